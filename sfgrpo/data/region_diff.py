"""Edit regions from where a source image and its target differ: a box and a mask per changed area.

A pixel has changed when the largest of its three channel differences exceeds ``threshold`` (0..255).
Changed pixels closer than ``merge_gap`` x the image's longer side belong to one region (they are labelled
after a dilation by half that distance, 8-connected); a region with fewer than ``min_area`` x H x W
changed pixels is dropped as noise (compression artefacts, resampling), and the pixels dropped are
counted. Each region's box is the tight pixel box of its changed pixels, so every changed pixel that is
kept lies inside a box; its mask is those pixels with their holes filled.

``RegionError`` (reason, message) is also what the grounding VLM's answer parser raises, so the annotator
reports both methods' failures alike.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

# Failure reasons of an annotation (diff or VLM); the annotator reports them per record.
REASONS = (
    "bad_record",  # the input record itself is invalid (image unreadable, instruction empty, ...)
    "no_target",  # diff: the record has no target image
    "no_region",  # nothing changed / the VLM named no region
    "too_many_regions",  # more regions than --max-regions
    "box_outside",  # a VLM box outside 0..1000
    "empty_box",  # a VLM box of zero area
    "unlabelled",  # a VLM region without a label
    "unparsable",  # no usable JSON in the VLM's answer
    "request_rejected",  # the VLM endpoint refused this record's request (4xx, or too large)
    "duplicate_id",  # a second record with the same id
)


class RegionError(ValueError):
    """An annotation that gives no usable regions; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; known: {REASONS}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True)
class DiffRegion:
    """One changed area. ``box``: (x1, y1, x2, y2) pixel edges (columns x1..x2-1); ``mask``: (H, W) bool;
    ``changed_px``: its changed pixels; ``mean_diff``: their mean largest-channel difference / 255."""

    box: tuple[int, int, int, int]
    mask: np.ndarray
    changed_px: int
    mean_diff: float


@dataclasses.dataclass(frozen=True)
class DiffSettings:
    """``threshold``: 0..255 on the largest channel difference; ``merge_gap``, ``min_area``: fractions of
    the longer side and of the image area."""

    threshold: float = 24.0
    merge_gap: float = 0.02
    min_area: float = 0.001

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 255:
            raise ValueError(f"diff threshold must be in [0, 255), got {self.threshold}")
        if not 0 <= self.merge_gap < 1:
            raise ValueError(f"diff merge gap must be in [0, 1), got {self.merge_gap}")
        if not 0 <= self.min_area < 1:
            raise ValueError(f"diff min area must be in [0, 1), got {self.min_area}")


def changed_pixels(source: np.ndarray, target: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(changed (H, W) bool, difference (H, W) float32 in 0..255): the largest channel difference."""
    if source.shape != target.shape or source.ndim != 3:
        raise ValueError(f"source {source.shape} and target {target.shape} must be the same (H, W, C) shape")
    diff = np.abs(source.astype(np.int16) - target.astype(np.int16)).max(axis=-1).astype(np.float32)
    return diff > threshold, diff


def diff_regions(
    source: np.ndarray, target: np.ndarray, settings: DiffSettings, max_regions: int
) -> tuple[list[DiffRegion], int]:
    """The changed areas of (H, W, 3) uint8 ``source`` -> ``target`` in reading order, and the changed pixels
    dropped as too small. ``RegionError`` when none is left or more than ``max_regions`` are."""
    changed, diff = changed_pixels(source, target, settings.threshold)
    h, w = changed.shape
    if not changed.any():
        raise RegionError(
            "no_region", f"source and target differ nowhere by more than {settings.threshold:g}/255"
        )
    radius = int(settings.merge_gap * max(h, w) / 2)
    grouped = (
        ndimage.binary_dilation(changed, np.ones((3, 3), bool), iterations=radius) if radius else changed
    )
    labels, n = ndimage.label(grouped, structure=np.ones((3, 3), bool))
    labels = np.where(changed, labels, 0)  # a region is its changed pixels, not the dilation
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    min_px = settings.min_area * h * w
    keep = [k for k in range(1, n + 1) if counts[k] > 0 and counts[k] >= min_px]
    dropped = int(counts[1:].sum() - counts[keep].sum())
    if not keep:
        raise RegionError(
            "no_region",
            f"every changed area is smaller than --diff-min-area={settings.min_area:g} of the image "
            f"({dropped} changed pixels dropped)",
        )
    if len(keep) > max_regions:
        raise RegionError(
            "too_many_regions",
            f"{len(keep)} separate changed areas, more than --max-regions={max_regions} "
            "(a larger --diff-merge-gap or --diff-min-area joins or drops small ones)",
        )
    slices = ndimage.find_objects(labels)
    regions = []
    for k in keep:
        rows, cols = slices[k - 1]
        pixels = labels == k
        regions.append(
            DiffRegion(
                box=(cols.start, rows.start, cols.stop, rows.stop),
                mask=ndimage.binary_fill_holes(pixels),
                changed_px=int(counts[k]),
                mean_diff=float(diff[pixels].mean() / 255.0),
            )
        )
    regions.sort(key=lambda r: (r.box[1], r.box[0]))
    return regions, dropped


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes in the same unit."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
