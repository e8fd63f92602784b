"""One sampler step with its log-probability (SPEC section 4, after Flow-GRPO).

The step moves x from flow time sigma to sigma_next (< sigma) given the model's velocity v = eps - x0.
Kinds:
  'sde'  the Flow-GRPO SDE: Gaussian step with std = eta * sqrt(sigma / (1 - sigma)) * sqrt(-dt);
  'cps'  coefficient-preserving sampling: std = sigma_next * sin(eta * pi / 2), unnormalised log-density;
  'ode'  the Euler step: deterministic, no log-probability (token_logp is 0 and must be masked).
All arithmetic is float32, whatever the dtype of the inputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

STEP_KINDS = ("sde", "cps", "ode")


class StepOutput(NamedTuple):
    """Result of one sampler step.

    next:       (B, L, C) float32, the sample at sigma_next: mean + std * noise.
    mean:       (B, L, C) float32, the mean of the step's Gaussian; gradients flow through it.
    std:        (B, 1, 1) float32, the step's total standard deviation (0 for 'ode').
    token_logp: (B, L) float32, the channel-mean log-density of ``next`` (0 for 'ode').
    """

    next: jax.Array
    mean: jax.Array
    std: jax.Array
    token_logp: jax.Array


def sde_step(
    v: jax.Array,
    x: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    eta: jax.Array | float,
    noise: jax.Array,
    *,
    kind: str = "sde",
    sigma_max: jax.Array | float | None = None,
    next_sample: jax.Array | None = None,
) -> StepOutput:
    """One step from sigma to sigma_next, with the per-token log-probability of the result.

    Args:
      v: (B, L, C) predicted velocity at (x, sigma).
      x: (B, L, C) current sample.
      sigma, sigma_next: scalars or (B,), with sigma_next < sigma.
      eta: the noise level (scalar).
      noise: (B, L, C) standard normal draws; ignored when ``next_sample`` is given.
      kind: 'sde', 'cps' or 'ode'.
      sigma_max: the sigma substituted in 1 / (1 - sigma) where sigma == 1 ('sde' only). Flow-GRPO uses
        sigmas[1], the second point of the schedule; when None, sigma_next is used, which is sigmas[1]
        exactly on the step that starts at sigma == 1.
      next_sample: (B, L, C) a recorded sample to score instead of drawing one (for re-scoring a trajectory
        under new parameters: the log-density is of this fixed point, gradients flow through the mean).

    Returns:
      StepOutput(next, mean, std, token_logp), all float32.
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"sde_step: kind must be one of {STEP_KINDS}, got {kind!r}")
    if v.shape != x.shape or v.ndim != 3:
        raise ValueError(f"sde_step: v and x must both be (B, L, C); got v {v.shape} and x {x.shape}")
    f32 = jnp.float32
    v = v.astype(f32)
    x = x.astype(f32)
    sigma = _per_sample(sigma, x.shape[0], "sigma")
    sigma_next = _per_sample(sigma_next, x.shape[0], "sigma_next")
    eta = jnp.asarray(eta, f32)
    dt = sigma_next - sigma

    if kind == "ode":
        mean = x + dt * v
        std = jnp.zeros_like(sigma)
    elif kind == "sde":
        s_max = sigma_next if sigma_max is None else _per_sample(sigma_max, x.shape[0], "sigma_max")
        sigma_safe = jnp.where(sigma >= 1.0, s_max, sigma)
        std_t = eta * jnp.sqrt(sigma / (1.0 - sigma_safe))
        # sigma == 0 never starts a step; the guard keeps the unused branch finite under jit.
        drift = v + std_t**2 / (2.0 * jnp.maximum(sigma, 1e-12)) * (x + (1.0 - sigma) * v)
        mean = x + dt * drift
        std = std_t * jnp.sqrt(-dt)
    else:  # cps
        std = sigma_next * jnp.sin(eta * math.pi / 2.0)
        x0_hat = x - sigma * v
        x1_hat = x + (1.0 - sigma) * v
        mean = (1.0 - sigma_next) * x0_hat + jnp.sqrt(jnp.maximum(sigma_next**2 - std**2, 0.0)) * x1_hat

    if next_sample is None:
        nxt = mean + std * noise.astype(f32)
    else:
        if next_sample.shape != x.shape:
            raise ValueError(f"sde_step: next_sample must be {x.shape}, got {next_sample.shape}")
        nxt = next_sample.astype(f32)
    token_logp = _token_logp(jax.lax.stop_gradient(nxt), mean, std, kind)
    return StepOutput(nxt, mean, std, token_logp)


def _token_logp(nxt: jax.Array, mean: jax.Array, std: jax.Array, kind: str) -> jax.Array:
    """(B, L) channel-mean log-density of ``nxt`` under the step; 0 where the step has no noise."""
    sq = (nxt - mean) ** 2
    if kind == "ode":
        return jnp.zeros(sq.shape[:2], jnp.float32)
    if kind == "cps":
        return -jnp.mean(sq, axis=-1)
    has_noise = std > 0
    safe_std = jnp.where(has_noise, std, 1.0)
    logp = -sq / (2.0 * safe_std**2) - jnp.log(safe_std) - 0.5 * math.log(2.0 * math.pi)
    return jnp.where(has_noise[..., 0], jnp.mean(logp, axis=-1), 0.0)


def gaussian_kl(
    mean: jax.Array,
    mean_ref: jax.Array,
    std: jax.Array,
    *,
    dt: jax.Array | float | None = None,
    form: str = "exact",
) -> jax.Array:
    """Per-token KL between the policy's and the reference's step Gaussians (same variance).

    Args:
      mean, mean_ref: (B, L, C) step means under the policy and the reference.
      std: (B, 1, 1) the step's total std (``StepOutput.std``).
      dt: scalar or (B,) sigma_next - sigma; needed by form='flow_grpo'.
      form: 'exact': channel mean of (mean - mean_ref)^2 / (2 std^2);
            'flow_grpo': the same without the (-dt) factor of the variance, as Flow-GRPO's code computes it,
            i.e. divided by 2 std_t^2 where std = std_t * sqrt(-dt). For 'cps' steps there is no dt factor:
            use 'exact'.

    Returns:
      (B, L) float32, 0 where the step has no noise.
    """
    if form not in ("exact", "flow_grpo"):
        raise ValueError(f"gaussian_kl: form must be 'exact' or 'flow_grpo', got {form!r}")
    diff = mean.astype(jnp.float32) - mean_ref.astype(jnp.float32)
    var = jnp.asarray(std, jnp.float32) ** 2
    var = jnp.reshape(var, var.shape + (1,) * (3 - var.ndim)) if var.ndim < 3 else var
    if form == "flow_grpo":
        if dt is None:
            raise ValueError("gaussian_kl: form='flow_grpo' needs dt")
        var = var / -_per_sample(dt, diff.shape[0], "dt")
    has_noise = var > 0
    kl = jnp.where(has_noise, diff**2 / (2.0 * jnp.where(has_noise, var, 1.0)), 0.0)
    return jnp.mean(kl, axis=-1)


def _per_sample(value: jax.Array | float, batch: int, name: str) -> jax.Array:
    """A scalar or (B,) value as (B, 1, 1) float32, so it broadcasts over tokens and channels."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        return jnp.broadcast_to(value, (batch, 1, 1))
    if value.shape == (batch,):
        return value[:, None, None]
    if value.shape == (batch, 1, 1):
        return value
    raise ValueError(f"{name} must be a scalar or ({batch},), got shape {value.shape}")
