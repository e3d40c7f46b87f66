"""The stage contract: every fact about a stage, in one list (`STAGES`).

Each `StageSpec` names the stage, the params groups it reads, its typed inputs, its outputs, its
metrics file and plots, the split it trains on, the model it starts from and the function that
runs it. From this list alone:

- `dvc.yaml` is rendered (`rlhf dvc-yaml`; a test compares the committed file), with each stage's
  code deps computed from the project modules its entry function really imports (`tasks.code_deps`);
- `rlhf stage NAME` dispatches to `StageSpec.entry`, and the Prefect flow walks `STAGE_NAMES`;
- metrics, plots, init and upstream paths are read (`StageSpec.metrics`, `.history`, `init_dir`...).

No other module spells a stage name, an output path or a list of models (a test greps for them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf_core.errors import RLHFError

# libyaml's loader where PyYAML was built with it: dvc.lock lists every dependency's hash (~2,000 lines)
# and is read several times per stage; the pure-Python loader took 0.6 s per read, libyaml 0.04 s
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

TOKENIZED = "data/tokenized"
TOKENIZER = "models/tokenizer"
DEMO_DIR = "data/demo"
VALIDATION_REPORT = "reports/validation.json"
VALIDATION_FAILED = "reports/validation_failed.json"
"""The full report of a failed validation (git-ignored, not a DVC output)."""
REJECTED_DIR = "reports/rejected"
"""Records the validate stage set aside, one `<file>.jsonl` per input (git-ignored, not a DVC output)."""
EVAL_DIR = "plots/eval"
EVAL_CHART = f"{EVAL_DIR}/comparison.png"
EVAL_REPORT = f"{EVAL_DIR}/report.md"
LAUNCHER = "scripts/stage.sh"
"""What dvc.yaml runs: `rlhf stage NAME` under the Python that runs DVC (see the script)."""
CODE_ROOTS = ("rlhf_core", "tasks", "flows")
"""Top-level packages whose modules count as a stage's code deps."""
STAGE_COMMAND = "flows.cli:cmd_stage"
STAGE_RUNNER = "run_stage"
"""`rlhf stage NAME` runs `STAGE_COMMAND`, which calls tasks.stages.`STAGE_RUNNER`, which calls the
stage's own entry: the imports of all three are the stage's code deps."""

POLICY = "sft"
"""The policy every aligned model is compared with."""
ALIGNED = ("dpo", "ppo")
"""The aligned policies; the best of them is the promotion candidate."""
POLICIES = (POLICY, *ALIGNED)
"""The policies evaluate compares, in the order of its table."""
REWARD = "rm"
JUDGE = "judge"

DATA_FILES = {"pt": "${data.pt}", "sft": "${data.sft}", "preference": "${data.preference}",
              "prompts": "${data.prompts}"}


def model_dir(stage: str) -> str:
    return f"models/{stage}"


def run_record(stage: str) -> str:
    """The last run of a stage: its MLflow run, seconds, throughput and lineage (git-ignored, not
    a DVC output, so nothing run-specific reaches an output DVC hashes)."""
    return f"reports/runs/{stage}.json"


