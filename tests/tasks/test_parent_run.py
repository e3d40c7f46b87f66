"""The parent run of a pipeline run: headline metrics, reused metrics, name, tags, tables; and the
LoggedModel behind each registered version. Hand-built metrics files; a real SQLite MLflow store."""
import json

import pytest
import yaml

from tasks import layout, parent_run, tracking

EVAL = {"judge": "oracle", "rm": {"accuracy": 0.75, "judge_agreement": 0.5},
        "sft": {"judge_score": 0.5, "judge_score_greedy": 1.0, "win_rate_vs_sft": 0.5, "kl_to_sft": 0.0,
                "rm_score": 1.0, "mean_length": 7.0, "eos_rate": 0.5},
        "dpo": {"judge_score": 0.625, "judge_score_greedy": 1.0, "win_rate_vs_sft": 0.75, "kl_to_sft": 2.5,
                "rm_score": 2.0, "mean_length": 6.0, "eos_rate": 1.0},
        "ppo": {"judge_score": 0.875, "judge_score_greedy": 1.0, "win_rate_vs_sft": 0.875, "kl_to_sft": 1.25,
                "rm_score": 3.0, "mean_length": 5.0, "eos_rate": 1.0},
        "examples": {"sft": [{"prompt": "Capital of A?", "greedy": "B.", "greedy_score": 0.75,
                              "sample": "Hm", "sample_score": 0.25},
                             {"prompt": "Capital of C?", "greedy": "D.", "greedy_score": 0.75,
                              "sample": "D", "sample_score": 0.75}],
                     "dpo": [{"prompt": "Capital of A?", "greedy": "Sure! B.", "greedy_score": 1.0,
                              "sample": "Sure! B.", "sample_score": 1.0}]}}


def test_eval_headline_metrics_are_the_four_per_model_and_the_rm_accuracy():
    m = parent_run.eval_metrics(EVAL)
    assert len(m) == 3 * 4 + 1
    assert m["eval/ppo/judge_score"] == 0.875 and m["eval/dpo/kl_to_sft"] == 2.5
    assert m["eval/sft/win_rate_vs_sft"] == 0.5 and m["eval/sft/mean_length"] == 7.0
    assert m["rm/heldout_accuracy"] == 0.75
    assert "eval/ppo/rm_score" not in m and "eval/ppo/eos_rate" not in m


def test_final_losses_of_a_stage_and_ppos_policy_loss():
    assert parent_run.train_metrics("sft", {"metrics": {"train/loss": 1.5, "eval/loss": 2.0, "train/lr": 0.1}}) == \
        {"sft/final_train_loss": 1.5, "sft/final_eval_loss": 2.0}
    assert parent_run.train_metrics("ppo", {"metrics": {"loss/policy_avg": -0.25, "objective/kl": 3.0}}) == \
        {"ppo/final_train_loss": -0.25}
    assert parent_run.train_metrics("rm", {}) == {}


def test_evaluation_table_has_a_row_per_model_and_example_with_the_models_metrics():
    rows = parent_run.evaluation_rows(EVAL)
    assert [(r["model"], r["prompt"]) for r in rows] == [("sft", "Capital of A?"), ("sft", "Capital of C?"),
                                                          ("dpo", "Capital of A?"), ("ppo", "")]
    assert rows[2]["judge_score"] == 0.625 and rows[2]["greedy"] == "Sure! B." and rows[2]["sample_score"] == 1.0
    assert rows[3]["win_rate_vs_sft"] == 0.875  # a model without examples still gets its metrics row


def test_run_name_is_the_dvc_exp_name_else_what_changed():
    before = {"dpo.beta": "0.1", "sft.max_steps": "4", "demo.seed": "0"}
    now = {"dpo.beta": "0.3", "sft.max_steps": "4", "demo.seed": "0"}
    assert parent_run.changed_params(now, before) == ["dpo.beta=0.3"]
    assert parent_run.run_name(["dpo.beta=0.3"], None, "lucky-fox") == "dpo.beta=0.3 · lucky-fox"
    assert parent_run.run_name(["dpo.beta=0.3"], "pious-sack", "lucky-fox") == "pious-sack"
    assert parent_run.run_name(None, None, None) == "first run"
    assert parent_run.run_name([], None, "x") == "no param change · x"
    changes = [f"g.k{i}=1" for i in range(5)]
    assert parent_run.run_name(changes, None, None) == "g.k0=1, g.k1=1, g.k2=1 +2 more"
    assert parent_run.changed_params({"a.x": "1"}, {"a.y": "2"}) == ["a.x=1", "a.y=-"]


