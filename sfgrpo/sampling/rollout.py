"""The rollout: one ``lax.scan`` over the N sampler steps that records the SDE-window steps (SPEC section 4).

Steps inside the window carry noise ('sde' or 'cps') and are recorded for training; the others are Euler
(ODE) steps, computed as the same step with eta = 0 so that one compiled body serves every step. The window
is given by its start, a traced integer, and its length, a static one, so a random window per rollout batch
(Flow-GRPO-Fast) costs no recompilation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sfgrpo.sampling.sde import sde_step

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
"""(x (B, L, C) float32, sigma (B,) float32) -> v (B, L, C): the policy, its conditioning closed over."""

WINDOW_MODES = ("all_but_last", "random")


class Trajectory(NamedTuple):
    """What training needs from a rollout, for the W window steps.

    x:          (W, B, L, C) float32 states at the start of each window step.
    x_next:     (W, B, L, C) float32 sampled states at its end.
    logp:       (W, B, L) float32 token log-probs of x_next under the rollout policy.
    sigma:      (W,) float32 flow time at the start of each window step.
    sigma_next: (W,) float32 flow time at its end.
    final:      (B, L, C) float32 the sample at sigma = 0.
    """

    x: jax.Array
    x_next: jax.Array
    logp: jax.Array
    sigma: jax.Array
    sigma_next: jax.Array
    final: jax.Array


def window_size(num_steps: int, mode: str, size: int) -> int:
    """The static number of trained steps W: N - 1 for 'all_but_last', ``size`` for 'random'."""
    if mode not in WINDOW_MODES:
        raise ValueError(f"sde window mode must be one of {WINDOW_MODES}, got {mode!r}")
    if mode == "all_but_last":
        if num_steps < 2:
            raise ValueError(f"window 'all_but_last' needs at least 2 sampler steps, got {num_steps}")
        return num_steps - 1
    if not 1 <= size <= num_steps:
        raise ValueError(f"sde window size {size} must lie in [1, num_steps={num_steps}]")
    return size


def _sharding_of(x: jax.Array) -> jax.sharding.PartitionSpec | None:
    """x's spec on the current (explicit) mesh, None without one: the step noise is drawn where each batch
    shard lives instead of whole on every device (jax's partitionable threefry gives the same numbers)."""
    if jax.sharding.get_abstract_mesh().empty:
        return None
    return jax.typeof(x).sharding.spec


def draw_window_start(key: jax.Array, mode: str, lo: int, hi: int, num_steps: int, size: int) -> jax.Array:
    """() int32 first window step: 0 for 'all_but_last', uniform in [lo, hi) for 'random'."""
    if mode == "all_but_last":
        return jnp.zeros((), jnp.int32)
    # The last step lands on sigma' = 0: a window there would leave noise in the judged image (sde) or
    # count a step of log-prob 0 (cps), so the window must end before it.
    if not 0 <= lo < hi or hi - 1 + size > num_steps - 1:
        raise ValueError(
            f"random sde window: need 0 <= lo < hi and hi - 1 + size <= num_steps - 1 (the last step is "
            f"never in the window); got lo={lo}, hi={hi}, size={size}, num_steps={num_steps}"
        )
    return jax.random.randint(key, (), lo, hi, dtype=jnp.int32)


def rollout(
    velocity_fn: VelocityFn,
    x_init: jax.Array,
    sigmas: np.ndarray,
    key: jax.Array,
    *,
    eta: float,
    kind: str,
    window_start: jax.Array,
    window: int,
) -> Trajectory:
    """Samples from sigma = 1 to 0 and records the window steps.

    Args:
      velocity_fn: the policy, see ``VelocityFn``.
      x_init: (B, L, C) initial noise.
      sigmas: (N + 1,) schedule from 1 to 0 (host constant).
      key: PRNG key for the step noise.
      eta: noise level of the window steps.
      kind: 'sde' or 'cps' for the window steps; 'ode' samples deterministically (evaluation).
      window_start: () int32 first trained step.
      window: W, the number of trained steps (static).

    Returns:
      The Trajectory.
    """
    num_steps = len(sigmas) - 1
    if not 1 <= window <= num_steps:
        raise ValueError(f"rollout: window {window} must lie in [1, {num_steps}]")
    batch = x_init.shape[0]
    sig = jnp.asarray(sigmas, jnp.float32)
    step_kind = "sde" if kind == "ode" else kind
    keys = jax.random.split(key, num_steps)

    def body(x: jax.Array, t: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
        in_window = (t >= window_start) & (t < window_start + window) & (kind != "ode")
        s, s_next = sig[t], sig[t + 1]
        v = velocity_fn(x, jnp.full((batch,), s))
        noise = jax.random.normal(keys[t], x.shape, jnp.float32, out_sharding=_sharding_of(x))
        out = sde_step(
            v, x, s, s_next, jnp.where(in_window, eta, 0.0), noise, kind=step_kind, sigma_max=sig[1]
        )
        return out.next, (x, out.next, out.token_logp)

    final, (xs, nexts, logps) = jax.lax.scan(body, x_init.astype(jnp.float32), jnp.arange(num_steps))

    def take(a: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(a, window_start, window, axis=0)

    return Trajectory(
        x=take(xs),
        x_next=take(nexts),
        logp=take(logps),
        sigma=take(sig[:-1]),
        sigma_next=take(sig[1:]),
        final=final,
    )


def guided(cond_fn: VelocityFn, uncond_fn: VelocityFn, scale: float) -> VelocityFn:
    """True classifier-free guidance: v = v_u + scale (v_c - v_u). scale = 1 is the conditional policy."""
    if scale == 1.0:
        return cond_fn

    def velocity(x: jax.Array, sigma: jax.Array) -> jax.Array:
        v_c = cond_fn(x, sigma)
        v_u = uncond_fn(x, sigma)
        return v_u + scale * (v_c - v_u)

    return velocity
