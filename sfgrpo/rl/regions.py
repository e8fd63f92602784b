"""From edit regions to per-token credit weights (SPEC section 6).

Token p of an h x w grid (row-major) covers the cell [j/w, (j+1)/w] x [i/h, (i+1)/h] of the unit image,
where p = i*w + j. Region r covers a fraction M_r[p] of that cell (exact box-cell overlap area, or the mean
of a pixel mask over the cell). The background covers M_B[p] = max(0, 1 - sum_r M_r[p]). The weights
W_r[p] = M_r[p] / sum_{r'} M_r'[p] (background included) sum to 1 at every token; overlapping regions
share a token.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def validate_boxes(boxes: np.ndarray, valid: np.ndarray, grid_hw: Sequence[int]) -> None:
    """Host-side checks of ``token_weights``'s inputs; raises ValueError naming the argument and the problem.

    Jitted code cannot raise, so call this where the boxes enter the program (the data pipeline, a reward).
    """
    boxes = np.asarray(boxes)
    valid = np.asarray(valid)
    if len(grid_hw) != 2 or any(int(n) < 1 for n in grid_hw):
        raise ValueError(f"grid_hw must be two positive integers (h, w), got {tuple(grid_hw)}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (B, R, 4) as (x1, y1, x2, y2), got {boxes.shape}")
    if valid.shape != boxes.shape[:2]:
        raise ValueError(f"valid must have shape {boxes.shape[:2]} to match boxes, got {valid.shape}")
    if valid.dtype != np.bool_:
        raise ValueError(f"valid must be a bool array, got dtype {valid.dtype}")
    live = boxes[valid]
    if not np.all(np.isfinite(live)):
        raise ValueError("boxes: valid boxes must be finite")
    outside = np.argwhere(valid & np.any((boxes < 0.0) | (boxes > 1.0), axis=-1))
    if outside.size:
        b, r = outside[0]
        raise ValueError(
            f"boxes: box [{b}, {r}] = {boxes[b, r].tolist()} lies outside [0, 1]; boxes are (x1, y1, x2, y2) "
            "relative to the image width and height"
        )
    flipped = np.argwhere(valid & ((boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])))
    if flipped.size:
        b, r = flipped[0]
        raise ValueError(
            f"boxes: box [{b}, {r}] = {boxes[b, r].tolist()} has x2 < x1 or y2 < y1; want (x1, y1, x2, y2)"
        )


def box_coverage(boxes: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
    """Exact fraction of each token cell covered by each box.

    Args:
      boxes: (B, R, 4) float (x1, y1, x2, y2) in [0, 1].
      grid_hw: (h, w) token grid.

    Returns:
      (B, R, L) float32 coverage in [0, 1], L = h*w row-major.
    """
    h, w = (int(n) for n in grid_hw)
    boxes = boxes.astype(jnp.float32)
    # Overlap lengths per axis, in units of one cell, so a fully covered cell gives exactly 1.
    cols = _interval_overlap(boxes[..., 0] * w, boxes[..., 2] * w, w)  # (B, R, w)
    rows = _interval_overlap(boxes[..., 1] * h, boxes[..., 3] * h, h)  # (B, R, h)
    return (rows[..., :, None] * cols[..., None, :]).reshape(*boxes.shape[:2], h * w)


def mask_coverage(masks: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
    """Fraction of each token cell covered by each region mask (average pooling).

    Args:
      masks: (B, R, H, W) bool or float in [0, 1]; H and W must be multiples of h and w.
      grid_hw: (h, w) token grid.

    Returns:
      (B, R, L) float32 coverage in [0, 1].
    """
    h, w = (int(n) for n in grid_hw)
    b, r, height, width = masks.shape
    if height % h or width % w:
        raise ValueError(f"masks of {height}x{width} pixels do not tile the {h}x{w} token grid evenly")
    cells = masks.astype(jnp.float32).reshape(b, r, h, height // h, w, width // w)
    return cells.mean(axis=(3, 5)).reshape(b, r, h * w)


def coverage_to_weights(coverage: jax.Array, valid: jax.Array) -> jax.Array:
    """Token weights from region coverage (SPEC section 6).

    Args:
      coverage: (B, R, L) fraction of each token covered by each region.
      valid: (B, R) bool; padded slots get zero weight.

    Returns:
      (B, R + 1, L) float32 weights summing to 1 over the R + 1 slots at every token; the last slot is the
      background.
    """
    coverage = jnp.where(valid[..., None], coverage.astype(jnp.float32), 0.0)
    background = jnp.maximum(0.0, 1.0 - coverage.sum(axis=1, keepdims=True))
    full = jnp.concatenate([coverage, background], axis=1)
    # The total is >= 1 by construction: the background fills any shortfall.
    return full / full.sum(axis=1, keepdims=True)


def token_weights(boxes: jax.Array, valid: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
    """Per-token region weights from boxes.

    Args:
      boxes: (B, R, 4) float (x1, y1, x2, y2) in [0, 1]; check them with ``validate_boxes`` on the host.
      valid: (B, R) bool.
      grid_hw: (h, w), with L = h*w tokens in row-major order.

    Returns:
      (B, R + 1, L) float32, the background last; they sum to 1 at every token.
    """
    return coverage_to_weights(box_coverage(boxes, grid_hw), valid)


def mask_token_weights(masks: jax.Array, valid: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
    """Per-token region weights from pixel masks (B, R, H, W); as ``token_weights``, (B, R + 1, L)."""
    return coverage_to_weights(mask_coverage(masks, grid_hw), valid)


def region_token_weights(
    boxes: jax.Array, masks: jax.Array, has_masks: jax.Array, valid: jax.Array, grid_hw: Sequence[int]
) -> jax.Array:
    """Per-token region weights from masks where an example has them and from its boxes otherwise, decided
    per example (SPEC section 6): boxes (B, R, 4), masks (B, R, H, W) bool, has_masks (B,) bool, valid
    (B, R) bool; returns (B, R + 1, L) as ``token_weights``. An example without masks has all-False masks,
    which would give its regions no credit and everything to the background."""
    from_masks = mask_token_weights(masks, valid, grid_hw)
    from_boxes = token_weights(boxes, valid, grid_hw)
    return jnp.where(has_masks[:, None, None], from_masks, from_boxes)


def area_share(weights: jax.Array) -> jax.Array:
    """(B, R + 1) each slot's share of the image area: its token weight averaged over the L tokens."""
    return weights.mean(axis=-1)


def _interval_overlap(lo: jax.Array, hi: jax.Array, n: int) -> jax.Array:
    """Length of [lo, hi] ∩ [k, k + 1] for k = 0..n-1; lo and hi are (...,), the result is (..., n)."""
    k = jnp.arange(n, dtype=jnp.float32)
    return jnp.clip(jnp.minimum(hi[..., None], k + 1.0) - jnp.maximum(lo[..., None], k), 0.0, 1.0)
