"""The programmatic shapes reward: each SFReward field measures what it should."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config

from sfgrpo import builders
from sfgrpo.data.shapes import ShapesConfig, generate
from sfgrpo.rewards import reward_config
from sfgrpo.rewards.base import score_rewards
from sfgrpo.rewards.synthetic import excess_gradient, shapes_scores

# configs/default.py:multi, whose task and tolerances these tests check.
MULTI = load_config("default.py", "multi")


def _example(index=0, r_max=3):
    rec = generate(index, split="train", seed=3, config=ShapesConfig(image_size=64))
    r = len(rec.regions)
    boxes = np.zeros((1, r_max, 4), np.float32)
    masks = np.zeros((1, r_max, 64, 64), bool)
    valid = np.zeros((1, r_max), bool)
    for k, region in enumerate(rec.regions):
        boxes[0, k], masks[0, k], valid[0, k] = region.box, region.mask, True
    assert r >= 1
    return rec.source[None], rec.target[None], masks, boxes, valid


def _scores(edited, example):
    source, target, masks, boxes, valid = example
    return shapes_scores(jnp.asarray(edited), source, target, masks, boxes, valid)


def test_perfect_edit_scores_full_marks():
    ex = _example()
    s = _scores(ex[1].astype(np.float32) / 255.0, ex)
    valid = ex[4][0]
    np.testing.assert_allclose(np.asarray(s.success)[0, valid], 25.0)
    np.testing.assert_allclose(np.asarray(s.preserve)[0, valid], 25.0)
    for field in (s.background, s.naturalness, s.artifacts, s.overall_success, s.overall_preserve):
        np.testing.assert_allclose(field, 25.0, rtol=1e-5)
    rewards = score_rewards(s, jnp.asarray(valid)[None])
    np.testing.assert_allclose(np.asarray(rewards.region)[0, :-1][valid], 1.0, rtol=1e-5)
    np.testing.assert_allclose(rewards.image, 1.0, rtol=1e-5)


def test_unedited_image_fails_success_but_preserves():
    ex = _example(1)
    s = _scores(ex[0].astype(np.float32) / 255.0, ex)
    valid = ex[4][0]
    assert np.all(np.asarray(s.success)[0, valid] < 12.5)
    np.testing.assert_allclose(s.background, 25.0)
    np.testing.assert_allclose(np.asarray(s.preserve)[0, valid], 25.0)


def test_region_credit_is_local():
    # Fix region 0 only: its success rises; the other regions' scores do not move.
    ex = _example(2)
    source, target, masks, _, valid = ex
    if valid[0].sum() < 2:
        ex = _example(5)
        source, target, masks, _, valid = ex
    assert valid[0].sum() >= 2
    edited = source.astype(np.float32) / 255.0
    fixed = edited.copy()
    fixed[0][masks[0, 0]] = target[0][masks[0, 0]] / 255.0
    before, after = _scores(edited, ex), _scores(fixed, ex)
    assert float(after.success[0, 0]) == 25.0 > float(before.success[0, 0])
    np.testing.assert_allclose(after.success[0, 1:], before.success[0, 1:])


def test_background_damage_and_artifacts():
    ex = _example(3)
    source = ex[0].astype(np.float32) / 255.0
    noisy = source + np.random.default_rng(0).normal(0, 0.2, source.shape).astype(np.float32)
    s_clean, s_noisy = _scores(source, ex), _scores(noisy, ex)
    assert float(s_noisy.background[0]) < float(s_clean.background[0])
    assert float(s_noisy.artifacts[0]) < 25.0  # values pushed outside [0, 1]
    assert float(s_noisy.naturalness[0]) < float(s_clean.naturalness[0])


def test_non_finite_image_is_a_failure():
    ex = _example(4)
    edited = ex[1].astype(np.float32) / 255.0
    edited[0, 3, 3, 0] = np.nan
    s = _scores(edited, ex)
    assert not bool(s.valid[0])
    rewards = score_rewards(s, jnp.asarray(ex[4]))
    assert not np.any(np.asarray(rewards.region_valid)) and not bool(rewards.image_valid[0])
    assert np.all(np.isfinite(np.asarray(rewards.region)))


def test_preservation_floor_and_naturalness_band():
    """Residue below the preservation floor, and total variation within the band, score full marks; past
    them the scores fall, so sampler-noise differences between preserved images carry no advantage."""
    ex = _example(3)
    source = ex[0].astype(np.float32) / 255.0
    rng = np.random.default_rng(1)
    slight = np.clip(source + rng.uniform(-0.04, 0.04, source.shape).astype(np.float32), 0.0, 1.0)
    s = _scores(slight, ex)
    assert float(s.background[0]) == 25.0 and float(s.overall_preserve[0]) == 25.0
    strict = shapes_scores(jnp.asarray(slight), *ex, preserve_floor=0.0, tv_tol=0.0)
    assert float(strict.background[0]) < 25.0
    heavy = np.clip(source + rng.uniform(-0.3, 0.3, source.shape).astype(np.float32), 0.0, 1.0)
    s_heavy = _scores(heavy, ex)
    assert float(s_heavy.background[0]) < 25.0 and float(s_heavy.naturalness[0]) < 25.0
    # A quarter more total variation than the target is inside the band; a tripling is not.
    target = ex[1].astype(np.float32) / 255.0
    mean = target.mean(axis=(1, 2), keepdims=True)
    assert float(_scores(mean + 1.2 * (target - mean), ex).naturalness[0]) == 25.0
    assert float(_scores(np.clip(mean + 3.0 * (target - mean), 0, 1), ex).naturalness[0]) < 25.0


def _multi_edit_example(n=4, pool=2):
    """n 128 px four-edit examples, the multi-edit variant's task, with their pool-``pool`` round trips
    (what the trainer judges against): (source, target, masks, boxes, valid)."""
    cfg = builders.shapes_config(MULTI)
    recs = [generate(i, seed=0, config=cfg) for i in range(n)]
    masks = np.stack([[r.mask for r in rec.regions] for rec in recs])
    boxes = np.asarray([[r.box for r in rec.regions] for rec in recs], np.float32)
    source = _round_trip(np.stack([r.source for r in recs]), pool)
    target = _round_trip(np.stack([r.target for r in recs]), pool)
    return source, target, masks, boxes, np.ones(masks.shape[:2], bool)


def _round_trip(images, pool):
    """128 px images through the pool-``pool`` autoencoder (what the trainer judges against)."""
    from sfgrpo.models.tiny import PixelAutoencoder  # noqa: PLC0415

    ae = PixelAutoencoder(pool=pool)
    return np.asarray(ae.decode(ae.encode(jnp.asarray(images)), (8, 8)))


# The multi-edit variant's tolerances; its margin is the autoencoder's pool (4 there; 2 here, where a finer
# reference makes blockiness measurable).
TIGHT = {**dict(reward_config.shapes_reward_options(MULTI.reward)), "shape_margin": 2}


def _mean(field):
    return float(np.mean(np.asarray(field))) / 25.0


def test_tight_tolerances_call_a_damaged_background_damaged():
    """The multi-edit variant's tolerances: a faithful round trip keeps full marks; the demo's speckled
    mosaic and a blocky background do not. The demo's tolerances call both preserved (the old behaviour)."""
    source, target, masks, boxes, valid = _multi_edit_example()
    b = target.shape[0]
    rng = np.random.default_rng(0)
    # The demo's mosaic: colour noise of std 0.06 per 8x8 block (the demo's sampler leaves about 0.044
    # mean error in the background of its 64 px eval images).
    noise = np.repeat(np.repeat(rng.normal(0, 0.06, (b, 16, 16, 3)), 8, 1), 8, 2).astype(np.float32)
    mosaic = target + noise
    blocky = target.reshape(b, 16, 8, 16, 8, 3).mean(axis=(2, 4)).repeat(8, 1).repeat(8, 2)
    args = (source, target, masks, boxes, valid)

    faithful = shapes_scores(jnp.asarray(target), *args, **TIGHT)
    for field in (faithful.success, faithful.preserve, faithful.background, faithful.naturalness):
        assert _mean(field) == 1.0
    invisible = shapes_scores(jnp.asarray(target + rng.normal(0, 0.01, target.shape)), *args, **TIGHT)
    assert _mean(invisible.background) == 1.0  # sampler residue below visibility carries no advantage

    s_mosaic = shapes_scores(jnp.asarray(mosaic), *args, **TIGHT)
    assert _mean(s_mosaic.background) < 0.1 and _mean(s_mosaic.naturalness) < 0.75
    s_blocky = shapes_scores(jnp.asarray(blocky), *args, **TIGHT)
    assert _mean(s_blocky.background) < 0.9 and _mean(s_blocky.naturalness) < 0.9
    # The demo's tolerances: both backgrounds "preserved".
    assert _mean(shapes_scores(jnp.asarray(mosaic), *args).background) == 1.0
    assert _mean(shapes_scores(jnp.asarray(blocky), *args).background) == 1.0


