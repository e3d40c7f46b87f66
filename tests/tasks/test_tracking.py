from tasks import tracking


def test_params_whose_key_looks_secret_are_masked_before_logging():
    flat = tracking.flatten("", {"model": {"name_or_path": "org/m", "hub_token": "abc"},
                                 "tracking": {"db_password": "pw", "experiment": "e"}, "api_key": "k"})
    red = tracking.redact(flat)
    assert red == {"model.name_or_path": "org/m", "model.hub_token": "***", "tracking.db_password": "***",
                   "tracking.experiment": "e", "api_key": "***"}


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