def checkpoint_dir(stage: str) -> str:
    return f"checkpoints/{stage}"


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str
    """The function in tasks/stages.py that runs the stage, called as `fn(root, params, stage, run)`."""
    params: tuple[str, ...]
    """params.yaml groups the stage reads (each a config class in tasks/params.py)."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Role -> path of every data file and model the stage reads (`tokenized`, `tokenizer`, `init`,
    `reward_model`, `eval_prompts`...); `${...}` paths are resolved by DVC from params.yaml."""
    outs: tuple[str, ...] = ()
    """Outputs cached by DVC."""
    plot_y: tuple[str, ...] = ()
    """Columns of the per-step history drawn by `dvc plots show` (a training stage has some)."""
    train_split: str | None = None
    """The tokenized split a training stage reads (`data/tokenized/<split>`)."""
    init: str | None = None
    """The stage whose model this stage starts from."""
    metrics_name: str | None = None
    """The metrics file's stem when it is not the stage's name."""
    eval_y: tuple[str, ...] = ()
    """Columns of an aligned policy's history drawn again beside the evaluation (`plots/eval`)."""
    loop: str | None = None
    """A training stage's loop, `module:function` in rlhf_core, called as `fn(ctx, cfg, model_cfg)`."""
    split: str = "train"
    """Which part of `train_split` the loop trains on (the judge RM: `judge`, held out from the rest)."""

    @property
    def deps(self) -> tuple[str, ...]:
        """Data and models the stage reads (DVC deps besides code)."""
        return tuple(self.inputs.values())

    @property
    def trains(self) -> bool:
        return self.train_split is not None

    @property
    def model(self) -> str:
        return model_dir(self.name)

    @property
    def metrics(self) -> str:
        return f"metrics/{self.metrics_name or self.name}.json"

    @property
    def history(self) -> str | None:
        """The per-step training history (CSV), or None for a stage that does not train."""
        return f"plots/{self.name}.csv" if self.plot_y else None

    @property
    def chart(self) -> str | None:
        """The training curves (PNG) drawn from the history."""
        return f"plots/{self.name}.png" if self.plot_y else None


def _trained(name: str, loop: str, split: str, init: str | None, plot_y: tuple[str, ...],
             eval_y: tuple[str, ...] = (), subsplit: str = "train", **inputs: str) -> StageSpec:
    start = {"init": model_dir(init)} if init else {"tokenizer": TOKENIZER}
    # launch: the number of processes sets the global batch (batch_size is per process)
    return StageSpec(name, "train_stage", ("model", name, "launch"), {"tokenized": TOKENIZED, **start, **inputs},
                     (model_dir(name),), plot_y, split, init, eval_y=eval_y, loop=f"rlhf_core.stages.{loop}",
                     split=subsplit)


LM_CURVES = ("train/loss", "eval/loss")
RM_CURVES = ("train/loss", "train/accuracy", "eval/accuracy")

