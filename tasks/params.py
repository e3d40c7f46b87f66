"""Read and check `params.yaml`: every group maps 1:1 onto a config dataclass, unknown groups or
keys and out-of-range values are rejected before any work starts, naming the key."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf_core.config import (
    DPOConfig,
    EvalConfig,
    ModelConfig,
    PPOConfig,
    PTConfig,
    RMConfig,
    SFTConfig,
    TokenizeConfig,
    from_dict,
)
from rlhf_core.data.formats import FIELDS
from rlhf_core.demo.data import DemoDataConfig
from rlhf_core.errors import ConfigError
from tasks.layout import DEMO_DIR, MODEL_STAGES, STAGE_NAMES
from tasks.validation import ValidationLimits

INPUTS = {"pt": "pt", "sft": "sft", "preference": "preference", "prompts": "prompts", "eval_prompts": "prompts"}
"""Input name in the `data` group -> the kind of records it holds."""


@dataclass(frozen=True)
class DataConfig:
    pt: str = f"{DEMO_DIR}/pt.txt"
    """PT corpus: `.txt` or JSONL `{"text"}`."""
    sft: str = f"{DEMO_DIR}/sft.jsonl"
    """SFT conversations (ShareGPT or messages)."""
    preference: str = f"{DEMO_DIR}/preferences.jsonl"
    """Preference pairs or rankings."""
    prompts: str = f"{DEMO_DIR}/prompts.jsonl"
    """PPO prompts."""
    eval_prompts: str = f"{DEMO_DIR}/eval_prompts.jsonl"
    """Held-out prompts of the evaluate stage."""
    columns: dict = field(default_factory=dict)
    """Per input (`pt`, `sft`, `preference`, `prompts`, `eval_prompts`), the file's own key for
    each field a shape reads, e.g. `{preference: {prompt: question, chosen: answer_good}}`."""

    def __post_init__(self) -> None:
        if not isinstance(self.columns, dict):
            raise ConfigError("columns", f"must be a mapping of inputs, got {type(self.columns).__name__}")
        for name, mapping in self.columns.items():
            if name not in INPUTS:
                raise ConfigError(f"columns.{name}", f"unknown input (allowed: {', '.join(INPUTS)})")
            if not isinstance(mapping, dict):
                raise ConfigError(f"columns.{name}", "must map field names to the file's own column names")
            for ours, theirs in mapping.items():
                if ours not in FIELDS:
                    raise ConfigError(f"columns.{name}.{ours}", f"unknown field (allowed: {', '.join(FIELDS)})")
                if not isinstance(theirs, str) or not theirs:
                    raise ConfigError(f"columns.{name}.{ours}", "must be the file's column name, a non-empty string")

    def inputs(self) -> list[tuple[str, str, str]]:
        """(input name, path, kind) of every input file, in stage order."""
        return [(name, getattr(self, name), INPUTS[name]) for name in INPUTS]

    def uses_demo(self) -> bool:
        """Whether any input lies under the demo folder, so the `generate` stage must write it."""
        demo = Path(DEMO_DIR)
        return any(Path(path) == demo or demo in Path(path).parents for _, path, _ in self.inputs())


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "rlhf-pipeline"
    """MLflow experiment name."""
    registry_prefix: str = "rlhf"
    """Registered models are named `<prefix>-<stage>`; MLflow refuses '/' and ':' in a model name,
    and '@' would break `models:/name@alias` URIs."""

    def __post_init__(self):
        _check_mlflow_names(self.experiment, self.registry_prefix)


def _check_mlflow_names(experiment: str, prefix: str) -> None:
    """Names MLflow accepts, checked here so a bad one fails before anything trains."""
    if not experiment.strip():
        raise ConfigError("experiment", "must be a non-empty MLflow experiment name [mlflow_name]")
    if len(experiment) > 500:
        raise ConfigError("experiment", "is longer than MLflow's 500 characters [mlflow_name]")
    if not prefix.strip() or prefix != prefix.strip():
        raise ConfigError("registry_prefix", "must be non-empty, without leading or trailing spaces [mlflow_name]")
    bad = sorted({c for c in prefix if c in "/:@%"})
    if bad or prefix.startswith("."):
        what = f"contains {', '.join(repr(c) for c in bad)}" if bad else "starts with '.'"
        raise ConfigError("registry_prefix", f"{what}, which MLflow model names (models:/<prefix>-<stage>@alias) "
                                             "cannot hold; use letters, digits, '-', '_' or '.' [mlflow_name]")


@dataclass(frozen=True)
class ResourcesConfig:
    """What each stage needs from the host, as Prefect task-run tags. No stage reads this group, so
    changing it re-runs nothing; it only labels the stages' task runs in the flow."""
    gpu: tuple[str, ...] = MODEL_STAGES
    """Stages that need a GPU: their task runs carry the tag `gpu`. A concurrency limit on the tag
    (`prefect concurrency-limit create gpu 1`) lets one of them run at a time, across all flow runs."""
    tags: dict = field(default_factory=dict)
    """More tags per stage, e.g. `{ppo: [big-memory]}`, for limits of their own."""

    def __post_init__(self) -> None:
        for stage in self.gpu:
            if stage not in STAGE_NAMES:
                raise ConfigError("gpu", f"unknown stage {stage!r} (stages: {', '.join(STAGE_NAMES)})")
        if not isinstance(self.tags, dict):
            raise ConfigError("tags", "must map stage names to lists of tags")
        for stage, tags in self.tags.items():
            if stage not in STAGE_NAMES:
                raise ConfigError(f"tags.{stage}", f"unknown stage (stages: {', '.join(STAGE_NAMES)})")
            if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
                raise ConfigError(f"tags.{stage}", "must be a list of non-empty strings")

    def stage_tags(self, stage: str) -> list[str]:
        """The Prefect tags of one stage's task run, e.g. ['gpu', 'big-memory']."""
        return (["gpu"] if stage in self.gpu else []) + list(self.tags.get(stage, []))


