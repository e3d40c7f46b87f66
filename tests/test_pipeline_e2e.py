"""One real end-to-end run on tiny sizes: the Prefect flow (ephemeral API) runs every stage
through DVC in a real git repo, with MLflow on SQLite. Then DVC's staleness is checked."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "demo": {"n_pt_docs": 80, "n_sft": 96, "n_preferences": 96, "n_prompts": 32, "n_eval_prompts": 6},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "vocab_size": 320},
    "tokenize": {"max_length": 64, "block_size": 32, "max_prompt_length": 24, "max_response_length": 32},
    **{s: {"max_steps": 4, "batch_size": 8, "save_every": 2, "eval_every": 2, "warmup_steps": 1}
       for s in ("pt", "sft", "rm", "dpo")},
    "ppo": {"max_steps": 2, "batch_size": 4, "rollout_batch_size": 8, "save_every": 1, "warmup_steps": 1,
            "max_new_tokens": 6},
    "evaluate": {"num_samples": 2, "max_new_tokens": 6, "promotion_margin": -1.0},
}


def _git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def _dvc(cwd, *args) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RLHF_PARENT_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def set_params(path: Path, overrides: dict) -> None:
    p = yaml.safe_load(path.read_text())
    for group, values in overrides.items():
        p[group].update(values)
    path.write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the committed project files in a fresh git repo, with tiny params."""
    dst = tmp_path_factory.mktemp("project")
    for rel in _git(ROOT, "ls-files").splitlines():
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    set_params(dst / "params.yaml", TINY)
    _git(dst, "init", "-q", "-b", "main")
    _git(dst, "add", "-A")
    _git(dst, "commit", "-qm", "tiny project")
    return dst


@pytest.fixture(scope="module")
def flow_run(project, prefect_server):
    from flows.pipeline import pipeline

    records = pipeline(project_dir=str(project))
    return records


def test_flow_runs_every_stage_and_dvc_lock_is_current(project, flow_run):
    from tasks.layout import STAGE_NAMES

    assert [r["stage"] for r in flow_run] == list(STAGE_NAMES)
    assert all(r["status"] == "ran" for r in flow_run), flow_run
    assert "up to date" in _dvc(project, "status")
    eval_metrics = json.loads((project / "metrics/eval.json").read_text())
    for model in ("sft", "dpo", "ppo"):
        assert 0.0 <= eval_metrics[model]["oracle_score"] <= 1.0
    assert eval_metrics["sft"]["win_rate_vs_sft"] == 0.5
    assert (project / "plots/eval/comparison.png").stat().st_size > 1000


def test_registry_versions_carry_lineage_back_to_the_data(project, flow_run):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    chain = []
    mv = client.get_model_version_by_alias("rlhf-dpo", "candidate")
    while True:
        chain.append(mv.name)
        for tag in ("source_run", "data_hash", "dvc_deps_hash", "git_commit", "upstream_model"):
            assert mv.tags.get(tag), (mv.name, tag)
        if mv.tags["upstream_model"] == "none":
            break
        name, version = mv.tags["upstream_model"].split("/")
        mv = client.get_model_version(name, version)
    assert chain == ["rlhf-dpo", "rlhf-sft", "rlhf-pt"]
    tokenized = json.loads((project / "metrics/tokenize.json").read_text())
    assert tokenized["datasets"]["pt"]["train"]["records_out"] > 0
    # the champion alias is set because the tiny run's promotion margin is -1
    assert client.get_model_version_by_alias("rlhf-ppo", "candidate").tags["upstream_model"].startswith("rlhf-sft/")
    # one parent run with a child run per stage
    runs = mlflow.search_runs(experiment_names=["rlhf-pipeline"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("rlhf.kind") == "pipeline"]
    assert len(parents) == 1
    children = {r.data.tags["rlhf.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert children == set(flow_run[i]["stage"] for i in range(len(flow_run)))
    # the registered checkpoint loads back into transformers
    from transformers import AutoModelForCausalLM
    path = mlflow.artifacts.download_artifacts("models:/rlhf-dpo@candidate")
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == TINY["model"]["hidden_size"]


def test_second_repro_does_nothing_and_beta_reruns_only_dpo_and_evaluate(project, flow_run):
    out = _dvc(project, "repro")
    assert "Running stage" not in out
    set_params(project / "params.yaml", {"dpo": {"beta": 0.2}})
    out = _dvc(project, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"dpo", "evaluate"}
    assert "up to date" in _dvc(project, "status")


def test_next_flow_run_after_repro_retrains_nothing(project, flow_run):
    from flows.pipeline import pipeline

    _dvc(project, "repro")
    records = pipeline(project_dir=str(project))
    assert {r["status"] for r in records} == {"skipped"}
