"""config.reward: the defaults are valid, and every bad or unknown key is named."""

import pytest

from sfgrpo.rewards.reward_config import check_reward_config, host_options, reward_config_defaults


def _config(url, **over):
    c = reward_config_defaults()
    c.kind, c.url = "server", url
    c.update(over)
    return c


def test_defaults_are_valid_and_documented():
    c = reward_config_defaults()
    check_reward_config(c)
    assert {"kind", "scale", "url", "model", "api_key_env", "timeout_s", "max_concurrency", "retries"} <= set(
        c
    )
    assert {"backoff_s", "on_failure", "max_pending", "max_request_mb"} <= set(c)
    check_reward_config(_config("http://127.0.0.1:1"))
    vlm = _config("https://judge.example:8000/v1", kind="vlm", model="sfreward")
    check_reward_config(vlm)


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(kind="clip"), "config.reward.kind: must be one of"),
        (dict(url="127.0.0.1:8000"), "config.reward.url: must be an http"),
        (dict(url=""), "config.reward.url: must be an http"),
        (dict(timeout_s=0.0), "config.reward.timeout_s: must be a number > 0"),
        (dict(retries=-1), "config.reward.retries: must be an integer >= 0"),
        (dict(max_concurrency=0), "config.reward.max_concurrency"),
        (dict(max_pending=0), "config.reward.max_pending: must be an integer >= 1"),
        (dict(on_failure="ignore"), "config.reward.on_failure: must be one of"),
        (dict(scale=float("nan")), "config.reward.scale"),
        (dict(kind="vlm"), "config.reward.model: the served model name is required"),
        (dict(kind="vlm", model="m", api_key_env="SFGRPO_TEST_UNSET_KEY"), "SFGRPO_TEST_UNSET_KEY"),
    ],
)
def test_bad_config_names_the_key(over, message):
    with pytest.raises(ValueError, match=message):
        check_reward_config(_config(**{"url": "http://127.0.0.1:1", **over}))


def test_unknown_and_missing_keys():
    c = _config("http://127.0.0.1:1")
    c.timeout = 3.0
    with pytest.raises(ValueError, match="config.reward.timeout: unknown key"):
        check_reward_config(c)
    c = _config("http://127.0.0.1:1")
    del c["retries"]
    with pytest.raises(ValueError, match="config.reward.retries: missing"):
        check_reward_config(c)


def test_host_options_parse_key_value_pairs():
    assert host_options("pool=4, scale = 2") == {"pool": "4", "scale": "2"}
    assert host_options("") == {}
    with pytest.raises(ValueError, match="config.reward.host_options: '=4' is not key=value"):
        host_options("=4")
