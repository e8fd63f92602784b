"""The GRPO stages on the tiny policy: on-policy ratio, credit modes, skipped updates, LoRA, shuffling."""

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import Setup, entries_moved, tiny_config
from multiprocess import run_script

from sfgrpo import builders, runtime
from sfgrpo.rewards.base import RegionScores, Rewards
from sfgrpo.rl import step as step_module
from sfgrpo.rl.step import (
    Credit,
    GRPOSettings,
    PolicyParts,
    _micro_batches,
    credit,
    merge,
    rescore,
    reward_metrics,
    update,
)


def spatial_settings() -> GRPOSettings:
    return builders.grpo_settings(tiny_config())


@pytest.fixture(scope="module")
def spatial():
    return Setup(tiny_config())


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_first_update_is_on_policy(spatial):
    s = spatial
    out = s("rollout", s.params, s.frozen, s.batch, s.key(1))
    assert out.traj.logp.shape == (2, 16, 4)  # W = N - 1 window steps, B, L (2x2 tokens)
    credit, m_reward = s("reward", s.params, s.frozen, out.edited, s.batch, out.weights)
    assert credit.adv.shape == (16, 4) and credit.weights.shape == (16, 4, 4)
    assert np.isfinite(m_reward["reward/mean"])
    # An untrained policy scores 0 everywhere (zero spread, zero advantages): give it advantages to push.
    credit = credit._replace(
        adv=jax.random.normal(s.key(9), credit.adv.shape), mask=jnp.ones_like(credit.mask)
    )
    # One optimizer step over all micro-batches: every gradient is taken at the rollout parameters, where
    # the ratio is 1 up to float error, so nothing is clipped.
    params, _, m = s("update", s.params, s.frozen, s.opt_state, {}, out, credit, s.key(2))
    assert float(m["clipfrac"]) == 0.0
    assert float(m["approx_kl"]) < 1e-8
    assert float(m["skipped_updates"]) == 0.0 and float(m["optimizer_steps"]) == 1.0
    assert float(m["grad_norm"]) > 0
    changed = [not np.array_equal(a, b) for a, b in zip(_leaves(params), _leaves(s.params), strict=True)]
    assert any(changed)