def test_shape_margin_spares_the_pixels_the_autoencoder_mixes():
    """Without a margin a faithful pool-2 edit loses preserve marks where the round trip mixes a shape's
    new colour into its neighbours; a margin of the pool size restores them."""
    source, target, masks, boxes, valid = _multi_edit_example()
    args = (source, target, masks, boxes, valid)
    no_margin = shapes_scores(jnp.asarray(target), *args, **{**TIGHT, "shape_margin": 0})
    assert _mean(no_margin.preserve) < 0.9
    assert _mean(shapes_scores(jnp.asarray(target), *args, **TIGHT).preserve) == 1.0


def test_local_noise_caps_naturalness():
    """The multi-edit variant's noise term, on its pool-4 round trips: a global total variation lets block
    speckle and smeared shapes cancel (the speckled K = 4 edits of docs/credit_study/k4_lr kept naturalness
    0.96); the excess gradient is local, so it does not. Edges of the source or the target are free."""
    source, target, masks, boxes, valid = _multi_edit_example(pool=4)
    b = target.shape[0]
    args = (source, target, masks, boxes, valid)
    rng = np.random.default_rng(0)

    def speckle(std):  # colour noise per pooled pixel (4x4 block), as the sampler leaves it
        return np.repeat(np.repeat(rng.normal(0, std, (b, 32, 32, 3)), 4, 1), 4, 2).astype(np.float32)

    def naturalness(image, **over):
        image = jnp.asarray(np.clip(image, 0.0, 1.0))
        return _mean(shapes_scores(image, *args, **{**TIGHT, "shape_margin": 4, **over}).naturalness)

    np.testing.assert_allclose(excess_gradient(jnp.asarray(target), source, target), 0.0, atol=1e-7)
    np.testing.assert_allclose(excess_gradient(jnp.asarray(source), source, target), 0.0, atol=1e-7)
    assert naturalness(source) == naturalness(source, noise_tol=0.0)  # its edges are the source's
    assert naturalness(target + speckle(0.005)) == 1.0  # invisible speckle is free
    assert naturalness(target + speckle(0.02)) < 0.6  # plainly speckled
    smeared = target.reshape(b, 16, 8, 16, 8, 3).mean(axis=(2, 4)).repeat(8, 1).repeat(8, 2)
    broken = smeared + speckle(0.02)
    assert naturalness(broken, noise_tol=0.0) > 0.7  # the total variation alone: the two cancel
    assert naturalness(broken) < 0.4
    excess = np.asarray(excess_gradient(jnp.asarray(np.clip(broken, 0, 1)), source, target))
    assert excess.shape == (b,) and np.all(excess > TIGHT["noise_tol"] / 2)


