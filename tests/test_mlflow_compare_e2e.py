"""Two pipeline runs that differ in `dpo.beta`, compared through MLflow and `rlhf compare`.

The first run is the session's `e2e_flow_run`; the second, with another `dpo.beta`, runs in this
file's own copy of its project (git repo, DVC cache, outputs, MLflow store), where DVC reruns only
`dpo` and `evaluate` and skips the rest."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT, set_params

pytestmark = pytest.mark.slow

SECOND_BETA = 0.3
TRAINED = ("pt", "sft", "rm", "dpo", "ppo")
"""The stages that train on the tiny demo (the judge stage trains nothing without a judge split)."""


def _client(project):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.MlflowClient()


@pytest.fixture(scope="module")
def two_runs(e2e_project, e2e_flow_run):
    """(project copy, first parent run id, second parent run id, second flow's records)."""
    from flows.pipeline import pipeline

    first_child = next(r["mlflow_run"] for r in e2e_flow_run if r["stage"] == "generate")
    project = e2e_project  # this file's own copy of the session's flow run
    first = _client(project).get_run(first_child).data.tags["mlflow.parentRunId"]
    set_params(project / "params.yaml", {"dpo": {"beta": SECOND_BETA}, "data": {"sft": "data/demo/sft.jsonl"}})
    records = pipeline(project_dir=str(project))
    second_child = next(r["mlflow_run"] for r in records if r["stage"] == "dpo")
    second = _client(project).get_run(second_child).data.tags["mlflow.parentRunId"]
    return project, first, second, records


def test_second_run_reran_only_dpo_and_evaluate(two_runs):
    _, _, _, records = two_runs
    assert {r["stage"] for r in records if r["status"] == "ran"} == {"dpo", "evaluate"}


def test_both_parents_carry_every_param_and_the_headline_metrics(two_runs):
    from tasks.layout import STAGE_NAMES
    from tasks.params import load_params
    from tasks.parent_run import EVAL_KEYS, EVAL_MODELS, resolved_params

    project, first, second, _ = two_runs
    client = _client(project)
    a, b = client.get_run(first), client.get_run(second)
    exp = client.get_experiment(a.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["mlflow.note.content"]
    view = json.loads(exp.tags["mlflow.sharedViewState.headline"])  # what scripts/mlflow_screenshot.sh opens
    assert "params.`dpo.beta`" in view["selectedColumns"] and "metrics.`eval/dpo/judge_score`" in view["selectedColumns"]
    resolved = resolved_params(load_params(project / "params.yaml"))
    assert b.data.params == resolved
    assert set(a.data.params) == set(resolved) and len(resolved) > 60
    assert a.data.params["dpo.beta"] == "0.1" and b.data.params["dpo.beta"] == str(SECOND_BETA)
    assert {k for k in resolved if a.data.params[k] != b.data.params[k]} == {"dpo.beta"}
    headline = ({f"eval/{m}/{k}" for m in EVAL_MODELS for k in EVAL_KEYS} | {"rm/heldout_accuracy"}
                | {f"{s}/final_train_loss" for s in TRAINED} | {"pt/final_eval_loss", "sft/final_eval_loss"}
                | {f"time/{s}_seconds" for s in STAGE_NAMES})
    for run in (a, b):
        assert headline <= set(run.data.metrics), headline - set(run.data.metrics)
        assert run.data.tags["rlhf.kind"] == "pipeline" and run.data.tags["prefect.flow_run_id"]
        assert run.data.tags["git_commit"] != "unknown"
        assert {f"dvc.stage_version.{s}" for s in STAGE_NAMES} <= set(run.data.tags)
        assert {"data.md5.pt.txt", "data.md5.sft.jsonl", "data.md5.tokenized"} <= set(run.data.tags)
        assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {"pt.txt", "preferences.jsonl", "tokenized"}
        artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
        assert artifacts == {"eval/evaluation_table.json", "eval/comparison.png"}
    assert a.info.run_name.startswith("first run · ")  # the session's first flow run
    assert b.info.run_name.startswith(f"dpo.beta={SECOND_BETA}")
    assert a.data.tags["dvc.stage_version.dpo"] != b.data.tags["dvc.stage_version.dpo"]
    assert a.data.tags["dvc.stage_version.sft"] == b.data.tags["dvc.stage_version.sft"]


def test_the_second_parent_carries_the_skipped_stages_metrics_tagged_as_reused(two_runs):
    from tasks.layout import STAGE_NAMES

    project, first, second, _ = two_runs
    client = _client(project)
    a, b = client.get_run(first), client.get_run(second)
    skipped = [s for s in STAGE_NAMES if s not in ("dpo", "evaluate")]
    assert b.data.tags["rlhf.stages.ran"] == "dpo,evaluate"
    assert b.data.tags["rlhf.reused_stages"] == ",".join(skipped)
    for stage in skipped:
        assert f"time/{stage}_seconds" in b.data.tags[f"rlhf.reused.{stage}"]
    assert "rlhf.reused.dpo" not in b.data.tags and a.data.tags["rlhf.reused_stages"] == "none"
    for key in ("pt/final_train_loss", "sft/final_train_loss", "sft/final_eval_loss", "rm/final_train_loss",
                "ppo/final_train_loss"):
        assert b.data.metrics[key] == a.data.metrics[key], key


def test_each_registered_version_resolves_to_a_logged_model_with_metrics(two_runs):
    from tasks.tracking import logged_model_of

    project, _, second, _ = two_runs
    client = _client(project)
    versions = client.search_model_versions()
    assert {v.name for v in versions} == {f"rlhf-{s}" for s in TRAINED}
    for v in versions:
        model = client.get_logged_model(logged_model_of(v))
        assert model.source_run_id == v.run_id
        keys = {m.key for m in model.metrics}
        assert "train/loss" in keys or "loss/policy_avg" in keys, (v.name, keys)
        assert all(m.dataset_name and m.dataset_name.startswith("tokenized-") for m in model.metrics)
    newest_dpo = client.get_model_version_by_alias("rlhf-dpo", "candidate")
    assert client.get_run(newest_dpo.run_id).data.tags["mlflow.parentRunId"] == second


def test_rlhf_compare_prints_both_runs_with_the_differing_param_first(two_runs):
    project, first, second, _ = two_runs
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "compare", first, second, "--project-dir", str(project)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert first[:8] in lines[0] and second[:8] in lines[0]
    assert lines[1].startswith("params that differ") and lines[2].split() == ["dpo.beta", "0.1", str(SECOND_BETA)]
    assert lines[3].startswith("metrics") and "eval/dpo/judge_score" in proc.stdout
    assert lines[-1].startswith("winner: ")
    last = subprocess.run([sys.executable, "-m", "flows.cli", "compare", "--last", "1", "--project-dir", str(project)],
                          cwd=ROOT, capture_output=True, text=True)
    assert last.returncode == 0 and second[:8] in last.stdout.splitlines()[0]
