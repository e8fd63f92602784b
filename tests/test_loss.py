"""The clipped objective (SPEC section 8): on-policy ratio, spatial = scalar gradient, region = scalar."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfgrpo.rl.advantages import token_advantages
from sfgrpo.rl.loss import clipped_surrogate, entry_count, policy_loss
from sfgrpo.rl.regions import token_weights

B, L = 4, 12
CLIP = (0.2, 0.28)


def _logp(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, L)) * 3.0 - 100.0


def _weights():
    boxes = jnp.array(
        [
            [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]],
            [[0.1, 0.2, 0.9, 0.6], [0.0, 0.0, 1.0, 1.0]],
            [[0.25, 0.0, 0.75, 1.0], [0.0, 0.0, 0.0, 0.0]],
            [[0.0, 0.0, 1.0, 0.34], [0.3, 0.3, 0.7, 0.7]],
        ]
    )
    valid = jnp.array([[True, True], [True, True], [True, False], [True, True]])
    return token_weights(boxes, valid, (3, 4))


@pytest.mark.parametrize("mode", ["spatial", "region", "scalar"])
def test_on_policy_ratio_is_one(mode):
    logp = _logp()
    weights = _weights()
    adv = {"spatial": jnp.ones((B, L)), "region": jnp.ones((B, 3)), "scalar": jnp.ones((B,))}[mode]
    loss, metrics = policy_loss(logp, logp, adv, mode=mode, clip_range=CLIP, weights=weights)
    assert float(metrics["clipfrac"]) == 0.0
    assert float(metrics["approx_kl"]) == 0.0
    # With ratio exactly 1 the surrogate is -A, so the loss is minus the mean advantage.
    np.testing.assert_allclose(loss, -1.0, rtol=1e-6)


def test_spatial_and_scalar_gradients_coincide_with_uniform_region_advantage():
    logp = _logp(1)
    weights = _weights()
    per_image = jnp.array([1.5, -0.7, 0.0, 2.2])
    region_adv = jnp.broadcast_to(per_image[:, None], (B, 3))
    token_adv = token_advantages(region_adv, weights)

    def spatial(lp):
        return policy_loss(lp, logp, token_adv, mode="spatial", clip_range=CLIP)[0]

    def scalar(lp):
        return policy_loss(lp, logp, per_image, mode="scalar", clip_range=CLIP)[0]

    g_spatial = jax.grad(spatial)(logp)
    g_scalar = jax.grad(scalar)(logp)
    np.testing.assert_allclose(g_spatial, g_scalar, atol=1e-6)
    np.testing.assert_allclose(spatial(logp), scalar(logp), atol=1e-6)
    assert float(jnp.abs(g_spatial).max()) > 0


def test_region_reduces_to_scalar_with_one_full_region():
    logp_old = _logp(2)
    logp = logp_old + 0.05 * jax.random.normal(jax.random.key(3), (B, L))
    boxes = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0, 1.0]), (B, 1, 4))
    weights = token_weights(boxes, jnp.ones((B, 1), bool), (3, 4))
    np.testing.assert_allclose(weights[:, 1], 0.0, atol=1e-7)  # no background left
    adv = jnp.array([1.0, -2.0, 0.3, 0.8])
    region_adv = jnp.stack([adv, jnp.zeros(B)], axis=1)

    def region(lp):
        return policy_loss(lp, logp_old, region_adv, mode="region", clip_range=CLIP, weights=weights)[0]

    def scalar(lp):
        return policy_loss(lp, logp_old, adv, mode="scalar", clip_range=CLIP)[0]

    np.testing.assert_allclose(region(logp), scalar(logp), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(region)(logp), jax.grad(scalar)(logp), atol=1e-6)


def test_clipping_off_policy():
    logp_old = jnp.zeros((1, 4))
    logp = jnp.log(jnp.array([[0.5, 0.9, 1.1, 2.0]]))
    adv = jnp.array([[1.0, 1.0, -1.0, 1.0]])
    loss, metrics = policy_loss(logp, logp_old, adv, mode="spatial", clip_range=(0.2, 0.2))
    s = np.asarray(clipped_surrogate(jnp.exp(logp), adv, (0.2, 0.2)))
    np.testing.assert_allclose(s, [[-0.5, -0.9, 1.1, -1.2]], rtol=1e-6)
    np.testing.assert_allclose(loss, s.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["clipfrac"], 0.5)
    # The clipped entry (ratio 2, A > 0) has no gradient; the unclipped ones do.
    grad = jax.grad(lambda lp: policy_loss(lp, logp_old, adv, mode="spatial", clip_range=(0.2, 0.2))[0])(logp)
    assert grad[0, 3] == 0.0 and np.all(np.asarray(grad[0, :3]) != 0)


def test_mask_removes_samples_and_tokens():
    logp_old = _logp(4)
    logp = logp_old + 0.1
    adv = jax.random.normal(jax.random.key(5), (B, L))
    mask = jnp.array([True, False, True, True])
    masked, _ = policy_loss(logp, logp_old, adv, mode="spatial", clip_range=CLIP, mask=mask)
    kept, _ = policy_loss(logp[mask], logp_old[mask], adv[mask], mode="spatial", clip_range=CLIP)
    np.testing.assert_allclose(masked, kept, rtol=1e-6)
    scalar_adv = adv[:, 0]
    masked, _ = policy_loss(logp, logp_old, scalar_adv, mode="scalar", clip_range=CLIP, mask=mask)
    kept, _ = policy_loss(logp[mask], logp_old[mask], scalar_adv[mask], mode="scalar", clip_range=CLIP)
    np.testing.assert_allclose(masked, kept, rtol=1e-6)


def test_region_split_metrics_present():
    logp_old = _logp(6)
    logp = logp_old + 0.3 * jax.random.normal(jax.random.key(7), (B, L))
    _, metrics = policy_loss(
        logp, logp_old, jnp.ones((B, L)), mode="spatial", clip_range=(0.01, 0.01), weights=_weights()
    )
    for key in ("token_clipfrac/edit", "token_clipfrac/background", "approx_kl/edit", "approx_kl/background"):
        assert key in metrics and np.isfinite(metrics[key])
    assert float(metrics["token_clipfrac/edit"]) > 0


def test_bad_arguments():
    logp = _logp()
    with pytest.raises(ValueError, match="mode"):
        policy_loss(logp, logp, jnp.ones((B, L)), mode="token", clip_range=CLIP)
    with pytest.raises(ValueError, match=r"adv \('spatial'\)"):
        policy_loss(logp, logp, jnp.ones((B,)), mode="spatial", clip_range=CLIP)
    with pytest.raises(ValueError, match="needs the token weights"):
        policy_loss(logp, logp, jnp.ones((B, 3)), mode="region", clip_range=CLIP)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logp, logp, jnp.ones((B, L)), mode="spatial", clip_range=CLIP, mask=jnp.ones(3))
    with pytest.raises(ValueError, match="clip_range"):
        policy_loss(logp, logp, jnp.ones((B, L)), mode="spatial", clip_range=(0.1,))


def _mode_inputs(mode, seed):
    """Random logp (B, L), logp_old, advantages and a loss mask of the mode's shapes."""
    k = jax.random.split(jax.random.key(seed), 3)
    logp_old = _logp(seed)
    logp = logp_old + 0.1 * jax.random.normal(k[0], (B, L))
    shape = {"spatial": (B, L), "region": (B, 3), "scalar": (B,)}[mode]
    adv = jax.random.normal(k[1], shape)
    mask = jax.random.uniform(k[2], shape, minval=0.2, maxval=1.0) if mode == "spatial" else jnp.ones(shape)
    return logp, logp_old, adv, mask


