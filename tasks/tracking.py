"""MLflow: one parent run per pipeline run, one child run per stage, datasets as inputs, and a
registered model per trained stage whose version tags walk the lineage back to the data.

Default store: `sqlite:///<project>/mlflow.db` (git-ignored); `MLFLOW_TRACKING_URI` overrides it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rlhf_core.errors import RLHFError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")

PARENT_ENV = "RLHF_PARENT_RUN_ID"
FLOW_RUN_ENV = "RLHF_PREFECT_FLOW_RUN_ID"
LINEAGE_FILE = "lineage.json"
STEP_DELAY = float(os.environ.get("RLHF_TEST_STEP_DELAY", "0"))
ATTEMPTS = int(os.environ.get("RLHF_TRACKING_ATTEMPTS", "4"))
SECRET_WORDS = ("token", "password", "secret", "api_key", "apikey", "credential", "private_key")


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
        exp_id = retry(mlflow.create_experiment, experiment, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
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


def redact(params: dict) -> dict:
    """Drop values whose key looks like a secret, so they never reach logged params."""
    return {k: ("***" if any(w in k.lower() for w in SECRET_WORDS) else v) for k, v in params.items()}


def flatten(prefix: str, obj) -> dict[str, str]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else k, v))
        return out
    return {prefix: str(obj)[:500]}


def _pipeline_key(root: Path) -> str:
    params = (root / "params.yaml").read_bytes() if (root / "params.yaml").exists() else b""
    return hashlib.sha256(git_commit(root).encode() + params).hexdigest()[:16]


def parent_run_id(root: Path, experiment_id: str) -> str:
    """The pipeline run this stage belongs to: the flow's (env), or one per (commit, params) for a
    bare `dvc repro`, so its stages still group under one parent."""
    import mlflow

    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = _pipeline_key(root)
    found = retry(mlflow.search_runs, [experiment_id], filter_string=f"tags.`rlhf.pipeline_key` = '{key}'",
                  max_results=1, output_format="list")
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    run = retry(client.create_run, experiment_id, run_name=f"dvc-repro-{key[:8]}",
                tags={"rlhf.pipeline_key": key, "rlhf.kind": "pipeline", "rlhf.launcher": "dvc",
                      "git_commit": git_commit(root)})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@contextmanager
def stage_run(root: Path, stage: str, experiment: str, params: dict) -> Iterator:
    """A child run for one stage; yields the active run."""
    import mlflow

    exp_id = setup(root, experiment)
    parent = parent_run_id(root, exp_id)
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
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    digest = file_hash(path)
    source = HTTPDatasetSource(url=Path(path).resolve().as_uri())
    retry(mlflow.log_input, MetaDataset(source=source, name=name, digest=digest[:32]), context=context)
    return digest


def log_file(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    if Path(path).exists():
        retry(mlflow.log_artifact, str(path), artifact_path)


def upstream_version(model_dir: Path) -> dict | None:
    """What the model in `model_dir` was registered as (read from its lineage file)."""
    f = Path(model_dir) / LINEAGE_FILE
    return json.loads(f.read_text()) if f.exists() else None


def register(stage: str, model_dir: Path, prefix: str, run, tags: dict) -> dict:
    """Log `model_dir` (HF format) as the run's `model` artifact and register it as
    `<prefix>-<stage>`; the newest version gets alias `candidate`."""
    import mlflow

    client = mlflow.MlflowClient()
    name = f"{prefix}-{stage}"
    retry(mlflow.log_artifacts, str(model_dir), "model")
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        retry(client.create_registered_model, name, description=f"{stage} checkpoints of the RLHF pipeline (HF format)")
    source = f"{run.info.artifact_uri}/model"
    mv = retry(client.create_model_version, name, source, run_id=run.info.run_id,
               tags={k: str(v) for k, v in tags.items()})
    retry(client.set_registered_model_alias, name, "candidate", mv.version)
    return {"name": name, "version": str(mv.version), "run_id": run.info.run_id, "uri": f"models:/{name}/{mv.version}"}


def log_dict_artifact(data: dict, name: str) -> None:
    import mlflow

    retry(mlflow.log_dict, data, name)
