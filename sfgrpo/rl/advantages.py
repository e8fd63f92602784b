"""Region rewards (SPEC section 5, Eq. 3) and group-normalised advantages (SPEC section 7).

A group is the G rollouts of one input; ``group_ids`` (B,) names each sample's group. Statistics use only
valid entries (a failed reward is invalid: it neither counts in its group's statistics nor gets credit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STD_MODES = ("group", "global")


def region_rewards(
    success: jax.Array,
    preserve: jax.Array,
    background: jax.Array,
    naturalness: jax.Array,
    artifacts: jax.Array,
    scale: float = 25.0,
) -> jax.Array:
    """R_{i,r} = sqrt(phi_{i,r} * AES_i) / C (Eq. 3), with the background as the last region.

    Args:
      success, preserve: (B, R) per-region scores on 0..scale.
      background: (B,) background-preservation score on 0..scale.
      naturalness, artifacts: (B,) perceptual-quality scores on 0..scale.
      scale: C, the top of the score scale.

    Returns:
      (B, R + 1) float32 rewards in [0, 1]. A NaN score propagates to NaN: mark such entries invalid.
    """
    f32 = jnp.float32
    phi = jnp.minimum(success.astype(f32), preserve.astype(f32))
    phi = jnp.concatenate([phi, background.astype(f32)[:, None]], axis=1)
    aes = jnp.minimum(naturalness.astype(f32), artifacts.astype(f32))[:, None]
    return jnp.sqrt(jnp.maximum(phi * aes, 0.0)) / scale


def global_reward(
    overall_success: jax.Array,
    overall_preserve: jax.Array,
    naturalness: jax.Array,
    artifacts: jax.Array,
    scale: float = 25.0,
) -> jax.Array:
    """(B,) R^g = sqrt(min(overall success, overall preserve) * AES) / C, the Flow-GRPO baseline's reward."""
    f32 = jnp.float32
    phi = jnp.minimum(overall_success.astype(f32), overall_preserve.astype(f32))
    aes = jnp.minimum(naturalness.astype(f32), artifacts.astype(f32))
    return jnp.sqrt(jnp.maximum(phi * aes, 0.0)) / scale


def group_statistics(
    rewards: jax.Array, valid: jax.Array, group_ids: jax.Array, *, std: str = "group"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sample group mean, std and zero-spread flag, shaped like ``rewards``.

    Args:
      rewards: (B,) or (B, K) float.
      valid: bool, the same shape.
      group_ids: (B,) int.
      std: 'group' (population std within the group, per column) or 'global' (over all valid entries of
        the column in the batch; the mean stays per group, as Flow-GRPO's global_std).

    Returns:
      (mean, std, zero_spread), each shaped like ``rewards``; zero_spread is True where the valid entries of
      the sample's group are all equal (or fewer than two).
    """
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    squeeze = rewards.ndim == 1
    r = rewards.astype(jnp.float32).reshape(rewards.shape[0], -1)
    v = valid.reshape(r.shape)
    r = jnp.where(v, r, 0.0)
    # (B, B) same-group matrix: batches are a few hundred samples, so this beats a segment reduction's
    # need for a static group count.
    # Row i stays where sample i lives; the "every j" side is replicated (a few hundred scalars).
    ids_all, r_all, v_all = _replicated(group_ids), _replicated(r), _replicated(v)
    same = (group_ids[:, None] == ids_all[None, :]).astype(jnp.float32)
    member = same[:, :, None] * v_all[None, :, :]  # (B, B, K): j is a valid member of i's group
    count = member.sum(axis=1)
    mean = (member * r_all[None]).sum(axis=1) / jnp.maximum(count, 1.0)
    if std == "group":
        var = (member * (r_all[None] - mean[:, None]) ** 2).sum(axis=1) / jnp.maximum(count, 1.0)
    else:
        n_all = jnp.maximum(v.sum(axis=0), 1)
        mean_all = r.sum(axis=0) / n_all
        var_all = (jnp.where(v, (r - mean_all) ** 2, 0.0)).sum(axis=0) / n_all
        var = jnp.broadcast_to(var_all, r.shape)
    big = jnp.finfo(jnp.float32).max
    gmax = jnp.where(member > 0, r_all[None], -big).max(axis=1)
    gmin = jnp.where(member > 0, r_all[None], big).min(axis=1)
    zero_spread = (count < 2) | (gmax <= gmin)
    out = (mean, jnp.sqrt(var), zero_spread)
    return tuple(x[:, 0] for x in out) if squeeze else out


def _replicated(x: jax.Array) -> jax.Array:
    """``x`` replicated over the current mesh (a no-op without one)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.sharding.reshard(x, jax.P())


def group_advantages(
    rewards: jax.Array,
    valid: jax.Array,
    group_ids: jax.Array,
    *,
    std: str = "group",
    clip: float = 5.0,
    eps: float = 1e-4,
) -> jax.Array:
    """A = (R - mean_group R) / (std R + eps), clipped to +-clip (SPEC section 7).

    Args:
      rewards: (B,) or (B, K) float rewards (K regions, the background included).
      valid: bool, the same shape; invalid entries get 0 and are left out of the statistics.
      group_ids: (B,) int group of each sample.
      std: 'group' or 'global' (see ``group_statistics``).
      clip: the advantage bound.
      eps: added to the std.

    Returns:
      float32 advantages shaped like ``rewards``; 0 where the group's valid rewards have zero spread.
    """
    mean, sd, zero_spread = group_statistics(rewards, valid, group_ids, std=std)
    adv = (rewards.astype(jnp.float32) - mean) / (sd + eps)
    adv = jnp.where(valid & ~zero_spread, adv, 0.0)
    return jnp.clip(adv, -clip, clip)


def token_advantages(region_adv: jax.Array, weights: jax.Array) -> jax.Array:
    """(B, L) token advantages A_hat[p] = sum_r W_r[p] A_r; region_adv (B, R+1), weights (B, R+1, L)."""
    return jnp.einsum("br,brl->bl", region_adv.astype(jnp.float32), weights.astype(jnp.float32))


def mix_global(token_adv: jax.Array, global_adv: jax.Array, lam: float) -> jax.Array:
    """(B, L) lam * token_adv + (1 - lam) * global_adv, the global advantage (B,) broadcast over tokens."""
    return lam * token_adv + (1.0 - lam) * global_adv[:, None]


def token_validity(region_valid: jax.Array, weights: jax.Array) -> jax.Array:
    """(B, L) float in [0, 1]: the weight of each token that belongs to regions with a valid reward.

    Use it as the loss mask, so that a failed region's tokens carry no weight rather than zero advantage.
    """
    return jnp.einsum("br,brl->bl", region_valid.astype(jnp.float32), weights.astype(jnp.float32))
