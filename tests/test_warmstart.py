"""The warm-start cache: reused only when made from the run's settings, replaced whole otherwise."""

import itertools
import logging

import jax
import numpy as np
from helpers import Setup, tiny_config

from sfgrpo import runtime, warmstart


def _leaves(policy):
    return [np.asarray(x) for x in jax.tree.leaves(warmstart._split(policy)[1])]


def test_cache_is_reused_only_for_its_fingerprint(tmp_path, caplog):
    """Issue 12 item 7: a cache made from other model/data/warm-start settings or another seed is not
    loaded (read-only, with a warning naming what differs); the next warm start replaces it whole."""
    config = tiny_config()
    fp = warmstart.fingerprint(config)
    changed = tiny_config()
    changed.warmstart.lr = 1e-2
    fp_changed = warmstart.fingerprint(changed)
    assert fp_changed["sha256"] != fp["sha256"]
    reseeded = tiny_config()
    reseeded.seed += 1
    assert warmstart.fingerprint(reseeded)["sha256"] != fp["sha256"]
    adapted = tiny_config()
    adapted.model.lora_rank = 4  # LoRA is attached after the warm start: the same cache serves
    assert warmstart.fingerprint(adapted) == fp
    # Runs of several seeds that fix the data and warm-start seeds share one cache (the credit study).
    fixed = [tiny_config() for _ in range(2)]
    for seed, c in enumerate(fixed):
        c.seed, c.data.seed, c.warmstart.seed = seed, 7, 7
    assert warmstart.fingerprint(fixed[0]) == warmstart.fingerprint(fixed[1])
    data_moved = tiny_config()
    data_moved.seed, data_moved.data.seed, data_moved.warmstart.seed = 0, 8, 7
    assert warmstart.fingerprint(data_moved)["sha256"] != warmstart.fingerprint(fixed[0])["sha256"]

    s = Setup(config)
    cache = tmp_path / "warmstart"
    untrained = _leaves(s.policy)

    def run(fingerprint, seed):
        warmstart.run(
            s.policy,
            s.condition,
            itertools.repeat(s.batch),
            steps=1,
            lr=1e-2,
            seed=seed,
            cache_dir=cache,
            fingerprint=fingerprint,
            log_metrics=lambda step, m: None,
        )
        return _leaves(s.policy)

    with runtime.use_mesh(s.mesh):
        assert not warmstart.load_cached(s.policy, cache, fp)
        first = run(fp, 0)
        assert any(not np.array_equal(a, b) for a, b in zip(first, untrained, strict=True))
        assert warmstart.load_cached(s.policy, cache, fp)

        stored = sorted(p.name for p in cache.rglob("*"))
        with caplog.at_level(logging.WARNING, logger="sfgrpo.warmstart"):
            assert not warmstart.load_cached(s.policy, cache, fp_changed)
        assert "other settings (warmstart differ)" in caplog.text
        assert sorted(p.name for p in cache.rglob("*")) == stored  # read only

        second = run(fp_changed, 1)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["warmstart"]  # no temporary left
        assert not warmstart.load_cached(s.policy, cache, fp)
        assert warmstart.load_cached(s.policy, cache, fp_changed)
        for a, b in zip(_leaves(s.policy), second, strict=True):
            np.testing.assert_array_equal(a, b)

        (cache / warmstart.FINGERPRINT_FILE).unlink()  # a cache from before fingerprints
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sfgrpo.warmstart"):
            assert not warmstart.load_cached(s.policy, cache, fp_changed)
        assert "fingerprint is missing" in caplog.text
