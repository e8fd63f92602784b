"""The training loop end to end at test size: exact resume, no recompilation, sharding, and bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from helpers import ROOT, tiny_config

from sfgrpo import builders, checkpoint, metrics, preemption, resume, train

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _compiles.append(event) if event == COMPILE_EVENT else None
)


def _config(steps):
    c = tiny_config()
    c.train.steps = steps
    c.train.fuse_step = True
    return c


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Four GRPO iterations in one go, recording backend compilations after each iteration."""
    workdir = tmp_path_factory.mktemp("full")
    counts = {}
    train.train(_config(4), workdir, on_step=lambda step, m: counts.__setitem__(step, len(_compiles)))
    return workdir, counts


def _with_warm_start(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "warmstart", dst / "warmstart")
    return dst


def _assert_same_params(a, b, **tol):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if tol:
            np.testing.assert_allclose(x, y, **tol)
        else:
            np.testing.assert_array_equal(x, y)


def test_outputs_and_no_recompilation(full_run):
    workdir, counts = full_run
    # Nothing compiles after the first iteration: every program was compiled once, ahead of time.
    assert counts[4] == counts[1], f"compilations after iteration 1: {counts}"
    records = metrics.read_metrics(workdir / "metrics.jsonl")
    grpo = [r for r in records if r["stage"] == "grpo"]
    assert [r["step"] for r in grpo] == [1, 2, 3, 4]
    for key in ("loss", "clipfrac", "kl", "reward/mean", "time/iteration_s"):
        assert all(key in r for r in grpo), key
    assert "eval/reward/mean" in grpo[-1]
    assert any(r["stage"] == "eval" and r["step"] == 0 for r in records)
    for name in ("eval_grid_step0.png", "eval_grid_step4.png", "rewards.png", "config.json"):
        assert (workdir / name).exists(), name
    assert (workdir / "tb").is_dir() and (workdir / "warmstart").is_dir()


def test_split_stages_log_their_times(full_run, tmp_path):
    c = _config(1)
    c.train.fuse_step = False
    workdir = _with_warm_start(full_run[0], tmp_path / "split")
    train.train(c, workdir)
    (line,) = [r for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["stage"] == "grpo"]
    assert line["time/rollout_s"] > 0 and line["time/update_s"] > 0 and line["time/reward_s"] > 0


def test_resume_is_bitwise_exact(full_run, tmp_path):
    workdir = _with_warm_start(full_run[0], tmp_path / "resumed")
    train.train(_config(2), workdir)  # stopped after 2 iterations ...
    train.train(_config(4), workdir)  # ... and resumed for 2 more
    _assert_same_params(train.final_params(workdir), train.final_params(full_run[0]))
    steps = [r["step"] for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["stage"] == "grpo"]
    assert steps == [1, 2, 3, 4]


