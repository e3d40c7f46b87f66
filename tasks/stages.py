"""The stages as `dvc.yaml` runs them (`rlhf stage NAME`): read params, call rlhf_core, write
outputs and metrics, record everything in MLflow. Each stage's entry function, paths, inputs and
params come from its `StageSpec` (tasks/layout.py).

Outputs are pure: what a stage writes into a DVC output is a function of its inputs and params only.
Run ids, registry versions, lineage, timings and throughput go to MLflow and to the stage's run
record (`reports/runs/<stage>.json`, not a DVC output)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rlhf_core.atomic import atomic_dir, atomic_write_text
from rlhf_core.config import to_dict
from rlhf_core.errors import ConfigError, RLHFError
from rlhf_core.training.stop import StopRequest
from tasks import launch, layout, tracking
from tasks.params import Params, load_params, resolve_judge
from tasks.plots import plot_comparison, plot_curves, plot_note, write_history_csv


class ValidationFailed(RLHFError):
    pass


class StageLocked(RLHFError):
    """Another process runs the same stage in this checkout."""


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _group_params(p: Params, stage: str) -> dict:
    return {g: to_dict(getattr(p, g)) for g in layout.SPECS[stage].params}


def _dvc_deps_hash(root: Path, stage: str) -> str:
    """Hash of the md5s DVC recorded for this stage's upstream outputs (from dvc.lock)."""
    outs = layout.lock_outs(root)
    if not outs:  # no dvc.lock yet (every stage has outputs, so a lock with stages has some)
        return "none"
    deps = [f"{d}:{outs[d].get('md5', '')}" for d in layout.SPECS[stage].deps if d in outs]
    return hashlib.sha256("|".join(deps).encode()).hexdigest()[:16]


# --- data stages -----------------------------------------------------------------------------

def generate(root: Path, p: Params, stage: str | None = None, run=None) -> dict:
    from rlhf_core.demo import data as demo_data

    with atomic_dir(root / layout.DEMO_DIR) as tmp:
        counts = demo_data.generate(tmp, p.demo)
    return {"files": counts}


def validate(root: Path, p: Params, stage: str | None = None, run=None) -> dict:
    """Validate every input; set aside up to `validate.max_invalid_fraction` of a file's records
    (listed in `reports/rejected/<file>.jsonl` and skipped by tokenize), or fail before training."""
    from tasks.validation import model_special_tokens, rejected_records, validate_file

    tokens = model_special_tokens(p.model.name_or_path)
    inputs = p.data.inputs()
    reports = [validate_file(root / path, kind, p.validate, p.data.columns.get(name), tokens)
               for name, path, kind in inputs]
    # the paths as params.yaml gives them (relative to the project), so the report is the same in any checkout
    summary = {"files": [{**r.to_dict(), "path": path} for (_, path, _), r in zip(inputs, reports)],
               "success": all(r.success for r in reports),
               "set_aside": {path: r.invalid_lines for (_, path, _), r in zip(inputs, reports)}}
    tracking.log_dict_artifact(summary, "validation.json")
    if not summary["success"]:
        failed = root / layout.VALIDATION_FAILED
        _write_json(failed, summary)
        text = "\n".join(r.format() for r in reports if not r.success)
        raise ValidationFailed(f"data validation failed; no training was started and earlier outputs are "
                               f"untouched (full report: {failed}):\n{text}")
    names: dict[str, str] = {}
    with atomic_dir(root / layout.REJECTED_DIR) as tmp:
        for (name, path, _), r in zip(inputs, reports):
            if r.invalid and path not in names:
                names[path] = f"{Path(path).stem}.jsonl" if Path(path).stem + ".jsonl" not in names.values() \
                    else f"{name}-{Path(path).stem}.jsonl"
                (tmp / names[path]).write_text("".join(json.dumps(e, ensure_ascii=False) + "\n"
                                                       for e in rejected_records(r)))
    for (name, path, _), r in zip(inputs, reports):
        where = f" (listed in {layout.REJECTED_DIR}/{names[path]})" if path in names else ""
        print(f"{Path(path).name}: {r.kind}: {r.policy()}{where}")
    _write_json(root / layout.VALIDATION_REPORT, summary)
    counts = {name: {"records": r.records, "valid": r.valid, "set_aside": r.invalid, "duplicates": r.duplicates}
              for (name, _, _), r in zip(inputs, reports)}
    _log_metrics({f"validate/{name}/{k}": v for name, c in counts.items() for k, v in c.items()})
    return {"rows": {Path(r.path).name: r.rows for r in reports},
            "duplicates": {Path(r.path).name: r.duplicates for r in reports},
            "shapes": {name: r.shape for (name, _, _), r in zip(inputs, reports)},
            "set_aside": sum(r.invalid for r in reports), "inputs": counts}


