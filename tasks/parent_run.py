"""The parent MLflow run of a pipeline run: the unit two pipeline runs are compared by.

It carries every resolved param (`group.key`), the headline metrics, the tags that say what ran
(git commit, DVC stage versions, data hashes, stages ran/skipped, Prefect flow run), the input
datasets, the evaluation table and the comparison chart. Stages that DVC skipped still contribute
their metrics, copied from the files their last run wrote and tagged `rlhf.reused.<stage>`.

Headline metric names (one place; `rlhf compare` and the tests read them back):

    eval/<model>/{judge_score,win_rate_vs_sft,kl_to_sft,mean_length}   from metrics/eval.json
    rm/heldout_accuracy                                                 from metrics/eval.json
    <stage>/final_train_loss, <stage>/final_eval_loss                   from metrics/<stage>.json
    time/<stage>_seconds                                                from reports/runs/<stage>.json
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tasks import layout, tracking

EVAL_KEYS = ("judge_score", "win_rate_vs_sft", "kl_to_sft", "mean_length")
EVAL_MODELS = layout.POLICIES
TRAIN_LOSS_KEYS = ("train/loss", "loss/policy_avg")
"""The final train loss of a stage: its `train/loss`, or PPO's mean policy loss."""
EVAL_LOSS_KEY = "eval/loss"
DVC_EXP_ENV = "DVC_EXP_NAME"
"""Set by DVC in the stages of `dvc exp run` (checked: `dvc exp run -n NAME` sets it to NAME)."""
NAME_DIFFS = 3
"""At most this many changed params are spelled out in a run name."""
VIEW_KEY = "headline"
"""The experiment's shared view of the runs table with the headline metric columns: the UI opens it
at `#/experiments/<id>/runs?viewStateShareKey=headline` (it reads the experiment tag
`mlflow.sharedViewState.headline`, the tag its own Share button writes)."""
VIEW_METRICS = ("eval/dpo/judge_score", "eval/ppo/judge_score", "eval/sft/judge_score", "eval/dpo/win_rate_vs_sft",
                "eval/ppo/win_rate_vs_sft", "eval/dpo/kl_to_sft", "eval/ppo/kl_to_sft", "rm/heldout_accuracy",
                "dpo/final_train_loss", "time/dpo_seconds")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --- what the parent holds -------------------------------------------------------------------

def resolved_params(p) -> dict[str, str]:
    """Every group of the resolved `Params` flattened to `group.key` -> str, secrets masked."""
    from dataclasses import asdict, fields

    return tracking.redact(tracking.flatten("", {f.name: asdict(getattr(p, f.name)) for f in fields(p)}))


def eval_metrics(report: dict) -> dict[str, float]:
    """Headline metrics of `metrics/eval.json`: per model its judge score, win rate vs SFT, KL to SFT
    and length, and the RM's held-out accuracy."""
    out = {}
    for model in EVAL_MODELS:
        for key in EVAL_KEYS:
            value = _number(report.get(model, {}).get(key))
            if value is not None:
                out[f"eval/{model}/{key}"] = value
    accuracy = _number(report.get("rm", {}).get("accuracy"))
    if accuracy is not None:
        out["rm/heldout_accuracy"] = accuracy
    return out


def train_metrics(stage: str, result: dict) -> dict[str, float]:
    """A trained stage's final train and eval loss, from its `metrics/<stage>.json`."""
    m = result.get("metrics", {})
    out = {}
    for key in TRAIN_LOSS_KEYS:
        if _number(m.get(key)) is not None:
            out[f"{stage}/final_train_loss"] = float(m[key])
            break
    if _number(m.get(EVAL_LOSS_KEY)) is not None:
        out[f"{stage}/final_eval_loss"] = float(m[EVAL_LOSS_KEY])
    return out


def stage_metrics(root: Path, stage: str) -> dict[str, float]:
    """The headline metrics a stage's last run left on disk (they are DVC outputs, so they belong
    to the outputs DVC considers current), plus the seconds that run took."""
    spec = layout.SPECS[stage]
    if stage == layout.EVALUATE:
        out = eval_metrics(_read_json(root / spec.metrics))
    elif spec.trains:
        out = train_metrics(stage, _read_json(root / spec.metrics))
    else:
        out = {}
    seconds = _number(_read_json(root / layout.run_record(stage)).get("stage_seconds"))
    if seconds is not None:
        out[f"time/{stage}_seconds"] = seconds
    return out


