"""Interrupted and concurrent Prefect flow runs of the tiny end-to-end project: the whole flow
killed, SIGTERM to the flow (a cancelled run or a stopping worker), and two flow runs at once
against one Prefect database. Each run is a real `rlhf run` process with its own ephemeral API."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import clean_env, copy_project, dvc, processes_with_env, run_record, set_params, wait_for_first_checkpoint

pytestmark = pytest.mark.slow


def test_a_killed_flow_run_can_simply_be_run_again(e2e_project, e2e_flow_run, prefect_server, tmp_path):
    """Kill the whole flow (process group) during DPO after its first checkpoint; the next flow
    run skips the finished and unchanged stages and resumes DPO. (DPO, not an earlier stage: only
    dpo and evaluate depend on its learning rate, so the test retrains nothing else.)"""

    from flows.pipeline import pipeline
    from tasks.layout import STAGE_NAMES

    dvc(e2e_project, "repro")
    set_params(e2e_project / "params.yaml", {"dpo": {"learning_rate": 0.0009}})
    state = e2e_project / "checkpoints" / "dpo" / "trainer_state.json"
    worker = subprocess.Popen([sys.executable, "-m", "flows.cli", "run"], cwd=e2e_project, start_new_session=True,
                              env=clean_env(RLHF_TEST_STEP_DELAY="1.5", PREFECT_HOME=str(tmp_path / "prefect")),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_first_checkpoint(worker, state, "the flow (DPO)", timeout=300)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and everything it started die at once
    worker.wait()
    gone_by = time.time() + 60  # its grandchildren (dvc, the stage) are reaped by init a moment later;
    while True:                 # until then DVC rightly counts their repo lock as held
        try:
            os.killpg(worker.pid, 0)
        except ProcessLookupError:
            break
        assert time.time() < gone_by, "the killed process group did not go away"
        time.sleep(0.2)
    step = json.loads(state.read_text())["step"]
    records = pipeline(project_dir=str(e2e_project))
    status = {r["stage"]: r["status"] for r in records}
    assert [s for s, v in status.items() if v == "ran"] == ["dpo", "evaluate"]
    assert [s for s, v in status.items() if v == "skipped"] == [s for s in STAGE_NAMES if s not in ("dpo", "evaluate")]
    assert run_record(e2e_project, "dpo")["resumed_from_step"] == step
    assert "up to date" in dvc(e2e_project, "status")


PREFECT_RUNS = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

async def main():
    async with get_client() as client:
        out = {}
        for run in await client.read_flow_runs():
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            out[str(run.id)] = {"state": run.state_type.value, "tasks": {t.name: t.state_type.value for t in tasks}}
        print(json.dumps(out))

asyncio.run(main())
"""