@dataclass(frozen=True)
class LaunchConfig:
    """How many processes a training stage runs in (tasks/launch.py): with `num_processes` > 1,
    `rlhf stage` runs the stage under `accelerate launch`. Each stage's `batch_size` is per process,
    so the global batch is `num_processes` x `batch_size`; precision stays each stage's own
    `mixed_precision`."""
    num_processes: int = 1
    """Processes (one per GPU; on a CPU-only host, gloo processes). 1: no launcher at all."""
    config_file: str = ""
    """An accelerate config file (relative to the project, or absolute) for FSDP or DeepSpeed, e.g.
    from `accelerate config`; empty: plain DDP (`--multi_gpu`). Not tracked by DVC: a change to the
    file itself re-runs nothing."""

    def __post_init__(self) -> None:
        if self.num_processes < 1:
            raise ConfigError("num_processes", f"must be >= 1, got {self.num_processes}")
        if self.config_file and self.num_processes == 1:
            raise ConfigError("config_file", "is used only with num_processes > 1; set num_processes or clear it")


@dataclass(frozen=True)
class Params:
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidationLimits = field(default_factory=ValidationLimits)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    pt: PTConfig = field(default_factory=PTConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    judge: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


GROUPS: dict[str, type] = typing.get_type_hints(Params)
"""params.yaml group -> its config dataclass, in file order (derived from `Params`)."""


def _build(group: str, cls, data, source: str):
    try:
        return from_dict(cls, data, prefix=f"{group}.")
    except ConfigError as e:
        raise ConfigError(e.key, e.rule, source) from None
    except ValueError as e:  # dataclasses outside rlhf_core.config raise plain ValueError
        raise ConfigError(group, str(e), source) from None


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError("<root>", "must be a mapping of groups", source)
    unknown = sorted(set(raw) - set(GROUPS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown group (allowed: {', '.join(GROUPS)})", source)
    params = Params(**{g: _build(g, cls, raw.get(g), source) for g, cls in GROUPS.items()})
    _cross_checks(params, source)
    return params


def is_demo_data(data: DataConfig) -> bool:
    """True when the held-out questions are the generated demo task's: the only ones the oracle
    knows (it checks answers against the demo's made-up atlas)."""
    return data.eval_prompts == DataConfig().eval_prompts and not data.columns.get("eval_prompts")


def resolve_judge(p: Params, source: str = "params.yaml") -> str:
    """'oracle', 'heldout_rm', or a model directory / `models:/` URI: who scores the evaluation."""
    judge = p.evaluate.judge
    if judge == "auto":
        judge = "oracle" if is_demo_data(p.data) else "heldout_rm"
    if judge == "oracle" and not is_demo_data(p.data):
        raise ConfigError("evaluate.judge", "'oracle' only knows the demo task's made-up atlas and would score your "
                                            "data by a politeness rule; use heldout_rm, or a reward model's "
                                            "directory or models:/ URI", source)
    if judge == "heldout_rm" and p.tokenize.judge_fraction <= 0:
        raise ConfigError("tokenize.judge_fraction", "must be > 0 (e.g. 0.2) when evaluate.judge is heldout_rm "
                                                     "(the default judge on your own data): the judge reward model "
                                                     "trains on that held-out share of the preference data", source)
    return judge


def _cross_checks(p: Params, source: str) -> None:
    resolve_judge(p, source)
    if not p.pt.enabled and not p.model.name_or_path:
        raise ConfigError("pt.enabled", "can be false only with a pretrained model.name_or_path (the tiny "
                                        "default model starts from random weights)", source)
    if p.model.name_or_path:
        return  # a real model's context is only known once it is loaded
    ctx = p.model.max_position_embeddings
    for key, value in (("tokenize.block_size", p.tokenize.block_size), ("tokenize.max_length", p.tokenize.max_length),
                       ("ppo.max_new_tokens", p.tokenize.max_prompt_length + p.ppo.max_new_tokens),
                       ("evaluate.max_new_tokens", p.tokenize.max_prompt_length + p.evaluate.max_new_tokens)):
        if value > ctx:
            raise ConfigError(key, f"needs {value} positions, above the model's context "
                                   f"(model.max_position_embeddings = {ctx})", source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (DVC refuses such a file too)."""


def _unique_mapping(loader, node, deep=False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key]})", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: Path):
    """Parse a YAML file; a syntax error or duplicate key names its line: `path:LINE: ...`."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        what = e.problem or e.context or "invalid YAML"
        raise ConfigError("", f"is not valid YAML: {what} [yaml]", f"{path}{line}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError("", f"is not valid YAML ({str(e).splitlines()[0]}) [yaml]", str(path)) from None


def dvc_groups() -> list[str]:
    """The groups some stage's DVC params depend on (tasks/layout.py), in DAG order."""
    from tasks.layout import STAGES

    return list(dict.fromkeys(g for spec in STAGES for g in spec.params))


def missing_dvc_groups(path: str | Path) -> list[str]:
    """Groups that stages depend on and `path` does not set. `load_params` gives them their
    defaults, but DVC refuses to run a stage whose params group is absent from params.yaml."""
    raw = read_yaml(Path(path)) or {}
    return [g for g in dvc_groups() if g not in raw]


def check_dvc_groups(path: str | Path) -> None:
    missing = missing_dvc_groups(path)
    if missing:
        raise ConfigError(missing[0], f"group is missing, and DVC runs no stage whose params group is absent "
                                      f"(missing: {', '.join(missing)}); add `{missing[0]}: {{}}` for its "
                                      f"defaults [dvc_groups]", str(path))


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "params file does not exist")
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError("", "is empty; it must set at least one group (an empty file would silently "
                              "run on built-in defaults) [empty]", str(path))
    params = parse_params(raw, str(path))
    check_environment(params, str(path))
    return params


def check_environment(p: Params, source: str) -> None:
    """Settings this machine cannot run: fp16 needs CUDA (on a CPU accelerate would train in fp32
    while the params, and so the logs, say fp16)."""
    fp16 = [g for g, cls in GROUPS.items() if hasattr(cls, "mixed_precision") and getattr(p, g).mixed_precision == "fp16"]
    if fp16:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{fp16[0]}.mixed_precision", "is fp16, which needs a CUDA GPU and none is visible "
                                                            "here; use 'no' (or 'bf16') [precision]", source)
