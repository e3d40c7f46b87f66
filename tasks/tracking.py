"""MLflow: one parent run per pipeline run, one child run per stage, datasets as inputs, and a
registered model per trained stage whose version tags walk the lineage back to the data.

Default store: `sqlite:///<project>/mlflow.db` (git-ignored); `MLFLOW_TRACKING_URI` overrides it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rlhf_core.errors import RLHFError
from tasks import layout

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")

PARENT_ENV = "RLHF_PARENT_RUN_ID"
FLOW_RUN_ENV = "RLHF_PREFECT_FLOW_RUN_ID"
LINEAGE_FILE = "lineage.json"
"""The MLflow artifact of a trained stage's run holding its lineage and registered version."""
STEP_DELAY = float(os.environ.get("RLHF_TEST_STEP_DELAY", "0"))
ATTEMPTS = int(os.environ.get("RLHF_TRACKING_ATTEMPTS", "4"))
SECRET_SUFFIXES = ("token", "secret", "password", "passwd", "key", "credential", "credentials")
"""A param is masked when the last component of its dotted name, lower-cased, ends with one of these:
`hub_token`, `db_password`, `api_key`, `aws_access_key` are; `max_new_tokens`, `tokenize.*`,
`block_size` are not."""
EXPERIMENT_TAGS = {
    # the UI opens a model-training view for this kind instead of the GenAI (traces) view
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "One **parent run per pipeline run** (`rlhf run`, `dvc repro` or `dvc exp run`): compare these rows. "
        "It is named after the `dvc exp` name, or the params that changed since the previous pipeline run, and holds "
        "every resolved param (`group.key`), the headline metrics (`eval/<model>/judge_score`, `win_rate_vs_sft`, "
        "`kl_to_sft`, `mean_length`; `rm/heldout_accuracy`; `<stage>/final_train_loss`, `final_eval_loss`; "
        "`time/<stage>_seconds`), tags (`git_commit`, `dvc.stage_version.*`, `data.md5.*`, `rlhf.stages.ran` / "
        "`skipped`, `prefect.flow_run_id` / `url`), the input datasets, the evaluation table and the comparison "
        "chart. Metrics of stages DVC skipped are copied from their last run and tagged `rlhf.reused.<stage>`.\n\n"
        "Under each parent, **one child run per stage** that ran, with its params and step metrics. Each trained "
        "stage registers a version of `rlhf-<stage>` linked to a LoggedModel with its metrics, source run and "
        "dataset. In a terminal: `rlhf compare --last 2`."),
}


# The user's choice, read before MLflow's own `set_tracking_uri` writes this variable.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(root: Path) -> str:
    return USER_TRACKING_URI or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def child_env(env: dict) -> dict:
    """Environment for a stage process: the project's own store unless the user chose one."""
    env = dict(env)
    if USER_TRACKING_URI:
        env["MLFLOW_TRACKING_URI"] = USER_TRACKING_URI
    else:
        env.pop("MLFLOW_TRACKING_URI", None)
    return env


def retry(fn, *args, attempts: int | None = None, base_delay: float = 1.0, **kwargs):
    """Call an MLflow (I/O) function with exponential backoff; training is never retried."""
    attempts = attempts or ATTEMPTS
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking errors come in many types
            if i == attempts - 1:
                raise TrackingUnavailable(f"MLflow call {getattr(fn, '__name__', fn)} failed {attempts} times: {e}") from e
            time.sleep(base_delay * 2 ** i)


class TrackingUnavailable(RLHFError):
    """MLflow stayed unreachable through every retry."""


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    exp = retry(mlflow.get_experiment_by_name, experiment)
    if exp is None:  # a local database keeps its artifacts beside it; a server decides for itself
        artifacts = (root / "mlruns").resolve().as_uri() if uri.startswith("sqlite:") else None
        exp_id = retry(mlflow.create_experiment, experiment, artifact_location=artifacts, tags=EXPERIMENT_TAGS)
    else:
        exp_id = exp.experiment_id
        for key, value in EXPERIMENT_TAGS.items():  # an experiment made before these tags existed
            if exp.tags.get(key) != value:
                retry(mlflow.MlflowClient().set_experiment_tag, exp_id, key, value)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents)."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def is_secret(name: str) -> bool:
    """The masking rule: the last component of the dotted name ends with a `SECRET_SUFFIXES` entry."""
    return name.rsplit(".", 1)[-1].lower().endswith(SECRET_SUFFIXES)


