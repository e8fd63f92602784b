"""Tests for regions from source/target differences: exact on the shapes task, noise dropped, areas merged,
failures named."""

import numpy as np
import pytest

from sfgrpo.data import shapes
from sfgrpo.data.region_diff import DiffSettings, RegionError, box_iou, changed_pixels, diff_regions


def _true_pixel_boxes(record, size):
    return [tuple(round(v * size) for v in r.box) for r in record.regions]


def test_shapes_boxes_cover_every_changed_pixel_and_match_the_true_boxes():
    size = 64
    cfg = shapes.ShapesConfig(image_size=size)
    ious = []
    for i in range(60):
        rec = shapes.generate(i, seed=3, config=cfg)
        found, dropped = diff_regions(rec.source, rec.target, DiffSettings(), max_regions=8)
        changed, _ = changed_pixels(rec.source, rec.target, DiffSettings().threshold)
        covered = np.zeros_like(changed)
        for region in found:
            x1, y1, x2, y2 = region.box
            covered[y1:y2, x1:x2] = True
            assert region.mask.shape == changed.shape and region.changed_px == region.mask.sum()
            assert 0 < region.mean_diff <= 1
        assert dropped == 0 and not (changed & ~covered).any(), (
            f"example {i}: changed pixels outside the boxes"
        )
        truth = _true_pixel_boxes(rec, size)
        assert len(found) == len(truth), f"example {i}: {len(found)} regions for {len(truth)} edits"
        # Regions come in reading order, not the instruction's: each true box meets its best match.
        ious += [max(box_iou(t, r.box) for r in found) for t in truth]
    ious = np.asarray(ious)
    print(f"diff vs true boxes, 64 px, {ious.size} regions: IoU mean {ious.mean():.4f}, min {ious.min():.4f}")
    assert ious.min() == 1.0  # flat shapes on PNG: the changed pixels are exactly the shape's


def test_masks_are_the_changed_shapes():
    rec = shapes.generate(5, seed=0, config=shapes.ShapesConfig(image_size=48))
    found, _ = diff_regions(rec.source, rec.target, DiffSettings(), max_regions=8)
    truth = np.zeros(rec.source.shape[:2], bool)
    for r in rec.regions:
        truth |= r.mask
    union = np.zeros_like(truth)
    for r in found:
        union |= r.mask
    np.testing.assert_array_equal(union, truth)


def _blank(h=64, w=64):
    return np.full((h, w, 3), 128, np.uint8)


def test_small_noise_is_dropped_and_counted():
    src = _blank()
    tgt = src.copy()
    tgt[10:30, 10:30] = (200, 40, 40)  # the edit: 400 px
    tgt[50, 50] = tgt[5, 60] = (0, 0, 0)  # two stray pixels, as compression leaves
    found, dropped = diff_regions(src, tgt, DiffSettings(min_area=0.001), max_regions=8)
    assert [r.box for r in found] == [(10, 10, 30, 30)] and dropped == 2


def test_below_threshold_is_unchanged():
    src = _blank()
    tgt = src.copy()
    tgt[:, :32] += 20  # a shift under the threshold everywhere on the left ...
    tgt[40:50, 40:60] = 0  # ... and a real change
    found, _ = diff_regions(src, tgt, DiffSettings(threshold=24), max_regions=8)
    assert [r.box for r in found] == [(40, 40, 60, 50)]


def test_near_areas_merge_far_areas_stay_apart():
    src = _blank(100, 100)
    tgt = src.copy()
    tgt[10:20, 10:20] = 0
    tgt[10:20, 23:33] = 0  # 3 px gap from the first
    tgt[70:90, 70:90] = 0  # far away
    merged, _ = diff_regions(src, tgt, DiffSettings(merge_gap=0.04), max_regions=8)  # areas within 4 px join
    assert [r.box for r in merged] == [(10, 10, 33, 20), (70, 70, 90, 90)]
    assert merged[0].changed_px == 200  # the region holds the changed pixels, not the gap between them
    apart, _ = diff_regions(src, tgt, DiffSettings(merge_gap=0.0), max_regions=8)
    assert [r.box for r in apart] == [(10, 10, 20, 20), (23, 10, 33, 20), (70, 70, 90, 90)]


def test_failures_are_named():
    src = _blank()
    with pytest.raises(RegionError, match="no_region") as info:
        diff_regions(src, src.copy(), DiffSettings(), max_regions=8)
    assert info.value.reason == "no_region"
    tgt = src.copy()
    for k in range(4):
        tgt[5 + 15 * k : 12 + 15 * k, 5:12] = 0
    with pytest.raises(RegionError) as info:
        diff_regions(src, tgt, DiffSettings(merge_gap=0.0), max_regions=3)
    assert info.value.reason == "too_many_regions" and "4 separate" in str(info.value)
    speck = src.copy()
    speck[3, 3] = 0
    with pytest.raises(RegionError) as info:
        diff_regions(src, speck, DiffSettings(min_area=0.01), max_regions=8)
    assert info.value.reason == "no_region" and "1 changed pixels dropped" in str(info.value)


@pytest.mark.parametrize(
    "kw", [{"threshold": 255}, {"threshold": -1}, {"merge_gap": 1.0}, {"min_area": -0.1}]
)
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        DiffSettings(**kw)


def test_box_iou():
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
