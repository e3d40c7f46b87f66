"""Issue 10's acceptance: `dvc repro` with `launch.num_processes: 2` runs every training stage in two
processes on CPU (`accelerate launch --multi_gpu`, gloo), and afterwards `dvc status` is clean,
each trained stage has exactly one registered model version, and each stage has exactly one
MLflow run in the experiment (only the main process tracks)."""
from __future__ import annotations

import json

import pytest
from conftest import TINY, dvc, project_repo

pytestmark = pytest.mark.slow

STEPS = {s: {**TINY[s], "max_steps": 2, "save_every": 0, "eval_every": 2} for s in ("pt", "sft", "rm", "dpo")}
CHEAP = {**TINY, **STEPS, "ppo": {**TINY["ppo"], "max_steps": 1, "save_every": 0},
         "launch": {"num_processes": 2}}


def test_dvc_repro_runs_every_training_stage_in_two_processes(tmp_path):
    import mlflow

    from tasks.layout import JUDGE, STAGE_NAMES, TRAINED, run_record
    from tasks.stages import NO_JUDGE

    root = project_repo(tmp_path, CHEAP)
    out = dvc(root, "repro")
    trained = [s for s in TRAINED if s != JUDGE]  # the demo has no judge split: judge records that, trains nothing
    assert (root / "models" / JUDGE / NO_JUDGE).exists()
    for stage in trained:
        assert f"{stage}: launching 2 processes" in out, out[-3000:]
        record = json.loads((root / run_record(stage)).read_text())
        assert record["num_processes"] == 2, (stage, record)  # what the loop's accelerator saw
    assert f"{JUDGE}: launching" not in out

    assert "Data and pipelines are up to date" in dvc(root, "status")

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    for stage in trained:
        versions = client.search_model_versions(f"name='rlhf-{stage}'")
        assert len(versions) == 1, (stage, [v.version for v in versions])
    assert client.search_model_versions(f"name='rlhf-{JUDGE}'") == []
    exp = client.get_experiment_by_name("rlhf-pipeline")
    runs = client.search_runs([exp.experiment_id], "tags.`rlhf.kind` = 'stage'", max_results=1000)
    per_stage = {s: [r.info.run_id for r in runs if r.data.tags["rlhf.stage"] == s] for s in STAGE_NAMES}
    assert {s: len(ids) for s, ids in per_stage.items()} == {s: 1 for s in STAGE_NAMES}
    for stage in trained:  # the stage's run saw the launch group among its params
        run = client.get_run(per_stage[stage][0])
        assert run.data.params["launch.num_processes"] == "2" and run.info.status == "FINISHED"
