"""``config.reward``: every key with its default, and the checks that name a bad key.

The kinds: 'shapes' (the in-graph JAX reward), 'host' (a registered host callable, in-process), 'server'
(sfgrpo's JSON reward server) and 'vlm' (an OpenAI-compatible VLM judge). The last three are scored on
the host by ``sfgrpo.rewards.remote.RewardWorker``, overlapping the next rollout.
"""

from __future__ import annotations

import math
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

import ml_collections

IN_GRAPH_KINDS = ("shapes",)
REMOTE_KINDS = ("server", "vlm")
HOST_KINDS = ("host", *REMOTE_KINDS)  # scored on the host, by the RewardWorker
ON_FAILURE = ("fail", "skip")
KINDS = IN_GRAPH_KINDS + HOST_KINDS


def reward_config_defaults() -> ml_collections.ConfigDict:
    """``config.reward`` with every key at its default."""
    c = ml_collections.ConfigDict()
    # 'shapes' (in-graph JAX), 'host' (a registered host callable, in-process), 'server' (our JSON reward
    # server) or 'vlm' (an OpenAI-compatible VLM judge)
    c.kind = "shapes"
    c.scale = 25.0  # C: scores lie in 0..C
    c.url = ""  # 'server': e.g. http://127.0.0.1:8100; 'vlm': the API base, e.g. http://127.0.0.1:8000/v1
    c.model = ""  # 'vlm': the served model name (as GET /v1/models lists it)
    c.api_key_env = ""  # 'vlm': environment variable holding the API key ('' sends none)
    c.timeout_s = 120.0  # seconds a request may wait for the connection or for each read of the reply
    c.max_concurrency = 8  # HTTP requests in flight at once (two per image for 'vlm')
    c.retries = 3  # retries of a request after a timeout, refused connection, 5xx or 429
    c.backoff_s = 1.0  # wait before retry k is backoff_s * 2**k
    c.on_failure = (
        "fail"  # after the retries: 'fail' stops training; 'skip' masks the batch out and counts it
    )
    c.max_pending = 2  # batches submitted to the worker and not yet scored (submit blocks beyond)
    c.max_request_mb = 64.0  # refuse to send a request body larger than this (our server has its own limit)
    c.request_batch = 0  # 'server': images per HTTP request, sent concurrently; 0 = the whole batch in one
    c.max_tokens = 1024  # 'vlm': answer budget per request
    c.temperature = 0.0  # 'vlm': sampling temperature of the judge
    c.overlap = True  # host kinds: score batch k while batch k+1 rolls out (one step of policy lag)
    c.host_reward = ""  # 'host': a reward registered with sfgrpo.rewards.server.register_reward
    c.host_import = ""  # 'host': a module imported first (where the reward registers itself)
    c.host_options = ""  # 'host': "key=value,key=value" passed to the reward's factory
    return c


# 'shapes': the tolerances of sfgrpo.rewards.synthetic.shapes_scores (its docstring defines them), at its
# defaults. Not in reward_config_defaults, so configs that do not set them (and checkpoints written before
# they existed) keep these values; configs/default.py sets tighter ones: these call a visibly speckled or
# blocky background preserved (its mean error is under 0.06).
SHAPES_DEFAULTS: dict[str, float | int] = {
    "preserve_floor": 0.06,
    "preserve_tol": 0.25,
    "tv_tol": 0.25,
    "shape_margin": 0,  # pixels around each shape left out of the preservation scores
    # The local-noise cap on naturalness (shapes_scores' noise_floor, noise_tol); tol 0 leaves it out, as
    # every run before 2026-12-05 had it.
    "noise_floor": 0.0,
    "noise_tol": 0.0,
    # The untouched shapes' preservation (shapes_scores' kept_saturation, kept_floor, kept_tol); saturation
    # 0 leaves it out, as every run before 2026-12-07 had it.
    "kept_saturation": 0.0,
    "kept_floor": 0.04,
    "kept_tol": 0.12,
}
SHAPES_OPTIONS = tuple(SHAPES_DEFAULTS)


