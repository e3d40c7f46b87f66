"""The bad-row policy: up to `validate.max_invalid_fraction` of a file's records are set aside
(listed line by line in reports/rejected/<file>.jsonl and skipped by tokenize); above it the
validate stage fails before any training and leaves earlier outputs as they were."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_core.data import formats
from rlhf_core.errors import ConfigError
from tasks import stages, tracking
from tasks.params import DataConfig, Params, parse_params
from tasks.validation import ValidationLimits, model_special_tokens, validate_file


def chat(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]}


BAD = {  # line -> (record, field, rule fragment)
    7: ({"conversations": chat(7)["conversations"] + [{"from": "human", "value": "And?"}]},
        "conversations", "must end with the assistant turn, ends with 'user'"),
    50: ({"conversations": [{"from": "human", "value": "Hi<|im_end|>"}, {"from": "gpt", "value": "Yo"}]},
         "conversations[0].value", "control-token string '<|im_end|>'"),
    81: ('{"conversations": [{"from": "human", "value": "caf\\ud800"}, {"from": "gpt", "value": "x"}]}',
         "conversations[0].value", "lone surrogate"),
}


def _write_lines(path: Path, items: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items), encoding="utf-8")
    return path


def _project(root: Path, bad_lines: list[int], fraction: float = 0.02) -> Params:
    data = root / "data" / "mine"
    _write_lines(data / "sft.jsonl", [BAD[n][0] if n in BAD and n in bad_lines else chat(n) for n in range(1, 101)])
    _write_lines(data / "pt.jsonl", [{"text": f"Document {i}."} for i in range(5)])
    _write_lines(data / "pref.jsonl", [{"prompt": f"P{i}", "chosen": "good", "rejected": "bad"} for i in range(5)])
    _write_lines(data / "prompts.jsonl", [{"prompt": f"P{i}"} for i in range(5)])
    return Params(data=DataConfig(pt="data/mine/pt.jsonl", sft="data/mine/sft.jsonl", preference="data/mine/pref.jsonl",
                                  prompts="data/mine/prompts.jsonl", eval_prompts="data/mine/prompts.jsonl"),
                  validate=ValidationLimits(max_invalid_fraction=fraction))


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    logged = []
    monkeypatch.setattr(tracking, "log_dict_artifact", lambda data, name: logged.append(name))
    return logged


def test_below_the_fraction_records_are_set_aside_and_every_line_is_named(tmp_path, capsys):
    p = _project(tmp_path, [7, 50], fraction=0.02)  # 2 of 100: at the limit
    metrics = stages.validate(tmp_path, p)
    rejected = [json.loads(x) for x in (tmp_path / "reports" / "rejected" / "sft.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejected] == [(7, "conversations"), (50, "conversations[0].value")]
    assert BAD[7][2] in rejected[0]["rule"] and BAD[50][2] in rejected[1]["rule"]
    assert sorted(x.name for x in (tmp_path / "reports" / "rejected").iterdir()) == ["sft.jsonl"]
    assert metrics["inputs"]["sft"] == {"records": 100, "valid": 98, "set_aside": 2, "duplicates": 0}
    assert metrics["set_aside"] == 2 and metrics["shapes"]["sft"] == "sharegpt"
    report = json.loads((tmp_path / "reports" / "validation.json").read_text())  # a DVC output: no absolute path
    assert [f["path"] for f in report["files"]] == [path for _, path, _ in p.data.inputs()]
    assert str(tmp_path) not in json.dumps(report)
    out = capsys.readouterr().out
    assert ("sft.jsonl: sft: sharegpt, 100 record(s), 2 invalid (2.0%, within max_invalid_fraction=0.02), "
            "2 set aside (listed in reports/rejected/sft.jsonl)") in out
    # tokenize reads the same file without the set-aside lines
    skip = stages._set_aside(tmp_path, p)
    assert skip["sft"] == {7, 50} and skip["pt"] == set()
    convs = formats.read_conversations(tmp_path / p.data.sft, skip=skip["sft"])
    assert len(convs) == 98 and {c.line for c in convs}.isdisjoint({7, 50})


def test_above_the_fraction_the_stage_fails_and_earlier_outputs_stay(tmp_path):
    stages.validate(tmp_path, _project(tmp_path, [7]))
    before = {f: f.read_bytes() for f in (tmp_path / "reports").rglob("*") if f.is_file()}
    p = _project(tmp_path, [7, 50, 81])  # 3 of 100: over 0.02
    with pytest.raises(stages.ValidationFailed) as info:
        stages.validate(tmp_path, p)
    text = str(info.value)
    for line, (_, field, rule) in BAD.items():
        assert f"{tmp_path / p.data.sft}:{line}: field '{field}': " in text and rule in text
    assert "3 invalid (3.0%, over max_invalid_fraction=0.02)" in text
    assert all(f.read_bytes() == data for f, data in before.items())  # validation.json and rejected/ untouched


def test_zero_restores_all_or_nothing(tmp_path):
    with pytest.raises(stages.ValidationFailed, match="1 invalid"):
        stages.validate(tmp_path, _project(tmp_path, [7], fraction=0.0))


def test_rlhf_validate_reads_the_validate_settings_from_params(tmp_path, capsys):
    from flows.cli import main

    path = _write_lines(tmp_path / "sft.jsonl", [chat(1), BAD[7][0], chat(3)])
    (tmp_path / "loose.yaml").write_text("validate:\n  max_invalid_fraction: 0.5\n")
    assert main(["validate", str(path), "--kind", "sft", "--params", str(tmp_path / "loose.yaml")]) == 0
    assert "1 set aside" in capsys.readouterr().out
    assert main(["validate", str(path), "--kind", "sft", "--params", str(tmp_path / "missing.yaml")]) == 2
    (tmp_path / "strict.yaml").write_text("validate:\n  max_invalid_fraction: 0.0\n")
    assert main(["validate", str(path), "--kind", "sft", "--params", str(tmp_path / "strict.yaml")]) == 1
    assert f"{path}:2: field 'conversations': must end with the assistant turn" in capsys.readouterr().out


def test_the_model_tokenizers_own_special_tokens_are_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"49152": {"content": "<filename>", "special": True}}, "eos_token": "</s>"}))
    assert model_special_tokens(str(model)) == ["</s>", "<filename>"]
    assert model_special_tokens("") == [] and model_special_tokens("org/hub-id") == []
    path = _write_lines(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": "see <filename> here"}])
    report = validate_file(path, "prompts", ValidationLimits(max_invalid_fraction=0), special_tokens=["<filename>"])
    assert [(f.line, f.field) for f in report.failures] == [(2, "prompt")]
    assert "'<filename>', a special token of the model's tokenizer" in report.failures[0].rule
    assert validate_file(path, "prompts").success  # no model: only the common control tokens are refused


@pytest.mark.parametrize("lines, name, line, field, fragment", [
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": "c",
                                                        "responses": ["b", "c"]}],
     "p.jsonl", 2, "responses", "conflicting shapes"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"question": "a", "response_chosen": "b",
                                                        "response_rejected": "c"}],
     "p.jsonl", 2, "<record>", "has the shape 'question', but the file's records have the shape 'trl' (line 1)"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, '{"prompt": "\\udfff", "chosen": "b", "rejected": "c"}'],
     "p.jsonl", 2, "prompt", "lone surrogate (\\udfff"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, '{"prompt": "a", "chosen": "b", "rejected": "c", "prompt": "d"}'],
     "p.jsonl", 2, "prompt", "duplicate key 'prompt'"),
])
def test_subverting_records_are_invalid_records_not_tracebacks(tmp_path, lines, name, line, field, fragment):
    report = validate_file(_write_lines(tmp_path / name, lines), "preference")
    assert not report.success and [(f.line, f.field) for f in report.failures] == [(line, field)], report.format()
    assert fragment in report.failures[0].rule


def test_whole_file_problems_are_named(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    for path, fragment in ((tmp_path / "dir.jsonl", "is a directory"), (loop, "is a symlink loop")):
        report = validate_file(path, "sft")
        assert [(f.line, f.expectation) for f in report.failures] == [(0, "file_readable")]
        assert fragment in report.failures[0].rule
    bom = tmp_path / "Corpus.TXT"
    bom.write_bytes(b"\xef\xbb\xbfone\ntwo\n")
    report = validate_file(bom, "pt")
    assert report.success and report.bom_stripped and report.records == 2 and "UTF-8 BOM stripped" in report.format()


def test_json_array_parquet_and_datasets_folder_validate(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(4)]
    (tmp_path / "sft.json").write_text(json.dumps(rows, indent=2))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sft.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "sft_ds"))
    for path in (tmp_path / "sft.json", tmp_path / "sft.parquet", tmp_path / "sft_ds"):
        report = validate_file(path, "sft")
        assert report.success and (report.shape, report.records, report.rows) == ("alpaca", 4, 4), report.format()
        assert "alpaca, 4 record(s)" in report.format()


def test_custom_columns_from_params(tmp_path):
    p = parse_params({"data": {"columns": {"preference": {"prompt": "query", "chosen": "good", "rejected": "bad"}}},
                      "tokenize": {"judge_fraction": 0.2}})
    path = _write_lines(tmp_path / "p.jsonl", [{"query": "Q?", "good": "yes", "bad": "no"}])
    report = validate_file(path, "preference", columns=p.data.columns["preference"])
    assert report.success and report.shape == "trl"
    with pytest.raises(ConfigError, match="data.columns.preference.answer"):
        parse_params({"data": {"columns": {"preference": {"answer": "x"}}}})
    with pytest.raises(ConfigError, match="data.columns.dpo"):
        parse_params({"data": {"columns": {"dpo": {"prompt": "x"}}}})


def test_demo_generator_runs_only_when_an_input_is_under_data_demo():
    assert DataConfig().uses_demo()
    mine = {k: f"data/mine/{k}.jsonl" for k in ("pt", "sft", "preference", "prompts", "eval_prompts")}
    assert not DataConfig(**mine).uses_demo()
    assert DataConfig(**dict(mine, eval_prompts="data/demo/eval_prompts.jsonl")).uses_demo()
    assert not DataConfig(**dict(mine, sft="data/demo_of_mine/sft.jsonl")).uses_demo()


def test_rlhf_validate_uses_params_yaml_of_the_working_directory(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    path = _write_lines(tmp_path / "sft.jsonl", [chat(1), BAD[7][0], chat(3)])
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(path), "--kind", "sft"]) == 1  # no params.yaml: the defaults (0.02)
    (tmp_path / "params.yaml").write_text("validate:\n  max_invalid_fraction: 0.5\n")
    assert main(["validate", str(path), "--kind", "sft"]) == 0
    assert "1 set aside" in capsys.readouterr().out
