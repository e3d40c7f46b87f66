"""The `rlhf` command line: clear errors, validation without side effects, deployments."""
import asyncio
import json
import subprocess
import sys
from pathlib import Path

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


def test_missing_model_path_is_named(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_deploy_registers_the_flow_on_a_work_pool_with_a_schedule(prefect_server):
    # no capsys here: Prefect's log console binds to the stdout of the test that starts the
    # session's server, and capsys closes its stream when the test ends
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async def create_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="gpu-test", type="process"))

    asyncio.run(create_pool())
    assert main(["deploy", "--pool", "gpu-test", "--cron", "0 3 * * *", "--name", "nightly-test",
                 "--project-dir", str(ROOT)]) == 0

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name("rlhf-pipeline/nightly-test")

    dep = asyncio.run(read())
    assert dep.work_pool_name == "gpu-test"
    assert dep.entrypoint == "flows/pipeline.py:pipeline"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