def _log_metrics(metrics: dict) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics(metrics)


def _set_aside(root: Path, p: Params) -> dict[str, set[int]]:
    """Input name -> the lines the validate stage set aside (tokenize and evaluate skip them)."""
    report = root / layout.VALIDATION_REPORT
    lines = json.loads(report.read_text()).get("set_aside", {}) if report.exists() else {}
    return {name: set(lines.get(path, [])) for name, path, _ in p.data.inputs()}


def tokenize(root: Path, p: Params, stage: str | None = None, run=None) -> dict:
    from rlhf_core.data import formats
    from rlhf_core.data.encoding import tokenize_datasets
    from rlhf_core.data.tokenizer import load_tokenizer, train_tokenizer
    from tasks.validation import tokenized_checks

    skip, cols = _set_aside(root, p), p.data.columns
    docs = formats.read_pt_documents(root / p.data.pt, cols.get("pt"), skip["pt"])
    convs = formats.read_conversations(root / p.data.sft, cols.get("sft"), skip["sft"])
    prefs = formats.read_preferences(root / p.data.preference, cols.get("preference"), skip["preference"])
    prompts = formats.read_prompts(root / p.data.prompts, cols.get("prompts"), skip["prompts"])
    if p.model.name_or_path:
        tokenizer = load_tokenizer(p.model.name_or_path, p.model.trust_remote_code)
    else:  # the tiny model's tokenizer is trained on everything it will read
        corpus = docs + [t.content for c in convs for t in c.turns] + [x.chosen for x in prefs] + [x.rejected for x in prefs]
        tokenizer = train_tokenizer(corpus, p.model.vocab_size)
    with atomic_dir(root / layout.TOKENIZED) as tmp:
        manifest = tokenize_datasets(tokenizer, p.tokenize, tmp, pt_docs=docs, conversations=convs,
                                     preferences=prefs, prompts=prompts,
                                     sources={"pt": p.data.pt, "sft": p.data.sft, "preference": p.data.preference,
                                              "prompts": p.data.prompts})
        checks = tokenized_checks(tmp, {"pt": p.data.pt, "sft": p.data.sft, "preference": p.data.preference,
                                        "prompts": p.data.prompts})
    with atomic_dir(root / layout.TOKENIZER) as tmp:
        tokenizer.save_pretrained(tmp)
    for kind, path in (("pt", p.data.pt), ("sft", p.data.sft), ("preference", p.data.preference), ("prompts", p.data.prompts)):
        tracking.log_dataset(root / path, kind, "training")
    for kind, c in checks.items():
        print(f"{Path(c['source']).name}: {kind}: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "source"))
    return {"vocab_size": len(tokenizer), "datasets": manifest.to_dict(), "checks": checks}


# --- training stages -------------------------------------------------------------------------

NO_JUDGE = "no_judge.json"
BASE_POINTER = "base.json"
"""Written to models/pt when PT is switched off: the base model every later stage starts from."""


def init_dir(root: Path, stage: str) -> Path | None:
    """The model `stage` starts from: its upstream stage's output, or the base model that a
    switched-off PT stage points at (a relative base path is relative to the project)."""
    if layout.SPECS[stage].init is None:
        return None
    path = root / layout.model_dir(layout.SPECS[stage].init)
    pointer = path / BASE_POINTER
    if pointer.exists():
        base = Path(json.loads(pointer.read_text())["base"]).expanduser()
        return base if base.is_absolute() else root / base
    return path
"""Written to models/judge when there is no judge split to train on (the demo: the oracle judges)."""


STOP = StopRequest()
"""The stop request of this process: the CLI's SIGTERM handler sets it, and the running training
loop then checkpoints its step and raises Stopped."""


def _input_hash(root: Path, stage: str, rel: str, lock_outs: dict[str, dict]) -> str:
    """Content hash of one input of `stage`: the md5 DVC recorded for it in dvc.lock when DVC runs
    this stage (`DVC_STAGE`, so DVC has just brought its deps up to date) and the entry still
    matches the files' count and size; otherwise sha256 of every byte of every file."""
    path, entry = root / rel, lock_outs.get(rel, {})
    if os.environ.get("DVC_STAGE") == stage and entry.get("md5"):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        if entry.get("size") == sum(f.stat().st_size for f in files) and entry.get("nfiles", 1) == len(files):
            return f"md5:{entry['md5']}"
    return f"sha256:{tracking.file_hash(path)}"


def _train_key(root: Path, p: Params, stage: str) -> str:
    """Identity of a training run: the stage's params and the content of each of its inputs. A
    finished result with this key is reused, and the loop resumes only a checkpoint with it."""
    lock_outs = layout.lock_outs(root)
    inputs = {d: _input_hash(root, stage, d, lock_outs) for d in layout.SPECS[stage].deps if (root / d).exists()}
    return hashlib.sha256(json.dumps({"params": _group_params(p, stage), "inputs": inputs}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def _timing_to_mlflow(logger):
    """The loop's per-step throughput goes to MLflow only: it differs from run to run, so it stays
    out of the history that becomes `plots/<stage>.csv`. A failure is the logger's to report."""
    def log(timing: dict, step: int) -> None:
        import mlflow

        if logger.error is None:
            try:
                mlflow.log_metrics({k: float(v) for k, v in timing.items()}, step=step)
            except Exception as e:  # noqa: BLE001
                logger.error = str(e)
    return log


def _fit(root: Path, p: Params, stage: str, logger, key: str) -> dict:
    """Run the stage's training loop (resuming from its last checkpoint with this `key`)."""
    import importlib

    from rlhf_core.training.context import RunContext

    spec = layout.SPECS[stage]
    module, name = spec.loop.split(":")
    loop = getattr(importlib.import_module(module), name)  # only this stage's loop (its code deps say so)
    cfg = getattr(p, stage)
    reward = spec.inputs.get("reward_model")
    inputs = {"data": root / layout.TOKENIZED, "tokenizer": root / layout.TOKENIZER, "init": init_dir(root, stage),
              "reward": root / reward if reward else None}
    ctx = RunContext.create(stage, cfg, inputs, root / spec.model, root / layout.checkpoint_dir(stage), key,
                            train_split=spec.split, log_fn=logger, timing_fn=_timing_to_mlflow(logger), stop=STOP)
    result = loop(ctx, cfg, p.model)
    # the run record (for MLflow and the run's side file) says how many processes trained
    return {**result.to_dict(), **result.run_record(), "num_processes": ctx.num_processes}


def _read_finished(finished: Path) -> dict | None:
    """The finished-training record, or None (with a warning naming it) if it is corrupted."""
    if not finished.exists():
        return None
    try:
        saved = json.loads(finished.read_text(encoding="utf-8"))
        if not (isinstance(saved, dict) and isinstance(saved.get("key"), str) and isinstance(saved.get("result"), dict)
                and isinstance(saved.get("history"), list)):
            raise ValueError("missing key, result or history")
    except (ValueError, UnicodeDecodeError) as e:
        print(f"warning: {finished}: corrupted ({e}); ignoring it, so the stage trains again", file=sys.stderr)
        return None
    return saved


def train(root: Path, p: Params, stage: str, run) -> dict:
    out, ckpt = root / layout.model_dir(stage), root / layout.checkpoint_dir(stage)
    finished = ckpt / "finished.json"  # kept until tracking succeeded, so a tracking outage loses no training
    key = _train_key(root, p, stage)
    logger = tracking.MetricLogger()
    saved = _read_finished(finished)
    if not launch.is_main_rank():  # another process of a launched stage: the loop only, it logs on the main one
        if not (saved and saved["key"] == key and out.exists()):
            _fit(root, p, stage, logger, key)
        return {}
    if saved and saved["key"] == key and out.exists():
        result, logger.history = saved["result"], saved["history"]
        result["reused_finished_training"] = True
        print(f"{stage}: training already finished ({finished}); logging it to MLflow again")
        for row in logger.history:
            logger({k: v for k, v in row.items() if k != "step"}, row["step"], record=False)
    else:
        try:
            result = _fit(root, p, stage, logger, key)  # writes the weights to models/<stage>
        except ConfigError as e:  # found when the model is loaded (lora.target_modules): name the params key
            if not e.key.startswith("lora."):
                raise
            raise ConfigError(f"{stage}.{e.key}", e.rule, "params.yaml") from None
        _write_json(finished, {"key": key, "result": result, "history": logger.history})  # first, whatever fails after
    try:
        return _publish(root, p, stage, run, logger, result)
    except Exception as e:  # noqa: BLE001 - whatever broke, the finished training must not be lost
        what = f"MLflow is unreachable ({e})" if isinstance(e, tracking.TrackingUnavailable) else \
            f"a step after training failed ({type(e).__name__}: {e})"
        kind = tracking.TrackingUnavailable if isinstance(e, tracking.TrackingUnavailable) else RLHFError
        raise kind(f"{stage}: training finished and is kept ({layout.model_dir(stage)}, {finished}), but {what}. "
                   f"Once that is fixed, run `rlhf stage {stage}` or `dvc repro`: the finished training is logged "
                   "and registered without training again.") from e


def _publish(root: Path, p: Params, stage: str, run, logger, result: dict) -> dict:
    """After training: history, plots, lineage and the registered model. The lineage and the
    registered version go to MLflow and to the run record (returned), not into models/<stage>."""
    spec = layout.SPECS[stage]
    out = root / spec.model
    write_history_csv(pure_history(logger.history), root / spec.history)
    png = plot_curves(logger.history, spec.plot_y, f"{stage} training", root / spec.chart)
    for f in (root / spec.history, png):
        if f:
            tracking.log_file(f, "plots")
    split = spec.train_split
    data_hash = tracking.log_dataset(root / layout.TOKENIZED / split, f"tokenized-{split}", "training")
    upstream = tracking.upstream_version(root / layout.run_record(spec.init)) if spec.init else None
    lineage = {"stage": stage, "run_id": run.info.run_id, "data_hash": data_hash,
               "dvc_deps_hash": _dvc_deps_hash(root, stage),
               "upstream_model": f"{upstream['name']}/{upstream['version']}" if upstream else "none",
               "upstream_run": upstream["run_id"] if upstream else "none",
               "git_commit": tracking.git_commit(root)}
    registered = tracking.register(stage, out, p.tracking.registry_prefix, run,
                                   {**lineage, "source_run": run.info.run_id})
    tracking.log_dict_artifact({**lineage, **registered}, tracking.LINEAGE_FILE)
    # checkpoints/<stage> (with finished.json) is removed by run_stage once the metrics are written too
    if logger.error:
        print(f"warning: MLflow step metrics failed during {stage} ({logger.error}); they are kept in "
              f"{spec.history}", file=sys.stderr)
    return {**result, "registered": registered, "lineage": lineage}


def not_trained(root: Path, stage: str, marker: str, record: dict, note: str) -> dict:
    """A training stage with nothing to train: its model folder holds only `marker` (the record),
    and its history and chart say so, so every output DVC expects exists."""
    with atomic_dir(root / layout.model_dir(stage)) as tmp:
        _write_json(tmp / marker, record)
    write_history_csv([], root / layout.SPECS[stage].history)
    plot_note(f"{stage}: {note}", root / layout.SPECS[stage].chart)
    print(f"{stage}: {note}")
    return {"trained": False, **{k: v for k, v in record.items() if k != "trained"}}


def no_pt(root: Path, p: Params, stage: str) -> dict:
    """PT switched off: models/pt points at the base model (nothing is copied or registered)."""
    later = ", ".join(s.name for s in layout.STAGES if s.init == stage)
    return not_trained(root, stage, BASE_POINTER, {"base": p.model.name_or_path},
                       f"switched off ({stage}.enabled: false); {later} starts from {p.model.name_or_path}")


def no_judge(root: Path, stage: str) -> dict:
    """The judge stage without a judge split: record that no judge RM was trained."""
    return not_trained(root, stage, NO_JUDGE, {"trained": False, "reason": (
        "no preference/judge split (tokenize.judge_fraction is 0), so no judge reward model was trained")},
        "not trained (tokenize.judge_fraction is 0; the oracle judges the demo)")


# --- evaluation ------------------------------------------------------------------------------

def make_judge(root: Path, p: Params):
    """The judge `evaluate.judge` names (see tasks.params.resolve_judge)."""
    from rlhf_core.data.tokenizer import load_tokenizer
    from rlhf_core.demo import oracle
    from rlhf_core.evaluation.evaluate import TextJudge, load_judge

    judge = resolve_judge(p)
    if judge == "oracle":
        return TextJudge("oracle", oracle.score)
    policy_tokenizer = load_tokenizer(root / layout.model_dir(layout.POLICY), p.model.trust_remote_code)
    if judge == "heldout_rm":
        path = root / layout.model_dir(layout.JUDGE)
        if (path / NO_JUDGE).exists():
            raise RLHFError(f"evaluate.judge is heldout_rm but {path} holds no judge model: "
                            f"{json.loads((path / NO_JUDGE).read_text())['reason']}")
        return load_judge(path, policy_tokenizer, p.model, name="heldout_rm")
    path = judge
    if judge.startswith(("models:/", "runs:/")):  # the stage's MLflow tracking URI is already set
        import mlflow

        path = mlflow.artifacts.download_artifacts(judge)
    return load_judge(path, policy_tokenizer, p.model, name=judge)  # the report names the URI, not a download dir


def evaluate(root: Path, p: Params, stage: str = layout.EVALUATE, run=None) -> dict:
    from rlhf_core.data import formats
    from rlhf_core.data.splits import load_split
    from rlhf_core.evaluation.evaluate import evaluate_policies

    spec, models = layout.SPECS[stage], layout.POLICIES
    prompts = formats.read_prompts(root / p.data.eval_prompts, p.data.columns.get("eval_prompts"),
                                   _set_aside(root, p)["eval_prompts"])
    judge = make_judge(root, p)
    results = evaluate_policies({m: root / spec.inputs[m] for m in models}, layout.POLICY,
                                root / spec.inputs[layout.REWARD], prompts, p.evaluate, p.model, judge,
                                load_split(root / spec.inputs["tokenized"], "preference", "eval"),
                                max_prompt_length=p.tokenize.max_prompt_length)
    out = root / layout.EVAL_DIR
    with atomic_dir(out) as tmp:
        plot_comparison(results, models, tmp / Path(layout.EVAL_CHART).name)
        for aligned in layout.ALIGNED[::-1]:
            aligned_spec = layout.SPECS[aligned]
            plot_curves(_read_history(root / aligned_spec.history), aligned_spec.eval_y, f"{aligned} training",
                        tmp / f"{aligned}_curves.png")
        (tmp / Path(layout.EVAL_REPORT).name).write_text(markdown_report(results, models))
    decision = promote(results, p)
    results["promotion"] = decision
    for f in sorted(out.iterdir()):
        tracking.log_file(f, "eval")
    import mlflow
    mlflow.log_metrics({f"{m}/{k}": v for m in models for k, v in results[m].items() if isinstance(v, (int, float))})
    return results


def _read_history(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    rows = []
    for r in csv.DictReader(path.open()):
        rows.append({k: (int(v) if k == "step" else float(v)) for k, v in r.items() if v != ""})
    return rows


def markdown_report(results: dict, models: list[str]) -> str:
    keys = ["judge_score", "judge_score_greedy", "win_rate_vs_sft", "kl_to_sft", "rm_score", "mean_length", "eos_rate",
            "preference_accuracy"]
    lines = [f"judge: {results.get('judge', '?')}\n", "| model | " + " | ".join(keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(f"{results[m].get(k, float('nan')):.3f}" for k in keys) + " |")
    lines.append(f"\nreward model: {json.dumps(results.get('rm', {}))}\n")
    for m, rows in results.get("examples", {}).items():
        lines.append(f"### {m}")
        for ex in rows:
            lines.append(f"- **{ex.get('prompt')}** → greedy: `{ex.get('greedy')}` · sample: `{ex.get('sample')}`")
    return "\n".join(lines) + "\n"


def promote(results: dict, p: Params) -> dict:
    """Give the best of PPO and DPO the `champion` alias if it beats SFT by the margin."""
    import mlflow

    best = max(layout.ALIGNED[::-1], key=lambda m: results[m]["judge_score"])  # the last aligned one wins a tie
    gain = results[best]["judge_score"] - results[layout.POLICY]["judge_score"]
    ok = gain >= p.evaluate.promotion_margin
    judge = results["judge"]
    reason = (f"{best} {judge} judge score {results[best]['judge_score']:.3f} vs {layout.POLICY} "
              f"{results[layout.POLICY]['judge_score']:.3f} "
              f"(gain {gain:+.3f}, required {p.evaluate.promotion_margin:+.3f})")
    decision = {"candidate": best, "promoted": ok, "reason": reason, "judge": judge}
    if ok:
        name = f"{p.tracking.registry_prefix}-{best}"
        client = mlflow.MlflowClient()
        version = client.get_model_version_by_alias(name, "candidate").version
        client.set_registered_model_alias(name, "champion", version)
        decision["model"] = f"models:/{name}@champion"
    mlflow.set_tags({"promotion.promoted": str(ok), "promotion.reason": reason, "evaluate.judge": judge})
    print(("promoted: " if ok else "not promoted: ") + reason)
    return decision


# --- entry point -----------------------------------------------------------------------------

def run_stage(stage: str, root: Path = Path("."), params_file: str = "params.yaml") -> dict:
    """Run one stage in this process: what `rlhf stage NAME` (and so `dvc repro`) calls."""
    if stage not in layout.SPECS:
        raise RLHFError(f"unknown stage '{stage}' (stages: {', '.join(layout.STAGE_NAMES)})")
    root = Path(root).resolve()
    p = load_params(root / params_file)
    if launch.in_child():  # one of the processes of a launch below: the parent holds the lock
        return _run_rank(root, p, stage, params_file)
    with stage_lock(root, stage):
        preflight(root, stage)
        if p.launch.num_processes > 1 and layout.SPECS[stage].trains and trains_now(root, p, stage):
            return _launch(root, p, stage, params_file)
        metrics = _run_locked(root, p, stage, params_file)
        if layout.SPECS[stage].trains:  # logged, registered and written: the resume point is no longer needed
            shutil.rmtree(root / layout.checkpoint_dir(stage), ignore_errors=True)
    return metrics


class LaunchFailed(RLHFError):
    """The processes of a launched stage failed; `returncode` is the launcher's exit code."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def _launch(root: Path, p: Params, stage: str, params_file: str) -> dict:
    """Run `stage` in `launch.num_processes` processes (tasks/launch.py) and wait for them; their
    main process writes the outputs, so the metrics are read back from its metrics file."""
    from rlhf_core.training.stop import Stopped

    cfg = p.launch
    cmd = launch.launch_command(cfg, stage, params_file, root, launch.free_port())
    print(f"{stage}: launching {cfg.num_processes} processes: {' '.join(cmd[1:])}", flush=True)
    rc, signum = launch.run_launched(cmd, os.environ)
    if signum is not None:
        raise Stopped(f"{stage}: stopped by signal {signum}; its {cfg.num_processes} processes checkpointed and "
                      f"stopped, and the next run with the same number resumes", signum)
    if rc != 0:
        raise LaunchFailed(f"{stage}: {cfg.num_processes} processes under accelerate launch failed (exit code {rc}); "
                           "their errors are above", rc)
    return json.loads((root / layout.SPECS[stage].metrics).read_text())


def _run_rank(root: Path, p: Params, stage: str, params_file: str) -> dict:
    """One process of a launched stage. The main process runs the stage as one process would
    (MLflow run, metrics, plots, run record, registration); the others run the training loop
    only, so its collectives have all their members, and return nothing."""
    if launch.is_main_rank():
        metrics = _run_locked(root, p, stage, params_file)
        shutil.rmtree(root / layout.checkpoint_dir(stage), ignore_errors=True)
        return metrics
    return globals()[layout.SPECS[stage].entry](root, p, stage, None)  # the loop only (see `train`)


RUN_SPECIFIC = ("wall_seconds", "tokens_per_second", "timing", "resumed_from_step", "registered", "lineage",
                "reused_finished_training", "num_processes")
"""Result keys that describe a run, not the outputs: they go to the run record and MLflow, never
into the metrics file (a DVC output)."""
RUN_SPECIFIC_METRICS = ("tokens_per_second", "seconds")
"""Suffixes of per-step metric names that measure the machine (throughput, time), kept out of the
metrics file and the history CSV (both DVC outputs) and logged to MLflow only."""


def split_run_specific(result: dict) -> tuple[dict, dict]:
    """(what a stage's metrics file holds, what only its run record holds): the first is a function
    of the stage's inputs and params, the second holds timings, throughput, run ids and lineage."""
    pure = {k: v for k, v in result.items() if k not in RUN_SPECIFIC}
    run = {k: v for k, v in result.items() if k in RUN_SPECIFIC}
    if isinstance(result.get("metrics"), dict):
        pure["metrics"] = {k: v for k, v in result["metrics"].items() if not k.endswith(RUN_SPECIFIC_METRICS)}
        run.update({k: v for k, v in result["metrics"].items() if k.endswith(RUN_SPECIFIC_METRICS)})
    return pure, run


def pure_history(history: list[dict]) -> list[dict]:
    """The per-step history without the machine's timings (see `RUN_SPECIFIC_METRICS`)."""
    return [{k: v for k, v in row.items() if not k.endswith(RUN_SPECIFIC_METRICS)} for row in history]


def train_stage(root: Path, p: Params, stage: str, run) -> dict:
    """A training stage: trained, or recorded as having nothing to train (PT switched off, no judge split)."""
    if not trains_now(root, p, stage):  # never launched in several processes (see run_stage)
        return no_judge(root, stage) if stage == layout.JUDGE else no_pt(root, p, stage)
    return train(root, p, stage, run)


def trains_now(root: Path, p: Params, stage: str) -> bool:
    """False for a training stage with nothing to train: the judge without a judge split, PT
    switched off (later stages then start from the base model)."""
    if stage == layout.JUDGE and not (root / layout.TOKENIZED / layout.JUDGE_SPLIT).exists():
        return False
    return getattr(getattr(p, stage), "enabled", True)


def _run_locked(root: Path, p: Params, stage: str, params_file: str = "params.yaml") -> dict:
    t0 = time.perf_counter()
    spec = layout.SPECS[stage]
    with tracking.stage_run(root, stage, p.tracking.experiment, _group_params(p, stage), params_file) as run:
        result = globals()[spec.entry](root, p, stage, run)
        metrics, run_specific = split_run_specific(result)
        # run bookkeeping stays out of the metrics file, so the same inputs give the same file
        _write_json(root / layout.run_record(stage), {"stage": stage, "mlflow_run_id": run.info.run_id,
                                                      "stage_seconds": round(time.perf_counter() - t0, 3),
                                                      **run_specific})
        target = root / spec.metrics
        _write_json(target, metrics)
        try:
            tracking.log_file(target, "metrics")
            tracking.log_dict_artifact(run_specific, f"run/{stage}.json")
        except tracking.TrackingUnavailable as e:  # the stage's work is done and on disk
            print(f"warning: {target} was not logged to MLflow: {e}", file=sys.stderr)
    return result


# --- before a stage starts -------------------------------------------------------------------

def output_dirs(stage: str) -> list[str]:
    """Folders a stage writes into (its outputs are renamed into place inside them)."""
    spec = layout.SPECS[stage]
    dirs = {str(Path(o).parent) for o in spec.outs} | {str(Path(spec.metrics).parent),
                                                      str(Path(layout.run_record(stage)).parent)}
    if spec.trains:
        dirs |= {str(Path(layout.checkpoint_dir(stage)).parent), str(Path(spec.history).parent)}
    return sorted(dirs)


def check_writable(root: Path, rel: str) -> None:
    """Create a file in `root/rel` and remove it: the only test that also holds for root and ACLs."""
    import tempfile

    try:
        (root / rel).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=root / rel)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise RLHFError(f"{rel}: output folder is not writable ({e.strerror or e}); nothing was started "
                        "[writable]") from None


def preflight(root: Path, stage: str) -> None:
    """What can fail after training is checked before it: dvc.lock parses, outputs are writable."""
    layout.read_lock(root)  # a corrupted dvc.lock raises here, naming its line
    for rel in output_dirs(stage):
        check_writable(root, rel)


@contextmanager
def stage_lock(root: Path, stage: str):
    """One run of a stage at a time per checkout: an exclusive `flock` on `checkpoints/.<stage>.lock`,
    released by the kernel when the process ends, so a killed run leaves no stale lock."""
    import fcntl

    path = root / Path(layout.checkpoint_dir(stage)).parent / f".{stage}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
    except OSError as e:
        raise RLHFError(f"{path.parent}: output folder is not writable ({e.strerror or e}); nothing was started "
                        "[writable]") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise StageLocked(f"{stage}: another run of this stage is in progress in this checkout (pid {holder}, "
                              f"lock {path.relative_to(root)}); wait for it to finish or stop it, then run "
                              "again [stage_lock]") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
