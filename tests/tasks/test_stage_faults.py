"""Faults around a stage (issue 15): state files that are corrupted, outputs that cannot be written,
failures after training, a second run of the same stage, SIGTERM during tokenize. The stages run
in this process on a tiny project with a real MLflow store (SQLite)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY, clean_env

from flows.cli import main
from rlhf_core.errors import ConfigError, DataError, RLHFError
from tasks import stages, tracking

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("faults")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    os.environ.pop(tracking.PARENT_ENV, None)
    for stage in ("generate", "tokenize", "pt"):
        stages.run_stage(stage, root)
    return root


@pytest.fixture
def fits(monkeypatch):
    """Counts the training loops that really ran."""
    calls = []
    real = stages._fit

    def counted(root, p, stage, *rest):
        calls.append(stage)
        return real(root, p, stage, *rest)

    monkeypatch.setattr(stages, "_fit", counted)
    return calls


def _files(path: Path) -> dict:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _version(name: str, version: str):
    import mlflow

    return mlflow.MlflowClient().get_model_version(name, version)


def test_throughput_reaches_mlflow_but_not_the_plots_history(project):
    """tokens/s differs from run to run: it is an MLflow metric of the stage run, never a column
    of `plots/<stage>.csv` (a DVC plot), which holds only functions of the inputs."""
    import mlflow

    header = (project / "plots" / "pt.csv").read_text().splitlines()[0].split(",")
    assert "train/loss" in header and not [c for c in header if "per_second" in c or "seconds" in c], header
    run_id = json.loads((project / "reports" / "runs" / "pt.json").read_text())["mlflow_run_id"]
    history = mlflow.MlflowClient().get_metric_history(run_id, "train/tokens_per_second")
    assert history and all(m.value > 0 for m in history)


def _registry_refuses(*args, **kwargs):
    raise RuntimeError("registry refused the model version")


def _plots_unwritable(*args, **kwargs):
    raise PermissionError(13, "Permission denied", "plots/sft.csv")


@pytest.mark.parametrize("fault, target, patch", [("registry", tracking, ("register", _registry_refuses)),
                                                  ("unwritable", stages, ("write_history_csv", _plots_unwritable))],
                         ids=["registry_error", "unwritable_output"])
def test_a_failure_after_training_keeps_it_and_the_rerun_registers_without_training(project, fits, monkeypatch,
                                                                                     fault, target, patch):
    monkeypatch.setattr(target, *patch)
    with pytest.raises(RLHFError) as err:
        stages.run_stage("sft", project)
    msg = str(err.value)
    assert msg.startswith(f"sft: training finished and is kept (models/sft, {project / 'checkpoints/sft/finished.json'})"
                          ", but a step after training failed (")
    assert "run `rlhf stage sft` or `dvc repro`: the finished training is logged and registered without training again" in msg
    assert fits == ["sft"]
    weights = _files(project / "models" / "sft")
    assert "model.safetensors" in weights and (project / "checkpoints/sft/finished.json").exists()
    monkeypatch.undo()  # the fault is gone (and the counter too)
    monkeypatch.setattr(stages, "_fit", lambda *a: pytest.fail("the rerun trained again"))
    again = stages.run_stage("sft", project)
    assert again["reused_finished_training"] is True
    reg = again["registered"]
    assert reg["name"] == "rlhf-sft" and _version(reg["name"], reg["version"]).run_id == reg["run_id"]
    assert _files(project / "models" / "sft") == weights  # no run id or registry version inside the model
    assert json.loads((project / "reports/runs/sft.json").read_text())["registered"] == reg
    assert "registered" not in json.loads((project / "metrics/sft.json").read_text())
    assert not (project / "checkpoints/sft").exists()


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(project, fits):
    before = _files(project / "models" / "pt")
    shutil.move(project / "plots", project / "plots.real")
    (project / "plots").write_text("a file where the plots folder should be")
    try:
        with pytest.raises(RLHFError, match=r"^plots: output folder is not writable \(File exists\); nothing was "
                                            r"started \[writable\]$"):
            stages.run_stage("pt", project)
    finally:
        (project / "plots").unlink()
        shutil.move(project / "plots.real", project / "plots")
    assert fits == [] and _files(project / "models" / "pt") == before


def test_a_corrupted_dvc_lock_is_an_error_before_training(project, fits):
    (project / "dvc.lock").write_text("schema: '2.0'\nstages:\n  pt:\n    cmd: [rlhf stage pt\n")
    try:
        with pytest.raises(RLHFError, match=rf"^{project / 'dvc.lock'}:5: is not valid YAML \(.*\); restore it "
                                            r"\(`git checkout dvc.lock`\) or delete it .*\[dvc_lock\]$"):
            stages.run_stage("pt", project)
        (project / "dvc.lock").write_text("- just\n- a list\n")
        with pytest.raises(RLHFError, match=r"dvc.lock: is not a DVC lock file"):
            stages.run_stage("pt", project)
    finally:
        (project / "dvc.lock").unlink()
    assert fits == []


def test_a_corrupted_finished_marker_is_skipped_with_a_warning_and_the_stage_trains(project, fits, capsys):
    marker = project / "checkpoints" / "pt" / "finished.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text('{"key": "abc", "result": {"ste')
    result = stages.run_stage("pt", project)
    err = capsys.readouterr().err
    assert f"warning: {marker}: corrupted (" in err and "ignoring it, so the stage trains again" in err
    assert fits == ["pt"] and "reused_finished_training" not in result
    assert not marker.exists()


def test_tokenize_with_useless_output_fails_and_keeps_the_previous_data(project):
    before = _files(project / "data" / "tokenized")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tokenize"]["eval_fraction"] = 0.9999
    (project / "bad_params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(DataError, match=r"^data/demo/pt.txt: the pt train split is empty \(0 full blocks out of 0 "
                                        r"records in; tokenize.eval_fraction=0.9999.*\[useful_output\]$"):
        stages.run_stage("tokenize", project, "bad_params.yaml")
    assert _files(project / "data" / "tokenized") == before


def test_sigterm_stops_tokenize_at_once_and_keeps_the_previous_data(project, monkeypatch, capsys):
    from rlhf_core.data import encoding

    before = _files(project / "data" / "tokenized")

    def terminated_mid_write(*args, **kwargs):  # as if a scheduler preempted the job while it writes
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        pytest.fail("SIGTERM was ignored")

    monkeypatch.setattr(encoding, "check_useful", terminated_mid_write)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["stage", "tokenize", "--project-dir", str(project)]) == 143
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert capsys.readouterr().err.strip() == "error: tokenize: stopped by SIGTERM; its previous outputs are unchanged"
    assert _files(project / "data" / "tokenized") == before
    assert not [p for p in (project / "data").iterdir() if p.name.startswith(".tokenized.tmp")]


@pytest.mark.slow
def test_the_same_stage_started_twice_in_one_checkout_runs_once(project, capsys):
    lock = project / "checkpoints" / ".pt.lock"
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", "pt", "--project-dir", str(project)], cwd=ROOT,
                             env=clean_env(RLHF_TEST_STEP_DELAY="1.0"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):  # the first run holds the lock
        assert first.poll() is None, first.stdout.read()[-2000:]
        assert time.time() < deadline, "the first run never took the lock"
        time.sleep(0.1)
    assert main(["stage", "pt", "--project-dir", str(project)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: pt: another run of this stage is in progress in this checkout (pid {first.pid}, "
                           "lock checkpoints/.pt.lock); wait for it to finish or stop it, then run again [stage_lock]")
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-2000:]
    assert stages.run_stage("pt", project)["steps"] == TINY["pt"]["max_steps"]  # the lock is free again


def test_lora_targets_the_model_lacks_name_the_params_key_before_the_first_step(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sft"]["lora"] = {"enabled": True, "target_modules": ["q_proj", "query_key_value"]}
    (project / "lora_params.yaml").write_text(yaml.safe_dump(params))
    before = _files(project / "models")
    with pytest.raises(ConfigError, match=r"^params.yaml: 'sft.lora.target_modules': 'query_key_value' names no "
                                          r"module of LlamaForCausalLM \(its linear layers: .*\) \[lora_targets\]$"):
        stages.run_stage("sft", project, "lora_params.yaml")
    assert _files(project / "models") == before and not (project / "checkpoints" / "sft").exists()
