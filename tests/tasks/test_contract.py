"""The stage contract holds: code deps are the real imports, and no stage name, output path or
model list is restated outside the spec module (tasks/layout.py)."""
import ast
import re
from pathlib import Path

from tasks import layout
from tasks.code_deps import imported_files

ROOT = Path(__file__).resolve().parents[2]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_code_deps_follow_lazy_and_relative_imports_and_only_the_functions_the_entry_reaches(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "X = 1\n",
        "pkg/entry.py": ("import os\nfrom pkg import top\n\n"
                         "def run():\n    return _helper()\n\n"
                         "def _helper():\n    from pkg.sub import lazy\n    return lazy\n\n"
                         "def other_stage():\n    import pkg.unused\n"),
        "pkg/top.py": "",
        "pkg/sub/lazy.py": "def f():\n    from . import deep\n",
        "pkg/sub/deep.py": "import json\n",
        "pkg/unused.py": "",
        "elsewhere/mod.py": "",
    })
    assert imported_files(tmp_path, ["pkg.entry:run"], ("pkg",)) == [
        "pkg/__init__.py", "pkg/entry.py", "pkg/sub/__init__.py", "pkg/sub/deep.py", "pkg/sub/lazy.py", "pkg/top.py"]
    assert "pkg/unused.py" in imported_files(tmp_path, ["pkg.entry:other_stage"], ("pkg",))


def test_each_stage_depends_on_the_code_it_runs_and_not_on_the_other_stages_entries():
    deps = {s.name: set(layout.code_deps(s)) for s in layout.STAGES}
    loops = {"rlhf_core/stages/lm.py", "rlhf_core/stages/rm.py", "rlhf_core/stages/dpo.py", "rlhf_core/stages/ppo.py"}
    for name in layout.TRAINED:
        own = {layout.SPECS[name].loop.split(":")[0].replace(".", "/") + ".py"}
        assert own | {"rlhf_core/ops/losses.py", "rlhf_core/data/batching.py", "rlhf_core/__init__.py", "tasks/stages.py",
                      "flows/cli.py", layout.LAUNCHER} <= deps[name], name
        assert not (loops - own) & deps[name], f"{name} depends on another stage's loop"
        assert "rlhf_core/evaluation/evaluate.py" not in deps[name]
    assert "rlhf_core/data/encoding.py" in deps["tokenize"] and "rlhf_core/data/tokenizer.py" in deps["tokenize"]
    assert {"rlhf_core/evaluation/evaluate.py", "rlhf_core/demo/oracle.py", "rlhf_core/stages/generation.py"} <= deps["evaluate"]
    assert "rlhf_core/data/encoding.py" not in deps["generate"]


PATH = re.compile(r"^(models|metrics|plots|reports|checkpoints)/|^data/(tokenized|demo)(/|$)")
STAGE_ARGS = {"model_dir", "run_record", "checkpoint_dir", "not_trained", "run_stage", "repro_stage", "stage_command"}
EXCEPTIONS = {
    # a base model the user builds (`rlhf smollm2`), not an output of the DAG
    ("flows/cli.py", "models/base/smollm2-135m-instruct"),
}
SKIPPED_FUNCTIONS: set[tuple[str, str]] = set()
"""Not scanned: rlhf_core (generic: it names no pipeline path, and its loops name their own
StageResult), benchmarks (standalone measurements) and the tests. In tasks/ and flows/ the data
kinds `pt` and `sft` (validate --kind, data.columns, `kind == "pt"`) share their names with two
stages; they are input kinds, so only stage-shaped uses of a name are flagged (a comparison with
something called `stage`, a path helper's argument, `SPECS[...]`, a list of names, a default)."""


def _stage_literal(node) -> bool:
    return isinstance(node, ast.Constant) and node.value in layout.STAGE_NAMES


def _findings(rel: str, tree: ast.Module) -> list[str]:
    skipped = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and (rel, f.name) in SKIPPED_FUNCTIONS
               for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and PATH.search(node.value) \
                and (rel, node.value) not in EXCEPTIONS:
            found.append(f"{where}: output path {node.value!r}")
        elif isinstance(node, ast.Compare) and any(map(_stage_literal, [node.left, *node.comparators])) \
                and any("stage" in ast.unparse(x) for x in [node.left, *node.comparators]):
            found.append(f"{where}: compares with a stage name")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in STAGE_ARGS \
                and any(map(_stage_literal, node.args)):
            found.append(f"{where}: stage name passed to {ast.unparse(node.func)}")
        elif isinstance(node, ast.Subscript) and _stage_literal(node.slice) and "SPECS" in ast.unparse(node.value):
            found.append(f"{where}: SPECS[stage name]")
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(map(_stage_literal, node.elts)):
            found.append(f"{where}: a list of stages or models")
        elif isinstance(node, ast.arguments):
            defaults = node.defaults + [d for d in node.kw_defaults if d is not None]
            found += [f"{where}: a stage name as a default" for d in defaults if _stage_literal(d)]
    return found


def test_no_stage_name_output_path_or_model_list_outside_the_spec_module():
    found = []
    for path in sorted([*(ROOT / "tasks").glob("*.py"), *(ROOT / "flows").glob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel != "tasks/layout.py":
            found += _findings(rel, ast.parse(path.read_text()))
    assert not found, "read these from tasks/layout.py instead:\n" + "\n".join(found)


def test_the_grep_finds_what_it_is_meant_to_find():
    bad = ('x = "models/sft"\nif stage == "dpo":\n    pass\nMODELS = ("sft", "dpo", "ppo")\n'
           'layout.model_dir("rm")\nSPECS["ppo"]\ndef f(stage="judge"):\n    pass\n')
    assert len(_findings("tasks/bad.py", ast.parse(bad))) == 6


def test_run_specific_values_stay_out_of_the_metrics_file_and_the_history():
    from tasks.stages import pure_history, split_run_specific

    result = {"stage": "sft", "steps": 4, "wall_seconds": 2.5, "tokens_per_second": 900.0, "resumed_from_step": 0,
              "registered": {"version": "3"}, "lineage": {"run_id": "abc"}, "reused_finished_training": True,
              "metrics": {"train/loss": 1.25, "eval/loss": 1.5, "train/tokens_per_second": 900.0}}
    pure, run = split_run_specific(result)
    assert pure == {"stage": "sft", "steps": 4, "metrics": {"train/loss": 1.25, "eval/loss": 1.5}}
    assert run == {"wall_seconds": 2.5, "tokens_per_second": 900.0, "resumed_from_step": 0, "registered": {"version": "3"},
                   "lineage": {"run_id": "abc"}, "reused_finished_training": True, "train/tokens_per_second": 900.0}
    history = [{"step": 1, "train/loss": 2.0, "train/tokens_per_second": 800.0, "time/step_seconds": 0.1}]
    assert pure_history(history) == [{"step": 1, "train/loss": 2.0}]
