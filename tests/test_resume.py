"""Where a rerun resumes: the newest readable step, the config comparison, the fallback, nothing written."""

import logging

import jax
import numpy as np
import pytest
from helpers import tiny_config

from sfgrpo import checkpoint, resume, run_config


def _state(x):
    return {"params": {"w": np.full((2, 3), x, np.float32)}, "step": int(x), "rng": jax.random.key(0)}


def _save(directory, config, steps):
    snap = run_config.snapshot(config, 1)
    with checkpoint.Checkpointer(directory, save_every=1, keep=5) as ckpt:
        for step in steps:
            ckpt.save(step, _state(step), {"next": step}, {"config": snap})
    return snap


def _break(directory, step):
    for f in (directory / str(step) / "train_state").rglob("*"):
        if f.is_file() and f.stat().st_size:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def test_no_checkpoint_directory_means_a_fresh_run(tmp_path):
    c = tiny_config()
    assert resume.find(tmp_path / "checkpoints", run_config.snapshot(c, 1), c) is None
    assert not (tmp_path / "checkpoints").exists()  # nothing created by looking


def test_same_config_resumes_from_the_newest_step(tmp_path):
    c = tiny_config()
    snap = _save(tmp_path / "ckpt", c, [1, 2])
    point = resume.find(tmp_path / "ckpt", snap, c)
    assert point.step == 2 and point.changes == {}
    state, data = point.restore(_state(0))
    assert state["step"] == 2 and data == {"next": 2}
    np.testing.assert_array_equal(state["params"]["w"], np.full((2, 3), 2, np.float32))


def test_an_experiment_change_is_refused_and_allowed_when_asked(tmp_path):
    c = tiny_config()
    _save(tmp_path / "ckpt", c, [1])
    before = _listing(tmp_path)
    c.rl.credit = "scalar"
    c.train.steps = 10
    with pytest.raises(resume.ConfigChangeError, match=r"step 1 .*: rl.credit 'spatial' -> 'scalar'; resume"):
        resume.find(tmp_path / "ckpt", run_config.snapshot(c, 1), c)
    assert _listing(tmp_path) == before
    c.train.allow_config_change = True
    point = resume.find(tmp_path / "ckpt", run_config.snapshot(c, 1), c)
    assert set(point.changes) == {"rl.credit", "train.steps", "train.allow_config_change"}


def test_unreadable_newest_step_stops_or_falls_back(tmp_path, caplog):
    c = tiny_config()
    snap = _save(tmp_path / "ckpt", c, [1, 2, 3])
    _break(tmp_path / "ckpt", 3)
    target = _state(0)
    point = resume.find(tmp_path / "ckpt", snap, c)
    with pytest.raises(checkpoint.CheckpointCorruptError, match=r"step 3, cannot be read: .*steps \[2, 1\]"):
        point.restore(target)
    c.train.restore_fallback = True
    point = resume.find(tmp_path / "ckpt", snap, c)
    with caplog.at_level(logging.WARNING):
        state, _ = point.restore(target)
    assert point.step == 2 and state["step"] == 2 and point.unreadable == [3]
    assert "checkpoint step 3 cannot be read" in caplog.text
    point.set_aside()
    assert not (tmp_path / "ckpt" / "3").exists()
    (moved,) = (tmp_path / "ckpt.unreadable").iterdir()
    assert moved.name.startswith("3.")  # kept, not deleted


def test_every_step_unreadable_says_so(tmp_path):
    c = tiny_config()
    c.train.restore_fallback = True
    snap = _save(tmp_path / "ckpt", c, [1])
    _break(tmp_path / "ckpt", 1)
    point = resume.find(tmp_path / "ckpt", snap, c)
    with pytest.raises(checkpoint.CheckpointCorruptError, match="no readable checkpoint"):
        point.restore(_state(0))


def test_a_checkpoint_without_a_stored_config_resumes_with_a_warning(tmp_path, caplog):
    c = tiny_config()
    with checkpoint.Checkpointer(tmp_path / "ckpt", save_every=1, keep=2) as ckpt:
        ckpt.save(1, _state(1), None, {"model": "old"})
    with caplog.at_level(logging.WARNING):
        point = resume.find(tmp_path / "ckpt", run_config.snapshot(c, 1), c)
    assert point.step == 1 and "stores no config" in caplog.text