def test_non_finite_update_is_skipped(spatial):
    s = spatial
    out = s("rollout", s.params, s.frozen, s.batch, s.key(3))
    credit, _ = s("reward", s.params, s.frozen, out.edited, s.batch, out.weights)
    adv = np.asarray(credit.adv).copy()
    adv[0, 0] = np.nan
    bad = credit._replace(adv=jax.device_put(adv, credit.adv.sharding))
    params, opt_state, m = s("update", s.params, s.frozen, s.opt_state, {}, out, bad, s.key(4))
    assert float(m["skipped_updates"]) == float(m["optimizer_steps"]) == 1.0
    for a, b in zip(_leaves(params), _leaves(s.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(opt_state), _leaves(s.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["region", "scalar"])
def test_other_credit_modes_run(mode):
    c = tiny_config()
    c.rl.credit = mode
    s = Setup(c)
    _, _, m = s("iteration", s.params, s.frozen, s.opt_state, {}, s.batch, s.key(5))
    assert np.isfinite(float(m["loss"])) and float(m["skipped_updates"]) == 0.0


def test_credit_shapes_and_masks():
    b, r, length = 8, 2, 4
    rng = np.random.default_rng(0)
    region_valid = np.ones((b, r + 1), bool)
    region_valid[0] = False  # a failed reward
    rewards = Rewards(
        region=jnp.asarray(rng.uniform(size=(b, r + 1)), jnp.float32),
        region_valid=jnp.asarray(region_valid),
        image=jnp.asarray(rng.uniform(size=b), jnp.float32),
        image_valid=jnp.asarray(region_valid[:, 0]),
    )
    weights = jnp.full((b, r + 1, length), 1.0 / (r + 1))
    groups = jnp.repeat(jnp.arange(2), 4)
    base = dict(spatial_settings().__dict__)
    for mode, shape in (("spatial", (b, length)), ("region", (b, r + 1)), ("scalar", (b,))):
        credit_, metrics = credit(rewards, weights, groups, GRPOSettings(**{**base, "credit": mode}))
        assert credit_.adv.shape == shape and credit_.mask.shape == shape
        assert float(np.asarray(credit_.mask)[0].sum()) == 0.0  # the failed sample carries no weight
        assert np.all(np.asarray(credit_.adv)[0] == 0.0)
        assert 0.0 <= float(metrics["adv/zero_spread_frac"]) <= 1.0


def test_placebo_gives_each_sample_another_groups_token_map():
    # Two groups of 4 with disjoint maps: the placebo's token advantages are the sample's own region
    # advantages spread over the other group's region tokens, and its mask follows that map too.
    b, r, length, g = 8, 1, 4, 4
    rng = np.random.default_rng(1)
    rewards = Rewards(
        region=jnp.asarray(rng.uniform(size=(b, r + 1)), jnp.float32),
        region_valid=jnp.ones((b, r + 1), bool),
        image=jnp.asarray(rng.uniform(size=b), jnp.float32),
        image_valid=jnp.ones((b,), bool),
    )
    own = np.zeros((b, r + 1, length), np.float32)
    own[:g, 0, 0] = own[:g, 1, 1:] = 1.0  # group 0: region on token 0
    own[g:, 0, 3] = own[g:, 1, :3] = 1.0  # group 1: region on token 3
    groups = jnp.repeat(jnp.arange(2), g)
    base = {**spatial_settings().__dict__, "credit": "spatial", "mix_lambda": 1.0}
    honest, _ = credit(rewards, jnp.asarray(own), groups, GRPOSettings(**base))
    placebo, _ = credit(rewards, jnp.asarray(own), groups, GRPOSettings(**{**base, "token_map_shift": g}))
    honest_adv, placebo_adv = np.asarray(honest.adv), np.asarray(placebo.adv)
    # Group 0's region advantage sits on token 0 honestly, on token 3 under the placebo; and vice versa.
    np.testing.assert_allclose(placebo_adv[:g, 3], honest_adv[:g, 0], atol=1e-6)
    np.testing.assert_allclose(placebo_adv[g:, 0], honest_adv[g:, 3], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(placebo.weights), np.roll(own, g, axis=0))
    assert not np.allclose(placebo_adv, honest_adv)
    # Scalar credit has no map to shuffle.
    scalar = {**base, "credit": "scalar"}
    a, _ = credit(rewards, jnp.asarray(own), groups, GRPOSettings(**scalar))
    z, _ = credit(rewards, jnp.asarray(own), groups, GRPOSettings(**{**scalar, "token_map_shift": g}))
    np.testing.assert_array_equal(np.asarray(a.adv), np.asarray(z.adv))


def _two_groups(b: int = 8, r: int = 2, length: int = 6, seed: int = 2):
    rng = np.random.default_rng(seed)
    region_valid = np.ones((b, r + 1), bool)
    region_valid[5, 0] = False  # a failed region in group 1 travels with its rewards
    rewards = Rewards(
        region=jnp.asarray(rng.uniform(size=(b, r + 1)), jnp.float32),
        region_valid=jnp.asarray(region_valid),
        image=jnp.asarray(rng.uniform(size=b), jnp.float32),
        image_valid=jnp.asarray(np.arange(b) != 6),
    )
    weights = rng.uniform(size=(b, r + 1, length)).astype(np.float32)
    return rewards, jnp.asarray(weights / weights.sum(axis=1, keepdims=True))


def test_no_signal_control_credits_each_group_with_another_groups_rewards():
    # rl.rewards_from='other_group': group 0 is credited exactly as group 1's rollouts would be with
    # group 0's own token maps, and vice versa; validity travels with the rewards, the maps stay.
    g = 4
    rewards, weights = _two_groups()
    groups = jnp.repeat(jnp.arange(2), g)
    swapped = Rewards(*(jnp.roll(x, g, axis=0) for x in rewards))
    for mode in ("scalar", "spatial", "region"):
        base = {**spatial_settings().__dict__, "credit": mode, "mix_lambda": 1.0}
        honest, _ = credit(rewards, weights, groups, GRPOSettings(**base))
        control, m = credit(rewards, weights, groups, GRPOSettings(**{**base, "reward_shift": g}))
        expected, m_expected = credit(swapped, weights, groups, GRPOSettings(**base))
        np.testing.assert_array_equal(np.asarray(control.adv), np.asarray(expected.adv))
        np.testing.assert_array_equal(np.asarray(control.mask), np.asarray(expected.mask))
        np.testing.assert_array_equal(np.asarray(control.weights), np.asarray(weights))
        assert not np.allclose(np.asarray(control.adv), np.asarray(honest.adv)), mode
        # Advantages of the usual size: the same statistics as honest credit, only on other rollouts.
        np.testing.assert_allclose(
            float(m["adv/spread_mean"]), float(m_expected["adv/spread_mean"]), rtol=1e-6
        )
    scalar, _ = credit(
        rewards, weights, groups, GRPOSettings(**{**base, "credit": "scalar", "reward_shift": g})
    )
    assert float(np.asarray(scalar.mask)[2]) == 0.0  # row 6's failed judgement now lands on row 2


_ROLL_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax
    from test_step import _two_groups, spatial_settings
    from sfgrpo import runtime
    from sfgrpo.rl.step import GRPOSettings, credit
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    runtime.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    mesh = runtime.make_mesh(data=-1)
    rewards, weights = _two_groups()  # the global batch, the same on both hosts: 4 rows each
    groups = np.repeat(np.arange(4), 2)  # G = 2: groups 0-1 on host 0, 2-3 on host 1
    settings = GRPOSettings(**{**spatial_settings().__dict__, "credit": "spatial", "mix_lambda": 1.0,
                              "reward_shift": 2, "token_map_shift": 2})
    expected, _ = credit(rewards, weights, groups, settings)  # unsharded, on this host alone
    local = {f"r{i}": np.asarray(x)[4 * pid: 4 * pid + 4] for i, x in enumerate(rewards)}
    local |= {"w": np.asarray(weights)[4 * pid: 4 * pid + 4], "g": groups[4 * pid: 4 * pid + 4]}
    with runtime.use_mesh(mesh):
        b = runtime.host_local_to_global(local, mesh)
        sharded = type(rewards)(b["r0"], b["r1"], b["r2"], b["r3"])
        out, _ = jax.jit(lambda r, w, g: credit(r, w, g, settings))(sharded, b["w"], b["g"])
    for name in ("adv", "mask", "weights"):
        mine = runtime.global_to_host_local(getattr(out, name))
        np.testing.assert_allclose(mine, np.asarray(getattr(expected, name))[4 * pid: 4 * pid + 4],
                                   atol=1e-6, err_msg=name)
    print("MATCH", pid, flush=True)
    jax.distributed.shutdown()
    """
)


def test_rolled_rewards_and_maps_cross_hosts_as_on_one(tmp_path):
    # Both controls take rows from other groups, which may live on another host: two processes on
    # loopback credit their rows exactly as one process crediting the whole batch.
    outputs = run_script(_ROLL_WORKER, tmp_path)
    for pid in (0, 1):
        assert f"MATCH {pid}" in outputs[pid]


def test_reward_metrics_count_region_successes_and_background():
    b, r, scale = 2, 2, 25.0
    success = jnp.asarray([[25.0, 19.0], [20.0, 24.0]])  # 0.8 C = 20: 1 of 2, then 2 of 2
    valid = jnp.asarray([[True, True, True], [True, True, True]])
    scores = RegionScores(
        success=success,
        preserve=jnp.full((b, r), scale),
        background=jnp.asarray([25.0, 12.5]),
        naturalness=jnp.full((b,), scale),
        artifacts=jnp.full((b,), scale),
        overall_success=jnp.full((b,), scale),
        overall_preserve=jnp.full((b,), scale),
        valid=jnp.ones((b,), bool),
    )
    rewards = Rewards(
        region=jnp.zeros((b, r + 1)), region_valid=valid, image=jnp.zeros(b), image_valid=valid[:, 0]
    )
    m = {k: float(v) for k, v in reward_metrics(scores, rewards, scale).items()}
    assert m["reward/region_success_rate"] == pytest.approx(0.75)
    assert m["reward/multi_region_success"] == pytest.approx(0.5)
    assert m["reward/background_preservation"] == pytest.approx(0.75)


def test_lora_trains_only_adapters_and_starts_at_the_reference():
    c = tiny_config()
    c.model.lora_rank = 4
    c.rl.kl_beta = 0.04
    s = Setup(c)
    assert s.adapted and all("lora" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(s.params))
    ref = jax.tree.map(jnp.zeros_like, s.params)
    out = s("rollout", s.params, s.frozen, s.batch, s.key(6))
    credit, _ = s("reward", s.params, s.frozen, out.edited, s.batch, out.weights)
    credit = credit._replace(
        adv=jax.random.normal(s.key(8), credit.adv.shape), mask=jnp.ones_like(credit.mask)
    )
    params, _, m = s("update", s.params, s.frozen, s.opt_state, ref, out, credit, s.key(7))
    # A fresh adapter (B = 0) is the base model, so the KL to the reference is exactly 0 at the start.
    assert float(m["kl"]) < 1e-10
    assert float(m["grad_norm"]) > 0
    assert jax.tree.structure(params) == jax.tree.structure(s.params)


def test_micro_batches_shuffle_within_each_device(spatial):
    settings = GRPOSettings(**{**spatial.programs.settings.__dict__, "micro_batch": 8, "batch_shards": 8})
    rows = jnp.arange(16, dtype=jnp.float32)[:, None] * jnp.ones((1, 3))
    with runtime.use_mesh(spatial.mesh):
        tree = runtime.host_local_to_global({"x": np.asarray(rows)}, spatial.mesh)
        out = jax.jit(lambda t, k: _micro_batches(t, k, settings))(tree, jax.random.key(0))
    x = np.asarray(out["x"])[..., 0]  # (2 micro-batches, 8)
    assert x.shape == (2, 8)
    # Device d holds samples 2d and 2d+1; its column of the micro-batches is a permutation of them.
    for d in range(8):
        assert sorted(x[:, d].tolist()) == [2 * d, 2 * d + 1]


def test_update_raises_the_likelihood_of_advantaged_tokens(spatial):
    """The sign, end to end: after an update, sum(A * (logp_new - logp_old)) > 0 on the same trajectory."""
    s = spatial
    out = s("rollout", s.params, s.frozen, s.batch, s.key(11))
    credit, _ = s("reward", s.params, s.frozen, out.edited, s.batch, out.weights)
    credit = credit._replace(
        adv=jax.random.normal(s.key(12), credit.adv.shape), mask=jnp.ones_like(credit.mask)
    )
    params, _, _ = s("update", s.params, s.frozen, s.opt_state, {}, out, credit, s.key(13))
    sigma_max = jnp.asarray(s.programs.sigmas[1])
    with runtime.use_mesh(s.mesh):
        parts = PolicyParts(s.graphdef, params, s.frozen)
        logp_new = jax.jit(lambda p, o: rescore(p, o.traj, o.cond, sigma_max, s.programs.settings))(
            parts, out
        )
    gain = (np.asarray(credit.adv)[None] * (np.asarray(logp_new) - np.asarray(out.traj.logp))).sum()
    assert gain > 0


def test_true_cfg_is_the_policy_in_rollout_and_update():
    c = tiny_config()
    c.sampler.cfg_scale = 3.0
    s = Setup(c)
    out = s("rollout", s.params, s.frozen, s.batch, s.key(21))
    assert out.cond.text_uncond is not None and out.cond.text_uncond.shape == out.cond.text.shape
    credit, _ = s("reward", s.params, s.frozen, out.edited, s.batch, out.weights)
    credit = credit._replace(
        adv=jax.random.normal(s.key(22), credit.adv.shape), mask=jnp.ones_like(credit.mask)
    )
    _, _, m = s("update", s.params, s.frozen, s.opt_state, {}, out, credit, s.key(23))
    # The update re-scores with the same guided velocity that sampled: on-policy, nothing is clipped.
    assert float(m["clipfrac"]) == 0.0 and float(m["approx_kl"]) < 1e-8
    # And guidance changes the samples: the unguided policy draws other images from the same noise.
    plain = Setup(tiny_config())
    out_plain = plain("rollout", s.params, s.frozen, plain.batch, s.key(21))
    assert not np.allclose(np.asarray(out_plain.edited), np.asarray(out.edited))


def _on_host(tree):
    """The tree as single-device arrays: the updates below run without a mesh, so micro_batch can be 1."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)


def _sgd_gradient(s, out, credit_, *, samples, micro_batch, ref_params=None, **overrides):
    """The gradient one update of ``samples`` (row indices) takes, on one device: plain SGD at rate 1
    (no clip, no Adam), so it is params - new params. Returns (gradient leaves, metrics)."""
    idx = np.asarray(samples)
    pick = lambda x: jnp.asarray(np.asarray(x)[idx])  # noqa: E731
    traj = out.traj._replace(
        x=out.traj.x[:, idx],
        x_next=out.traj.x_next[:, idx],
        logp=out.traj.logp[:, idx],
        final=out.traj.final[idx],
    )
    cond = out.cond._replace(text=pick(out.cond.text), reference=pick(out.cond.reference))
    credit_ = Credit(*(pick(x) for x in credit_))
    settings = dataclasses.replace(
        s.programs.settings,
        batch_shards=1,
        micro_batch=micro_batch,
        grad_accum=len(idx) // micro_batch,
        **overrides,
    )
    params, frozen = _on_host(s.params), _on_host(s.frozen)
    ref = {} if ref_params is None else _on_host(ref_params)
    opt = optax.sgd(1.0)
    sigma_max = jnp.asarray(s.programs.sigmas[1])

    def run(params, frozen, ref, traj, cond, credit_):
        parts = PolicyParts(s.graphdef, params, frozen)
        return update(
            parts, opt.init(params), opt, ref, traj, cond, credit_, jax.random.key(0), sigma_max, settings
        )

    new, _, metrics = jax.jit(run)(params, frozen, ref, _on_host(traj), _on_host(cond), credit_)
    grads = [
        np.asarray(a) - np.asarray(b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True)
    ]
    return grads, metrics


def _random_credit(out, mode, seed):
    """Random advantages of the mode's shape with an all-ones mask (the rows to fail are set by callers)."""
    b, r1, length = out.weights.shape
    shape = {"spatial": (b, length), "region": (b, r1), "scalar": (b,)}[mode]
    adv = jax.random.normal(jax.random.key(seed), shape)
    return Credit(adv, jnp.ones(shape), out.weights)


@pytest.mark.parametrize("mode", ["spatial", "region", "scalar"])
def test_poisoned_failed_samples_leave_the_update_to_the_valid_ones(spatial, mode):
    """Issue 12 item 2: a failed sample whose trajectory holds NaN (sample 0) or a log-ratio of 1e4
    (sample 5) changes neither the loss, the KL nor the gradient: they equal those of the 14 valid
    samples alone."""
    s = spatial
    out = _on_host(s("rollout", s.params, s.frozen, s.batch, s.key(31)))
    credit_ = _random_credit(out, mode, 32)
    credit_ = credit_._replace(mask=credit_.mask.at[np.array([0, 5])].set(0.0))
    poisoned = out._replace(
        traj=out.traj._replace(
            x=out.traj.x.at[:, 0].set(jnp.nan),
            x_next=out.traj.x_next.at[:, 0].set(jnp.nan),
            logp=out.traj.logp.at[:, 5].add(-1e4),
        )
    )
    leaves, treedef = jax.tree.flatten(_on_host(s.params))
    keys = jax.random.split(jax.random.key(33), len(leaves))
    # A reference away from the policy, so that the KL term and its gradient are not zero.
    ref = treedef.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    kw = dict(ref_params=ref, credit=mode, kl_beta=0.04)
    valid = [i for i in range(16) if i not in (0, 5)]
    g_all, m_all = _sgd_gradient(s, poisoned, credit_, samples=range(16), micro_batch=16, **kw)
    g_valid, m_valid = _sgd_gradient(s, out, credit_, samples=valid, micro_batch=14, **kw)
    assert float(m_all["skipped_updates"]) == 0.0
    for key in ("loss", "kl", "total_loss"):
        np.testing.assert_allclose(m_all[key], m_valid[key], rtol=1e-5, err_msg=key)
    assert float(m_valid["kl"]) > 0
    scale = max(float(np.abs(g).max()) for g in g_valid)
    assert scale > 0
    for a, b in zip(g_all, g_valid, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("mode", ["spatial", "region", "scalar"])
def test_accumulated_gradient_equals_the_full_batch_gradient(spatial, mode):
    """Issue 12 item 3, SPEC section 8: with random failed rewards, 16 micro-batches of one sample
    accumulate the gradient of one micro-batch of 16 (each divides by the whole batch's count)."""
    s = spatial
    out = _on_host(s("rollout", s.params, s.frozen, s.batch, s.key(41)))
    credit_ = _random_credit(out, mode, 42)
    rng = np.random.default_rng(43)
    failed = rng.random(credit_.mask.shape) < 0.4  # per token, region or sample
    failed[:3] = True  # and some whole samples
    mask = np.where(failed, 0.0, 1.0).astype(np.float32)
    if mode == "spatial":
        mask *= rng.uniform(0.2, 1.0, mask.shape).astype(np.float32)  # fractional token validity
    credit_ = credit_._replace(mask=jnp.asarray(mask))
    leaves, treedef = jax.tree.flatten(_on_host(s.params))
    keys = jax.random.split(jax.random.key(44), len(leaves))
    ref = treedef.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    kw = dict(ref_params=ref, credit=mode, kl_beta=0.04)
    g_full, m_full = _sgd_gradient(s, out, credit_, samples=range(16), micro_batch=16, **kw)
    g_micro, m_micro = _sgd_gradient(s, out, credit_, samples=range(16), micro_batch=1, **kw)
    np.testing.assert_allclose(m_micro["total_loss"], m_full["total_loss"], rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in g_full)
    assert scale > 0
    worst = max(float(np.abs(a - b).max()) for a, b in zip(g_micro, g_full, strict=True)) / scale
    assert worst < 1e-5, f"max |g_micro - g_full| / max |g_full| = {worst:.2e}"


def test_bf16_full_fine_tuning_trains_float32_master_weights():
    """Issue 12 item 1, full fine-tuning: a bf16 model trains float32 master weights with float32 Adam
    moments, computes with a bf16 copy of them, and its step moves every weight entry that a float32 model's
    step moves (bf16 weights round Adam's lr-sized steps to zero for most entries)."""
    s, params, opt_state, moved_bf16 = entries_moved("bfloat16", 0, 3)
    assert s.compute_dtypes is not None and set(s.compute_dtypes) == {"bfloat16"}
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    floats = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    # The model computes in bf16: the merged policy holds bf16 weights.
    policy = s.programs._parts(params, s.frozen)
    kernels = jax.tree.leaves(nnx.state(merge(policy).transformer, nnx.Param))
    assert kernels and all(x.dtype == jnp.bfloat16 for x in kernels)
    _, _, _, moved_f32 = entries_moved("float32", 0, 3)
    assert moved_f32.keys() == moved_bf16.keys()
    f32_frac = np.mean(np.concatenate([m.ravel() for m in moved_f32.values()]))
    assert f32_frac > 0.9, f32_frac
    for path, m32 in moved_f32.items():
        missed = m32 & ~moved_bf16[path]
        assert not missed.any(), f"{path}: {missed.mean():.1%} of entries moved in float32 only"


def test_reference_kv_cache_in_the_rollout_and_the_update(monkeypatch):
    """A Flux2KleinKVPipeline-style policy (``reference_kv``): the rollout samples with the cached source
    keys/values and the first update is on-policy; the update runs the reference pass once per
    micro-batch and pulls the window steps' summed cache gradient back through it, which equals
    differentiating a reference pass inside every step, and that gradient is not negligible."""
    c = tiny_config()
    c.model.transformer.reference_kv = True
    s = Setup(c)
    out = s("rollout", s.params, s.frozen, s.batch, s.key(51))
    assert out.cond.reference_kv is None  # the cache lives inside the programs, not in their outputs
    credit_ = _random_credit(out, "spatial", 52)
    _, _, m = s("update", s.params, s.frozen, s.opt_state, {}, out, credit_, s.key(53))
    assert float(m["clipfrac"]) == 0.0 and float(m["approx_kl"]) < 1e-8

    out = _on_host(out)
    leaves, treedef = jax.tree.flatten(_on_host(s.params))
    keys = jax.random.split(jax.random.key(54), len(leaves))
    ref = treedef.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    kw = dict(samples=range(16), micro_batch=8, ref_params=ref, kl_beta=0.04)
    g_cached, m_cached = _sgd_gradient(s, out, credit_, **kw)
    cached_pass = step_module._reference_kv
    # Without the hoisted pass every window step's velocity computes (and differentiates) its own.
    monkeypatch.setattr(step_module, "_reference_kv", lambda *a: None)
    g_each, m_each = _sgd_gradient(s, out, credit_, **kw)
    np.testing.assert_allclose(m_cached["total_loss"], m_each["total_loss"], rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in g_each)
    assert scale > 0
    worst = max(float(np.abs(a - b).max()) for a, b in zip(g_cached, g_each, strict=True)) / scale
    assert worst < 1e-5, f"max |g_cached - g_each| / max |g_each| = {worst:.2e}"
    # A cache that carried no gradient would leave out a real part of it.
    monkeypatch.setattr(step_module, "_reference_kv", lambda *a: jax.lax.stop_gradient(cached_pass(*a)))
    g_frozen, _ = _sgd_gradient(s, out, credit_, **kw)
    gap = max(float(np.abs(a - b).max()) for a, b in zip(g_frozen, g_each, strict=True)) / scale
    assert gap > 1e-2
