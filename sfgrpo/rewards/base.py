"""The region-score schema (SPEC section 5) as arrays, and the rewards it gives (Eq. 3).

Every reward, whether in-graph JAX, a host callable or a remote judge, produces ``RegionScores`` on the
0..C scale; ``score_rewards`` turns them into the region rewards R_{i,r} and the global reward R^g. A
failed score (unparsable answer, missing region, non-finite value) is marked invalid, never defaulted: its
sample's regions leave the loss and the failure is counted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sfgrpo.rl.advantages import global_reward, region_rewards

SCORE_SCALE = 25.0


class RegionScores(NamedTuple):
    """One judge's scores for B edited images with up to R regions, on 0..scale.

    success, preserve: (B, R) per edit region.
    background:        (B,) preservation outside the regions.
    naturalness, artifacts: (B,) perceptual quality.
    overall_success, overall_preserve: (B,) whole-image judgements.
    valid: (B,) bool, False where the judge failed for that image.
    """

    success: jax.Array
    preserve: jax.Array
    background: jax.Array
    naturalness: jax.Array
    artifacts: jax.Array
    overall_success: jax.Array
    overall_preserve: jax.Array
    valid: jax.Array


class Rewards(NamedTuple):
    """Rewards in [0, 1] with their validity.

    region: (B, R + 1) R_{i,r}, the background last.  region_valid: (B, R + 1) bool.
    image:  (B,) the global reward R^g.                image_valid: (B,) bool.
    """

    region: jax.Array
    region_valid: jax.Array
    image: jax.Array
    image_valid: jax.Array


def score_rewards(scores: RegionScores, region_valid: jax.Array, scale: float = SCORE_SCALE) -> Rewards:
    """Eq. 3 for every region and the background, plus the global reward, with validity masks.

    Args:
      scores: the judge's scores.
      region_valid: (B, R) bool, which region slots hold real regions (padding is False).
      scale: C.
    """
    region = region_rewards(
        scores.success, scores.preserve, scores.background, scores.naturalness, scores.artifacts, scale
    )
    image = global_reward(
        scores.overall_success, scores.overall_preserve, scores.naturalness, scores.artifacts, scale
    )
    ok = scores.valid & jnp.all(jnp.isfinite(region), axis=1) & jnp.isfinite(image)
    slots = jnp.concatenate([region_valid, jnp.ones_like(region_valid[:, :1])], axis=1)
    region_ok = slots & ok[:, None]
    return Rewards(
        region=jnp.where(region_ok, region, 0.0),
        region_valid=region_ok,
        image=jnp.where(ok, image, 0.0),
        image_valid=ok,
    )
