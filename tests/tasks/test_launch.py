"""The `launch` group: checked at parse naming the key, the launcher's argv, and the parent's
handling of the launched processes (SIGTERM passed on, exit code passed back). The real
two-process `dvc repro` is tests/test_launch_e2e.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhf_core.errors import ConfigError
from tasks import launch
from tasks.params import LaunchConfig, parse_params


@pytest.mark.parametrize("raw, key, rule", [
    ({"num_processes": 0}, "launch.num_processes", "must be >= 1"),
    ({"num_processes": "2"}, "launch.num_processes", "must be int"),
    ({"config_file": "fsdp.yaml"}, "launch.config_file", "only with num_processes > 1"),
    ({"processes": 2}, "launch.processes", "unknown key"),
])
def test_a_bad_launch_group_names_the_key(raw, key, rule):
    with pytest.raises(ConfigError) as info:
        parse_params({"launch": raw})
    assert info.value.key == key and rule in str(info.value)


def test_the_default_is_one_process():
    assert parse_params({}).launch == LaunchConfig(num_processes=1, config_file="")


def test_the_command_runs_the_same_stage_under_torchrun_or_the_config_file(tmp_path):
    cmd = launch.launch_command(LaunchConfig(num_processes=3), "sft", "params.yaml", tmp_path, 4321)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    rest = cmd[3:]
    assert rest == ["--multi_gpu", "--num_processes", "3", "--num_machines", "1", "--main_process_port", "4321",
                    "-m", "flows.cli", "stage", "sft", "--params", "params.yaml", "--project-dir", str(tmp_path)]
    (tmp_path / "fsdp.yaml").write_text("distributed_type: FSDP\n")
    cmd = launch.launch_command(LaunchConfig(num_processes=2, config_file="fsdp.yaml"), "dpo", "params.yaml",
                                tmp_path, 1)
    # accelerate refuses --multi_gpu together with a config file's FSDP/DeepSpeed type
    assert "--multi_gpu" not in cmd and cmd[3:5] == ["--config_file", str(tmp_path / "fsdp.yaml")]


def test_a_missing_config_file_is_named_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError) as info:
        launch.launch_command(LaunchConfig(num_processes=2, config_file="nope.yaml"), "sft", "params.yaml",
                              tmp_path, 1)
    assert info.value.key == "launch.config_file" and str(tmp_path / "nope.yaml") in str(info.value)


def test_the_exit_code_of_the_launched_processes_comes_back_and_they_see_the_marker(tmp_path):
    script = f"import os, sys; open({str(tmp_path / 'env')!r}, 'w').write(os.environ.get({launch.LAUNCHED_ENV!r}, '')); sys.exit(7)"
    rc, signum = launch.run_launched([sys.executable, "-c", script], dict(os.environ))
    assert (rc, signum) == (7, None)
    assert (tmp_path / "env").read_text() == "1"


def test_sigterm_to_the_parent_reaches_the_launched_processes(tmp_path):
    """A parent process runs `run_launched` on a stand-in launcher whose child checkpoints on SIGTERM
    (writes a file) and exits 143. SIGTERM to the parent must reach that child, not the launcher
    (which would die of it, orphaning the child), and the parent reports both."""
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import signal, sys, time
        def stop(signum, frame):
            open({str(tmp_path / 'checkpointed')!r}, 'w').write('yes')
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        open({str(tmp_path / 'started')!r}, 'w').write('yes')
        time.sleep(60)
    """))
    parent = textwrap.dedent(f"""
        import os, sys
        from tasks import launch
        launcher = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, {str(child)!r}]))"
        print(launch.run_launched([sys.executable, "-c", launcher], dict(os.environ)), flush=True)
    """)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env, stdout=subprocess.PIPE, text=True)
    for _ in range(300):  # the child is up once it wrote `started` (bounded wait, not a timed assertion)
        if (tmp_path / "started").exists():
            break
        time.sleep(0.1)
    assert (tmp_path / "started").exists()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert out.strip() == f"(143, {int(signal.SIGTERM)})"
    assert (tmp_path / "checkpointed").read_text() == "yes"
