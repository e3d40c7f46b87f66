"""The end-to-end Prefect flow. Each stage is a Prefect task that runs `dvc repro` on that stage,
so DVC alone decides what is stale, `dvc.lock` is current after every flow run, and unchanged
stages are skipped (the flow compares each stage's dvc.lock entry and run record before and after,
so it reports ran or skipped without reading DVC's log). One `dvc status` before the first stage
spares the leading unchanged stages a `dvc repro` process each (see `unchanged_stages`). The
stages come from tasks/layout.py, the same list `dvc.yaml` is made from."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from flows.settings import apply_defaults  # noqa: E402

apply_defaults()  # before prefect is imported: it reads its settings at import

import yaml  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from tasks import layout, parent_run, tracking  # noqa: E402
from tasks.tracking import stage_version  # noqa: E402


class StageFailed(RuntimeError):
    pass


PROGRESS = re.compile(r"^\s*[\w./-]+:\s+\d{1,3}%\|")
"""A progress-bar line (`<desc>:  50%|...`), whatever the stage calls its bar."""


def dvc_env(parent_run_id: str | None, root: Path) -> dict:
    """The stage's environment. No PATH change is needed: `scripts/stage.sh` finds the Python that
    runs DVC. The stages import this project's code, not the checkout the venv was installed from:
    on a worker, the project is the deployment's fresh clone."""
    env = tracking.child_env(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if parent_run_id:
        env[tracking.PARENT_ENV] = parent_run_id
    if flow_run.get_id():
        env[tracking.FLOW_RUN_ENV] = str(flow_run.get_id())
    return env


def stage_state(root: Path, stage: str) -> tuple:
    """What a run of `stage` changes: its dvc.lock entry (DVC rewrites it when the stage runs) and
    its run record (the stage writes a fresh MLflow run id into it on every run, also when the
    outputs come out identical). Compared before and after `dvc repro`: equal means DVC skipped it."""
    record = root / layout.run_record(stage)
    return layout.read_lock(root).get(stage), record.read_bytes() if record.exists() else None


def _train_seconds(run: dict) -> float:
    """The training time a stage's run record holds (0 for a stage that does not train)."""
    seconds = run.get("wall_seconds", (run.get("timing") or {}).get("wall_seconds", 0.0))
    return round(float(seconds or 0.0), 2)


def unchanged_stages(root: Path) -> set[str]:
    """The stages `dvc status` finds up to date, asked once before the first stage runs. Until a
    stage of this flow runs, nothing a later stage depends on has changed since, so DVC's answer
    still holds and such a stage is reported skipped without starting `dvc repro` (about a second
    each: a rerun that changes one late stage's params skips all the stages before it). Once a stage
    has run, its outputs may have changed, and every later stage goes to `dvc repro` as before.
    Empty without a dvc.lock (nothing has run yet) or when `dvc status` fails: then `dvc repro`
    decides, and reports, for every stage."""
    import json

    if not (root / "dvc.lock").exists():
        return set()
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, env=dvc_env(None, root),
                          capture_output=True, text=True)
    try:
        changed = json.loads(proc.stdout) if proc.returncode == 0 else None
    except json.JSONDecodeError:
        changed = None
    if not isinstance(changed, dict):
        return set()
    locked = layout.read_lock(root)
    return {s for s in layout.STAGE_NAMES if s not in changed and s in locked}


