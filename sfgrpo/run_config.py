"""The resolved config a checkpoint stores, and what a resume may change.

Each checkpoint's metadata holds the run's resolved config (:func:`snapshot`). A resume compares it with
the config it was started with (:func:`compare`): changing anything that alters the experiment (the model,
credit, seed, data, reward, learning rate, the global batch, ...) is refused, with the changed keys in one
line, unless ``train.allow_config_change`` is set; the keys in :data:`HARMLESS` (how long to train, how
often to evaluate, log and save, workers, timeouts, the mesh layout, paths of caches) may change freely.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections

# Keys (or key prefixes ending in '.') that change how a run executes or reports, not what it learns.
HARMLESS: tuple[str, ...] = (
    "train.steps",
    "train.eval_every",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.grid_rows",
    "train.fuse_step",  # one compiled program or three: the same arithmetic
    "train.allow_config_change",
    "train.restore_fallback",
    "train.export_format",  # what the run writes for diffusers, not what it learns
    "train.export_every",
    "train.compilation_cache_dir",  # where compiled programs are kept: they compute the same
    "train.eval_benchmark",  # what the run reports at its evaluations, not what it learns
    "train.eval_benchmark_protocol",
    "train.eval_benchmark_examples",
    "train.eval_benchmark_judge_url",
    "train.eval_benchmark_judge_model",
    "train.eval_benchmark_box_format",
    "data.num_workers",
    "warmstart.checkpoint_every",  # how often the warm start saves its progress
    "mesh.",  # checkpoints restore onto any mesh
    "model.remat",
    "model.scan_unroll",
    "model.attention",
    "model.prompt_cache",  # where the cache lives; its contents are fingerprinted
    "model.prompt_cache_batch",
    "reward.url",  # the same judge may move; reward.model names it
    "reward.api_key_env",
    "reward.timeout_s",
    "reward.retries",
    "reward.backoff_s",
    "reward.max_concurrency",
    "reward.max_pending",
)
# Keys added after runs were checkpointed without them, with the value that reproduces those runs: an older
# checkpoint lacking one resumes under that value as the same experiment.
INTRODUCED_WITH_NEUTRAL_VALUE: dict[str, Any] = {
    "data.seed": -1,
    "warmstart.seed": -1,
    "rl.token_map": "own",
    "rl.rewards_from": "own",
    "sampler.schedule": "flux2",
    # train.eval_benchmark is off ('') in runs from before it; the rest are its defaults.
    "train.eval_benchmark": "",
    "train.eval_benchmark_protocol": "shapes",
    "train.eval_benchmark_examples": 16,
    "train.eval_benchmark_judge_url": "",
    "train.eval_benchmark_judge_model": "",
    "train.eval_benchmark_box_format": "",
    "train.compilation_cache_dir": "",
    # The shapes reward's untouched-shapes term is off (saturation 0) in runs from before it.
    "reward.kept_saturation": 0.0,
    "reward.kept_floor": 0.04,
    "reward.kept_tol": 0.12,
}
GLOBAL_BATCH = "global batch (rl.batch_size x processes)"
_MAX_SHOWN = 8


def snapshot(config: ml_collections.ConfigDict, process_count: int) -> dict[str, Any]:
    """The JSON form of ``config`` stored with a checkpoint, plus the global batch it implies."""
    flat = flatten(json.loads(config.to_json_best_effort()))
    flat[GLOBAL_BATCH] = int(config.rl.batch_size) * int(process_count)
    return flat


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists stay leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def is_harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)


def compare(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[dict, dict]:
    """(experiment-altering changes, harmless changes), each {key: (saved, current)}; a key missing on one
    side shows as '<absent>'."""
    altering, harmless = {}, {}
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        neutral = INTRODUCED_WITH_NEUTRAL_VALUE.get(key, "<absent>")
        absent_as_neutral = (old == "<absent>" and new == neutral) or (new == "<absent>" and old == neutral)
        if old != new and not absent_as_neutral:
            (harmless if is_harmless(key) else altering)[key] = (old, new)
    return altering, harmless


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """'rl.lr 0.0005 -> 0.001, seed 0 -> 1' (the first few, then how many more)."""
    parts = [f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in list(changes.items())[:_MAX_SHOWN]]
    more = len(changes) - _MAX_SHOWN
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
