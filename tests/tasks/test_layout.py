"""dvc.yaml, the stage list and the Prefect flow describe one DAG."""
import subprocess
import sys
from pathlib import Path

import yaml

from tasks import layout
from tasks.params import GROUPS, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_committed_dvc_yaml_is_rendered_from_stages():
    assert (ROOT / "dvc.yaml").read_text() == layout.render_dvc_yaml(), "run `rlhf dvc-yaml` and commit dvc.yaml"


def test_dvc_sees_the_same_dag_as_the_stage_list():
    out = subprocess.run([sys.executable, "-m", "dvc", "dag", "--dot"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    edges = set()
    for line in out.splitlines():
        if "->" in line:
            a, b = (s.strip().strip(";").strip('"') for s in line.split("->"))
            edges.add((a, b))
    expected = {(u, s) for s in layout.STAGE_NAMES for u in layout.upstream(s)}
    # DVC links a stage to the producer of any file it reads, including files inside an output dir
    assert expected <= edges
    order = {s: i for i, s in enumerate(layout.STAGE_NAMES)}
    assert all(order[a] < order[b] for a, b in edges), "the flow's stage order must respect DVC's DAG"


def test_every_stage_reads_only_groups_that_exist_and_params_yaml_builds():
    p = load_params(ROOT / "params.yaml")
    for s in layout.STAGES:
        assert set(s.params) <= set(GROUPS)
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(shipped) == set(GROUPS)
    assert p.dpo.beta == shipped["dpo"]["beta"]


def test_stage_list_has_the_designed_dag():
    # the flow runs STAGE_NAMES in order (checked end to end in test_pipeline_e2e.py)
    assert layout.STAGE_NAMES == ("generate", "validate", "tokenize", "pt", "sft", "rm", "judge", "dpo", "ppo",
                                  "evaluate")
    assert layout.upstream("dpo") == ["tokenize", "sft"]
    assert layout.upstream("judge") == ["tokenize", "sft"]  # the judge RM sees no policy RM output
    assert set(layout.upstream("ppo")) == {"tokenize", "sft", "rm"}
    assert set(layout.upstream("evaluate")) == {"tokenize", "sft", "rm", "judge", "dpo", "ppo"}


def test_dvc_lock_reader_and_the_stage_version_and_deps_hash_built_on_it(tmp_path):
    from flows.pipeline import stage_version
    from tasks.stages import _dvc_deps_hash

    assert layout.read_lock(tmp_path) == {} and _dvc_deps_hash(tmp_path, "sft") == "none"
    lock = {"schema": "2.0", "stages": {
        "tokenize": {"cmd": "rlhf stage tokenize", "outs": [{"path": "data/tokenized", "md5": "aaa.dir"},
                                                             {"path": "models/tokenizer", "md5": "bbb.dir"}]},
        "pt": {"cmd": "rlhf stage pt", "outs": [{"path": "models/pt", "md5": "ccc.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert layout.read_lock(tmp_path) == lock["stages"]
    before = _dvc_deps_hash(tmp_path, "sft")
    lock["stages"]["pt"]["outs"][0]["md5"] = "ddd.dir"  # sft's upstream model changed
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert _dvc_deps_hash(tmp_path, "sft") != before
    assert stage_version({}) == "-" and stage_version(lock["stages"]["pt"]) != stage_version(lock["stages"]["tokenize"])


def test_dvc_never_deletes_an_output_before_its_stage_runs():
    """Without `persist`, `dvc repro` deletes a stage's outputs before running it, so a run that
    fails (bad data, NaN, Ctrl-C) would destroy the last good model, metrics or plots."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for entry in st.get(kind, []):
                (path, opts), = entry.items()
                assert (opts or {}).get("persist") is True, f"{name}: {kind} {path} is not persisted"