def test_two_flow_runs_at_once_in_separate_checkouts_share_one_prefect_db(e2e_project, e2e_flow_run, tmp_path):
    """Two Prefect flow runs at the same moment, in two checkouts, against one fresh Prefect
    database (both race to create it): both complete, each is recorded whole, and each
    checkout's DVC state and MLflow store hold only its own run. Each checkout has its own
    `evaluate.promotion_margin`, so the evaluate stage really runs in both (and nothing else)."""
    import mlflow
    import yaml

    current = yaml.safe_load((e2e_project / "params.yaml").read_text())["evaluate"]["promotion_margin"]
    margins = {"one": current - 0.5, "two": current - 1.5}  # both differ from the last evaluation's
    for name, margin in margins.items():
        copy_project(e2e_project, tmp_path / name)
        set_params(tmp_path / name / "params.yaml", {"evaluate": {"promotion_margin": margin}})
    prefect_env = clean_env(PREFECT_HOME=str(tmp_path / "shared-prefect"))
    procs = {name: subprocess.Popen([sys.executable, "-m", "flows.cli", "run"], cwd=tmp_path / name, env=prefect_env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in margins}
    outs = {name: p.communicate(timeout=900)[0] for name, p in procs.items()}
    assert {n: p.returncode for n, p in procs.items()} == {"one": 0, "two": 0}, {n: o[-1500:] for n, o in outs.items()}
    for out in outs.values():
        assert "stage evaluate ran" in out and "stage dpo skipped" in out

    query = subprocess.run([sys.executable, "-c", PREFECT_RUNS], env=prefect_env, capture_output=True, text=True)
    assert query.returncode == 0, query.stderr[-2000:]
    flow_runs = json.loads(query.stdout.strip().splitlines()[-1])
    assert len(flow_runs) == 2
    for run in flow_runs.values():
        assert run["state"] == "COMPLETED"
        assert run["tasks"] == {s: "COMPLETED" for s in
                                ("generate", "validate", "tokenize", "pt", "sft", "rm", "judge", "dpo", "ppo", "evaluate")}

    seen = set()
    for name, margin in margins.items():
        d = tmp_path / name
        assert "up to date" in dvc(d, "status")
        mlflow.set_tracking_uri(f"sqlite:///{d / 'mlflow.db'}")
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name("rlhf-pipeline")
        eval_run = client.search_runs([exp.experiment_id], "tags.`rlhf.stage` = 'evaluate'",
                                      order_by=["start_time DESC"], max_results=1)[0]
        assert float(eval_run.data.params["evaluate.promotion_margin"]) == margin
        assert eval_run.info.artifact_uri.startswith((d / "mlruns").resolve().as_uri())
        flow_run_id = eval_run.data.tags["prefect.flow_run_id"]
        assert flow_run_id in flow_runs
        seen.add(flow_run_id)
    assert len(seen) == 2, "each checkout's MLflow store names its own flow run"


def test_sigterm_to_the_flow_is_passed_on_to_the_stage_and_the_next_flow_resumes(e2e_project, e2e_flow_run,
                                                                                 prefect_server, tmp_path):
    """Cancelling a flow run (SIGTERM to the flow process only, as a stopping worker does): the
    stage under `dvc repro` checkpoints the step in progress and exits, no training is left running
    orphaned with DVC's lock, and the next flow run resumes from that step."""
    import psutil

    from flows.pipeline import pipeline

    dvc(e2e_project, "repro")
    set_params(e2e_project / "params.yaml", {"dpo": {"learning_rate": 0.0008}})  # reruns only dpo and evaluate
    state = e2e_project / "checkpoints" / "dpo" / "trainer_state.json"
    prefect_home = str(tmp_path / "prefect")  # only this flow (and what it starts) has it in its environment
    flow_proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run"], cwd=e2e_project,
                                 env=clean_env(RLHF_TEST_STEP_DELAY="1.5", PREFECT_HOME=prefect_home),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_first_checkpoint(flow_proc, state, "the flow (DPO)", timeout=300)
    periodic = json.loads(state.read_text())["step"]
    tree = [p for p in psutil.Process(flow_proc.pid).children(recursive=True)
            if {"dvc", "stage", "uvicorn"} & set(p.cmdline())]  # dvc repro, rlhf stage dpo, the ephemeral Prefect API
    assert any("stage" in p.cmdline() for p in tree), "the stage runs under the flow"
    assert any("uvicorn" in p.cmdline() for p in tree), "the flow's own ephemeral Prefect API server runs under it"
    flow_proc.send_signal(signal.SIGTERM)
    _, err = flow_proc.communicate(timeout=180)
    assert flow_proc.returncode == 128 + signal.SIGTERM, err[-2000:]  # an exit, not death by the signal
    assert "run: stopped by SIGTERM" in err and "Traceback" not in err
    gone, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    assert processes_with_env("PREFECT_HOME", prefect_home) == [], "no process of this flow is left (orphans have parent 1)"
    assert json.loads(state.read_text())["step"] == periodic + 1, "the step in progress was checkpointed"
    records = pipeline(project_dir=str(e2e_project))
    assert {r["stage"]: r["status"] for r in records}["dpo"] == "ran"
    assert run_record(e2e_project, "dpo")["resumed_from_step"] == periodic + 1
    assert "up to date" in dvc(e2e_project, "status")
