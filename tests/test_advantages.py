"""Region rewards (Eq. 3) and group advantages (SPEC section 7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfgrpo.rl.advantages import (
    global_reward,
    group_advantages,
    group_statistics,
    mix_global,
    region_rewards,
    token_advantages,
    token_validity,
)
from sfgrpo.rl.regions import token_weights


def test_region_rewards_eq3():
    success = jnp.array([[25.0, 10.0], [5.0, 0.0]])
    preserve = jnp.array([[20.0, 25.0], [25.0, 25.0]])
    background = jnp.array([16.0, 25.0])
    naturalness = jnp.array([25.0, 9.0])
    artifacts = jnp.array([16.0, 25.0])
    r = np.asarray(region_rewards(success, preserve, background, naturalness, artifacts))
    assert r.shape == (2, 3)
    expected = (
        np.array(
            [
                [np.sqrt(20 * 16), np.sqrt(10 * 16), np.sqrt(16 * 16)],
                [np.sqrt(5 * 9), 0.0, np.sqrt(25 * 9)],
            ]
        )
        / 25.0
    )
    np.testing.assert_allclose(r, expected, rtol=1e-6)
    g = global_reward(jnp.array([25.0, 4.0]), jnp.array([9.0, 25.0]), naturalness, artifacts)
    np.testing.assert_allclose(g, [np.sqrt(9 * 16) / 25, np.sqrt(4 * 9) / 25], rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 6),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(0, 2**31 - 1),
)
def test_group_mean_zero_std_one(group_size, num_groups, k, seed):
    rng = np.random.default_rng(seed)
    rewards = rng.uniform(0, 1, (group_size * num_groups, k)).astype(np.float32)
    ids = np.repeat(rng.permutation(100)[:num_groups], group_size)
    perm = rng.permutation(len(ids))  # groups need not be contiguous
    rewards, ids = rewards[perm], ids[perm]
    adv = np.asarray(group_advantages(rewards, np.ones_like(rewards, bool), ids, clip=1e9, eps=0.0))
    for g in np.unique(ids):
        a = adv[ids == g]
        # float32 rounding grows as 1/spread; near-ties are the zero-spread test's business.
        wide = np.ptp(rewards[ids == g], axis=0) > 1e-2
        np.testing.assert_allclose(a.mean(axis=0)[wide], 0.0, atol=1e-4)
        np.testing.assert_allclose(a.std(axis=0)[wide], 1.0, atol=1e-3)


def test_matches_numpy_reference_with_eps():
    rewards = np.array([0.1, 0.4, 0.9, 0.3, 0.3, 0.8], np.float32)
    ids = np.array([0, 0, 0, 7, 7, 7])
    adv = np.asarray(group_advantages(rewards, np.ones(6, bool), ids, eps=1e-4))
    for g in (0, 7):
        r = rewards[ids == g].astype(np.float64)
        np.testing.assert_allclose(adv[ids == g], (r - r.mean()) / (r.std() + 1e-4), rtol=1e-5)


def test_zero_spread_gives_zero():
    rewards = np.array([[0.1, 0.5], [0.1, 0.2], [0.1, 0.9], [0.3, 0.3], [0.3, 0.3], [0.3, 0.3]], np.float32)
    ids = np.array([0, 0, 0, 1, 1, 1])
    adv = np.asarray(group_advantages(rewards, np.ones_like(rewards, bool), ids))
    np.testing.assert_array_equal(adv[:, 0], 0.0)  # column 0 of group 0 has no spread
    np.testing.assert_array_equal(adv[3:], 0.0)
    assert np.all(adv[:3, 1] != 0)
    for std in ("group", "global"):
        _, _, zero = group_statistics(jnp.asarray(rewards), jnp.ones((6, 2), bool), jnp.asarray(ids), std=std)
        np.testing.assert_array_equal(np.asarray(zero)[:, 0], True)


def test_invalid_entries_are_excluded_and_zero():
    rewards = np.array([0.2, 0.8, np.nan, 0.5], np.float32)
    valid = np.array([True, True, False, True])
    ids = np.zeros(4, int)
    adv = np.asarray(group_advantages(rewards, valid, ids))
    assert adv[2] == 0.0 and np.all(np.isfinite(adv))
    r = np.array([0.2, 0.8, 0.5])
    np.testing.assert_allclose(adv[[0, 1, 3]], (r - r.mean()) / (r.std() + 1e-4), rtol=1e-5)
    # A single valid member is zero spread.
    lone = group_advantages(rewards, np.array([True, False, False, False]), ids)
    np.testing.assert_array_equal(lone, 0.0)


def test_clip():
    rewards = np.array([1.0] + [0.0] * 99, np.float32)
    adv = np.asarray(group_advantages(rewards, np.ones(100, bool), np.zeros(100, int), clip=5.0))
    assert adv[0] == 5.0  # unclipped it is about 9.95
    assert np.all(adv >= -5.0)


def test_global_std_uses_batch_std_and_group_mean():
    rewards = np.array([0.0, 1.0, 10.0, 12.0], np.float32)
    ids = np.array([0, 0, 1, 1])
    adv = np.asarray(group_advantages(rewards, np.ones(4, bool), ids, std="global", eps=0.0, clip=1e9))
    sd = rewards.std()
    np.testing.assert_allclose(adv, [-0.5 / sd, 0.5 / sd, -1 / sd, 1 / sd], rtol=1e-5)
    with pytest.raises(ValueError, match="std"):
        group_advantages(rewards, np.ones(4, bool), ids, std="batch")


def test_token_advantages_and_mixing():
    boxes = jnp.array([[[0.0, 0.0, 0.5, 1.0]], [[0.0, 0.0, 0.5, 1.0]]])
    weights = token_weights(boxes, jnp.ones((2, 1), bool), (1, 4))
    region_adv = jnp.array([[2.0, -1.0], [0.5, 0.5]])
    tok = np.asarray(token_advantages(region_adv, weights))
    np.testing.assert_allclose(tok, [[2, 2, -1, -1], [0.5, 0.5, 0.5, 0.5]], atol=1e-6)
    mixed = np.asarray(mix_global(jnp.asarray(tok), jnp.array([1.0, 0.0]), 0.25))
    np.testing.assert_allclose(mixed[0], 0.25 * tok[0] + 0.75, atol=1e-6)
    validity = token_validity(jnp.array([[True, False], [True, True]]), weights)
    np.testing.assert_allclose(validity, [[1, 1, 0, 0], [1, 1, 1, 1]], atol=1e-6)


def test_jittable():
    rewards = jnp.array([[0.1, 0.5], [0.3, 0.2], [0.9, 0.9], [0.4, 0.1]])
    ids = jnp.array([0, 0, 1, 1])
    valid = jnp.ones((4, 2), bool)
    eager = group_advantages(rewards, valid, ids)
    jitted = jax.jit(lambda r, v, i: group_advantages(r, v, i, std="group"))(rewards, valid, ids)
    np.testing.assert_allclose(eager, jitted, atol=1e-6)