def test_the_shared_view_shows_the_changed_params_and_the_headline_metrics_as_columns():
    view = json.loads(parent_run.headline_view(["dpo.beta"]))
    assert view["selectedColumns"][:3] == ["attributes.`Dataset`", "params.`dpo.beta`", "metrics.`eval/dpo/judge_score`"]
    assert len(view["selectedColumns"]) == 2 + len(parent_run.VIEW_METRICS)
    assert set(parent_run.VIEW_METRICS) <= set(parent_run.eval_metrics(EVAL)) | {"dpo/final_train_loss", "time/dpo_seconds"}


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture()
def project(tmp_path):
    """Metrics files, run records and a dvc.lock as a pipeline run leaves them."""
    _write(tmp_path / layout.EVAL_METRICS, EVAL)
    for stage, loss in (("pt", 4.0), ("sft", 3.0), ("rm", 0.5), ("dpo", 0.25)):
        _write(tmp_path / layout.SPECS[stage].metrics, {"metrics": {"train/loss": loss, "eval/loss": loss + 1}})
    _write(tmp_path / layout.SPECS["ppo"].metrics, {"metrics": {"loss/policy_avg": 0.125}})
    for i, stage in enumerate(layout.STAGE_NAMES):
        _write(tmp_path / layout.run_record(stage), {"stage": stage, "mlflow_run_id": f"run-{stage}", "stage_seconds": i + 0.5})
    lock = {"schema": "2.0", "stages": {
        "validate": {"cmd": "rlhf stage validate", "deps": [{"path": "data/demo/pt.txt", "md5": "aa11"},
                                                           {"path": "tasks/validation.py", "md5": "cc"}]},
        "tokenize": {"cmd": "rlhf stage tokenize", "outs": [{"path": "data/tokenized", "md5": "bb22.dir"},
                                                           {"path": "models/tokenizer", "md5": "dd.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "data/demo").mkdir(parents=True)
    (tmp_path / "data/demo/pt.txt").write_text("x\n")
    from PIL import Image

    (tmp_path / "plots/eval").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "plots/eval/comparison.png")
    return tmp_path


def test_stage_metrics_and_data_hashes_come_from_the_files_the_stages_left(project):
    assert parent_run.stage_metrics(project, "dpo") == {"dpo/final_train_loss": 0.25, "dpo/final_eval_loss": 1.25,
                                                        "time/dpo_seconds": layout.STAGE_NAMES.index("dpo") + 0.5}
    assert parent_run.stage_metrics(project, "generate") == {"time/generate_seconds": 0.5}
    assert parent_run.stage_metrics(project, "evaluate")["eval/dpo/judge_score"] == 0.625
    assert parent_run.data_hashes(project) == {"pt.txt": ("data/demo/pt.txt", "aa11"),
                                               "tokenized": ("data/tokenized", "bb22.dir")}


@pytest.fixture()
def store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setattr(tracking, "USER_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield
    mlflow.set_tracking_uri(None)


def test_a_parent_that_skipped_stages_carries_their_metrics_tagged_as_reused(project, store, capsys):
    import mlflow

    from tasks.params import Params

    exp_id = tracking.setup(project, "t")
    assert mlflow.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    first = parent_run.create(project, exp_id, Params(), "prefect", {"prefect.flow_run_id": "f1"}, "calm-cat")
    statuses = {s: "ran" for s in layout.STAGE_NAMES}
    parent_run.finish(project, first, statuses)
    second = parent_run.create(project, exp_id, Params(), "prefect", {}, "bold-dog")
    skipped = [s for s in layout.STAGE_NAMES if s not in ("dpo", "evaluate")]
    statuses.update({s: "skipped" for s in skipped})
    logged = parent_run.finish(project, second, statuses)

    client = mlflow.MlflowClient()
    a, b = client.get_run(first), client.get_run(second)
    assert a.info.run_name == "first run · calm-cat" and b.info.run_name == "no param change · bold-dog"
    view = mlflow.get_experiment(exp_id).tags[f"mlflow.sharedViewState.{parent_run.VIEW_KEY}"]
    assert json.loads(view)["selectedColumns"][1] == "metrics.`eval/dpo/judge_score`"  # no param changed
    assert a.data.params == b.data.params and a.data.params["dpo.beta"] == "0.1" and len(a.data.params) > 60
    # 13 eval, train and eval loss of pt, sft, rm, dpo, ppo's train loss, the seconds of each stage
    assert b.data.metrics == a.data.metrics == logged and len(logged) == 13 + 4 * 2 + 1 + len(layout.STAGE_NAMES)
    assert "rlhf.reused.generate" not in a.data.tags and a.data.tags["rlhf.reused_stages"] == "none"
    assert b.data.tags["rlhf.stages.ran"] == "dpo,evaluate"
    assert b.data.tags["rlhf.reused_stages"] == ",".join(skipped) and b.data.tags["rlhf.judge"] == "oracle"
    assert b.data.tags["rlhf.reused.sft"] == ("metrics sft/final_eval_loss, sft/final_train_loss, time/sft_seconds "
                                              "copied from run run-sft")
    assert "rlhf.reused.dpo" not in b.data.tags
    assert a.data.tags["prefect.flow_run_id"] == "f1" and a.data.tags["data.md5.pt.txt"] == "aa11"
    assert a.data.tags["dvc.stage_version.tokenize"] == tracking.stage_version(layout.read_lock(project)["tokenize"])
    assert {d.dataset.name: d.dataset.digest for d in b.inputs.dataset_inputs} == {"pt.txt": "aa11", "tokenized": "bb22"}
    from flows.cli import main

    assert main(["compare", "--experiment", "t", "--project-dir", str(project)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "calm-cat" in out[0] and "bold-dog" in out[0] and out[2] == "  (none)"  # the same params
    assert any(line.split()[:3] == ["eval/ppo/judge_score", "0.875", "0.875"] for line in out)
    assert main(["compare", "bold-dog", "--experiment", "t", "--project-dir", str(project)]) == 2  # not a full name
    assert main(["compare", second, "--experiment", "t", "--project-dir", str(project)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("winner: no param change · bold-dog")
    assert {f.path for f in client.list_artifacts(second, "eval")} == {"eval/evaluation_table.json", "eval/comparison.png"}
    table = json.loads(mlflow.artifacts.load_text(f"{b.info.artifact_uri}/eval/evaluation_table.json"))
    assert len(table["data"]) == 4 and {"model", "judge_score", "prompt", "greedy", "sample"} <= set(table["columns"])


def test_a_registered_version_resolves_to_a_logged_model_with_the_runs_metrics(tmp_path, store):
    import mlflow

    exp_id = tracking.setup(tmp_path, "t")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_params({"sft.beta": "0.1"})
        mlflow.log_metrics({"train/loss": 2.0}, step=1)
        mlflow.log_metrics({"train/loss": 1.5, "eval/loss": 1.75}, step=2)
        digest = tracking.log_dataset(model_dir, "tokenized-sft", "training")
        first = tracking.register("sft", model_dir, "rlhf", run, {"source_run": run.info.run_id})
        second = tracking.register("sft", model_dir, "rlhf", run, {"source_run": run.info.run_id})
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("rlhf-sft", "candidate")
    assert str(mv.version) == second["version"] == "2" and first["version"] == "1"
    model = client.get_logged_model(tracking.logged_model_of(mv))
    assert model.model_id == second["model_id"] and model.source_run_id == run.info.run_id
    assert {m.key: m.value for m in model.metrics} == {"train/loss": 1.5, "eval/loss": 1.75}
    assert {(m.dataset_name, m.dataset_digest) for m in model.metrics} == {("tokenized-sft", digest[:32])}
    assert model.params == {"sft.beta": "0.1"} and model.tags["source_run"] == run.info.run_id
    # the run's curve keeps its shape: the model's copy of a metric sits at the metric's last step
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")][-1] == (2, 1.5)
    path = mlflow.artifacts.download_artifacts("models:/rlhf-sft@candidate", dst_path=str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "config.json").exists() and path
