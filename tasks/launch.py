"""Several processes for one training stage: `rlhf stage NAME` re-runs itself under `accelerate launch`.

With `launch.num_processes: N > 1` in params.yaml, the `rlhf stage` process of a training stage
(what `dvc repro`, the Prefect flow and a user all run) takes the stage lock, then starts

    python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines 1
        --main_process_port PORT [--config_file F] -m flows.cli stage NAME --params P --project-dir D

with `LAUNCHED_ENV` set, so the N children run the stage instead of launching again. It waits for
them, passes a SIGTERM on to the children (so they checkpoint the same step and stop; see
`stage_processes`) and returns the launcher's exit code. With N = 1 nothing is launched.

`--multi_gpu` is accelerate's torchrun launcher: on a CPU-only host it starts N gloo processes
(accelerate 1.15's `--cpu --num_processes N` starts one). With a config file (FSDP, DeepSpeed) the
file names the distributed type, so `--multi_gpu` is left out (accelerate refuses both).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from rlhf_core.errors import ConfigError

LAUNCHED_ENV = "RLHF_LAUNCHED"
"""Set in the children of a launch: they run the stage, they never launch again."""


def in_child() -> bool:
    """Whether this process is one of the processes `accelerate launch` started for a stage."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def is_main_rank() -> bool:
    """Rank 0 of a launch (torchrun sets `RANK`), or a process that was not launched."""
    return os.environ.get("RANK", "0") == "0"


def free_port() -> int:
    """A TCP port nobody listens on now: the rendezvous of one launch, so two launches on one host
    never meet on torchrun's default 29500 (and no port lives in params.yaml, where a change would
    re-run the stages)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(cfg, stage: str, params_file: str, root: Path, port: int) -> list[str]:
    """The argv that runs `stage` in `cfg.num_processes` processes (`cfg`: tasks.params.LaunchConfig)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.config_file:
        config = Path(cfg.config_file) if Path(cfg.config_file).is_absolute() else root / cfg.config_file
        if not config.is_file():
            raise ConfigError("launch.config_file", f"{config} does not exist (an accelerate config file, e.g. "
                                                    "from `accelerate config`)", "params.yaml")
        cmd += ["--config_file", str(config)]
    else:
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(cfg.num_processes), "--num_machines", "1", "--main_process_port", str(port),
            "-m", "flows.cli", "stage", stage, "--params", params_file, "--project-dir", str(root)]
    return cmd


def stage_processes(launcher_pid: int) -> list:
    """The processes a SIGTERM is passed on to: the launched stage processes (the launcher's
    children), each of which checkpoints and exits, after which the launcher exits; the launcher
    itself only while it has no children yet. Not the launcher and its children both: torchrun
    passes a signal on to its children itself, and a second one while it waits for them could end
    it before them (`rlhf run`'s stop signals every stage process, the launcher included, anyway)."""
    try:
        launcher = psutil.Process(launcher_pid)
        return launcher.children() or [launcher]
    except psutil.Error:  # it has ended
        return []


def run_launched(cmd: list[str], env: dict) -> tuple[int, int | None]:
    """Run the launcher and wait; a SIGTERM meanwhile is passed on to it. Returns (exit code, the
    signal passed on or None). The previous SIGTERM handler is restored afterwards."""
    proc = subprocess.Popen(cmd, env={**env, LAUNCHED_ENV: "1"})
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        for target in stage_processes(proc.pid):
            try:
                target.send_signal(signum)
            except psutil.Error:  # ended meanwhile
                pass

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if main_thread else None
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reaches the whole foreground group; wait for the children
                continue
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return rc, (forwarded[0] if forwarded else None)
