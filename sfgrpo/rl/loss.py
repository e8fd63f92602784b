"""The clipped GRPO objective with three credit modes (SPEC section 8).

For one trained sampler step, with rho = exp(logp - logp_old) and s(rho, A) = max(-A rho, -A clip(rho)):
  'spatial'  token ratio, token advantage:     mean_{i,p} s(rho_i[p], A_i[p])
  'region'   region ratio, region advantage:   mean_i sum_r omega_r s(rho_{i,r}, A_{i,r}),
             log rho_{i,r} = sum_p W~_r[p] (logp - logp_old)[p], W~_r = W_r normalised over p,
             omega_r = region r's share of the image area
  'scalar'   image ratio, global advantage (Flow-GRPO): mean_i s(exp(mean_p (logp - logp_old)), A_i)
Each is a mean over the valid entries; the caller passes the whole batch's count of them (over samples,
trained steps and micro-batches, ``entry_count``) so that the partial losses it accumulates sum to the
full-batch mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sfgrpo.rl.regions import area_share

CREDIT_MODES = ("spatial", "region", "scalar")


def clipped_surrogate(ratio: jax.Array, adv: jax.Array, clip_range: Sequence[float]) -> jax.Array:
    """s(rho, A) = max(-A rho, -A clip(rho, 1 - lo, 1 + hi)), elementwise."""
    lo, hi = clip_range
    return jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - lo, 1.0 + hi))


def policy_loss(
    logp: jax.Array,
    logp_old: jax.Array,
    adv: jax.Array,
    *,
    mode: str,
    clip_range: Sequence[float],
    weights: jax.Array | None = None,
    mask: jax.Array | None = None,
    count: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped policy loss of one trained step.

    Args:
      logp: (B, L) float32 token log-probs under the current parameters.
      logp_old: (B, L) float32 token log-probs recorded at rollout.
      adv: 'spatial': (B, L) token advantages; 'region': (B, R+1) region advantages; 'scalar': (B,).
      mode: 'spatial', 'region' or 'scalar'.
      clip_range: (lo, hi); the ratio is clipped to [1 - lo, 1 + hi].
      weights: (B, R+1, L) token weights (background last); needed by 'region', and used by the other
        modes only to split the metrics into edit regions and background.
      mask: which entries count. 'spatial': (B, L) or (B,) weights; 'region': (B, R+1) or (B,);
        'scalar': (B,). Masked-out entries leave the loss and its mean's denominator. Default: all count.
      count: the denominator of the mean, a scalar: the number of valid entries of the whole batch, over
        its samples, trained steps and micro-batches (``entry_count`` per step times the steps). Default:
        this call's own count, ``entry_count(mask, mode, L)``.

    Returns:
      (loss, metrics): a float32 scalar (this call's share of the whole batch's mean when ``count`` is
      given) and a dict of float32 scalars with at least 'clipfrac' and
      'approx_kl' (and their '/edit' and '/background' splits when weights are given).
    """
    if mode not in CREDIT_MODES:
        raise ValueError(f"policy_loss: mode must be one of {CREDIT_MODES}, got {mode!r}")
    if logp.shape != logp_old.shape or logp.ndim != 2:
        raise ValueError(
            f"policy_loss: logp and logp_old must both be (B, L); got {logp.shape}, {logp_old.shape}"
        )
    if len(clip_range) != 2:
        raise ValueError(f"policy_loss: clip_range must be (lo, hi), got {clip_range!r}")
    batch, length = logp.shape
    delta = logp.astype(jnp.float32) - jax.lax.stop_gradient(logp_old.astype(jnp.float32))
    adv = jax.lax.stop_gradient(adv.astype(jnp.float32))
    lo, hi = clip_range
    # Excluded entries are selected away (SPEC section 8): a failed sample's trajectory may hold NaN or a
    # huge log-ratio, and 0 * NaN or 0 * exp(1e4) would poison the loss and its gradient. The log-ratio is
    # replaced before exp, so the excluded branch is finite and `where` passes it no gradient.

    if mode == "spatial":
        _expect(adv, (batch, length), "adv ('spatial')")
        token_mask = _mask_as(mask, (batch, length))
        keep = token_mask > 0
        delta = jnp.where(keep, delta, 0.0)
        log_ratio = delta
        values = clipped_surrogate(jnp.exp(delta), jnp.where(keep, adv, 0.0), clip_range)
        total = _masked_sum(values, token_mask)
        entry_mask = token_mask
    elif mode == "scalar":
        _expect(adv, (batch,), "adv ('scalar')")
        token_mask = _mask_as(mask, (batch, length))
        keep = token_mask[:, 0] > 0
        delta = jnp.where(keep[:, None], delta, 0.0)
        log_ratio = delta.mean(axis=1)
        values = clipped_surrogate(jnp.exp(log_ratio), jnp.where(keep, adv, 0.0), clip_range)
        total = _masked_sum(values, token_mask[:, 0])
        entry_mask = token_mask[:, 0]
    else:
        if weights is None:
            raise ValueError("policy_loss: mode 'region' needs the token weights (B, R+1, L)")
        regions = weights.shape[1]
        _expect(weights, (batch, regions, length), "weights")
        _expect(adv, (batch, regions), "adv ('region')")
        region_mask = _mask_as(mask, (batch, regions))
        keep = region_mask > 0
        sample_keep = keep.any(axis=1)
        # A region's ratio mixes all tokens of its sample, so a failed sample is cleared whole.
        delta = jnp.where(sample_keep[:, None], delta, 0.0)
        mass = weights.sum(axis=-1, keepdims=True)
        normalised = weights / jnp.where(mass > 0, mass, 1.0)
        log_ratio = jnp.where(keep, jnp.einsum("brl,bl->br", normalised, delta), 0.0)
        surrogate = clipped_surrogate(jnp.exp(log_ratio), jnp.where(keep, adv, 0.0), clip_range)
        per_image = jnp.where(keep, area_share(weights) * region_mask * surrogate, 0.0).sum(axis=1)
        total = _masked_sum(per_image, sample_keep.astype(jnp.float32))
        token_mask = jnp.einsum("br,brl->bl", region_mask, weights)
        entry_mask = jnp.where(mass[..., 0] > 0, region_mask, 0.0)

    if count is None:
        count = entry_count(mask if mask is not None else jnp.ones((batch,)), mode, length)
    count = jnp.asarray(count, jnp.float32)
    loss = total / jnp.where(count > 0, count, 1.0)
    metrics = _ratio_metrics(delta, log_ratio, lo, hi, entry_mask, token_mask, weights)
    metrics["loss"] = loss
    return loss, metrics


