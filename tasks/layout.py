"""The pipeline's DAG and file layout, in one place.

`dvc.yaml` is rendered from `STAGES` (`rlhf dvc-yaml`), the Prefect flow walks the same list, and
a test checks that the committed `dvc.yaml` is what `STAGES` renders. So the two cannot drift.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhf_core.errors import RLHFError

TOKENIZED = "data/tokenized"
TOKENIZER = "models/tokenizer"
DEMO_DIR = "data/demo"
VALIDATION_REPORT = "reports/validation.json"
REJECTED_DIR = "reports/rejected"
"""Records the validate stage set aside, one `<file>.jsonl` per input (git-ignored, not a DVC output)."""
EVAL_METRICS = "metrics/eval.json"


def model_dir(stage: str) -> str:
    return f"models/{stage}"


def metrics_file(stage: str) -> str:
    return f"metrics/{stage}.json"


def history_file(stage: str) -> str:
    return f"plots/{stage}.csv"


def run_record(stage: str) -> str:
    """The last run of a stage: its MLflow run id and seconds (git-ignored, not a DVC output)."""
    return f"reports/runs/{stage}.json"


def checkpoint_dir(stage: str) -> str:
    return f"checkpoints/{stage}"


DATA_FILES = ("${data.pt}", "${data.sft}", "${data.preference}", "${data.prompts}")
CORE = "rlhf_core"


@dataclass(frozen=True)
class StageSpec:
    name: str
    deps: tuple[str, ...]
    """Data and models the stage reads."""
    code: tuple[str, ...]
    """Code the stage runs (besides the shared task code)."""
    params: tuple[str, ...]
    """params.yaml groups the stage reads."""
    outs: tuple[str, ...]
    """Outputs cached by DVC."""
    plot_y: tuple[str, ...] = ()
    """Columns of the per-step history drawn by `dvc plots show`."""

    @property
    def trains(self) -> bool:
        return self.outs == (model_dir(self.name),)


def _core(*modules: str) -> tuple[str, ...]:
    return tuple(f"{CORE}/{m}.py" for m in modules)


TRAIN_CODE = _core("config", "training/context", "training/stop", "training/progress", "training/frozen", "training/optim", "training/checkpoint", "data/batching", "training/modeling", "ops/losses", "ops/logprobs", "data/splits")

STAGES: tuple[StageSpec, ...] = (
    StageSpec("generate", (), _core("demo/data", "demo/oracle"), ("demo",), (DEMO_DIR,)),
    StageSpec("validate", DATA_FILES + ("${data.eval_prompts}",), ("tasks/validation.py", f"{CORE}/data/formats.py", f"{CORE}/data/sources.py"),
              ("data", "validate", "model"), (VALIDATION_REPORT,)),
    StageSpec("tokenize", DATA_FILES + (VALIDATION_REPORT,), _core("data/formats", "data/sources", "data/encoding", "data/tokenizer"),
              ("data", "model", "tokenize"), (TOKENIZED, TOKENIZER)),
    StageSpec("pt", (TOKENIZED, TOKENIZER), TRAIN_CODE + _core("stages/lm"), ("model", "pt"), (model_dir("pt"),),
              ("train/loss", "eval/loss")),
    StageSpec("sft", (TOKENIZED, model_dir("pt")), TRAIN_CODE + _core("stages/lm"), ("model", "sft"), (model_dir("sft"),),
              ("train/loss", "eval/loss")),
    StageSpec("rm", (TOKENIZED, model_dir("sft")), TRAIN_CODE + _core("stages/rm"), ("model", "rm"), (model_dir("rm"),),
              ("train/loss", "train/accuracy", "eval/accuracy")),
    # the held-out judge RM: trains on preference/judge (tokenize.judge_fraction > 0), else records
    # that there is none; evaluate scores with it under evaluate.judge: heldout_rm
    StageSpec("judge", (TOKENIZED, model_dir("sft")), TRAIN_CODE + _core("stages/rm"), ("model", "judge"), (model_dir("judge"),),
              ("train/loss", "train/accuracy", "eval/accuracy")),
    StageSpec("dpo", (TOKENIZED, model_dir("sft")), TRAIN_CODE + _core("stages/dpo"), ("model", "dpo"), (model_dir("dpo"),),
              ("train/loss", "train/rewards/margins", "train/rewards/accuracies")),
    StageSpec("ppo", (TOKENIZED, model_dir("sft"), model_dir("rm")), TRAIN_CODE + _core("stages/ppo", "ops/gae", "ops/kl", "stages/generation"),
              ("model", "ppo"), (model_dir("ppo"),), ("objective/scores", "objective/kl", "objective/rlhf_reward")),
    StageSpec("evaluate", (TOKENIZED, "${data.eval_prompts}", model_dir("sft"), model_dir("rm"), model_dir("judge"),
                           model_dir("dpo"), model_dir("ppo")), _core("evaluation/evaluate", "demo/oracle", "stages/generation"),
              ("data", "model", "tokenize", "evaluate", "tracking"), ("plots/eval",)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
SPECS = {s.name: s for s in STAGES}
TRAINED = tuple(s.name for s in STAGES if s.trains)


def upstream(stage: str) -> list[str]:
    """Stages whose outputs `stage` reads directly."""
    produced = {o: s.name for s in STAGES for o in s.outs}
    return [produced[d] for d in SPECS[stage].deps if d in produced]


def read_lock(root: str | Path) -> dict[str, dict]:
    """The stages DVC recorded in `dvc.lock` (stage name -> its cmd, deps, params, outs); {} before any run."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return {}
    fix = "restore it (`git checkout dvc.lock`) or delete it so DVC records the stages again [dvc_lock]"
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{lock}:{mark.line + 1}" if mark else str(lock)
        raise RLHFError(f"{where}: is not valid YAML ({getattr(e, 'problem', None) or e}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages") or {}, dict):
        raise RLHFError(f"{lock}: is not a DVC lock file (no 'stages' mapping); {fix}")
    return data.get("stages") or {}


def _uncached() -> dict:  # a fresh dict each time, or yaml writes anchors (&id001) into dvc.yaml
    return {"cache": False, "persist": True}


def render_dvc_yaml() -> str:
    stages = {}
    for s in STAGES:
        entry = {
            "cmd": f"rlhf stage {s.name}",
            "deps": [*s.deps, *s.code, "tasks/stages.py"],
            "params": list(s.params),
            # persist: DVC would otherwise delete these before the command runs, so a failing run
            # would destroy the last good outputs; the stages replace them atomically themselves
            "outs": [{o: {"persist": True}} for o in s.outs],
            "metrics": [{metrics_file(s.name) if s.name != "evaluate" else EVAL_METRICS: _uncached()}],
        }
        if s.plot_y:
            entry["plots"] = [{f: _uncached()} for f in (history_file(s.name), f"plots/{s.name}.png")]
        stages[s.name] = entry
    plots = [{history_file(s.name): {"x": "step", "y": list(s.plot_y)}} for s in STAGES if s.plot_y]
    plots.append({"plots/eval/comparison.png": None})
    header = "# Generated from tasks/layout.py by `rlhf dvc-yaml`; edit STAGES there, not here.\n"
    return header + yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False, width=120)


def write_dvc_yaml(root: str | Path = ".") -> Path:
    path = Path(root) / "dvc.yaml"
    path.write_text(render_dvc_yaml())
    return path