STAGES: tuple[StageSpec, ...] = (
    StageSpec("generate", "generate", ("demo",), {}, (DEMO_DIR,)),
    StageSpec("validate", "validate", ("data", "validate", "model"),
              {**DATA_FILES, "eval_prompts": "${data.eval_prompts}"}, (VALIDATION_REPORT,)),
    StageSpec("tokenize", "tokenize", ("data", "model", "tokenize"), {**DATA_FILES, "validation": VALIDATION_REPORT},
              (TOKENIZED, TOKENIZER)),
    _trained("pt", "lm:run_pt", "pt", None, LM_CURVES),
    _trained("sft", "lm:run_sft", "sft", "pt", LM_CURVES),
    _trained(REWARD, "rm:run_rm", "preference", POLICY, RM_CURVES),
    # the held-out judge RM: trains on preference/judge (tokenize.judge_fraction > 0), else records
    # that there is none; evaluate scores with it under evaluate.judge: heldout_rm
    _trained(JUDGE, "rm:run_rm", "preference", POLICY, RM_CURVES, subsplit=JUDGE),
    _trained("dpo", "dpo:run_dpo", "preference", POLICY, ("train/loss", "train/rewards/margins", "train/rewards/accuracies"),
             ("train/rewards/margins", "train/rewards/accuracies")),
    _trained("ppo", "ppo:run_ppo", "prompts", POLICY, ("objective/scores", "objective/kl", "objective/rlhf_reward"),
             ("objective/scores", "objective/kl"), reward_model=model_dir(REWARD)),
    StageSpec("evaluate", "evaluate", ("data", "model", "tokenize", "evaluate", "tracking"),
              {"tokenized": TOKENIZED, "eval_prompts": "${data.eval_prompts}",
               **{m: model_dir(m) for m in (POLICY, REWARD, JUDGE, *ALIGNED)}},
              (EVAL_DIR,), metrics_name="eval"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
SPECS = {s.name: s for s in STAGES}
TRAINED = tuple(s.name for s in STAGES if s.trains)
EVALUATE = STAGES[-1].name
"""The last stage: it reads every model and writes the evaluation."""
EVAL_METRICS = SPECS[EVALUATE].metrics
MODEL_STAGES = (*TRAINED, EVALUATE)
"""Stages that load models (the default of `resources.gpu`)."""
JUDGE_SPLIT = f"{SPECS[JUDGE].train_split}/{SPECS[JUDGE].split}"
"""The split the judge RM trains on (written by tokenize when tokenize.judge_fraction > 0)."""


def producer(path: str) -> str | None:
    """The stage whose output `path` is."""
    return next((s.name for s in STAGES if path in s.outs), None)


def upstream(stage: str) -> list[str]:
    """Stages whose outputs `stage` reads directly."""
    return [producer(d) for d in SPECS[stage].deps if producer(d)]


def read_lock(root: str | Path) -> dict[str, dict]:
    """The stages DVC recorded in `dvc.lock` (stage name -> its cmd, deps, params, outs); {} before any run."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return {}
    fix = "restore it (`git checkout dvc.lock`) or delete it so DVC records the stages again [dvc_lock]"
    try:
        data = yaml.load(lock.read_text(encoding="utf-8"), Loader=SAFE_LOADER) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{lock}:{mark.line + 1}" if mark else str(lock)
        raise RLHFError(f"{where}: is not valid YAML ({getattr(e, 'problem', None) or e}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages") or {}, dict):
        raise RLHFError(f"{lock}: is not a DVC lock file (no 'stages' mapping); {fix}")
    return data.get("stages") or {}


def lock_outs(root: str | Path) -> dict[str, dict]:
    """Every output DVC recorded in `dvc.lock`, by path (its md5, size, nfiles); {} before any run."""
    return {o["path"]: o for s in read_lock(root).values() for o in s.get("outs", [])}


def stage_command(stage: str) -> str:
    return f"sh {LAUNCHER} {stage}"


def code_deps(spec: StageSpec, root: str | Path | None = None) -> list[str]:
    """The project modules the stage's code imports (relative paths), computed from the source."""
    from tasks.code_deps import imported_files

    root = Path(root) if root else Path(__file__).resolve().parents[1]
    entries = [STAGE_COMMAND, f"tasks.stages:{STAGE_RUNNER}", f"tasks.stages:{spec.entry}", *([spec.loop] if spec.loop else [])]
    return imported_files(root, entries, CODE_ROOTS) + [LAUNCHER]


def _uncached() -> dict:  # a fresh dict each time, or yaml writes anchors (&id001) into dvc.yaml
    return {"cache": False, "persist": True}


def render_dvc_yaml(root: str | Path | None = None) -> str:
    stages = {}
    for s in STAGES:
        entry = {
            "cmd": stage_command(s.name),
            "deps": [*s.deps, *code_deps(s, root)],
            "params": list(s.params),
            # persist: DVC would otherwise delete these before the command runs, so a failing run
            # would destroy the last good outputs; the stages replace them atomically themselves
            "outs": [{o: {"persist": True}} for o in s.outs],
            "metrics": [{s.metrics: _uncached()}],
        }
        if s.history:
            entry["plots"] = [{f: _uncached()} for f in (s.history, s.chart)]
        stages[s.name] = entry
    plots = [{s.history: {"x": "step", "y": list(s.plot_y)}} for s in STAGES if s.history]
    plots.append({EVAL_CHART: None})
    header = "# Generated from tasks/layout.py by `rlhf dvc-yaml`; edit STAGES there, not here.\n"
    return header + yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False, width=120)


def write_dvc_yaml(root: str | Path = ".") -> Path:
    path = Path(root) / "dvc.yaml"
    path.write_text(render_dvc_yaml(root))
    return path