def redact(params: dict) -> dict:
    """Replace values whose key names a secret (`is_secret`), so they never reach logged params."""
    return {k: ("***" if is_secret(k) else v) for k, v in params.items()}


def stage_version(entry: dict) -> str:
    """Short hash of what DVC recorded for a stage in dvc.lock: its deps, params and outs."""
    import yaml

    return hashlib.sha256(yaml.safe_dump(entry, sort_keys=True).encode()).hexdigest()[:12] if entry else "-"


def flatten(prefix: str, obj) -> dict[str, str]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else k, v))
        return out
    return {prefix: str(obj)[:500]}


def _pipeline_key(root: Path, params_file: str | Path = "params.yaml") -> str:
    """One key per (git commit, params file content): the stages of one `dvc repro` share it."""
    path = root / params_file
    params = path.read_bytes() if path.exists() else b""
    return hashlib.sha256(git_commit(root).encode() + params).hexdigest()[:16]


def parent_run_id(root: Path, experiment_id: str, params_file: str | Path = "params.yaml") -> str:
    """The pipeline run this stage belongs to: the flow's (env), or one per (commit, params) for a
    bare `dvc repro`, so its stages still group under one parent."""
    import mlflow

    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = _pipeline_key(root, params_file)
    found = retry(mlflow.search_runs, [experiment_id], filter_string=f"tags.`rlhf.pipeline_key` = '{key}'",
                  max_results=1, output_format="list")
    if found:
        return found[0].info.run_id
    from tasks import parent_run
    from tasks.params import load_params

    try:
        p = load_params(root / params_file)
    except RLHFError:  # a stage run by hand on another params file: the parent goes without params
        p = None
    run_id = parent_run.create(root, experiment_id, p, "dvc", {"rlhf.pipeline_key": key}, f"dvc-repro-{key[:8]}")
    retry(mlflow.MlflowClient().set_terminated, run_id)
    return run_id


def finish_dvc_parent(root: Path, parent: str, experiment_id: str) -> None:
    """After the last stage of a bare `dvc repro` / `dvc exp run`: fill its parent run like the flow
    does (stages without a child run under it were skipped by DVC). Failing here fails no stage."""
    from tasks import parent_run

    try:
        ran = parent_run.ran_stages_of(parent, experiment_id)
        parent_run.finish(root, parent, {s: "ran" if s in ran else "skipped" for s in layout.STAGE_NAMES})
    except Exception as e:  # noqa: BLE001 - the stage's outputs are written; only the summary is missing
        print(f"warning: the pipeline's parent run {parent} was not filled in: {e}", file=sys.stderr)


@contextmanager
def stage_run(root: Path, stage: str, experiment: str, params: dict,
              params_file: str | Path = "params.yaml") -> Iterator:
    """A child run for one stage; yields the active run."""
    import mlflow

    exp_id = setup(root, experiment)
    parent = parent_run_id(root, exp_id, params_file)
    tags = {"mlflow.parentRunId": parent, "rlhf.stage": stage, "rlhf.kind": "stage", "git_commit": git_commit(root)}
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = os.environ[FLOW_RUN_ENV]
    run = retry(mlflow.start_run, experiment_id=exp_id, run_name=stage, tags=tags)
    try:
        retry(mlflow.log_params, redact(flatten("", params)))
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()
    if stage == layout.STAGE_NAMES[-1] and not os.environ.get(PARENT_ENV):
        finish_dvc_parent(root, parent, exp_id)


