"""The region-score schema (SPEC section 5) as arrays, and the rewards it gives (Eq. 3).

Every reward, whether in-graph JAX, a host callable or a remote judge, produces ``RegionScores`` on the
0..C scale; ``score_rewards`` turns them into the region rewards R_{i,r} and the global reward R^g. A
failed score (unparsable answer, missing region, non-finite value) is marked invalid, never defaulted: its
sample's regions leave the loss and the failure is counted.

A reward is one of three kinds (``config.reward.kind``): a JAX function inside the compiled step (the
shapes reward), or a host-side ``HostReward``, a blocking, thread-safe callable from a ``ScoreRequest``
(host numpy) to ``HostScores`` (numpy scores plus failure counts), which is how the remote judges (our JSON
reward server, an OpenAI-compatible VLM endpoint; ``sfgrpo.rewards.remote``) are reached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


# Why an image got no scores, in the order they are checked. Per-image judge failures: the answer was not
# JSON of the schema ('unparsable'), named the wrong regions ('missing_region': missing, extra or
# duplicated ids), or held a score outside 0..C or non-finite ('out_of_range'). Transport failures that
# outlived the retries under on_failure='skip': 'timeout' and 'http_error' (refused connection, 5xx, 4xx)
# count the images lost to each cause, and 'batch_skipped' counts every image of a skipped batch.
FAILURE_REASONS: tuple[str, ...] = (
    "unparsable",
    "missing_region",
    "out_of_range",
    "timeout",
    "http_error",
    "host_error",  # an in-process host reward raised
    "batch_skipped",
)
_SCORE_FIELDS = RegionScores._fields


class RewardError(RuntimeError):
    """A reward that cannot go on (e.g. its server is down after the retries with on_failure='fail').

    The message names the endpoint and the cause."""


def no_failures() -> dict[str, int]:
    """Every failure reason with a zero count."""
    return dict.fromkeys(FAILURE_REASONS, 0)


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """One batch of B edited images with up to R region slots, as host numpy arrays.

    source, edited: (B, H, W, 3) uint8.  instructions: B strings.
    boxes: (B, R, 4) float32 (x1, y1, x2, y2) in [0, 1].  region_valid: (B, R) bool.
    region_labels: (B, R) str, "" in padded slots.
    target: (B, H, W, 3) uint8 ground truth, for rewards that need it (else None).
    region_masks: (B, R, H, W) bool per-region pixel masks (else None).
    """

    source: np.ndarray
    edited: np.ndarray
    instructions: Sequence[str]
    boxes: np.ndarray
    region_valid: np.ndarray
    region_labels: np.ndarray
    target: np.ndarray | None = None
    region_masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        src = np.asarray(self.source)
        if src.ndim != 4 or src.shape[-1] != 3 or src.dtype != np.uint8:
            raise ValueError(f"ScoreRequest.source: expected (B, H, W, 3) uint8, got {src.shape} {src.dtype}")
        b, h, w, _ = src.shape
        r = np.asarray(self.region_valid).shape[-1] if np.ndim(self.region_valid) == 2 else -1
        expected = {
            "edited": ((b, h, w, 3), np.uint8),
            "boxes": ((b, r, 4), None),
            "region_valid": ((b, r), np.bool_),
            "region_labels": ((b, r), None),
            "target": ((b, h, w, 3), np.uint8),
            "region_masks": ((b, r, h, w), np.bool_),
        }
        for name, (shape, dtype) in expected.items():
            value = getattr(self, name)
            if value is None and name in ("target", "region_masks"):
                continue
            arr = np.asarray(value)
            if arr.shape != shape or (dtype is not None and arr.dtype != dtype):
                want = f"{shape} {np.dtype(dtype).name if dtype else ''}".strip()
                raise ValueError(f"ScoreRequest.{name}: expected {want}, got {arr.shape} {arr.dtype}")
        boxes = np.asarray(self.boxes, np.float64)
        if not np.all(np.isfinite(boxes)) or boxes.min(initial=0.0) < 0 or boxes.max(initial=0.0) > 1:
            raise ValueError("ScoreRequest.boxes: coordinates must be finite and in [0, 1]")
        if len(self.instructions) != b or not all(isinstance(t, str) for t in self.instructions):
            raise ValueError(f"ScoreRequest.instructions: expected {b} strings, got {len(self.instructions)}")

    @property
    def batch_size(self) -> int:
        return int(self.source.shape[0])

    @property
    def num_regions(self) -> int:
        return int(self.region_valid.shape[1])

    def rows(self, start: int, stop: int) -> ScoreRequest:
        """Images ``start:stop`` of the batch, as a request of their own."""
        cut = slice(start, stop)
        return ScoreRequest(
            source=self.source[cut],
            edited=self.edited[cut],
            instructions=list(self.instructions[cut]),
            boxes=self.boxes[cut],
            region_valid=self.region_valid[cut],
            region_labels=self.region_labels[cut],
            target=None if self.target is None else self.target[cut],
            region_masks=None if self.region_masks is None else self.region_masks[cut],
        )


@dataclasses.dataclass(frozen=True)
class HostScores:
    """The numpy twin of ``RegionScores`` (same fields, shapes and 0..C scale) plus failure counts.

    failures: reason (``FAILURE_REASONS``) -> number of images. An invalid image has every score 0: its
    regions leave the loss, and no plausible default ever stands in for a judgement.
    """

    success: np.ndarray
    preserve: np.ndarray
    background: np.ndarray
    naturalness: np.ndarray
    artifacts: np.ndarray
    overall_success: np.ndarray
    overall_preserve: np.ndarray
    valid: np.ndarray
    failures: Mapping[str, int] = dataclasses.field(default_factory=no_failures)

    def __post_init__(self) -> None:
        valid = np.asarray(self.valid)
        if valid.ndim != 1 or valid.dtype != np.bool_:
            raise ValueError(f"HostScores.valid: expected (B,) bool, got {valid.shape} {valid.dtype}")
        b = valid.shape[0]
        r = np.shape(self.success)[1] if np.ndim(self.success) == 2 else -1
        for name in _SCORE_FIELDS[:-1]:
            shape = (b, r) if name in ("success", "preserve") else (b,)
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(
                    f"HostScores.{name}: expected shape {shape}, got {np.shape(getattr(self, name))}"
                )
        unknown = set(self.failures) - set(FAILURE_REASONS)
        if unknown:
            raise ValueError(
                f"HostScores.failures: unknown reasons {sorted(unknown)}; known {FAILURE_REASONS}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.valid.shape[0])

    def region_scores(self) -> RegionScores:
        """The scores as a ``RegionScores`` of numpy arrays (float32, valid bool)."""
        return RegionScores(
            **{
                f: np.asarray(getattr(self, f), np.bool_ if f == "valid" else np.float32)
                for f in _SCORE_FIELDS
            }
        )

    @classmethod
    def from_region_scores(
        cls, scores: RegionScores, failures: Mapping[str, int] | None = None
    ) -> HostScores:
        """Host copies of a ``RegionScores`` (e.g. a JAX reward's); invalid images get zeros."""
        valid = np.asarray(scores.valid, np.bool_)
        fields = {}
        for f in _SCORE_FIELDS[:-1]:
            x = np.asarray(getattr(scores, f), np.float32)
            mask = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
            fields[f] = np.where(mask, x, 0.0).astype(np.float32)
        return cls(**fields, valid=valid, failures={**no_failures(), **(failures or {})})

    @classmethod
    def invalid(cls, batch: int, regions: int, failures: Mapping[str, int] | None = None) -> HostScores:
        """A batch with no valid image (every score 0), e.g. one skipped after transport failures."""
        zeros = np.zeros((batch,), np.float32)
        return cls(
            success=np.zeros((batch, regions), np.float32),
            preserve=np.zeros((batch, regions), np.float32),
            background=zeros,
            naturalness=zeros.copy(),
            artifacts=zeros.copy(),
            overall_success=zeros.copy(),
            overall_preserve=zeros.copy(),
            valid=np.zeros((batch,), np.bool_),
            failures={**no_failures(), **(failures or {})},
        )

    @staticmethod
    def concatenate(parts: Sequence[HostScores]) -> HostScores:
        """Scores of consecutive sub-batches as one batch; failure counts add up."""
        failures = no_failures()
        for p in parts:
            for k, v in p.failures.items():
                failures[k] += int(v)
        fields = {f: np.concatenate([np.asarray(getattr(p, f)) for p in parts]) for f in _SCORE_FIELDS}
        return HostScores(**fields, failures=failures)


HostReward = Callable[[ScoreRequest], HostScores]
"""A host-side reward: blocking and thread-safe (a ``RewardWorker`` may call it from several threads)."""
