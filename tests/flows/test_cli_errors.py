"""One error path for user mistakes: `error: <where>: <what> [<rule>]`, a non-zero exit and no
traceback, unless RLHF_DEBUG=1 asks for one."""
from __future__ import annotations

import pytest

from flows.cli import main
from rlhf_core.errors import ConfigError


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-0.5"], "error: '--temperature': is -0.5, must be >= 0 (0 = greedy) [predict_args]"),
    (["--temperature", "nan"], "error: '--temperature': is nan, must be >= 0 (0 = greedy) [predict_args]"),
    (["--max-new-tokens", "0"], "error: '--max-new-tokens': is 0, must be > 0 [predict_args]"),
])
def test_predict_checks_its_arguments_before_loading_anything(tmp_path, capsys, args, message):
    assert main(["predict", "--model", str(tmp_path / "missing"), "--prompt", "hi", *args]) == 2
    assert capsys.readouterr().err.strip() == message  # refused before the missing model is even looked at


def test_predict_names_a_registered_model_that_does_not_exist(tmp_path, capsys, monkeypatch):
    import mlflow

    from tasks import tracking

    monkeypatch.setattr(tracking, "USER_TRACKING_URI", None)
    monkeypatch.chdir(tmp_path)  # the default store is ./mlflow.db
    assert main(["predict", "--model", "models:/rlhf-sft@champion", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip() == ("error: models:/rlhf-sft@champion: no MLflow store here (./mlflow.db "
                                               "does not exist); run from the project folder or set "
                                               "MLFLOW_TRACKING_URI [model_uri]")
    assert not (tmp_path / "mlflow.db").exists()
    mlflow.MlflowClient(tracking.tracking_uri(tmp_path)).create_registered_model("rlhf-sft")
    assert main(["predict", "--model", "models:/rlhf-nope@champion", "--prompt", "hi"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # MLflow may log INFO lines above it
    assert last.startswith("error: models:/rlhf-nope@champion: no such model in the MLflow store sqlite:///")
    assert "rlhf-nope" in last.split("(", 1)[1] and last.endswith("[model_uri]")


def test_params_mistakes_end_in_one_error_line_and_rlhf_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "params.yaml").write_text("tracking:\n  registry_prefix: team/rlhf\n")
    assert main(["stage", "sft", "--project-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'params.yaml'}: 'tracking.registry_prefix': contains '/'")
    assert err.rstrip().endswith("[mlflow_name]") and err.count("\n") == 1
    monkeypatch.setenv("RLHF_DEBUG", "1")
    with pytest.raises(ConfigError, match="registry_prefix"):
        main(["stage", "sft", "--project-dir", str(tmp_path)])