_ONE_DEVICE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from helpers import tiny_config
    from sfgrpo import train
    c = tiny_config()
    c.train.steps = 1
    c.train.fuse_step = True
    import jax
    print("devices", jax.device_count())
    train.train(c, sys.argv[1])
    """
)


def test_eight_devices_match_one_device(full_run, tmp_path):
    eight = _with_warm_start(full_run[0], tmp_path / "eight")
    one = _with_warm_start(full_run[0], tmp_path / "one")
    train.train(_config(1), eight)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", _ONE_DEVICE, str(one), str(ROOT / "tests")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "devices 1" in done.stdout
    # The iteration's sums agree to float precision ...
    (m1,) = [r for r in metrics.read_metrics(one / "metrics.jsonl") if r["stage"] == "grpo"]
    (m8,) = [r for r in metrics.read_metrics(eight / "metrics.jsonl") if r["stage"] == "grpo"]
    for key in ("reward/mean", "reward/region_mean", "loss", "grad_norm", "adv/abs_mean"):
        np.testing.assert_allclose(m1[key], m8[key], rtol=1e-4, atol=1e-7, err_msg=key)
    # ... and so do the parameters, except where Adam's first step, lr * g / (|g| + eps), flips sign on a
    # gradient that is zero up to rounding: those few entries may differ by up to 2 lr.
    lr = tiny_config().rl.lr
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(train.final_params(one))])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(train.final_params(eight))])
    diff = np.abs(a - b)
    assert np.all(diff <= 2 * lr + 1e-6)
    assert np.mean(diff > 1e-5) < 1e-3, f"{np.sum(diff > 1e-5)} of {diff.size} parameters differ"


def _tree_digest(root):
    """(path, size, sha1) of every file under ``root``: what a refused run must leave as it was."""
    import hashlib  # noqa: PLC0415

    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
        for p in root.rglob("*")
        if p.is_file()
    )


def test_checkpoint_of_another_model_is_refused_before_anything_is_written(full_run, tmp_path):
    workdir = tmp_path / "other"
    shutil.copytree(full_run[0], workdir)
    before = _tree_digest(workdir)
    c = _config(5)
    c.model.transformer.num_single_layers = 2
    with pytest.raises(resume.ConfigChangeError, match="model.transformer.num_single_layers 1 -> 2"):
        train.train(c, workdir)
    assert _tree_digest(workdir) == before
    # Told to go on with the change, the warm start no longer fits (its fingerprint names the model) ...
    c.train.allow_config_change = True
    with pytest.raises(train.TrainingError, match="no usable warm-start cache"):
        train.train(c, workdir)
    assert _tree_digest(workdir) == before
    # ... and without a warm start the saved arrays still cannot fit the model: refused, listing them.
    c.warmstart.steps = 0
    with pytest.raises(checkpoint.CheckpointMismatchError, match="single_transformer_blocks"):
        train.train(c, workdir)
    assert _tree_digest(workdir) == before


@pytest.mark.parametrize(
    "key, value, shown",
    [
        ("rl.credit", "scalar", "rl.credit 'spatial' -> 'scalar'"),
        ("seed", 3, "seed 0 -> 3"),
        ("rl.lr", 1e-3, "rl.lr"),
    ],
)
def test_resume_with_a_changed_experiment_is_refused(full_run, tmp_path, key, value, shown):
    workdir = tmp_path / "changed"
    shutil.copytree(full_run[0], workdir)
    before = _tree_digest(workdir)
    c = _config(5)
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
    with pytest.raises(resume.ConfigChangeError, match=re.escape(shown)):
        train.train(c, workdir)
    assert _tree_digest(workdir) == before


def test_allowed_config_change_is_logged_and_recorded(full_run, tmp_path):
    workdir = tmp_path / "allowed"
    shutil.copytree(full_run[0], workdir)
    c = _config(5)
    c.rl.lr = 1e-3
    c.train.eval_every = 50  # harmless: recorded, never refused
    c.train.allow_config_change = True
    train.train(c, workdir)
    (event,) = [r for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["stage"] == "resume"]
    assert event["step"] == 4
    assert event["config_changes"]["rl.lr"] == [tiny_config().rl.lr, 1e-3]
    assert event["config_changes"]["train.eval_every"] == [100, 50]
    steps = [r["step"] for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["stage"] == "grpo"]
    assert steps == [1, 2, 3, 4, 5]


def _break_newest_checkpoint(workdir):
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    newest = workdir / "checkpoints" / str(steps[-1])
    for f in (newest / "train_state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return steps


def test_unreadable_newest_checkpoint_stops_or_falls_back(full_run, tmp_path):
    workdir = tmp_path / "broken"
    shutil.copytree(full_run[0], workdir)
    steps = _break_newest_checkpoint(workdir)
    assert steps == [3, 4]
    before = _tree_digest(workdir)
    with pytest.raises(
        checkpoint.CheckpointCorruptError, match="the newest checkpoint, step 4, cannot be read"
    ):
        train.train(_config(4), workdir)
    assert _tree_digest(workdir) == before
    c = _config(4)
    c.train.restore_fallback = True
    train.train(c, workdir)  # resumes from step 3 and redoes step 4
    _assert_same_params(train.final_params(workdir), train.final_params(full_run[0]))
    steps = [r["step"] for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["stage"] == "grpo"]
    assert steps == [1, 2, 3, 4]


def test_rerun_after_a_kill_before_any_checkpoint_keeps_one_line_per_step(full_run, tmp_path, caplog):
    # What a kill leaves: an interrupted warm start's lines (no cache), or GRPO lines with no checkpoint.
    workdir = tmp_path / "killed"
    workdir.mkdir()
    stale = [
        {"step": 1, "stage": "warmstart", "loss": 1.0},
        {"step": 0, "stage": "eval", "eval/reward/mean": 0.5},
        {"step": 1, "stage": "grpo", "loss": 0.1},
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    with caplog.at_level("INFO"):
        train.train(_config(1), workdir)
    assert "warm start: restarting; dropped 1 metric lines" in caplog.text
    records = metrics.read_metrics(workdir / "metrics.jsonl")
    keys = [(r["stage"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), keys
    assert ("grpo", 1) in keys and ("eval", 0) in keys
    assert [r for r in records if r["stage"] == "grpo"][0]["loss"] != 0.1


def test_sigterm_saves_the_step_it_stops_at_and_the_rerun_is_exact(full_run, tmp_path):
    workdir = _with_warm_start(full_run[0], tmp_path / "sigterm")
    c = _config(4)
    c.train.checkpoint_every = 100  # no scheduled save before the end: only the SIGTERM's own

    def sigterm_after_first(step, m):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(preemption.Preempted, match="after GRPO iteration 1; checkpoint .*1 is saved"):
        train.train(c, workdir, on_step=sigterm_after_first)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
    train.train(c, workdir)
    _assert_same_params(train.final_params(workdir), train.final_params(full_run[0]))
    steps = [r["step"] for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["stage"] == "grpo"]
    assert steps == [1, 2, 3, 4]


def test_a_stop_during_the_warm_start_resumes_it_exactly(full_run, tmp_path, monkeypatch, caplog):
    """A SIGTERM during the warm start saves its progress; the rerun resumes the warm start from it (not
    from step 0) and the run ends bit-equal to one never stopped."""
    workdir = tmp_path / "warm_stop"
    c = _config(4)
    c.warmstart.checkpoint_every = 100  # no scheduled save: only the stop's own
    asked = iter(range(1, 1000))
    # Asked before every warm-start step: stop before step 2, after step 1 of 2.
    monkeypatch.setattr(preemption.PreemptionGuard, "should_stop", lambda self: next(asked) == 2)
    with pytest.raises(preemption.Preempted, match="after step 1 of 2: its progress is saved"):
        train.train(c, workdir)
    monkeypatch.undo()
    progress = workdir / "warmstart_progress"
    assert sorted(p.name for p in progress.iterdir() if p.name.isdigit()) == ["1"]
    assert not (workdir / "warmstart").exists()
    with caplog.at_level("INFO"):
        train.train(c, workdir)
    assert "warm start: resuming after step 1 of 2" in caplog.text
    assert not progress.exists()
    _assert_same_params(train.final_params(workdir), train.final_params(full_run[0]))


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(train.TrainingError, match="is a file"):
        train.train(_config(1), path)


def test_non_finite_updates_are_skipped_then_stop(full_run, tmp_path, monkeypatch):
    # An optimizer whose every update is NaN (a config cannot ask for one: rl.lr=nan is refused).
    monkeypatch.setattr(builders, "make_optimizer", lambda *args: optax.scale(float("nan")))
    c = _config(5)
    c.rl.max_consecutive_skips = 2
    workdir = _with_warm_start(full_run[0], tmp_path / "nan")
    with pytest.raises(train.TrainingError, match="non-finite .* 2 iterations in a row"):
        train.train(c, workdir)
    lines = [r for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["stage"] == "grpo"]
    assert [r["skipped_updates"] for r in lines] == [1.0]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rl.group_size", 5, "multiple of the group size"),
        ("sampler.window_size", 9, "window"),
        ("rl.micro_batch", 12, "micro_batch"),
        ("rl.credit", "pixel", "rl.credit"),
        ("model.text_dim", 7, "joint_attention_dim"),
        ("train.fuse_step", True, "fused step needs an in-graph reward"),
        ("train.eval_examples", -1, "train.eval_examples"),
        ("model.name", "sd3", "model.name"),
        # 3 steps, a random window of 1 starting in [0, 3): it may train the last step (sigma' = 0).
        ("sampler.window_hi", 3, r"sampler\.window_hi=3 and sampler\.window_size=1.*last step"),
        ("rl.kl_form", "flow_grpo", r"rl\.kl_form='flow_grpo'.*sampler\.kind='cps'"),
    ],
)
def test_incompatible_configs(key, value, message):
    c = tiny_config()
    if key.startswith("sampler.window"):
        c.sampler.window = "random"
        c.sampler.window_size, c.sampler.window_lo = 1, 0
    if key == "rl.kl_form":
        c.sampler.kind = "cps"
    if key == "train.fuse_step":
        c.reward.kind, c.reward.url = "server", "http://127.0.0.1:1"
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(builders.ConfigError, match=message):
        builders.validate(c)


@pytest.mark.parametrize(
    "changes",
    [
        {"sampler.window_lo": 1},  # start 1: the last trained step is 1 of 0..2
        {"sampler.window_size": 2, "sampler.window_hi": 1},
        {"rl.kl_form": "flow_grpo"},  # with 'sde' steps
        {"sampler.kind": "cps"},  # with the exact KL
    ],
)
def test_compatible_neighbours_of_refused_configs(changes):
    """The edges of the window and KL refusals above: these configs are accepted."""
    c = tiny_config()
    c.sampler.window, c.sampler.window_size, c.sampler.window_lo = "random", 1, 0
    c.sampler.window_hi = 2
    for key, value in changes.items():
        section, name = key.split(".")
        c[section][name] = value
    builders.validate(c)


def test_config_json_round_trips(full_run):
    saved = json.loads((full_run[0] / "config.json").read_text())
    assert saved["rl"]["credit"] == "spatial" and saved["train"]["steps"] == 4