@pytest.mark.parametrize("poison", ["nan", "huge_log_ratio"])
@pytest.mark.parametrize("mode", ["spatial", "region", "scalar"])
def test_poisoned_masked_sample_leaves_loss_and_gradient_to_the_valid_samples(mode, poison):
    """SPEC section 8: excluded by selection, so 0 * NaN and 0 * exp(1e4) never reach loss or gradient."""
    logp, logp_old, adv, mask = _mode_inputs(mode, 11)
    weights = _weights()
    bad = 1
    mask = mask.at[bad].set(0.0)
    if poison == "nan":
        logp_old = logp_old.at[bad].set(jnp.nan)
        adv = adv.at[bad].set(jnp.nan)
    else:
        logp = logp.at[bad].add(1e4)
    kw = dict(mode=mode, clip_range=CLIP)

    def full(lp):
        return policy_loss(lp, logp_old, adv, weights=weights, mask=mask, **kw)

    keep = np.array([i != bad for i in range(B)])

    def alone(lp):
        return policy_loss(lp, logp_old[keep], adv[keep], weights=weights[keep], mask=mask[keep], **kw)[0]

    (loss, metrics), grad = jax.value_and_grad(full, has_aux=True)(logp)
    loss_alone, grad_alone = jax.value_and_grad(alone)(logp[keep])
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
    np.testing.assert_allclose(loss, loss_alone, rtol=1e-6)
    np.testing.assert_allclose(grad[keep], grad_alone, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(grad[bad], 0.0)
    assert float(jnp.abs(grad_alone).max()) > 0


@pytest.mark.parametrize("mode", ["spatial", "region", "scalar"])
def test_count_makes_partial_losses_add_up_to_the_full_batch_loss(mode):
    """SPEC section 8: split into parts, each divided by the whole batch's count, the losses and their
    gradients sum to the full-batch ones, with failed samples anywhere."""
    logp, logp_old, adv, mask = _mode_inputs(mode, 12)
    weights = _weights()
    mask = mask.at[0].set(0.0)  # part [0, 1] keeps one valid sample, part [2, 3] two
    kw = dict(mode=mode, clip_range=CLIP)
    count = entry_count(mask, mode, L)

    def full(lp):
        return policy_loss(lp, logp_old, adv, weights=weights, mask=mask, **kw)[0]

    def parts(lp):
        return sum(
            policy_loss(lp[s], logp_old[s], adv[s], weights=weights[s], mask=mask[s], count=count, **kw)[0]
            for s in (slice(0, 2), slice(2, 4))
        )

    np.testing.assert_allclose(parts(logp), full(logp), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(parts)(logp), jax.grad(full)(logp), rtol=1e-6, atol=1e-9)
    # Each part normalised by its own count would weigh its lone sample as much as the other two.
    own = (
        sum(
            policy_loss(logp[s], logp_old[s], adv[s], weights=weights[s], mask=mask[s], **kw)[0]
            for s in (slice(0, 2), slice(2, 4))
        )
        / 2
    )
    assert not np.isclose(float(own), float(full(logp)), rtol=1e-4)
