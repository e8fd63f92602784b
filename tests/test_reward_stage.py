"""Training with a remote judge over loopback HTTP: the overlap with the next rollout, its policy lag, exact
resumes across the overlap, the VLM path, and a judge that dies mid-run."""

import numpy as np
import pytest
from fake_vlm import FakeVLM, ShapesOracle
from helpers import tiny_config

from sfgrpo import builders, metrics, train
from sfgrpo.data import shapes
from sfgrpo.rewards.base import RewardError
from sfgrpo.rewards.server import serve_in_thread


def remote_config(url: str, steps: int, kind: str = "server"):
    c = tiny_config()
    c.reward.kind = kind
    c.reward.url = url
    c.reward.timeout_s = 20.0
    c.reward.retries = 1
    c.reward.backoff_s = 0.05
    c.train.steps = steps
    c.train.checkpoint_every = 2
    c.train.eval_every = 100
    return c


@pytest.fixture(scope="module")
def server():
    # The in-graph reward judges against the pixel autoencoder's round trip: so does this server.
    pool = tiny_config().model.pixel_pool
    with serve_in_thread("shapes", pool=str(pool)) as s:
        yield s


def grpo_records(workdir):
    return [r for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["stage"] == "grpo"]


def test_rewards_overlap_the_next_rollout_with_a_lag_of_one(server, tmp_path):
    seen = []
    train.train(remote_config(server.url, 4), tmp_path / "run", on_step=lambda s, m: seen.append((s, m)))
    assert [s for s, _ in seen] == [1, 2, 3, 4]
    lag = {s: m["policy_lag"] for s, m in seen}
    # Step 1's rewards were scored while step 2 rolled out (lag for step 2 = 1); checkpoints at 2 and 4
    # drain the pipeline, so step 3 rolls out with the freshest policy.
    assert lag == {1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0}
    for _, m in seen:
        assert m["reward/valid_images"] == 16 and np.isfinite(m["reward/mean"]) and m["skipped_updates"] == 0
        assert 0 <= m["time/reward_wait_s"] <= m["time/reward_s"] + 1e-3
    final = train.final_params(tmp_path / "run")
    assert final


def test_an_in_process_host_reward_trains_like_the_server(server, tmp_path):
    c = remote_config("", 2, kind="host")
    c.reward.host_reward, c.reward.host_options = "shapes", f"pool={c.model.pixel_pool}"
    train.train(c, tmp_path / "host")
    train.train(remote_config(server.url, 2), tmp_path / "server")
    # The same scorer in-process and behind HTTP: the same rewards, so the same updates.
    a, b = grpo_records(tmp_path / "host"), grpo_records(tmp_path / "server")
    assert [r["policy_lag"] for r in a] == [0.0, 1.0]
    for x, y in zip(a, b, strict=True):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)


def test_resume_across_the_overlap_is_exact(server, tmp_path):
    full = tmp_path / "full"
    train.train(remote_config(server.url, 4), full)
    resumed = tmp_path / "resumed"
    train.train(remote_config(server.url, 2), resumed)
    train.train(remote_config(server.url, 4), resumed)
    a, b = train.final_params(full), train.final_params(resumed)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert [r["step"] for r in grpo_records(resumed)] == [1, 2, 3, 4]


def test_the_vlm_path_trains_and_evaluates(tmp_path):
    c = remote_config("", 1, kind="vlm")
    sc = builders.shapes_config(c)
    records = [
        *shapes.ShapesSource(c.data.shapes_train, split="train", seed=c.seed, config=sc),
        *shapes.ShapesSource(c.data.shapes_eval, split="test", seed=c.seed, config=sc),
    ]
    oracle = ShapesOracle.from_records(records, c.data.resolution, pool=c.model.pixel_pool)
    with FakeVLM(oracle) as vlm:
        c.reward.url, c.reward.model = vlm.url, vlm.model
        train.train(c, tmp_path / "vlm")
    (row,) = grpo_records(tmp_path / "vlm")
    assert row["reward/valid_images"] == 16 and row["skipped_updates"] == 0
    (ev,) = [r for r in metrics.read_metrics(tmp_path / "vlm" / "metrics.jsonl") if r["stage"] == "eval"][-1:]
    # Judged from the images (the fake VLM scores them with the shapes scorer): no failures, real scores.
    assert ev["eval/reward/failures"] == 0 and ev["eval/reward/aes_mean"] > 0


def test_a_judge_dying_mid_run_skips_its_batches_or_stops_cleanly(tmp_path):
    pool = tiny_config().model.pixel_pool
    for on_failure in ("skip", "fail"):
        with serve_in_thread("shapes", pool=str(pool)) as s:
            c = remote_config(s.url, 3)
            c.reward.on_failure = on_failure
            c.reward.overlap = False

            def kill(step, m, server=s):
                if step == 1:
                    server.shutdown()
                    server.server_close()

            workdir = tmp_path / on_failure
            if on_failure == "skip":
                seen = []

                def record(step, m, seen=seen):
                    kill(step, m)
                    seen.append(m)

                train.train(c, workdir, on_step=record)
                # Steps 2 and 3 lost their judge: every image masked out, counted, no update applied.
                assert [m["reward/failures_batch_skipped"] > 0 for m in seen] == [False, True, True]
                assert [m["empty_updates"] > 0 for m in seen] == [False, True, True]
            else:
                with pytest.raises(RewardError, match=s.url.split("//")[1]):
                    train.train(c, workdir, on_step=kill)
                # The step before the failure is checkpointed; nothing after it was.
                assert [r["step"] for r in grpo_records(workdir)] == [1]


def test_a_judge_down_at_start_is_a_clear_error_before_any_work(tmp_path):
    c = remote_config("http://127.0.0.1:9", 2)  # port 9 (discard): nothing listens
    with pytest.raises(RewardError, match="127.0.0.1:9"):
        train.train(c, tmp_path / "run")
    assert not (tmp_path / "run" / "warmstart").exists()


def _leaves(tree):
    import jax  # noqa: PLC0415

    return jax.tree.leaves(tree)
