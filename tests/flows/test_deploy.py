"""`rlhf deploy` records where the workers find the project, never the deploying machine's path;
per-stage resources become Prefect task tags. (A real worker running a deployment: test_deploy_e2e.py.)"""
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import git, project_repo

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]


def create_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async def create():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"), overwrite=True)

    asyncio.run(create())


def read_deployment(name: str):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name(f"rlhf-pipeline/{name}")

    return asyncio.run(read())


# no capsys in the tests that deploy: Prefect's log console binds to the stdout of the test that
# starts the session's server, and capsys closes its stream when the test ends

def test_deploy_from_a_checkout_records_its_origin_url_and_no_local_path(prefect_server, tmp_path):
    """The default --source is the checkout's `origin`: the worker clones it and runs the flow in
    the clone (`project_dir` "."), so the deploying machine's path appears nowhere."""
    remote = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(project_repo(tmp_path / "src", {})), str(remote))
    checkout = tmp_path / "my-checkout"
    git(tmp_path, "clone", "-q", str(remote), str(checkout))
    create_pool("clone-pool")
    assert main(["deploy", "--pool", "clone-pool", "--name", "from-origin", "--cron", "0 3 * * *",
                 "--workdir", "/srv/rlhf", "--project-dir", str(checkout)]) == 0
    dep = read_deployment("from-origin")
    assert dep.work_pool_name == "clone-pool"
    assert dep.entrypoint == "flows/pipeline.py:pipeline"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert dep.parameters == {"project_dir": "."}
    assert dep.job_variables == {"working_dir": "/srv/rlhf"}
    assert dep.pull_steps == [{"prefect.deployments.steps.git_clone": {"repository": str(remote), "branch": None}}]
    recorded = json.dumps(dep.model_dump(mode="json"))
    assert str(checkout) not in recorded and str(tmp_path / "src") not in recorded


def test_deploy_with_a_directory_records_that_directory_as_given(prefect_server, tmp_path):
    """--source DIR: the project's directory on the workers (e.g. a shared filesystem), given at
    deploy time; the flow runs in it."""
    shared = project_repo(tmp_path / "shared" / "rlhf", {})
    create_pool("dir-pool")
    assert main(["deploy", "--pool", "dir-pool", "--name", "from-dir", "--source", str(shared)]) == 0
    dep = read_deployment("from-dir")
    assert dep.parameters == {"project_dir": "."}
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(shared)}}]
    assert dep.job_variables == {}


def test_deploy_without_origin_or_source_says_what_to_give(tmp_path):
    (tmp_path / "repo").mkdir()
    git(tmp_path / "repo", "init", "-q")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--pool", "p", "--project-dir",
                           str(tmp_path / "repo")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--source" in proc.stderr and "no git remote 'origin'" in proc.stderr and "[deploy_source]" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--pool", "p", "--source",
                           str(tmp_path / "repo")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "no flows/pipeline.py in it" in proc.stderr


def test_git_urls_are_told_from_directories():
    from flows.deploy import is_git_url

    for url in ("https://github.com/org/rlhf.git", "https://gitlab.example/org/rlhf", "ssh://git@host/rlhf",
                "git@github.com:org/rlhf.git", "file:///srv/git/rlhf", "/srv/git/rlhf.git"):
        assert is_git_url(url), url
    for path in ("/srv/rlhf", "rlhf", "./checkouts/rlhf"):
        assert not is_git_url(path), path


def test_stage_tags_come_from_the_resources_group():
    from tasks.params import parse_params

    p = parse_params({"resources": {"gpu": ["sft", "dpo"], "tags": {"dpo": ["big-memory"], "validate": ["io"]}}})
    assert p.resources.stage_tags("sft") == ["gpu"]
    assert p.resources.stage_tags("dpo") == ["gpu", "big-memory"]
    assert p.resources.stage_tags("validate") == ["io"]
    assert p.resources.stage_tags("tokenize") == []


@pytest.mark.parametrize("group, key", [({"gpu": ["sft", "dpoo"]}, "resources.gpu"),
                                        ({"tags": {"sftt": ["x"]}}, "resources.tags.sftt"),
                                        ({"tags": {"sft": "gpu"}}, "resources.tags.sft"),
                                        ({"tags": {"sft": [""]}}, "resources.tags.sft")])
def test_resources_naming_an_unknown_stage_or_a_bad_tag_are_refused(group, key):
    from rlhf_core.errors import ConfigError
    from tasks.params import parse_params

    with pytest.raises(ConfigError) as err:
        parse_params({"resources": group})
    assert f"'{key}'" in str(err.value)
