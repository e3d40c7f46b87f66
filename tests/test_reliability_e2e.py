"""Interrupted training resumes exactly; a tracking outage loses no training. These run real
`rlhf stage` processes in the tiny end-to-end project and kill them with SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import clean_env, dvc, processes_with_env, set_params

pytestmark = pytest.mark.slow
COMPARED = ("train/loss", "eval/loss", "train/accuracy", "eval/accuracy", "train/rewards/accuracies",
            "train/rewards/margins", "eval/rewards/margins", "objective/scores", "objective/kl", "loss/value_avg")


def stage_cmd(stage):
    return [sys.executable, "-m", "flows.cli", "stage", stage]


def env(**extra):
    return clean_env(**extra)


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


def kill_after_first_checkpoint(project: Path, stage: str) -> int:
    """Start the stage slowed down, SIGKILL it as soon as a checkpoint exists; return its step."""
    state = project / "checkpoints" / stage / "trainer_state.json"
    proc = subprocess.Popen(stage_cmd(stage), cwd=project, env=env(RLHF_TEST_STEP_DELAY="1.5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_first_checkpoint(proc, state, stage, timeout=240)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return json.loads(state.read_text())["step"]


@pytest.mark.parametrize("stage", ["pt", "sft", "rm", "dpo", "ppo"])
def test_killed_stage_resumes_and_ends_with_the_uninterrupted_metrics(e2e_project, e2e_flow_run, stage):
    # the last finished run of the stage is the reference: its inputs are the current ones
    reference = json.loads((e2e_project / f"metrics/{stage}.json").read_text())
    model_files = {p.name: p.read_bytes() for p in (e2e_project / "models" / stage).glob("*.safetensors")}
    step = kill_after_first_checkpoint(e2e_project, stage)
    assert step >= 1
    # the killed run never replaced the finished model: outputs are renamed into place only when complete
    assert {p.name: p.read_bytes() for p in (e2e_project / "models" / stage).glob("*.safetensors")} == model_files
    proc = subprocess.run(stage_cmd(stage), cwd=e2e_project, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads((e2e_project / f"metrics/{stage}.json").read_text())
    assert run_record(e2e_project, stage)["resumed_from_step"] == step  # run facts live beside, not in, the metrics
    assert "resumed_from_step" not in resumed
    keys = [k for k in COMPARED if k in reference["metrics"]]
    assert keys
    for k in keys:
        print(f"RESUME {stage} killed_at_step={step} {k}: uninterrupted={reference['metrics'][k]!r} "
              f"resumed={resumed['metrics'][k]!r}")  # read with `pytest -s`; the numbers of the closing note
        assert resumed["metrics"][k] == pytest.approx(reference["metrics"][k], abs=1e-5), k
    assert not (e2e_project / "checkpoints" / stage).exists()
    resumed_files = {p.name: p.read_bytes() for p in (e2e_project / "models" / stage).glob("*.safetensors")}
    assert resumed_files == model_files, "the resumed run must end with bit-identical weights"


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sigterm_checkpoints_the_step_in_progress_and_the_rerun_resumes_there(e2e_project, e2e_flow_run, stage):
    """A preempted worker gets SIGTERM: the stage finishes the step it is in, checkpoints it (not
    only the last `save_every` step), exits 143 with a message, and the next run resumes there."""
    reference = json.loads((e2e_project / f"metrics/{stage}.json").read_text())
    model_files = {p.name: p.read_bytes() for p in (e2e_project / "models" / stage).glob("*.safetensors")}
    state = e2e_project / "checkpoints" / stage / "trainer_state.json"
    proc = subprocess.Popen(stage_cmd(stage), cwd=e2e_project, env=env(RLHF_TEST_STEP_DELAY="1.5"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_checkpoint(proc, state, stage, timeout=240)
    periodic = json.loads(state.read_text())["step"]  # save_every; the next step is now in progress
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped_at = json.loads(state.read_text())["step"]
    assert stopped_at == periodic + 1, "the step in progress was finished and checkpointed"
    assert f"{stage}: stopped by SIGTERM after step {stopped_at}" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (e2e_project / "models" / stage).glob("*.safetensors")} == model_files
    rerun = subprocess.run(stage_cmd(stage), cwd=e2e_project, env=env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = json.loads((e2e_project / f"metrics/{stage}.json").read_text())
    assert run_record(e2e_project, stage)["resumed_from_step"] == stopped_at
    assert resumed["metrics"]["train/loss"] == pytest.approx(reference["metrics"]["train/loss"], abs=1e-5)
    assert {p.name: p.read_bytes() for p in (e2e_project / "models" / stage).glob("*.safetensors")} == model_files


def test_tracking_outage_after_training_keeps_the_work_and_a_rerun_only_logs_it(e2e_project, e2e_flow_run):
    down = env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", RLHF_TRACKING_ATTEMPTS="2",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    proc = subprocess.run(stage_cmd("sft"), cwd=e2e_project, env=down, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "MLflow" in proc.stderr and "failed 2 times" in proc.stderr
    # tracking is checked before training starts, so nothing was trained and nothing was lost
    assert not (e2e_project / "checkpoints" / "sft").exists()


def test_tracking_outage_at_registration_keeps_the_training_and_a_rerun_does_not_retrain(e2e_project, e2e_flow_run,
                                                                                         monkeypatch):
    from tasks import stages, tracking

    reference = json.loads((e2e_project / "metrics/rm.json").read_text())
    reference_version = int(run_record(e2e_project, "rm")["registered"]["version"])

    def unreachable(*args, **kwargs):
        raise tracking.TrackingUnavailable("MLflow call create_model_version failed 4 times: connection refused")

    monkeypatch.setattr(tracking, "register", unreachable)
    with pytest.raises(tracking.TrackingUnavailable) as err:
        stages.run_stage("rm", e2e_project)
    assert "rlhf stage rm" in str(err.value) and "without training again" in str(err.value)
    assert (e2e_project / "checkpoints/rm/finished.json").exists()
    monkeypatch.undo()
    again = stages.run_stage("rm", e2e_project)
    assert again["reused_finished_training"] is True
    assert again["metrics"]["eval/accuracy"] == reference["metrics"]["eval/accuracy"]
    assert int(again["registered"]["version"]) > reference_version
    assert int(run_record(e2e_project, "rm")["registered"]["version"]) == int(again["registered"]["version"])
    assert not (e2e_project / "checkpoints/rm").exists()


def test_secrets_in_the_environment_never_reach_logged_params_or_artifacts(e2e_project, e2e_flow_run):
    secret = "fake-secret-7f3a9c1e"
    proc = subprocess.run(stage_cmd("tokenize"), cwd=e2e_project, capture_output=True, text=True,
                          env=env(HF_TOKEN=secret, MLFLOW_TRACKING_PASSWORD=secret, AWS_SECRET_ACCESS_KEY=secret,
                                  WANDB_API_KEY=secret))
    assert proc.returncode == 0, proc.stderr[-2000:]
    leaked = []
    for where in ("mlflow.db", "mlruns", "metrics", "reports", "models", "plots", "data/tokenized"):
        path = e2e_project / where
        for f in ([path] if path.is_file() else path.rglob("*")):
            if f.is_file() and secret.encode() in f.read_bytes():
                leaked.append(str(f))
    assert not leaked
    assert secret not in proc.stdout + proc.stderr


def test_two_runs_in_one_checkout_get_dvcs_lock_error(e2e_project, e2e_flow_run):
    slow = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "sft"], cwd=e2e_project,
                            env=env(RLHF_TEST_STEP_DELAY="1.0", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)  # the first run holds the repo lock while it trains
    second = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=e2e_project, env=env(),
                            capture_output=True, text=True)
    first_out, _ = slow.communicate(timeout=300)
    assert slow.returncode == 0, first_out[-2000:]
    assert second.returncode != 0
    assert "lock" in (second.stdout + second.stderr).lower()


def test_two_runs_in_separate_checkouts_do_not_interfere(e2e_project, e2e_flow_run, tmp_path):
    import shutil

    import mlflow

    from tasks.tracking import logged_model_of

    other = tmp_path / "other"
    shutil.copytree(e2e_project, other, symlinks=True)
    (other / "mlflow.db").unlink()  # a separate checkout has its own tracking store
    shutil.rmtree(other / "mlruns")
    cmd = [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "dpo"]
    path_env = env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    procs = [subprocess.Popen(cmd, cwd=d, env=path_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for d in (e2e_project, other)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-1500:] for o in outs]
    versions = []
    for d in (e2e_project, other):
        assert "dpo:" not in dvc(d, "status"), "each checkout's dvc.lock records its own dpo run"
        mlflow.set_tracking_uri(f"sqlite:///{d / 'mlflow.db'}")
        client = mlflow.MlflowClient()
        model = client.get_logged_model(logged_model_of(client.get_model_version_by_alias("rlhf-dpo", "candidate")))
        assert model.artifact_location.startswith((d / "mlruns").resolve().as_uri()), "each checkout has its own store"
        versions.append(json.loads((d / "metrics/dpo.json").read_text())["metrics"]["train/loss"])
    assert versions[0] == pytest.approx(versions[1], abs=1e-6)


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
                              env=env(RLHF_TEST_STEP_DELAY="1.5", PREFECT_HOME=str(tmp_path / "prefect")),
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
    checkout's DVC state and MLflow store hold only its own run."""
    import shutil

    import mlflow
    import yaml

    current = yaml.safe_load((e2e_project / "params.yaml").read_text())["dpo"]["beta"]
    betas = {"one": round(current * 1.5, 6), "two": round(current * 2.5, 6)}  # both differ from the last dpo run
    for name, beta in betas.items():
        shutil.copytree(e2e_project, tmp_path / name, symlinks=True)
        set_params(tmp_path / name / "params.yaml", {"dpo": {"beta": beta}})
    prefect_env = env(PREFECT_HOME=str(tmp_path / "shared-prefect"))
    procs = {name: subprocess.Popen([sys.executable, "-m", "flows.cli", "run"], cwd=tmp_path / name, env=prefect_env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in betas}
    outs = {name: p.communicate(timeout=900)[0] for name, p in procs.items()}
    assert {n: p.returncode for n, p in procs.items()} == {"one": 0, "two": 0}, {n: o[-1500:] for n, o in outs.items()}

    query = subprocess.run([sys.executable, "-c", PREFECT_RUNS], env=prefect_env, capture_output=True, text=True)
    assert query.returncode == 0, query.stderr[-2000:]
    flow_runs = json.loads(query.stdout.strip().splitlines()[-1])
    assert len(flow_runs) == 2
    for run in flow_runs.values():
        assert run["state"] == "COMPLETED"
        assert run["tasks"] == {s: "COMPLETED" for s in
                                ("generate", "validate", "tokenize", "pt", "sft", "rm", "judge", "dpo", "ppo", "evaluate")}

    seen = set()
    for name, beta in betas.items():
        d = tmp_path / name
        assert "up to date" in dvc(d, "status")
        mlflow.set_tracking_uri(f"sqlite:///{d / 'mlflow.db'}")
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name("rlhf-pipeline")
        dpo_run = client.search_runs([exp.experiment_id], "tags.`rlhf.stage` = 'dpo'", order_by=["start_time DESC"],
                                     max_results=1)[0]
        assert float(dpo_run.data.params["dpo.beta"]) == beta
        flow_run_id = dpo_run.data.tags["prefect.flow_run_id"]
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
                                 env=env(RLHF_TEST_STEP_DELAY="1.5", PREFECT_HOME=prefect_home),
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


def test_tokenised_data_of_the_wrong_shape_stops_the_next_stage_by_name(e2e_project, e2e_flow_run):
    """Edit a tokenised split behind DVC's back: `rlhf stage sft` names the path, row and rule,
    prints no traceback and leaves the finished SFT model in place."""
    import shutil

    from datasets import Dataset, load_from_disk

    split = e2e_project / "data" / "tokenized" / "sft" / "train"
    rows = load_from_disk(str(split)).to_dict()
    rows["labels"][2] = rows["labels"][2][:-1]
    model_before = {p.name: p.read_bytes() for p in (e2e_project / "models" / "sft").glob("*.safetensors")}
    shutil.rmtree(split)
    Dataset.from_dict(rows).save_to_disk(str(split))
    try:
        proc = subprocess.run(stage_cmd("sft"), cwd=e2e_project, env=env(), capture_output=True, text=True)
        assert proc.returncode != 0
        assert "data/tokenized/sft/train: row 2: 'labels' has" in proc.stderr
        assert "[labels_aligned]" in proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        assert {p.name: p.read_bytes() for p in (e2e_project / "models" / "sft").glob("*.safetensors")} == model_before
    finally:
        dvc(e2e_project, "checkout", "--force", "data/tokenized")
    assert "data/tokenized" not in dvc(e2e_project, "status"), "the tokenised data is DVC's again"
