"""One real end-to-end run on tiny sizes: the Prefect flow (ephemeral API) runs every stage
through DVC in a real git repo, with MLflow on SQLite. Then DVC's staleness is checked."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, clean_env, project_repo, set_params
from conftest import dvc as _dvc

pytestmark = pytest.mark.slow

def test_flow_runs_every_stage_and_dvc_lock_is_current(e2e_project, e2e_flow_run):
    from tasks.layout import STAGE_NAMES

    assert [r["stage"] for r in e2e_flow_run] == list(STAGE_NAMES)
    assert all(r["status"] == "ran" for r in e2e_flow_run), e2e_flow_run
    assert "up to date" in _dvc(e2e_project, "status")
    eval_metrics = json.loads((e2e_project / "metrics/eval.json").read_text())
    assert eval_metrics["judge"] == "oracle"  # the demo data's judge under evaluate.judge: auto
    from rlhf_core.demo import oracle
    for model in ("sft", "dpo", "ppo"):  # every reported example is scored by the oracle itself
        examples = eval_metrics["examples"][model]
        assert examples
        for ex in examples:
            assert ex["greedy_score"] == oracle.score(ex["prompt"], ex["greedy"]), (model, ex)
            assert ex["sample_score"] == oracle.score(ex["prompt"], ex["sample"]), (model, ex)
    assert eval_metrics["sft"]["win_rate_vs_sft"] == 0.5
    assert (e2e_project / "plots/eval/comparison.png").stat().st_size > 1000


def _lock_outs(root: Path) -> dict[str, str]:
    """path -> md5 of every output (models, data, metrics, plots) recorded in dvc.lock."""
    from tasks.layout import read_lock

    return {o["path"]: o["md5"] for st in read_lock(root).values() for o in st.get("outs", [])}


def _imports_per_stage(log: str) -> dict[str, set[str]]:
    """Project modules each stage's process imported, from `PYTHONPROFILEIMPORTTIME` lines
    (`import time: self | cumulative | module`) between DVC's `Running stage` lines."""
    from tasks.layout import CODE_ROOTS

    stage, found = None, {}
    for line in log.splitlines():
        if line.startswith("Running stage '"):
            stage = line.split("'")[1]
            found[stage] = set()
        elif line.startswith("import time:") and stage and "|" in line:
            module = line.rsplit("|", 1)[1].strip()
            if module.split(".")[0] in CODE_ROOTS:
                found[stage].add(module)
    return found