class MetricLogger:
    """The `log(metrics, step)` callback handed to rlhf_core: MLflow plus an in-memory history.

    If MLflow fails mid-training, the history is kept and training goes on; the stage reports it."""

    def __init__(self):
        self.history: list[dict] = []
        self.error: str | None = None

    def __call__(self, metrics: dict, step: int, record: bool = True) -> None:
        import mlflow

        if record:
            self.history.append({"step": step, **metrics})
        if STEP_DELAY:  # test hook: slows training so a test can kill it between two steps
            time.sleep(STEP_DELAY)
        if self.error is None:
            try:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
            except Exception as e:  # noqa: BLE001
                self.error = str(e)


def log_dataset(path: Path, name: str, context: str) -> str:
    """Record a dataset as a run input with its content hash; returns the hash."""
    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    digest = file_hash(path)
    source = HTTPDatasetSource(url=Path(path).resolve().as_uri())
    retry(mlflow.log_input, MetaDataset(source=source, name=name, digest=digest[:32]), context=context)
    return digest


def log_file(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    if Path(path).exists():
        retry(mlflow.log_artifact, str(path), artifact_path)


def upstream_version(run_record: Path) -> dict | None:
    """What the upstream stage's model was registered as (its `registered` entry, read from its run
    record, `reports/runs/<stage>.json`), or None if it registered nothing (e.g. PT switched off)."""
    f = Path(run_record)
    return (json.loads(f.read_text()).get("registered") or None) if f.exists() else None


def register(stage: str, model_dir: Path, prefix: str, run, tags: dict) -> dict:
    """Log `model_dir` (HF format) as an MLflow 3 LoggedModel of the stage's run, carrying the run's
    params and its latest metrics (linked to the run's training dataset), and register it as a
    version of `<prefix>-<stage>`; the newest version gets alias `candidate`."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    client = mlflow.MlflowClient()
    name = f"{prefix}-{stage}"
    tags = {k: str(v) for k, v in tags.items()}
    source_run = retry(client.get_run, run.info.run_id)
    model = retry(mlflow.initialize_logged_model, name=stage, source_run_id=run.info.run_id, tags=tags,
                  params=dict(source_run.data.params), model_type="hf-checkpoint",
                  experiment_id=run.info.experiment_id)
    retry(client.log_model_artifacts, model.model_id, str(model_dir))
    retry(mlflow.finalize_logged_model, model.model_id, LoggedModelStatus.READY)
    retry(client.log_batch, run.info.run_id, metrics=model_metrics(client, source_run, model.model_id))
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        retry(client.create_registered_model, name, description=f"{stage} checkpoints of the RLHF pipeline (HF format)")
    mv = retry(client.create_model_version, name, f"models:/{model.model_id}", run_id=run.info.run_id, tags=tags,
               model_id=model.model_id)
    retry(client.set_registered_model_alias, name, "candidate", mv.version)
    return {"name": name, "version": str(mv.version), "run_id": run.info.run_id, "uri": f"models:/{name}/{mv.version}",
            "model_id": model.model_id}


def model_metrics(client, run, model_id: str) -> list:
    """The run's latest value of each metric, at its own step, attributed to the LoggedModel and to
    the run's training dataset (the tokenized split it logged as input)."""
    from mlflow.entities import Metric

    inputs = run.inputs.dataset_inputs if run.inputs else []
    datasets = [d.dataset for d in inputs if d.dataset.name.startswith("tokenized-")] or [d.dataset for d in inputs]
    dataset = datasets[-1] if datasets else None
    out = []
    for key, value in run.data.metrics.items():
        history = retry(client.get_metric_history, run.info.run_id, key)
        step = max((m.step for m in history), default=0)
        out.append(Metric(key, value, int(time.time() * 1000), step, model_id=model_id,
                          dataset_name=dataset.name if dataset else None,
                          dataset_digest=dataset.digest if dataset else None))
    return out


def logged_model_of(version) -> str:
    """The LoggedModel id a registered version was made from (the SQL store keeps it in `source`)."""
    return version.model_id or version.source.removeprefix("models:/")


def log_dict_artifact(data: dict, name: str) -> None:
    import mlflow

    retry(mlflow.log_dict, data, name)