def test_untouched_shapes_must_stay_as_they_are():
    """The multi-edit variant's kept-shapes term, on K = 2 examples with a shape left alone and their pool-4
    round trips: recolouring or removing the untouched shape is damage, though it is a few percent of the
    background's pixels; without the term (as before 2026-12-07) both were scored 100% preserved."""
    config = load_config("default.py", "multi_k2")
    options = dict(reward_config.shapes_reward_options(config.reward))
    assert options["kept_saturation"] == 0.25 and options["shape_margin"] == 4
    drawn = (generate(i, seed=0, config=builders.shapes_config(config)) for i in range(64))
    recs = [rec for rec in drawn if len(rec.meta["shapes"]) > len(rec.regions)][:4]  # with a shape left
    masks = np.stack([[r.mask for r in rec.regions] for rec in recs])
    boxes = np.asarray([[r.box for r in rec.regions] for rec in recs], np.float32)
    valid = np.ones(masks.shape[:2], bool)
    sources = np.stack([r.source for r in recs])
    targets = np.stack([r.target for r in recs])
    saturated = sources.max(-1).astype(int) - sources.min(-1) > 64
    kept = saturated & ~masks.any(axis=1)  # the untouched shape of each example
    assert np.all(kept.sum(axis=(1, 2)) > 100)
    args = (_round_trip(sources, 4), _round_trip(targets, 4), masks, boxes, valid)

    def scored(pixels, **over):
        s = shapes_scores(jnp.asarray(_round_trip(pixels, 4)), *args, **{**options, **over})
        return _mean(s.background), _mean(s.overall_preserve)

    assert scored(targets) == (1.0, 1.0)
    shifted = targets.astype(np.int16)
    shifted[kept] += 6  # a slight shift of the kept shape's colour (0.024): still itself
    assert scored(np.clip(shifted, 0, 255).astype(np.uint8)) == (1.0, 1.0)
    recoloured, removed = targets.copy(), targets.copy()
    recoloured[kept] = 255 - recoloured[kept]
    for b in range(len(recs)):
        removed[b][kept[b]] = np.median(sources[b][~saturated[b]], axis=0)
    for damaged in (recoloured, removed):
        background, overall = scored(damaged)
        assert background == 0.0 and overall == 0.0
        assert min(scored(damaged, kept_saturation=0.0)) > 0.9  # the old reward hardly sees it