def test_a_second_checkout_run_by_the_venvs_dvc_from_a_plain_shell_gives_identical_outputs(
        e2e_project, e2e_flow_run, tmp_path_factory):
    """Pure outputs, DVC from any shell, complete code deps, in one second run of the pipeline:
    a copy at another path runs `.venv/bin/dvc repro` with a PATH that lacks the venv. Every output
    hash in its dvc.lock and metrics/eval.json equal those of the flow's run in the first copy; each
    stage imported only modules its dvc.yaml deps list; after `rm -rf mlflow.db mlruns` the flow
    retrains nothing and no hash changes."""
    import yaml

    from flows.pipeline import pipeline
    from tasks.code_deps import module_file

    other = project_repo(tmp_path_factory.mktemp("elsewhere") / "checkout", TINY)
    assert other.parent != e2e_project.parent
    env = clean_env(PATH=os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir()),
                    PYTHONPROFILEIMPORTTIME="1", PYTHONUNBUFFERED="1")
    env.pop("VIRTUAL_ENV", None)
    venv_dvc = Path(sys.executable).parent / "dvc"
    proc = subprocess.run([str(venv_dvc), "repro"], cwd=other, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, "\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("import time:"))[-3000:]

    first, second = _lock_outs(e2e_project), _lock_outs(other)
    assert len(first) >= 25 and first == second, {k: (first.get(k), second.get(k)) for k in first | second
                                                   if first.get(k) != second.get(k)}
    assert (other / "metrics/eval.json").read_bytes() == (e2e_project / "metrics/eval.json").read_bytes()
    assert not list((other / "models").rglob("lineage.json"))

    imported = _imports_per_stage(proc.stdout)
    stages = yaml.safe_load((other / "dvc.yaml").read_text())["stages"]
    assert set(imported) == set(stages)
    for stage, modules in imported.items():
        files = {module_file(other, m).relative_to(other).as_posix() for m in modules}
        assert "tasks/stages.py" in files, (stage, sorted(files))
        assert files <= set(stages[stage]["deps"]), (stage, sorted(files - set(stages[stage]["deps"])))

    shutil.rmtree(other / "mlruns")
    (other / "mlflow.db").unlink()
    records = pipeline(project_dir=str(other))
    assert {r["status"] for r in records} == {"skipped"}
    assert _lock_outs(other) == second


def test_registry_versions_carry_lineage_back_to_the_data(e2e_project, e2e_flow_run):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{e2e_project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    chain = []
    mv = client.get_model_version_by_alias("rlhf-dpo", "candidate")
    while True:
        chain.append(mv.name)
        for tag in ("source_run", "data_hash", "dvc_deps_hash", "git_commit", "upstream_model"):
            assert mv.tags.get(tag), (mv.name, tag)
        if mv.tags["upstream_model"] == "none":
            break
        name, version = mv.tags["upstream_model"].split("/")
        mv = client.get_model_version(name, version)
    assert chain == ["rlhf-dpo", "rlhf-sft", "rlhf-pt"]
    tokenized = json.loads((e2e_project / "metrics/tokenize.json").read_text())
    assert tokenized["datasets"]["pt"]["train"]["records_out"] > 0
    # the champion alias is set because the tiny run's promotion margin is -1
    assert client.get_model_version_by_alias("rlhf-ppo", "candidate").tags["upstream_model"].startswith("rlhf-sft/")
    # one parent run with a child run per stage
    runs = mlflow.search_runs(experiment_names=["rlhf-pipeline"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("rlhf.launcher") == "prefect"]
    assert len(parents) == 1
    children = {r.data.tags["rlhf.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert children == set(e2e_flow_run[i]["stage"] for i in range(len(e2e_flow_run)))
    # the registered checkpoint loads back into transformers
    from transformers import AutoModelForCausalLM
    path = mlflow.artifacts.download_artifacts("models:/rlhf-dpo@candidate")
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == TINY["model"]["hidden_size"]


def test_second_repro_does_nothing_and_beta_reruns_only_dpo_and_evaluate(e2e_project, e2e_flow_run, tmp_path):
    """Also what the flow's one `dvc status` sees (`unchanged_stages`): after the beta change, every
    stage but dpo, evaluate included, since evaluate's inputs change only once dpo has run. So the
    flow may skip a stage on that answer only while no stage before it has run (the second flow
    run in test_mlflow_compare_e2e.py reruns evaluate after dpo)."""
    from flows.pipeline import unchanged_stages
    from tasks.layout import STAGE_NAMES

    out = _dvc(e2e_project, "repro")
    assert "Running stage" not in out
    assert unchanged_stages(e2e_project) == set(STAGE_NAMES)
    assert unchanged_stages(tmp_path) == set(), "no dvc.lock: nothing has run, DVC decides every stage"
    set_params(e2e_project / "params.yaml", {"dpo": {"beta": 0.2}})
    assert unchanged_stages(e2e_project) == set(STAGE_NAMES) - {"dpo"}
    out = _dvc(e2e_project, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"dpo", "evaluate"}
    assert "up to date" in _dvc(e2e_project, "status")


def test_next_flow_run_after_repro_retrains_nothing(e2e_project, e2e_flow_run):
    from flows.pipeline import pipeline

    _dvc(e2e_project, "repro")
    records = pipeline(project_dir=str(e2e_project))
    assert {r["status"] for r in records} == {"skipped"}


def test_stage_runs_carry_the_flow_run_id_and_predict_loads_a_registered_model(e2e_project, e2e_flow_run, monkeypatch, capsys):
    import mlflow

    from flows.cli import main

    mlflow.set_tracking_uri(f"sqlite:///{e2e_project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["rlhf-pipeline"], output_format="list")
    flow_parents = {r.info.run_id for r in runs if r.data.tags.get("rlhf.launcher") == "prefect"}
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in flow_parents]
    assert stage_runs and all(r.data.tags.get("prefect.flow_run_id") for r in stage_runs)
    bare = [r for r in runs if r.data.tags.get("rlhf.launcher") == "dvc"]
    assert bare, "stages run by a bare `dvc repro` still group under a parent run"
    monkeypatch.chdir(e2e_project)
    ask = ["--prompt", "Name the capital of Veldoria.", "--max-new-tokens", "4"]
    assert main(["predict", "--model", "models:/rlhf-sft@candidate", *ask]) == 0
    registered = capsys.readouterr().out
    assert main(["predict", "--model", "models/sft", *ask]) == 0
    assert registered == capsys.readouterr().out  # the registered version is the stage's output, greedy either way


def test_bad_data_stops_the_flow_at_validate_and_leaves_earlier_outputs_alone(e2e_project, e2e_flow_run):
    import mlflow

    from flows.pipeline import StageFailed, pipeline
    from tasks.layout import STAGE_NAMES

    def outputs():
        files = [p for d in ("models", "data/tokenized", "metrics", "plots") for p in (e2e_project / d).rglob("*") if p.is_file()]
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}

    def registry():
        mlflow.set_tracking_uri(f"sqlite:///{e2e_project / 'mlflow.db'}")
        return sorted((v.name, v.version, tuple(sorted(v.aliases))) for v in mlflow.MlflowClient().search_model_versions())

    _dvc(e2e_project, "repro")
    before, registry_before = outputs(), registry()
    assert registry_before and any(p.parts[-2] == "metrics" for p in before)
    lock_before = (e2e_project / "dvc.lock").read_text()
    bad = e2e_project / "data" / "bad_sft.jsonl"
    bad.write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}\n'
                   '{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "ok"}]}\n')
    set_params(e2e_project / "params.yaml", {"data": {"sft": "data/bad_sft.jsonl"}})
    with pytest.raises(StageFailed) as err:
        pipeline(project_dir=str(e2e_project), stages=list(STAGE_NAMES))
    msg = str(err.value)
    assert "validate" in msg and "data/bad_sft.jsonl:2" in msg and "robot" in msg
    assert outputs() == before, "no model, tokenised data, metrics or plot may be touched by a failed validation"
    assert registry() == registry_before, "nothing is registered and no alias moves"
    assert (e2e_project / "dvc.lock").read_text() == lock_before
    assert (e2e_project / "reports/validation.json").exists()
    set_params(e2e_project / "params.yaml", {"data": {"sft": "data/demo/sft.jsonl"}})


def test_evaluate_twice_gives_the_identical_metrics_file(e2e_project, e2e_flow_run):
    from tasks.stages import run_stage

    _dvc(e2e_project, "repro")
    before = (e2e_project / "metrics/eval.json").read_bytes()
    run_stage("evaluate", e2e_project)
    assert (e2e_project / "metrics/eval.json").read_bytes() == before
