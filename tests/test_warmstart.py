"""The warm-start cache: reused only when made from the run's settings, replaced whole otherwise; and its
progress: a stopped warm start resumes to the uninterrupted result."""

import itertools
import logging

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import Setup, tiny_config

from sfgrpo import builders, runtime, warmstart
from sfgrpo.data import pipeline
from sfgrpo.preemption import Preempted


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
            lambda data_state: (itertools.repeat(s.batch), lambda: None),
            steps=1,
            lr=1e-2,
            seed=seed,
            cache_dir=cache,
            fingerprint=fingerprint,
            progress=warmstart.Progress(tmp_path / warmstart.PROGRESS_DIR, fingerprint, save_every=1),
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


def test_a_stopped_warm_start_resumes_to_the_uninterrupted_result(tmp_path, caplog):
    """Progress is saved every few steps and at a stop; a rerun resumes from it (parameters, optimizer
    state and data position) and ends bit-equal to a warm start that was never stopped. The progress is
    removed once the cache is written; progress made from other settings is removed, with a warning."""
    config = tiny_config()
    s = Setup(config)
    fp = warmstart.fingerprint(config)
    source = builders.data_source(config, "train")
    pcfg = builders.pipeline_config(config, batch_size=config.warmstart.batch_size, group_size=1, seed=1)
    drawn = []  # the positions each run drew its batches from

    def batches(data_state):
        drawn.append(data_state)
        it = pipeline.make_iterator(source, pcfg, state=data_state)
        return (builders.device_batch(b, s.mesh, s.model.text_fields) for b in it), it.get_state

    initial = jax.tree.map(np.array, warmstart._split(s.policy)[1])  # a copy: run updates in place

    logged = []  # (step, elapsed seconds) of each metrics record

    def run(workdir, should_stop=lambda: False, later=0.0):
        nnx.update(s.policy, initial)
        progress = warmstart.Progress(workdir / warmstart.PROGRESS_DIR, fp, save_every=2)
        progress.elapsed_s += later  # as if the stopped run had taken that much longer
        warmstart.run(
            s.policy,
            s.condition,
            batches,
            steps=5,
            lr=1e-2,
            seed=0,
            cache_dir=workdir / "warmstart",
            fingerprint=fp,
            progress=progress,
            log_metrics=lambda step, m: logged.append((step, m["time/elapsed_s"])),
            should_stop=should_stop,
        )
        return _leaves(s.policy)

    asked = itertools.count(1)
    with runtime.use_mesh(s.mesh):
        whole = run(tmp_path / "whole")
        assert not (tmp_path / "whole" / warmstart.PROGRESS_DIR).exists()  # removed with the cache written

        stopped = tmp_path / "stopped"
        # Asked before every step: True before step 4, after 3 steps (2 saved on schedule, 3 at the stop).
        with pytest.raises(Preempted, match="after step 3 of 5: its progress is saved"):
            run(stopped, should_stop=lambda: next(asked) == 4)
        assert not (stopped / "warmstart").exists()
        saved = warmstart.Progress(stopped / warmstart.PROGRESS_DIR, fp, save_every=2)
        assert saved.step == 3 and saved.elapsed_s > 0
        saved.close()

        del drawn[:], logged[:]
        with caplog.at_level(logging.INFO, logger="sfgrpo.warmstart"):
            resumed = run(stopped, later=1000.0)
        assert "resuming after step 3 of 5" in caplog.text
        assert logged[-1][0] == 5 and logged[-1][1] > saved.elapsed_s + 1000.0  # the clock goes on
        assert drawn[0] is not None  # from the saved data position, not the start
        for a, b in zip(resumed, whole, strict=True):
            np.testing.assert_array_equal(a, b)
        assert warmstart.load_cached(s.policy, stopped / "warmstart", fp)
        assert sorted(p.name for p in stopped.iterdir()) == ["warmstart"]

        # Progress of other settings is of no use: removed, with a warning naming what differs.
        other = tiny_config()
        other.warmstart.lr = 1e-2
        fp_other = warmstart.fingerprint(other)
        asked = itertools.count(1)
        with pytest.raises(Preempted):
            run(tmp_path / "mixed", should_stop=lambda: next(asked) == 3)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sfgrpo.warmstart"):
            fresh = warmstart.Progress(tmp_path / "mixed" / warmstart.PROGRESS_DIR, fp_other, save_every=2)
        assert fresh.step == 0
        assert "(step 2) was made from other settings (warmstart differ)" in caplog.text
        fresh.close()
        assert warmstart.Progress(tmp_path / "mixed" / warmstart.PROGRESS_DIR, fp, save_every=2).step == 0