def test_bad_tolerances_are_refused():
    ex = _example()
    with pytest.raises(ValueError, match="preserve_floor"):
        shapes_scores(jnp.asarray(ex[1] / 255.0), *ex, preserve_floor=0.3, preserve_tol=0.2)
    with pytest.raises(ValueError, match="shape_margin"):
        shapes_scores(jnp.asarray(ex[1] / 255.0), *ex, shape_margin=-1)
    with pytest.raises(ValueError, match="noise_floor"):
        shapes_scores(jnp.asarray(ex[1] / 255.0), *ex, noise_floor=0.02, noise_tol=0.01)
    with pytest.raises(ValueError, match="noise_tol"):
        shapes_scores(jnp.asarray(ex[1] / 255.0), *ex, noise_tol=-0.01)
    with pytest.raises(ValueError, match="kept_saturation"):
        shapes_scores(jnp.asarray(ex[1] / 255.0), *ex, kept_saturation=-0.1)
    with pytest.raises(ValueError, match="kept_floor"):
        shapes_scores(jnp.asarray(ex[1] / 255.0), *ex, kept_saturation=0.25, kept_floor=0.2, kept_tol=0.1)
    with pytest.raises(ValueError, match=r"config\.reward\.kept_floor"):
        reward_config.shapes_reward_options({"kept_saturation": 0.25, "kept_floor": 0.2, "kept_tol": 0.1})
    with pytest.raises(ValueError, match=r"config\.reward\.noise_floor"):
        reward_config.shapes_reward_options({"noise_floor": 0.02, "noise_tol": 0.01})
    # Configs and checkpoints written before the noise and kept-shapes terms existed keep them off.
    assert dict(reward_config.shapes_reward_options({}))["noise_tol"] == 0.0
    assert dict(reward_config.shapes_reward_options({}))["kept_saturation"] == 0.0
