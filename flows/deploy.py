"""`rlhf deploy`: the flow as a Prefect deployment that a worker on another host can run.

The deployment names the project portably: a git URL the worker clones (by default the project's
`origin` remote), or a directory given at deploy time as it is on the workers (a shared
filesystem). The flow's `project_dir` is ".", the directory the worker's pull step leaves it in,
so the absolute path of the machine that ran `deploy` is recorded nowhere.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from uuid import UUID

from rlhf_core.errors import ConfigError

ENTRYPOINT = "flows/pipeline.py:pipeline"
"""The flow, relative to the project root (the clone, or the --source directory)."""
PROJECT_DIR = "."
"""The flow's `project_dir` parameter: the working directory the pull step leaves the run in."""


def is_git_url(source: str) -> bool:
    """`https://…`, `ssh://…`, `file://…`, scp-like `git@host:org/repo`, or a path ending in `.git`."""
    return "://" in source or re.match(r"^[\w.-]+@[\w.-]+:", source) is not None or source.endswith(".git")


def origin_url(project_dir: Path) -> str | None:
    """The URL of the project's `origin` remote, or None when it has none."""
    proc = subprocess.run(["git", "remote", "get-url", "origin"], cwd=project_dir, capture_output=True, text=True)
    url = proc.stdout.strip() if proc.returncode == 0 else ""
    return url or None


def resolve_source(source: str | None, project_dir: Path) -> tuple[str, bool]:
    """(where the workers find the project, whether it is a git URL). No --source: `origin`."""
    if source:
        return source, is_git_url(source)
    origin = origin_url(project_dir)
    if origin is None:
        raise ConfigError("--source", f"{project_dir} has no git remote 'origin'; give the git URL the workers "
                                      "clone, or the project's directory as it is on the workers [deploy_source]")
    return origin, True


def project_storage(source: str, git: bool, branch: str | None):
    """The Prefect storage the workers pull: a git clone, or a directory they change into."""
    from prefect.runner.storage import GitRepository, LocalStorage

    if git:
        return GitRepository(url=source, branch=branch)
    if branch:
        raise ConfigError("--branch", "applies only to a git --source [deploy_source]")
    if not Path(source, ENTRYPOINT.split(":")[0]).is_file():
        raise ConfigError("--source", f"{source}: neither a git URL nor a project directory "
                                      f"(no {ENTRYPOINT.split(':')[0]} in it) [deploy_source]")
    return LocalStorage(path=source)


def job_variables(workdir: str | None) -> dict:
    """Process-worker job variables: `working_dir` keeps the clone (and DVC's outputs and cache in
    it) between runs; without it each run clones into a temporary directory."""
    return {"working_dir": workdir} if workdir else {}


def deploy(name: str, pool: str, source: str, git: bool, branch: str | None = None, workdir: str | None = None,
           cron: str | None = None) -> UUID:
    """Register the flow on work pool `pool`; returns the deployment id."""
    from flows.pipeline import pipeline

    flow = pipeline.from_source(source=project_storage(source, git, branch), entrypoint=ENTRYPOINT)
    return flow.deploy(name=name, work_pool_name=pool, cron=cron, parameters={"project_dir": PROJECT_DIR},
                       job_variables=job_variables(workdir), print_next_steps=False,
                       ignore_warnings=True)  # its advice to use `.serve` is for local development
