"""The sampler step (SPEC section 4): formulas, log-density, sigma = 1, 'ode', jit and vmap."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfgrpo.sampling.schedule import flux2_sigmas
from sfgrpo.sampling.sde import gaussian_kl, sde_step

B, L, C = 3, 5, 8


def _inputs(seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    v = jax.random.normal(k1, (B, L, C), dtype)
    x = jax.random.normal(k2, (B, L, C), dtype)
    noise = jax.random.normal(k3, (B, L, C), dtype)
    return v, x, noise


def _np_gauss_logpdf(y, mu, sd):
    return -((y - mu) ** 2) / (2 * sd**2) - np.log(sd) - 0.5 * np.log(2 * np.pi)


def test_sde_mean_std_formula():
    v, x, noise = _inputs()
    sigma, sigma_next, eta = 0.7, 0.55, 0.8
    out = sde_step(v, x, sigma, sigma_next, eta, noise, kind="sde")
    vn, xn = np.asarray(v, np.float64), np.asarray(x, np.float64)
    dt = sigma_next - sigma
    std_t = eta * math.sqrt(sigma / (1 - sigma))
    mean = xn + dt * (vn + std_t**2 / (2 * sigma) * (xn + (1 - sigma) * vn))
    np.testing.assert_allclose(out.mean, mean, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.std).ravel(), std_t * math.sqrt(-dt), rtol=1e-6)
    np.testing.assert_allclose(out.next, out.mean + out.std * noise, atol=1e-6)


def test_sde_token_logp_is_gaussian_density():
    v, x, noise = _inputs(1)
    out = sde_step(v, x, 0.4, 0.3, 1.0, noise, kind="sde")
    sd = float(np.asarray(out.std).ravel()[0])
    dens = _np_gauss_logpdf(np.asarray(out.next, np.float64), np.asarray(out.mean, np.float64), sd)
    assert out.token_logp.shape == (B, L) and out.token_logp.dtype == jnp.float32
    np.testing.assert_allclose(out.token_logp, dens.mean(-1), rtol=1e-5, atol=1e-5)


def test_per_sample_sigmas():
    v, x, noise = _inputs(2)
    sig = jnp.array([0.9, 0.5, 0.2])
    nxt = jnp.array([0.8, 0.4, 0.0])
    out = sde_step(v, x, sig, nxt, 0.7, noise)
    for i in range(B):
        one = sde_step(v[i : i + 1], x[i : i + 1], sig[i], nxt[i], 0.7, noise[i : i + 1])
        np.testing.assert_allclose(out.mean[i], one.mean[0], atol=1e-6)
        np.testing.assert_allclose(out.token_logp[i], one.token_logp[0], atol=1e-5)


def test_finite_at_sigma_one():
    sigmas = flux2_sigmas(8, 64)
    v, x, noise = _inputs(3)
    out = sde_step(v, x, sigmas[0], sigmas[1], 1.0, noise, kind="sde", sigma_max=sigmas[1])
    for field in out:
        assert np.all(np.isfinite(field))
    # The default sigma_max on the first step is sigma_next == sigmas[1]: the same step.
    default = sde_step(v, x, sigmas[0], sigmas[1], 1.0, noise, kind="sde")
    np.testing.assert_array_equal(default.next, out.next)
    std_t = 1.0 * math.sqrt(1.0 / (1.0 - sigmas[1]))
    expected_std = std_t * math.sqrt(sigmas[0] - sigmas[1])
    np.testing.assert_allclose(np.asarray(out.std).ravel(), expected_std, rtol=1e-5)


def test_ode_is_euler_with_no_logp():
    v, x, noise = _inputs(4)
    out = sde_step(v, x, 0.6, 0.45, 0.9, noise, kind="ode")
    np.testing.assert_allclose(out.next, x + (0.45 - 0.6) * v, atol=1e-6)
    np.testing.assert_array_equal(out.token_logp, np.zeros((B, L)))
    assert np.all(np.asarray(out.std) == 0)
    # eta = 0 under 'sde' is the same Euler step, and its log-prob stays finite (masked to 0).
    zero_eta = sde_step(v, x, 0.6, 0.45, 0.0, noise, kind="sde")
    np.testing.assert_allclose(zero_eta.next, out.next, atol=1e-6)
    assert np.all(np.isfinite(zero_eta.token_logp))


def test_cps_formula():
    v, x, noise = _inputs(5)
    sigma, sigma_next, eta = 0.8, 0.6, 0.5
    out = sde_step(v, x, sigma, sigma_next, eta, noise, kind="cps")
    vn, xn = np.asarray(v, np.float64), np.asarray(x, np.float64)
    std = sigma_next * math.sin(eta * math.pi / 2)
    mean = (1 - sigma_next) * (xn - sigma * vn) + math.sqrt(sigma_next**2 - std**2) * (xn + (1 - sigma) * vn)
    np.testing.assert_allclose(out.mean, mean, atol=1e-5)
    np.testing.assert_allclose(out.next, out.mean + std * np.asarray(noise), atol=1e-5)
    expected = -((np.asarray(out.next, np.float64) - np.asarray(out.mean, np.float64)) ** 2).mean(-1)
    np.testing.assert_allclose(out.token_logp, expected, atol=1e-5)


def test_bfloat16_inputs_compute_in_float32():
    v, x, noise = _inputs(6, jnp.bfloat16)
    out = sde_step(v, x, 0.5, 0.4, 0.8, noise)
    ref = sde_step(v.astype(jnp.float32), x.astype(jnp.float32), 0.5, 0.4, 0.8, noise.astype(jnp.float32))
    for got, want in zip(out, ref, strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)


def test_jit_and_vmap():
    v, x, noise = _inputs(7)
    eager = sde_step(v, x, 0.5, 0.4, 0.8, noise)
    jitted = jax.jit(lambda *a: sde_step(*a, kind="sde"))(v, x, 0.5, 0.4, 0.8, noise)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)

    # vmap over a leading axis of trajectories, each a (B, L, C) batch with its own sigmas.
    vs, xs, ns = (jnp.stack([a, a * 0.5]) for a in (v, x, noise))
    sig, nxt = jnp.array([0.5, 0.9]), jnp.array([0.4, 0.7])
    batched = jax.vmap(lambda a, b, s, t, n: sde_step(a, b, s, t, 0.8, n))(vs, xs, sig, nxt, ns)
    for k in range(2):
        single = sde_step(vs[k], xs[k], sig[k], nxt[k], 0.8, ns[k])
        np.testing.assert_allclose(batched.token_logp[k], single.token_logp, atol=1e-5)


def test_rescoring_fixed_sample_gradient_flows_through_mean_only():
    v, x, noise = _inputs(8)
    first = sde_step(v, x, 0.5, 0.4, 0.8, noise)

    def logp_sum(v_):
        return sde_step(v_, x, 0.5, 0.4, 0.8, noise, next_sample=first.next).token_logp.sum()

    np.testing.assert_allclose(logp_sum(v), first.token_logp.sum(), rtol=1e-6)
    grad = jax.grad(logp_sum)(v)
    # d/dv of sum log N(y; mu(v), s^2) = sum (y - mu)/s^2 * dmu/dv, with y constant.
    out = first
    s2 = np.asarray(out.std) ** 2
    dmu_dv = (0.4 - 0.5) * (1 + float(np.asarray(out.std).ravel()[0] ** 2 / (0.1)) / (2 * 0.5) * (1 - 0.5))
    expected = (np.asarray(out.next) - np.asarray(out.mean)) / s2 * dmu_dv / C
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


def test_gaussian_kl_forms():
    v, x, noise = _inputs(9)
    pol = sde_step(v, x, 0.5, 0.4, 0.8, noise)
    ref = sde_step(v * 0.9, x, 0.5, 0.4, 0.8, noise)
    exact = gaussian_kl(pol.mean, ref.mean, pol.std)
    diff2 = (np.asarray(pol.mean, np.float64) - np.asarray(ref.mean, np.float64)) ** 2
    var = float(np.asarray(pol.std).ravel()[0]) ** 2
    np.testing.assert_allclose(exact, (diff2 / (2 * var)).mean(-1), rtol=1e-5)
    flow = gaussian_kl(pol.mean, ref.mean, pol.std, dt=0.4 - 0.5, form="flow_grpo")
    np.testing.assert_allclose(flow, np.asarray(exact) * 0.1, rtol=1e-5)
    np.testing.assert_array_equal(gaussian_kl(pol.mean, pol.mean, pol.std), np.zeros((B, L)))
    with pytest.raises(ValueError, match="dt"):
        gaussian_kl(pol.mean, ref.mean, pol.std, form="flow_grpo")


def test_bad_arguments():
    v, x, noise = _inputs()
    with pytest.raises(ValueError, match="kind"):
        sde_step(v, x, 0.5, 0.4, 0.8, noise, kind="euler")
    with pytest.raises(ValueError, match="v and x"):
        sde_step(v[:, :2], x, 0.5, 0.4, 0.8, noise)
    with pytest.raises(ValueError, match="sigma"):
        sde_step(v, x, jnp.ones(7), 0.4, 0.8, noise)
