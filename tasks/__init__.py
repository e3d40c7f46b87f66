"""Tasks: the pipeline's stages as units of work, one level below the Prefect flow.

A task here is what one stage does when `dvc repro` (or `rlhf stage NAME`) runs it: read its params
and inputs, call the pure library (`rlhf_core`), write its outputs and metrics, and record the run
in MLflow. Tasks are plain functions, not Prefect `@task`s: the flow (`flows/pipeline.py`) wraps
each stage in one Prefect task that runs `dvc repro` on it, so DVC decides what is stale and the
same code runs with or without Prefect.

- `layout`: the stage contract, one `StageSpec` per stage (paths, params, inputs, entry function);
  `dvc.yaml` is rendered from it, with code deps from `code_deps`.
- `stages`: each stage's entry function and `run_stage`, what `rlhf stage NAME` calls.
- `params`, `validation`, `tracking`, `parent_run`, `compare`, `plots`: what the entries use.
"""
