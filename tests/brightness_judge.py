"""A host reward for tests whose scores never saturate: with the demo's tiny, barely warmed-up policy the
shapes reward scores every rollout 0 (nothing to learn from, and nothing for a comparison to catch), while
this one scores every image by its pixels, so rewards, advantages and updates are all non-zero.

Per region: success = C x the mean brightness inside the box, preserve = C x (1 - the mean absolute change
from the source inside it); background = C x (1 - the mean change outside every box); naturalness and
artifacts = C. Registered as ``brightness`` (``reward.host_import=brightness_judge``, with ``tests/`` on
the path; ``python -m sfgrpo.rewards.server --import brightness_judge --reward brightness``).
"""

import numpy as np

from sfgrpo.rewards.base import HostReward, HostScores, ScoreRequest
from sfgrpo.rewards.server import register_reward


@register_reward("brightness")
def make_brightness_reward(scale: float) -> HostReward:
    def score(request: ScoreRequest) -> HostScores:
        edited = request.edited.astype(np.float32) / 255.0  # (B, H, W, 3)
        change = np.abs(edited - request.source.astype(np.float32) / 255.0).mean(-1)  # (B, H, W)
        b, h, w = change.shape
        ys = (np.arange(h) + 0.5) / h
        xs = (np.arange(w) + 0.5) / w
        boxes = np.asarray(request.boxes, np.float32)  # (B, R, 4)
        inside = (
            (ys[None, None, :, None] >= boxes[..., 1, None, None])
            & (ys[None, None, :, None] <= boxes[..., 3, None, None])
            & (xs[None, None, None, :] >= boxes[..., 0, None, None])
            & (xs[None, None, None, :] <= boxes[..., 2, None, None])
            & request.region_valid[..., None, None]
        )  # (B, R, H, W)
        n = np.maximum(inside.sum(axis=(-2, -1)), 1)
        bright = edited.mean(-1)[:, None]
        success = scale * (bright * inside).sum(axis=(-2, -1)) / n
        preserve = scale * (1.0 - (change[:, None] * inside).sum(axis=(-2, -1)) / n)
        outside = ~inside.any(axis=1)
        background = scale * (
            1.0 - (change * outside).sum(axis=(-2, -1)) / np.maximum(outside.sum((-2, -1)), 1)
        )
        valid_regions = request.region_valid
        full = np.full((b,), scale, np.float32)
        return HostScores(
            success=np.where(valid_regions, success, 0.0).astype(np.float32),
            preserve=np.where(valid_regions, preserve, 0.0).astype(np.float32),
            background=background.astype(np.float32),
            naturalness=full,
            artifacts=full,
            overall_success=(scale * bright[:, 0].mean(axis=(-2, -1))).astype(np.float32),
            overall_preserve=background.astype(np.float32),
            valid=np.ones((b,), bool),
        )

    return score
