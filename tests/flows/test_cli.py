"""The `rlhf` command line: clear errors, validation without side effects (deployments: test_deploy.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_validate_reports_file_line_and_rule_and_exits_nonzero(tmp_path, capsys):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "hi", "chosen": "same", "rejected": "same"}) + "\n")
    assert main(["validate", str(bad), "--kind", "preference"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2" in out and "rejected" in out and "must differ" in out
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert main(["validate", str(good), "--kind", "prompts"]) == 0


def test_bad_params_give_one_line_naming_the_key_and_no_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("dpo:\n  beta: -1\n")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "dpo", "--project-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "dpo.beta" in proc.stderr and "must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_params_file_without_a_group_dvc_needs_gets_it_at_defaults_and_a_params_yaml_without_it_is_refused(
        tmp_path, capsys):
    """DVC runs no stage whose params group is absent from params.yaml (its error: "Parameters
    'launch' are missing"). `rlhf run --params FILE` adds the groups FILE leaves out, at their
    defaults; a params.yaml that lacks one is refused by name before any stage. The shipped
    params files lack none."""
    import yaml

    from flows.cli import use_params
    from rlhf_core.errors import ConfigError
    from tasks.params import check_dvc_groups, dvc_groups, load_params, missing_dvc_groups

    recipe = yaml.safe_load((ROOT / "params.yaml").read_text())
    del recipe["launch"], recipe["tracking"]
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"'launch': group is missing.*missing: launch, tracking.*\[dvc_groups\]"):
        check_dvc_groups(tmp_path / "mine.yaml")
    use_params(str(tmp_path), str(tmp_path / "mine.yaml"))
    assert "with launch, tracking at defaults" in capsys.readouterr().out
    assert missing_dvc_groups(tmp_path / "params.yaml") == []
    check_dvc_groups(tmp_path / "params.yaml")
    assert load_params(tmp_path / "params.yaml") == load_params(tmp_path / "mine.yaml")
    assert {"launch", "tracking", "model", "dpo"} <= set(dvc_groups())
    for shipped in ("params.yaml", "examples/smollm2.yaml"):
        assert missing_dvc_groups(ROOT / shipped) == [], shipped


def test_missing_model_path_is_named(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_rlhf_run_ends_on_sigterm_by_an_exception_that_main_turns_into_143():
    """The handler `rlhf run` installs raises (the process then exits normally, running the exit
    handler that stops Prefect's ephemeral API server); the process-level check is in
    test_flow_interruptions_e2e.py."""
    import signal

    import pytest

    from flows.cli import stop_run_on_sigterm
    from rlhf_core.training.stop import Stopped

    with pytest.raises(Stopped) as err:
        stop_run_on_sigterm(signal.SIGTERM, None)
    assert err.value.signum == signal.SIGTERM and "run: stopped by SIGTERM" in str(err.value)


def test_exit_now_keeps_what_a_normal_exit_does_before_the_module_teardown(tmp_path):
    """`rlhf` ends by os._exit (flows.cli.exit_now): the code still comes back, a non-daemon thread
    still finishes, atexit handlers (Prefect's server stop, MLflow's run end) still run, and output
    that sat in a pipe's buffer or a log handler is still written."""
    marker = tmp_path / "atexit"
    code = f"""
import atexit, logging, pathlib, sys, threading, time
from flows.cli import exit_now
logging.basicConfig(filename={str(tmp_path / 'log')!r}, level=logging.INFO)
atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.5), print("thread done"))).start()
logging.getLogger("x").info("logged")
print("buffered", end="")
exit_now(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "buffered" in proc.stdout and "thread done" in proc.stdout
    assert marker.read_text() == "ran"
    assert "logged" in (tmp_path / "log").read_text()