@task(task_run_name="{stage}", retries=0)
def repro_stage(stage: str, project_dir: str, parent_run_id: str | None, force: bool = False,
                unchanged: bool = False) -> dict:
    """`dvc repro --single-item STAGE`; never retried (training is not I/O). `unchanged`: `dvc status`
    found the stage up to date and nothing before it in this flow ran (`unchanged_stages`), so
    `dvc repro` would skip it: it is reported skipped without starting DVC."""
    logger = get_run_logger()
    root = Path(project_dir)
    if unchanged:
        return _record(root, stage, "skipped", 0.0, logger)
    before = stage_state(root, stage)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=dvc_env(parent_run_id, root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not PROGRESS.match(line) or "100%" in line:
                print(line, end="", flush=True)  # training progress bars are printed at their end only
        proc.wait()
    except BaseException:  # Prefect raises SIGTERM (cancellation, a stopping worker) here as TerminationSignal
        stop_stage(proc)
        raise
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(lines[-30:])
        raise StageFailed(f"stage '{stage}' failed (exit {proc.returncode}):\n{tail}")
    return _record(root, stage, "ran" if stage_state(root, stage) != before else "skipped", seconds, logger)


def _record(root: Path, stage: str, status: str, seconds: float, logger) -> dict:
    """What the flow reports of one stage: ran or skipped, its version (from dvc.lock), and its run
    record's training time and MLflow run."""
    run_path = root / layout.run_record(stage)
    run = yaml.load(run_path.read_text(), Loader=layout.SAFE_LOADER) if run_path.exists() else {}
    record = {"stage": stage, "status": status, "version": stage_version(layout.read_lock(root).get(stage, {})),
              "seconds": round(seconds, 2), "train_seconds": _train_seconds(run),
              "mlflow_run": run.get("mlflow_run_id", "")}
    logger.info("stage %s %s in %.1fs (version %s)", stage, status, seconds, record["version"])
    return record


def stop_stage(proc: subprocess.Popen, grace: float | None = None) -> None:
    """Pass a stop on to the `rlhf stage` process under `dvc repro`: SIGTERM makes it checkpoint the
    step in progress and exit, then DVC exits and frees its lock. Without this the training would go
    on, orphaned, holding the lock. After `grace` seconds (RLHF_STOP_GRACE_SECONDS) it is killed."""
    import signal

    import psutil

    grace = float(os.environ.get("RLHF_STOP_GRACE_SECONDS", "120")) if grace is None else grace
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    stages = [p for p in tree if _is_stage(p)]  # not the shell DVC may run it in: that would orphan it
    for p in stages:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    try:
        proc.communicate(timeout=grace)  # drains its output so it cannot block on a full pipe
    except subprocess.TimeoutExpired:
        for p in stages:
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.kill()
        proc.wait()


def _is_stage(p) -> bool:
    import psutil

    try:
        argv = p.cmdline()
    except psutil.Error:
        return False
    return "stage" in argv and any(a.endswith(("rlhf", "flows.cli")) for a in argv)


def _key_metric(root: Path, stage: str) -> str:
    import json

    f = root / layout.SPECS[stage].metrics
    if not f.exists():
        return ""
    m = json.loads(f.read_text())
    if stage == layout.EVALUATE:
        return " ".join(f"{k}={m[k]['judge_score']:.3f}" for k in layout.POLICIES if k in m)
    picks = ("eval/loss", "eval/accuracy", "eval/rewards/accuracies", "objective/scores")
    return " ".join(f"{k}={m['metrics'][k]:.3f}" for k in picks if k in m.get("metrics", {}))


def _flow_run_tags() -> dict[str, str]:
    """The Prefect flow run's id, and its UI address when a Prefect UI is configured."""
    from prefect.settings import PREFECT_UI_URL

    if not flow_run.get_id():
        return {}
    tags = {"prefect.flow_run_id": str(flow_run.get_id())}
    if PREFECT_UI_URL.value():
        tags["prefect.flow_run_url"] = flow_run.get_flow_run_ui_url()
    return tags


@flow(name="rlhf-pipeline", log_prints=True)
def pipeline(project_dir: str = ".", stages: list[str] | None = None, force: bool = False) -> list[dict]:
    """Run the stages in DAG order (all by default) through DVC, under one MLflow parent run."""
    import mlflow

    from tasks.params import check_dvc_groups, load_params

    root = Path(project_dir).resolve()
    p = load_params(root / "params.yaml")  # a bad params.yaml fails here, before any stage
    check_dvc_groups(root / "params.yaml")
    names = [s for s in layout.STAGE_NAMES if stages is None or s in stages]
    demo = layout.producer(layout.DEMO_DIR)
    if demo in names and not p.data.uses_demo():  # every input is the user's own: no demo set to write
        names.remove(demo)
    exp_id = tracking.setup(root, p.tracking.experiment)
    parent_id = parent_run.create(root, exp_id, p, "prefect", _flow_run_tags(), flow_run.get_name())
    unchanged = set() if force else unchanged_stages(root)
    records, status = [], "FAILED"
    try:
        for name in names:
            tagged = repro_stage.with_options(tags=p.resources.stage_tags(name))  # e.g. `gpu`, for tag concurrency limits
            still = name in unchanged and all(r["status"] == "skipped" for r in records)
            records.append(tagged(name, str(root), parent_id, force, still))
        status = "FINISHED"
    finally:
        try:
            done = {r["stage"]: r["status"] for r in records}  # stages left out by --stages count as skipped
            statuses = {s: done.get(s, "skipped") for s in layout.STAGE_NAMES if s in done or status == "FINISHED"}
            parent_run.finish(root, parent_id, statuses, status)
        except Exception as e:  # noqa: BLE001
            if status == "FINISHED":
                raise
            get_run_logger().warning("the parent run %s was not filled in: %s", parent_id, e)
            with contextlib.suppress(Exception):  # the stage's own error is the one to report
                mlflow.MlflowClient().set_terminated(parent_id, status=status)
        table = [{**r, "key_metrics": _key_metric(root, r["stage"])} for r in records]
        create_table_artifact(table=table, key="rlhf-stages", description="Stage versions, status and key metrics")
        report = root / layout.EVAL_REPORT
        if report.exists() and any(r["stage"] == layout.EVALUATE for r in records):
            create_markdown_artifact(markdown=report.read_text(), key="rlhf-evaluation",
                                     description="Held-out evaluation of SFT, DPO and PPO")
    return records
