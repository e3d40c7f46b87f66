"""A deployment that a real worker runs: a `prefect server` on localhost, a `process` work pool,
`rlhf deploy` from a checkout whose `origin` is a bare git repository, `prefect worker start`, and a
triggered flow run of the first stages, which the worker clones and runs to `Completed`."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, clean_env, git, processes_with_env, project_repo

pytestmark = pytest.mark.slow
STAGES = ["generate", "validate", "tokenize"]
CHEAP = {**TINY, "resources": {"gpu": ["tokenize"], "tags": {"validate": ["io"]}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group `proc` leads (it was started in a session of its own), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while True:
        assert server.poll() is None, "prefect server exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "prefect server did not become healthy"
        time.sleep(0.5)


def run_cmd(args, env, cwd) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout


def read_run(api_url: str, deployment: str) -> dict:
    """The deployment's one flow run: its state, its task runs' states and tags, the stage table."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            dep = await client.read_deployment_by_name(deployment)
            runs = await client.read_flow_runs()
            assert len(runs) == 1, [r.name for r in runs]
            run = runs[0]
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
            return {"deployment": dep, "run": run, "tasks": {t.name: (t.state_type.value, sorted(t.tags)) for t in tasks},
                    "artifacts": {a.key: a for a in arts}}

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(read())


def test_a_worker_runs_a_triggered_deployment_to_completed(tmp_path):
    src = project_repo(tmp_path / "src", CHEAP)
    remote = tmp_path / "remote.git"  # stands in for the team's git server
    git(tmp_path, "clone", "-q", "--bare", str(src), str(remote))
    checkout = tmp_path / "laptop"   # the machine that runs `rlhf deploy`
    git(tmp_path, "clone", "-q", str(remote), str(checkout))
    workdir, worker_cwd = tmp_path / "worker-workdir", tmp_path / "worker-cwd"
    workdir.mkdir()
    worker_cwd.mkdir()

    home = str(tmp_path / "prefect-home")  # every process started here has it, so none can hide
    api_url = f"http://127.0.0.1:{free_port()}/api"
    env = clean_env(PREFECT_HOME=home, PREFECT_API_URL=api_url, PREFECT_WORKER_QUERY_SECONDS="2",
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    prefect = [sys.executable, "-m", "prefect"]
    port = api_url.rsplit(":", 1)[1].split("/")[0]
    started = []
    try:
        server = subprocess.Popen(prefect + ["server", "start", "--host", "127.0.0.1", "--port", port, "--no-ui"],
                                  env=env, cwd=tmp_path, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(server)
        wait_healthy(api_url, server, timeout=180)
        run_cmd(prefect + ["work-pool", "create", "cpu-test", "--type", "process"], env, tmp_path)
        run_cmd(prefect + ["concurrency-limit", "create", "gpu", "1"], env, tmp_path)  # one GPU stage at a time
        out = run_cmd([sys.executable, "-m", "flows.cli", "deploy", "--pool", "cpu-test", "--name", "e2e",
                       "--workdir", str(workdir)], env, checkout)
        assert f"cloned from {remote}" in out
        worker = subprocess.Popen(prefect + ["worker", "start", "--pool", "cpu-test"], env=env, cwd=worker_cwd,
                                  start_new_session=True, stdout=open(tmp_path / "worker.log", "w"),
                                  stderr=subprocess.STDOUT)
        started.append(worker)
        t0 = time.perf_counter()
        trigger = subprocess.run(prefect + ["deployment", "run", "rlhf-pipeline/e2e", "--params",
                                            json.dumps({"stages": STAGES}), "--watch", "--watch-interval", "2",
                                            "--watch-timeout", "900"],
                                 env=env, cwd=tmp_path, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        log = (tmp_path / "worker.log").read_text()
        assert trigger.returncode == 0, (trigger.stdout[-2000:], trigger.stderr[-2000:], log[-4000:])
        print(f"DEPLOY trigger to Completed: {seconds:.1f}s")  # read with `pytest -s`; the number of the note

        found = read_run(api_url, "rlhf-pipeline/e2e")
        dep, run = found["deployment"], found["run"]
        assert run.state_type.value == "COMPLETED", log[-4000:]
        assert run.deployment_id == dep.id and run.parameters["stages"] == STAGES
        assert found["tasks"] == {"generate": ("COMPLETED", []), "validate": ("COMPLETED", ["io"]),
                                  "tokenize": ("COMPLETED", ["gpu"])}
        data = found["artifacts"]["rlhf-stages"].data
        table = json.loads(data) if isinstance(data, str) else data
        assert [(r["stage"], r["status"]) for r in table] == [(s, "ran") for s in STAGES]

        # the worker cloned the remote into its working directory and ran the flow there
        clone = workdir / "remote"
        lock = (clone / "dvc.lock").read_text()
        for stage in STAGES:
            assert f"  {stage}:" in lock
        assert all(r["version"] for r in table)
        assert not (checkout / "dvc.lock").exists(), "nothing ran in the deploying checkout"
        recorded = json.dumps(dep.model_dump(mode="json"))
        assert str(checkout) not in recorded, "the deployment records no path of the deploying machine"
    finally:
        for proc in reversed(started):  # the worker first, then the server
            stop_group(proc)
    gone_by = time.time() + 30
    while processes_with_env("PREFECT_HOME", home) and time.time() < gone_by:
        time.sleep(0.5)
    assert processes_with_env("PREFECT_HOME", home) == [], "every process the test started has stopped"