def evaluation_rows(report: dict) -> list[dict]:
    """The evaluation as table rows: one per (model, example prompt), the model's metrics repeated
    beside the prompt, its greedy answer and one sampled answer with their judge scores."""
    rows = []
    for model in EVAL_MODELS:
        if model not in report:
            continue
        metrics = {k: v for k, v in report[model].items() if _number(v) is not None}
        examples = report.get("examples", {}).get(model) or [{}]
        for ex in examples:
            rows.append({"model": model, **metrics, "prompt": ex.get("prompt", ""), "greedy": ex.get("greedy", ""),
                         "greedy_score": ex.get("greedy_score"), "sample": ex.get("sample", ""),
                         "sample_score": ex.get("sample_score")})
    return rows


def data_hashes(root: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, md5) of the input data files (the validate stage's data deps) and of the
    tokenized data (`tokenized`), as DVC recorded them in dvc.lock; {} before any run."""
    lock = layout.read_lock(root)
    out = {}
    for entry in lock.get(layout.producer(layout.VALIDATION_REPORT), {}).get("deps", []):
        if entry.get("md5") and not entry["path"].endswith(".py"):
            out[Path(entry["path"]).name] = (entry["path"], entry["md5"])
    for entry in lock.get(layout.producer(layout.TOKENIZED), {}).get("outs", []):
        if entry.get("md5") and entry["path"] == layout.TOKENIZED:
            out["tokenized"] = (entry["path"], entry["md5"])
    return out


def changed_params(now: dict[str, str], before: dict[str, str]) -> list[str]:
    """`key=value` for each param that differs from `before` (sorted by key)."""
    keys = sorted(set(now) | set(before))
    return [f"{k}={now.get(k, '-')}" for k in keys if now.get(k) != before.get(k)]


def run_name(changes: list[str] | None, exp_name: str | None, fallback: str | None) -> str:
    """The `dvc exp` name if there is one, else what changed since the previous pipeline run."""
    if exp_name:
        return exp_name
    if changes is None:
        what = "first run"
    elif not changes:
        what = "no param change"
    else:
        extra = len(changes) - NAME_DIFFS
        what = ", ".join(changes[:NAME_DIFFS]) + (f" +{extra} more" if extra > 0 else "")
    return f"{what} · {fallback}" if fallback else what


def headline_view(changed: list[str]) -> str:
    """The runs-table state of the shared view (JSON): run name, dataset, the params in `changed`
    and the `VIEW_METRICS` columns, in that order (column ids as the UI writes them)."""
    columns = ["attributes.`Dataset`", *[f"params.`{k}`" for k in changed], *[f"metrics.`{k}`" for k in VIEW_METRICS]]
    return json.dumps({"selectedColumns": columns, "columnOrder": [], "runsExpanded": {}, "runsHidden": [],
                       "viewMaximized": False, "runListHidden": False})


# --- MLflow ----------------------------------------------------------------------------------

def previous_params(experiment_id: str) -> dict[str, str] | None:
    """The params of the newest earlier pipeline parent run, or None if there is none."""
    import mlflow

    runs = tracking.retry(mlflow.search_runs, [experiment_id], filter_string="tags.`rlhf.kind` = 'pipeline'",
                          order_by=["attributes.start_time DESC"], max_results=5, output_format="list")
    for run in runs:
        if run.data.params:
            return dict(run.data.params)
    return None


def create(root: Path, experiment_id: str, p, launcher: str, tags: dict[str, str], fallback_name: str | None) -> str:
    """Create the parent run with its name, params (`p`: the resolved `Params`, or None) and launch
    tags; returns its id."""
    import mlflow
    from mlflow.entities import Param

    params = resolved_params(p) if p is not None else {}
    before = previous_params(experiment_id)
    changes = None if before is None else changed_params(params, before)
    name = run_name(changes, os.environ.get(DVC_EXP_ENV), fallback_name)
    all_tags = {"rlhf.kind": "pipeline", "rlhf.launcher": launcher, "git_commit": tracking.git_commit(root),
                "rlhf.changed_params": "; ".join(changes) if changes else ("first run" if changes is None else "none"),
                **tags}
    if os.environ.get(DVC_EXP_ENV):
        all_tags["dvc.exp_name"] = os.environ[DVC_EXP_ENV]
    client = mlflow.MlflowClient()
    changed_keys = [c.split("=", 1)[0] for c in changes or []]
    tracking.retry(client.set_experiment_tag, experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}",
                   headline_view(changed_keys))
    run = tracking.retry(client.create_run, experiment_id, run_name=name, tags=all_tags)
    tracking.retry(client.log_batch, run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


def ran_stages_of(parent_id: str, experiment_id: str) -> set[str]:
    """Stages that have a child run under `parent_id` (the ones that ran in this pipeline run)."""
    import mlflow

    runs = tracking.retry(mlflow.search_runs, [experiment_id], output_format="list",
                          filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.data.tags["rlhf.stage"] for r in runs if r.data.tags.get("rlhf.stage")}


def finish(root: Path, parent_id: str, statuses: dict[str, str], status: str = "FINISHED") -> dict[str, float]:
    """Fill the parent run from what the stages left on disk and end it with `status`.

    `statuses`: stage -> "ran" or "skipped", in DAG order (stages that did not get to run are left
    out). The metrics of skipped stages are copied in and tagged `rlhf.reused.<stage>` with the run
    they came from. Returns the metrics logged."""
    import mlflow

    metrics, tags = {}, {}
    lock = layout.read_lock(root)
    for stage, state in statuses.items():
        found = stage_metrics(root, stage)
        metrics.update(found)
        tags[f"dvc.stage_version.{stage}"] = tracking.stage_version(lock.get(stage, {}))
        if state == "skipped" and found:
            source = _read_json(root / layout.run_record(stage)).get("mlflow_run_id", "unknown")
            tags[f"rlhf.reused.{stage}"] = f"metrics {', '.join(sorted(found))} copied from run {source}"
    tags["rlhf.stages.ran"] = ",".join(s for s, v in statuses.items() if v == "ran") or "none"
    tags["rlhf.stages.skipped"] = ",".join(s for s, v in statuses.items() if v == "skipped") or "none"
    reused = [s for s, v in statuses.items() if v == "skipped" and f"rlhf.reused.{s}" in tags]
    tags["rlhf.reused_stages"] = ",".join(reused) or "none"
    judge = _read_json(root / layout.EVAL_METRICS).get("judge") if layout.EVALUATE in statuses else None
    if isinstance(judge, str):
        tags["rlhf.judge"] = judge  # who gave the eval/<model>/judge_score numbers
    hashes = data_hashes(root)
    tags.update({f"data.md5.{name}": md5 for name, (_, md5) in hashes.items()})
    with tracking.retry(mlflow.start_run, run_id=parent_id):
        tracking.retry(mlflow.set_tags, tags)
        if metrics:
            tracking.retry(mlflow.log_metrics, metrics)
        for name, (path, md5) in hashes.items():
            _log_input(root / path, name, md5)
        if layout.EVALUATE in statuses:
            _log_evaluation(root)
        mlflow.end_run(status=status)
    return metrics


def _log_input(path: Path, name: str, digest: str) -> None:
    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    source = HTTPDatasetSource(url=path.resolve().as_uri())
    tracking.retry(mlflow.log_input, MetaDataset(source=source, name=name, digest=digest.removesuffix(".dir")[:32]),
                   context="tokenized" if name == "tokenized" else "training")


def _log_evaluation(root: Path) -> None:
    """The evaluation table (`mlflow.log_table`) and the comparison chart (`mlflow.log_image`)."""
    import mlflow
    import pandas as pd

    rows = evaluation_rows(_read_json(root / layout.EVAL_METRICS))
    if rows:
        tracking.retry(mlflow.log_table, pd.DataFrame(rows), artifact_file="eval/evaluation_table.json")
    chart = root / layout.EVAL_CHART
    if chart.exists():
        from PIL import Image

        with Image.open(chart) as img:
            tracking.retry(mlflow.log_image, img.convert("RGB"), artifact_file="eval/comparison.png")
