import pytest

from tasks import tracking


def test_params_whose_key_looks_secret_are_masked_before_logging():
    flat = tracking.flatten("", {"model": {"name_or_path": "org/m", "hub_token": "abc"},
                                 "tracking": {"db_password": "pw", "experiment": "e"}, "api_key": "k"})
    red = tracking.redact(flat)
    assert red == {"model.name_or_path": "org/m", "model.hub_token": "***", "tracking.db_password": "***",
                   "tracking.experiment": "e", "api_key": "***"}


@pytest.mark.parametrize("name", ["hub_token", "model.hub_token", "token", "client_secret", "db.password",
                                  "api_key", "s3.aws_access_key", "access_key", "key", "tracking.apiKey",
                                  "HF_TOKEN", "private_key", "gcp.credentials"])
def test_names_ending_in_a_secret_word_are_masked(name):
    assert tracking.is_secret(name)
    assert tracking.redact({name: "v"}) == {name: "***"}


@pytest.mark.parametrize("name", ["ppo.max_new_tokens", "evaluate.max_new_tokens", "tokenize.max_length",
                                  "tokenize.block_size", "tokenize.overlong", "tokenize.max_prompt_length",
                                  "tokenize.eval_fraction", "tokenize.seed", "block_size", "model.vocab_size",
                                  "key_metric_name", "token_budget.size", "keys"])
def test_names_that_only_contain_a_secret_word_are_not_masked(name):
    # the rule looks at the end of the last dotted component only: `tokenize.*` and
    # `max_new_tokens` were masked by the old substring rule
    assert not tracking.is_secret(name)
    assert tracking.redact({name: "v"}) == {name: "v"}


def test_every_shipped_param_is_logged_in_clear():
    from pathlib import Path

    from tasks.params import load_params
    from tasks.parent_run import resolved_params

    flat = resolved_params(load_params(Path(__file__).resolve().parents[2] / "params.yaml"))
    assert "***" not in flat.values()
    assert flat["ppo.max_new_tokens"] == "24" and flat["tokenize.block_size"] == "64"


def test_retry_backs_off_then_raises_a_clear_error(monkeypatch):
    sleeps, calls = [], {"n": 0}
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("refused")
        return "ok"

    assert tracking.retry(flaky, attempts=4, base_delay=1.0) == "ok"
    assert sleeps == [1.0, 2.0]

    def down():
        raise ConnectionError("refused")

    try:
        tracking.retry(down, attempts=3, base_delay=0.5)
    except tracking.TrackingUnavailable as e:
        assert "failed 3 times" in str(e) and "refused" in str(e)
    else:
        raise AssertionError("no error raised")
    assert sleeps[2:] == [0.5, 1.0]
