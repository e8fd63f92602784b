"""A programmatic region reward for the synthetic shapes task, in JAX (SPEC section 5 schema).

The shapes task knows the exact target and each region's pixel mask, so every SFReward field has a
measurable counterpart. Errors are mean absolute differences of [0, 1] RGB values, mapped linearly onto
0..C and saturating at a tolerance:
  success_r      the edited shape's pixels (its mask) against the target;
  preserve_r     the pixels of the region's box outside the shape against the source;
  background     the pixels outside every box against the source (preservation errors below a small floor
                 score full marks); with ``kept_saturation`` > 0 also capped by ``kept`` below;
  kept           the shapes the instruction leaves alone (saturated source pixels outside every edited
                 shape, its box and margin) against the source: a few percent of the background's pixels,
                 so recolouring or removing one hardly moves the background's mean error, yet a person
                 sees a damaged image. It caps background and overall_preserve;
  naturalness    how close the edited image's total variation is to the target's (blur and noise both
                 move it away), with a tolerance band; with ``noise_tol`` > 0 also capped by its local
                 noise: neighbour differences beyond both the source's and the target's (a global total
                 variation lets speckle and smeared shapes cancel);
  artifacts      how much of the decoded signal lies outside the valid [0, 1] range;
  overall_*      success over the union of the shapes, preservation over everything else.
With ``shape_margin`` m > 0, the preservation scores skip pixels within m of a shape: a lossy autoencoder's
round trip (what the trainer judges against) mixes a shape's colour into them, so a faithful edit differs
from the source there, and a tight ``preserve_floor`` would call it damage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sfgrpo.rewards.base import SCORE_SCALE, RegionScores


def shapes_scores(
    edited: jax.Array,
    source: jax.Array,
    target: jax.Array,
    masks: jax.Array,
    boxes: jax.Array,
    region_valid: jax.Array,
    *,
    scale: float = SCORE_SCALE,
    success_tol: float = 0.25,
    preserve_tol: float = 0.25,
    artifact_tol: float = 0.1,
    preserve_floor: float = 0.06,
    tv_tol: float = 0.25,
    shape_margin: int = 0,
    noise_floor: float = 0.0,
    noise_tol: float = 0.0,
    kept_saturation: float = 0.0,
    kept_floor: float = 0.04,
    kept_tol: float = 0.12,
) -> RegionScores:
    """Scores of B edited images.

    Args:
      edited: (B, H, W, 3) float decoded images, nominally in [0, 1] (not clipped: overshoot is an artifact).
      source, target: (B, H, W, 3) uint8 or float in [0, 1].
      masks: (B, R, H, W) bool, each region's shape pixels.
      boxes: (B, R, 4) float (x1, y1, x2, y2) in [0, 1].
      region_valid: (B, R) bool.
      scale: C. success_tol, preserve_tol: the mean absolute error that scores 0; artifact_tol: the mean
        out-of-range overshoot that scores 0.
      preserve_floor: the mean absolute error against the source that still scores C (preserve,
        background, overall_preserve): the residue that the lossy autoencoder and the sampler leave in
        untouched pixels. Without it, regions that are in fact preserved get rewards that differ only by
        sampler noise, which group normalisation inflates into full-size advantages.
      tv_tol: the |log| ratio of total variations (edited / target) that still scores full naturalness
        (0.25: within about 28 percent); beyond it naturalness decays as exp(-(|log ratio| - tv_tol)).
      shape_margin: pixels around each shape left out of preserve, background and overall_preserve
        (the autoencoder's pooling size: pixels the round trip mixes with the shape's colour).
      noise_floor, noise_tol: the excess gradient (``excess_gradient``: [0, 1] units per neighbour pair,
        both axes summed) that still scores full naturalness, and the one that scores 0; linear between.
        noise_tol 0 leaves the term out (naturalness is the total-variation term alone).
      kept_saturation: the channel spread (max - min of RGB, [0, 1] units) above which a source pixel
        belongs to a shape: the task's shapes are saturated colours (spread >= 0.5) on a grey background
        (spread <= 0.05). Such pixels outside every edited shape's box and margin are the untouched
        shapes; 0 leaves the term out (as every run before 2026-12-07 had it).
      kept_floor, kept_tol: the mean absolute error against the source over the untouched shapes'
        interiors (eroded by half of ``shape_margin``, where the round trip mixes them with the background)
        that still scores C, and the one that scores 0. Faithful interiors measure under 0.03, recoloured
        or removed ones over 0.12 (docs/credit_study/kept_shapes).

    Returns:
      RegionScores on 0..scale; ``valid`` is False where the edited image is not finite.
    """
    if not 0.0 <= preserve_floor < preserve_tol:
        raise ValueError(f"need 0 <= preserve_floor < preserve_tol, got {preserve_floor}, {preserve_tol}")
    if noise_tol > 0 and not 0.0 <= noise_floor < noise_tol:
        raise ValueError(f"need 0 <= noise_floor < noise_tol, got {noise_floor}, {noise_tol}")
    if noise_tol < 0:
        raise ValueError(f"noise_tol must be >= 0 (0: no noise term), got {noise_tol}")
    if shape_margin < 0:
        raise ValueError(f"shape_margin must be >= 0 pixels, got {shape_margin}")
    if kept_saturation < 0:
        raise ValueError(f"kept_saturation must be >= 0 (0: no kept-shapes term), got {kept_saturation}")
    if kept_saturation > 0 and not 0.0 <= kept_floor < kept_tol:
        raise ValueError(f"need 0 <= kept_floor < kept_tol, got {kept_floor}, {kept_tol}")
    edited = edited.astype(jnp.float32)
    clipped = jnp.clip(edited, 0.0, 1.0)
    source, target = _unit(source), _unit(target)
    b, h, w, _ = edited.shape
    masks = masks.astype(bool) & region_valid[:, :, None, None]
    box_px = _box_pixels(boxes, (h, w)) & region_valid[:, :, None, None]

    err_target = jnp.abs(clipped - target).mean(-1)  # (B, H, W)
    err_source = jnp.abs(clipped - source).mean(-1)

    def score(err: jax.Array, region: jax.Array, tol: float, floor: float = 0.0) -> jax.Array:
        """Score of the mean error over ``region`` (..., H, W); a region with no pixels scores C."""
        n = region.sum(axis=(-2, -1))
        mean = (err * region).sum(axis=(-2, -1)) / jnp.maximum(n, 1)
        frac = jnp.clip((mean - floor) / (tol - floor), 0.0, 1.0)
        return jnp.where(n > 0, scale * (1.0 - frac), scale)

    success = score(err_target[:, None], masks, success_tol)
    near = _dilate(masks, shape_margin)  # (B, R, H, W): the shapes and their margins
    preserve = score(err_source[:, None], box_px & ~near, preserve_tol, preserve_floor)
    outside = ~jnp.any(box_px | near, axis=1)
    background = score(err_source, outside, preserve_tol, preserve_floor)
    shapes = jnp.any(masks, axis=1)
    overall_success = score(err_target, shapes, success_tol)
    overall_preserve = score(err_source, ~jnp.any(near, axis=1), preserve_tol, preserve_floor)
    if kept_saturation > 0:
        # Half the margin: the round trip's saturated pixels already end about half a pool inside the
        # outline; a full margin empties small triangles (7 of 252 untouched shapes at K = 2).
        interiors = untouched_shapes(source, ~outside, kept_saturation, (shape_margin + 1) // 2)
        kept = score(err_source, interiors, kept_tol, kept_floor)
        background = jnp.minimum(background, kept)
        overall_preserve = jnp.minimum(overall_preserve, kept)

    tv_edit = _total_variation(clipped)
    tv_target = _total_variation(target)
    tv_dev = jnp.abs(jnp.log((tv_edit + 1e-3) / (tv_target + 1e-3)))
    naturalness = scale * jnp.exp(-jnp.maximum(tv_dev - tv_tol, 0.0))
    if noise_tol > 0:
        excess = excess_gradient(clipped, source, target)
        noise = scale * (1.0 - jnp.clip((excess - noise_floor) / (noise_tol - noise_floor), 0.0, 1.0))
        naturalness = jnp.minimum(naturalness, noise)
    overshoot = jnp.abs(edited - clipped).mean(axis=(1, 2, 3))
    artifacts = scale * (1.0 - jnp.minimum(overshoot / artifact_tol, 1.0))

    valid = jnp.all(jnp.isfinite(edited), axis=(1, 2, 3))
    return RegionScores(
        success=success,
        preserve=preserve,
        background=background,
        naturalness=naturalness,
        artifacts=artifacts,
        overall_success=overall_success,
        overall_preserve=overall_preserve,
        valid=valid,
    )


def untouched_shapes(source: jax.Array, edited_area: jax.Array, saturation: float, margin: int) -> jax.Array:
    """(B, H, W) bool interiors of the shapes the instruction leaves alone.

    Args:
      source: (B, H, W, 3) float [0, 1] source images.
      edited_area: (B, H, W) bool, the edited regions' boxes, shapes and margins.
      saturation: the RGB channel spread above which a pixel belongs to a shape.
      margin: pixels eroded from each shape's outline (where a round trip mixes it with the background).
    """
    saturated = source.max(-1) - source.min(-1) > saturation
    kept = saturated & ~edited_area
    return ~_dilate(~kept, margin)


def _unit(image: jax.Array) -> jax.Array:
    """uint8 images to float32 [0, 1]; float images pass through as float32."""
    if image.dtype == jnp.uint8:
        return image.astype(jnp.float32) / 255.0
    return image.astype(jnp.float32)


def _dilate(masks: jax.Array, margin: int) -> jax.Array:
    """(..., H, W) bool masks grown by ``margin`` pixels (a square window); margin 0 returns them."""
    if margin == 0:
        return masks
    window = (1,) * (masks.ndim - 2) + (2 * margin + 1,) * 2
    grown = jax.lax.reduce_window(
        masks.astype(jnp.float32), 0.0, jax.lax.max, window, (1,) * masks.ndim, "SAME"
    )
    return grown > 0


def _box_pixels(boxes: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """(B, R, H, W) bool: pixels whose centres lie inside each box."""
    h, w = hw
    ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    inside_y = (ys >= boxes[..., 1, None]) & (ys <= boxes[..., 3, None])  # (B, R, H)
    inside_x = (xs >= boxes[..., 0, None]) & (xs <= boxes[..., 2, None])  # (B, R, W)
    return inside_y[..., :, None] & inside_x[..., None, :]


def excess_gradient(edited: jax.Array, source: jax.Array, target: jax.Array) -> jax.Array:
    """(B,) the edited images' local noise: neighbour differences beyond the source's and the target's.

    Per axis, the mean over neighbour pairs and channels of max(|d edited| - max(|d source|, |d target|), 0),
    summed over the two axes; (B, H, W, 3) float inputs in [0, 1]. An edge the source or the target has
    (a recoloured, removed or kept shape) costs nothing; speckle where both are smooth does. Being local,
    it does not cancel against smeared shapes as a global total variation does.
    """
    total = jnp.zeros(edited.shape[:1], jnp.float32)
    for axis in (1, 2):
        d_edit = jnp.abs(jnp.diff(edited, axis=axis))
        d_ref = jnp.maximum(jnp.abs(jnp.diff(source, axis=axis)), jnp.abs(jnp.diff(target, axis=axis)))
        total = total + jnp.maximum(d_edit - d_ref, 0.0).mean(axis=(1, 2, 3))
    return total


def _total_variation(image: jax.Array) -> jax.Array:
    """(B,) mean absolute difference between neighbouring pixels."""
    dy = jnp.abs(jnp.diff(image, axis=1)).mean(axis=(1, 2, 3))
    dx = jnp.abs(jnp.diff(image, axis=2)).mean(axis=(1, 2, 3))
    return dx + dy
