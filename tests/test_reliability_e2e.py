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
from conftest import clean_env, dvc, run_record, wait_for_first_checkpoint

pytestmark = pytest.mark.slow
COMPARED = ("train/loss", "eval/loss", "train/accuracy", "eval/accuracy", "train/rewards/accuracies",
            "train/rewards/margins", "eval/rewards/margins", "objective/scores", "objective/kl", "loss/value_avg")


def stage_cmd(stage):
    return [sys.executable, "-m", "flows.cli", "stage", stage]


def kill_after_first_checkpoint(project: Path, stage: str) -> int:
    """Start the stage slowed down, SIGKILL it as soon as a checkpoint exists; return its step."""
    state = project / "checkpoints" / stage / "trainer_state.json"
    proc = subprocess.Popen(stage_cmd(stage), cwd=project, env=clean_env(RLHF_TEST_STEP_DELAY="1.5"),
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
    proc = subprocess.run(stage_cmd(stage), cwd=e2e_project, env=clean_env(), capture_output=True, text=True)
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
    proc = subprocess.Popen(stage_cmd(stage), cwd=e2e_project, env=clean_env(RLHF_TEST_STEP_DELAY="1.5"),
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
    rerun = subprocess.run(stage_cmd(stage), cwd=e2e_project, env=clean_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = json.loads((e2e_project / f"metrics/{stage}.json").read_text())
    assert run_record(e2e_project, stage)["resumed_from_step"] == stopped_at
    assert resumed["metrics"]["train/loss"] == pytest.approx(reference["metrics"]["train/loss"], abs=1e-5)
    assert {p.name: p.read_bytes() for p in (e2e_project / "models" / stage).glob("*.safetensors")} == model_files


def test_tracking_outage_after_training_keeps_the_work_and_a_rerun_only_logs_it(e2e_project, e2e_flow_run):
    down = clean_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", RLHF_TRACKING_ATTEMPTS="2",
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
                          env=clean_env(HF_TOKEN=secret, MLFLOW_TRACKING_PASSWORD=secret, AWS_SECRET_ACCESS_KEY=secret,
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
                            env=clean_env(RLHF_TEST_STEP_DELAY="1.0", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)  # the first run holds the repo lock while it trains
    second = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=e2e_project, env=clean_env(),
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
    path_env = clean_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
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
        proc = subprocess.run(stage_cmd("sft"), cwd=e2e_project, env=clean_env(), capture_output=True, text=True)
        assert proc.returncode != 0
        assert "data/tokenized/sft/train: row 2: 'labels' has" in proc.stderr
        assert "[labels_aligned]" in proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        assert {p.name: p.read_bytes() for p in (e2e_project / "models" / "sft").glob("*.safetensors")} == model_before
    finally:
        dvc(e2e_project, "checkout", "--force", "data/tokenized")
    assert "data/tokenized" not in dvc(e2e_project, "status"), "the tokenised data is DVC's again"