def entry_count(mask: jax.Array, mode: str, length: int) -> jax.Array:
    """The number of valid entries one trained step of a batch adds to the mean of ``policy_loss``.

    'spatial': the mask's total over (sample, token), a (B,) mask counting ``length`` tokens per sample;
    'scalar': its total over samples; 'region': the samples with any valid region (the loss is a mean
    over images of an area-weighted sum over regions). ``mask`` takes ``policy_loss``'s shapes.
    """
    mask = mask.astype(jnp.float32)
    if mode == "spatial":
        return mask.sum() * (length if mask.ndim == 1 else 1)
    if mode == "scalar":
        return mask.sum()
    return sample_validity(mask).sum().astype(jnp.float32)


def sample_validity(mask: jax.Array) -> jax.Array:
    """(B,) bool: the samples with any entry of ``mask`` (B, ...) above 0."""
    return (mask > 0).any(axis=tuple(range(1, mask.ndim))) if mask.ndim > 1 else mask > 0


def approx_kl(delta: jax.Array) -> jax.Array:
    """Flow-GRPO's estimate 0.5 (logp - logp_old)^2, elementwise."""
    return 0.5 * delta**2


def _ratio_metrics(
    delta: jax.Array,
    log_ratio: jax.Array,
    lo: float,
    hi: float,
    entry_mask: jax.Array,
    token_mask: jax.Array,
    weights: jax.Array | None,
) -> dict[str, jax.Array]:
    """Clip fraction and approximate KL of the ratios the mode clips (entry_mask: their weights, the shape
    of log_ratio), plus per-token splits by region (token_mask (B, L))."""
    ratio = jnp.exp(jax.lax.stop_gradient(log_ratio))
    clipped = ((ratio < 1.0 - lo) | (ratio > 1.0 + hi)).astype(jnp.float32)
    kl = approx_kl(jax.lax.stop_gradient(log_ratio))
    metrics = {"clipfrac": _weighted_mean(clipped, entry_mask), "approx_kl": _weighted_mean(kl, entry_mask)}
    if weights is not None:
        # Token-level view for every mode, split by where the credit goes.
        token_ratio = jnp.exp(jax.lax.stop_gradient(delta))
        token_clipped = ((token_ratio < 1.0 - lo) | (token_ratio > 1.0 + hi)).astype(jnp.float32)
        token_kl = approx_kl(jax.lax.stop_gradient(delta))
        edit = weights[:, :-1].sum(axis=1) * token_mask
        background = weights[:, -1] * token_mask
        for name, part in (("edit", edit), ("background", background)):
            metrics[f"token_clipfrac/{name}"] = _weighted_mean(token_clipped, part)
            metrics[f"approx_kl/{name}"] = _weighted_mean(token_kl, part)
    return metrics


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(w * v) / sum(w) over the entries with w > 0 (selected, so a NaN where w = 0 stays out); 0 when
    nothing is weighted."""
    total = weights.sum()
    return jnp.where(total > 0, _masked_sum(values, weights) / jnp.where(total > 0, total, 1.0), 0.0)


def _masked_sum(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(w * v) over the entries with w > 0, selected so that a NaN where w = 0 stays out."""
    return jnp.where(weights > 0, weights * values, 0.0).sum()


def _mask_as(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """A float32 mask of ``shape`` from None (all ones), a (B,) mask, or one of ``shape`` itself."""
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    mask = mask.astype(jnp.float32)
    if mask.shape == shape:
        return mask
    if mask.shape == shape[:1]:
        return jnp.broadcast_to(mask.reshape(shape[:1] + (1,) * (len(shape) - 1)), shape)
    raise ValueError(f"policy_loss: mask must be {shape} or {shape[:1]}, got {mask.shape}")


def _expect(x: jax.Array, shape: tuple[int, ...], name: str) -> None:
    if x.shape != shape:
        raise ValueError(f"policy_loss: {name} must have shape {shape}, got {x.shape}")
