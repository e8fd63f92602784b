"""Sampling schedules (SPEC section 3): linear sigma grids with a resolution-dependent time shift.

- FLUX.2 (``flux2_sigmas``) matches diffusers' ``Flux2KleinPipeline`` with
  ``FlowMatchEulerDiscreteScheduler`` (dynamic, exponential shifting): sigmas = linspace(1, 1/N, N),
  shifted by mu = ``compute_empirical_mu(L, N)``, then a final 0.
- OmniGen2 (``omnigen2_sigmas``) matches its own ``FlowMatchEulerDiscreteScheduler`` with
  ``dynamic_time_shift``: OmniGen2 times t = k/N (0 = noise) shifted to t / (m - m t + t) with
  m = sqrt(latent pixels) / 40, then a final 1; here as sigma = 1 - t, so every sampler runs one convention.

Sigmas depend only on static integers (steps, token count), so they are computed once on the host and enter
jitted code as constants.
"""

from __future__ import annotations

import numpy as np

# The empirical rule for mu: two lines in image_seq_len, fitted at 10 and at 200 steps, interpolated in N.
_MU_A10, _MU_B10 = 8.73809524e-05, 1.89833333
_MU_A200, _MU_B200 = 0.00016927, 0.45666666
_MU_LONG_SEQUENCE = 4300


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The time-shift parameter mu for ``image_seq_len`` target tokens and ``num_steps`` sampler steps."""
    _check_positive_int("image_seq_len", image_seq_len)
    _check_positive_int("num_steps", num_steps)
    mu_200 = _MU_A200 * image_seq_len + _MU_B200
    if image_seq_len > _MU_LONG_SEQUENCE:
        return float(mu_200)
    mu_10 = _MU_A10 * image_seq_len + _MU_B10
    slope = (mu_200 - mu_10) / 190.0
    return float(slope * num_steps + (mu_200 - 200.0 * slope))


def time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """Exponential time shift: sigma -> e^mu / (e^mu + (1/sigma - 1)). Sigmas must be in (0, 1]."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if np.any(sigmas <= 0) or np.any(sigmas > 1):
        raise ValueError(f"time_shift: sigmas must lie in (0, 1], got range [{sigmas.min()}, {sigmas.max()}]")
    e_mu = np.exp(mu)
    return e_mu / (e_mu + (1.0 / sigmas - 1.0))


SCHEDULES = ("flux2", "linear", "omnigen2")


def flux2_sigmas(num_steps: int, image_seq_len: int, schedule: str = "flux2") -> np.ndarray:
    """The shifted FLUX.2 schedule, or the unshifted linear one.

    Args:
      num_steps: N, the number of sampler steps.
      image_seq_len: the number of target image tokens L = (H/16)·(W/16).
      schedule: 'flux2' (the time shift FLUX.2's pipeline uses) or 'linear' (no shift: sigmas
        linspace(1, 1/N, N)). FLUX.2's rule is fitted to its own models; at 8 steps it spends 6 steps above
        sigma 0.8 and ends with one step from about 0.49 to 0, which suits a model distilled for it and
        leaves a small model's final image as one coarse denoising (speckle).

    Returns:
      (N + 1,) float32 sigmas, from 1.0 down to a final 0.0; step t goes from sigmas[t] to sigmas[t + 1].
    """
    _check_positive_int("num_steps", num_steps)
    _check_positive_int("image_seq_len", image_seq_len)
    if schedule not in ("flux2", "linear"):
        raise ValueError(f"schedule must be 'flux2' or 'linear', got {schedule!r}")
    base = np.linspace(1.0, 1.0 / num_steps, num_steps)
    if schedule == "flux2":
        base = time_shift(empirical_mu(image_seq_len, num_steps), base)
    return np.append(base, 0.0).astype(np.float32)


def schedule_sigmas(num_steps: int, image_seq_len: int, schedule: str) -> np.ndarray:
    """(N + 1,) float32 sigmas of ``schedule`` for ``image_seq_len`` 16-px target tokens: 'flux2' and
    'linear' (``flux2_sigmas``) or 'omnigen2' (``omnigen2_sigmas``; 4 latent pixels per token)."""
    if schedule == "omnigen2":
        _check_positive_int("image_seq_len", image_seq_len)
        return omnigen2_sigmas(num_steps, 4 * image_seq_len)
    return flux2_sigmas(num_steps, image_seq_len, schedule)


def omnigen2_sigmas(num_steps: int, latent_pixels: int, shift: bool = True) -> np.ndarray:
    """OmniGen2's schedule in sigma = 1 - t.

    Args:
      num_steps: N, the number of sampler steps.
      latent_pixels: the VAE latent's h * w (4 per 16-px token; 128 * 128 at 1024 px, where m = 3.2).
      shift: the scheduler's ``dynamic_time_shift`` (True in the released model's scheduler config).

    Returns:
      (N + 1,) float32 sigmas from 1.0 down to a final 0.0. The times are computed in float32 as upstream
      does (``np.linspace(..., dtype=np.float32)``), then 1 - t.
    """
    _check_positive_int("num_steps", num_steps)
    _check_positive_int("latent_pixels", latent_pixels)
    t = np.linspace(0, 1, num_steps + 1, dtype=np.float32)[:-1]
    if shift:
        m = np.sqrt(latent_pixels) / 40
        t = t / (m - m * t + t)
    t = np.append(t.astype(np.float32), np.float32(1.0))
    return (np.float32(1.0) - t).astype(np.float32)


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
