"""The jitted rollout scan: window recording, Euler outside the window, random windows, CFG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfgrpo.sampling.rollout import draw_window_start, guided, rollout, window_size
from sfgrpo.sampling.schedule import flux2_sigmas
from sfgrpo.sampling.sde import sde_step

B, L, C, N = 2, 6, 4, 6


def _velocity(x, sigma):
    # A smooth, x-dependent field so that the steps differ.
    return jnp.tanh(x) * (1.0 + sigma[:, None, None]) - 0.3


def _noise():
    return jax.random.normal(jax.random.key(0), (B, L, C))


def test_ode_rollout_is_the_euler_loop():
    sigmas = flux2_sigmas(N, 64)
    traj = rollout(
        _velocity,
        _noise(),
        sigmas,
        jax.random.key(1),
        eta=0.0,
        kind="ode",
        window_start=jnp.int32(0),
        window=1,
    )
    x = np.asarray(_noise(), np.float64)
    for t in range(N):
        v = np.asarray(_velocity(jnp.asarray(x, jnp.float32), jnp.full((B,), sigmas[t])), np.float64)
        x = x + (sigmas[t + 1] - sigmas[t]) * v
    np.testing.assert_allclose(traj.final, x, atol=1e-5)


def test_window_records_sde_steps_with_their_log_probs():
    sigmas = flux2_sigmas(N, 64)
    key = jax.random.key(2)
    traj = rollout(_velocity, _noise(), sigmas, key, eta=0.9, kind="sde", window_start=jnp.int32(2), window=3)
    assert traj.x.shape == (3, B, L, C) and traj.logp.shape == (3, B, L)
    np.testing.assert_allclose(traj.sigma, sigmas[2:5])
    np.testing.assert_allclose(traj.sigma_next, sigmas[3:6])
    # Consecutive recorded steps chain, and each log-prob re-scores exactly under the same policy.
    np.testing.assert_array_equal(traj.x[1], traj.x_next[0])
    for w in range(3):
        v = _velocity(traj.x[w], jnp.full((B,), traj.sigma[w]))
        again = sde_step(
            v,
            traj.x[w],
            traj.sigma[w],
            traj.sigma_next[w],
            0.9,
            traj.x_next[w],
            sigma_max=sigmas[1],
            next_sample=traj.x_next[w],
        )
        np.testing.assert_allclose(again.token_logp, traj.logp[w], rtol=1e-5, atol=1e-4)
        assert np.all(np.asarray(traj.logp[w]) != 0)
    # Steps before the window are Euler: re-running them deterministically reproduces x at the window.
    x = _noise()
    for t in range(2):
        x = x + (sigmas[t + 1] - sigmas[t]) * _velocity(x, jnp.full((B,), sigmas[t]))
    np.testing.assert_allclose(traj.x[0], x, atol=1e-5)


def test_all_but_last_window_starts_at_sigma_one_and_is_finite():
    sigmas = flux2_sigmas(N, 64)
    w = window_size(N, "all_but_last", 0)
    traj = rollout(
        _velocity,
        _noise(),
        sigmas,
        jax.random.key(3),
        eta=1.0,
        kind="sde",
        window_start=draw_window_start(jax.random.key(0), "all_but_last", 0, 0, N, w),
        window=w,
    )
    assert w == N - 1 and float(traj.sigma[0]) == 1.0
    assert np.all(np.isfinite(np.asarray(traj.logp)))


def test_random_window_is_traced_once():
    sigmas = flux2_sigmas(N, 64)
    run = jax.jit(
        lambda key, start: rollout(
            _velocity, _noise(), sigmas, key, eta=0.7, kind="cps", window_start=start, window=2
        )
    )
    starts = [draw_window_start(jax.random.key(k), "random", 1, 4, N, 2) for k in range(12)]
    assert {int(s) for s in starts} <= {1, 2, 3} and len({int(s) for s in starts}) > 1
    for s in starts[:3]:
        traj = run(jax.random.key(5), s)
        np.testing.assert_allclose(traj.sigma, sigmas[int(s) : int(s) + 2])
    assert run._cache_size() == 1


def test_window_errors():
    with pytest.raises(ValueError, match="at least 2"):
        window_size(1, "all_but_last", 0)
    with pytest.raises(ValueError, match="lie in"):
        window_size(4, "random", 5)
    with pytest.raises(ValueError, match="one of"):
        window_size(4, "middle", 2)
    with pytest.raises(ValueError, match="random sde window"):
        draw_window_start(jax.random.key(0), "random", 3, 5, 6, 3)


def test_true_cfg():
    def uncond(x, s):
        return jnp.zeros_like(x) + 1.0

    assert guided(_velocity, uncond, 1.0) is _velocity
    v = guided(_velocity, uncond, 4.0)(_noise(), jnp.full((B,), 0.5))
    expected = 1.0 + 4.0 * (_velocity(_noise(), jnp.full((B,), 0.5)) - 1.0)
    np.testing.assert_allclose(v, expected, atol=1e-5)


def test_step_noise_is_drawn_with_the_batch_sharding(monkeypatch):
    """On a data x fsdp mesh with the batch sharded, every step's noise has the batch's sharding (not
    replicated on all 8 devices), and the trajectory equals the unsharded one."""
    from sfgrpo import runtime  # noqa: PLC0415
    from sfgrpo.sampling import rollout as rollout_module  # noqa: PLC0415

    batch = 8
    x0 = jax.random.normal(jax.random.key(0), (batch, L, C))
    sigmas = flux2_sigmas(N, 64)

    def run(x):
        return rollout(
            _velocity, x, sigmas, jax.random.key(3), eta=0.9, kind="sde", window_start=jnp.int32(1), window=3
        )

    want = jax.jit(run)(x0)
    seen = []

    def recording_step(v, x, s, s_next, eta, noise, **kw):
        seen.append(jax.typeof(noise).sharding.spec)
        return sde_step(v, x, s, s_next, eta, noise, **kw)

    monkeypatch.setattr(rollout_module, "sde_step", recording_step)
    mesh = runtime.make_mesh(2, 4, 1)
    with runtime.use_mesh(mesh):
        sharded = jax.device_put(x0, runtime.batch_sharding(mesh, 3))
        got = jax.jit(run)(sharded)
    assert seen and all(spec[0] == ("data", "fsdp") for spec in seen), seen
    assert got.final.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(got.final), np.asarray(want.final), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.logp), np.asarray(want.logp), atol=1e-5)