def shapes_reward_options(
    reward: Mapping[str, Any], where: str = "config.reward."
) -> tuple[tuple[str, float | int], ...]:
    """The 'shapes' reward's keyword options from ``config.reward`` (missing keys take their defaults).

    ``reward`` may also be a host reward's options (strings such as ``"0.012"``, parsed here); ``where``
    prefixes the key in errors. Raises ``ValueError("config.reward.<key>: ...")`` for a bad value.
    """
    values = {k: _number(reward.get(k, SHAPES_DEFAULTS[k])) for k in SHAPES_OPTIONS}
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}{key}: must be a finite number >= 0, got {reward.get(key)!r}")
    if not values["preserve_floor"] < values["preserve_tol"]:
        raise ValueError(
            f"{where}preserve_floor: must be below {where}preserve_tol ({values['preserve_tol']}), "
            f"got {values['preserve_floor']}"
        )
    if values["noise_tol"] > 0 and not values["noise_floor"] < values["noise_tol"]:
        raise ValueError(
            f"{where}noise_floor: must be below {where}noise_tol ({values['noise_tol']}), "
            f"got {values['noise_floor']}"
        )
    if values["kept_saturation"] > 0 and not values["kept_floor"] < values["kept_tol"]:
        raise ValueError(
            f"{where}kept_floor: must be below {where}kept_tol ({values['kept_tol']}), "
            f"got {values['kept_floor']}"
        )
    if not float(values["shape_margin"]).is_integer():
        raise ValueError(
            f"{where}shape_margin: must be a whole number of pixels, got {values['shape_margin']}"
        )
    values["shape_margin"] = int(values["shape_margin"])
    return tuple((k, values[k] if k == "shape_margin" else float(values[k])) for k in SHAPES_OPTIONS)


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_reward_config(reward: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError("config.reward.<key>: <problem>")`` for the first bad or missing value."""
    defaults = reward_config_defaults()
    unknown = sorted(set(reward.keys()) - set(defaults.keys()) - set(SHAPES_OPTIONS))
    if unknown:
        raise ValueError(f"config.reward.{unknown[0]}: unknown key; known: {sorted(defaults.keys())}")

    def get(key: str) -> Any:
        if key not in reward:
            raise ValueError(f"config.reward.{key}: missing (kind={reward.get('kind')!r} needs it)")
        return reward[key]

    def number(key: str, low: float, *, strict: bool, integer: bool = False) -> None:
        v = get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > low if strict else v >= low) and (not integer or float(v).is_integer())
        if not ok:
            kind = "an integer" if integer else "a number"
            raise ValueError(
                f"config.reward.{key}: must be {kind} {'>' if strict else '>='} {low:g}, got {v!r}"
            )

    kind = get("kind")
    if kind not in KINDS:
        raise ValueError(f"config.reward.kind: must be one of {KINDS}, got {kind!r}")
    number("scale", 0, strict=True)
    if kind not in HOST_KINDS:
        return
    number("max_pending", 1, strict=False, integer=True)
    if get("on_failure") not in ON_FAILURE:
        raise ValueError(f"config.reward.on_failure: must be one of {ON_FAILURE}, got {reward.on_failure!r}")
    if kind == "host":
        if not isinstance(get("host_reward"), str) or not reward.host_reward:
            raise ValueError("config.reward.host_reward: the registered reward's name is required for 'host'")
        host_options(get("host_options"))
        return
    url = get("url")
    parsed = urllib.parse.urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"config.reward.url: must be an http(s) URL for kind={kind!r}, got {url!r}")
    number("timeout_s", 0, strict=True)
    number("max_concurrency", 1, strict=False, integer=True)
    number("retries", 0, strict=False, integer=True)
    number("backoff_s", 0, strict=False)
    number("max_request_mb", 0, strict=True)
    if kind == "server":
        number("request_batch", 0, strict=False, integer=True)
    if kind == "vlm":
        if not isinstance(get("model"), str) or not reward.model:
            raise ValueError("config.reward.model: the served model name is required for kind='vlm'")
        number("max_tokens", 1, strict=False, integer=True)
        number("temperature", 0, strict=False)
        env = get("api_key_env")
        if not isinstance(env, str):
            raise ValueError(f"config.reward.api_key_env: must be an environment variable name, got {env!r}")
        if env and env not in os.environ:
            raise ValueError(f"config.reward.api_key_env: environment variable {env!r} is not set")


def host_options(text: Any) -> dict[str, str]:
    """``reward.host_options`` ("key=value,key=value") as a dict; raises ValueError naming the key."""
    if not isinstance(text, str):
        raise ValueError(f"config.reward.host_options: must be a 'key=value,...' string, got {text!r}")
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config.reward.host_options: {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def judge_options(reward: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keyword arguments every remote judge takes from ``config.reward``."""
    keys = ("scale", "timeout_s", "retries", "backoff_s", "on_failure", "max_concurrency", "max_request_mb")
    return {k: reward[k] for k in keys}
