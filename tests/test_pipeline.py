"""Tests for sfgrpo.data.pipeline: groups, host sharding, epochs, resizing, resume, the batch contract."""

import json

import jax
import numpy as np
import pytest

from sfgrpo import runtime
from sfgrpo.data import pipeline, shapes
from sfgrpo.data.records import EditRecord, RecordError, Region

N = 12
SRC = shapes.ShapesSource(N, seed=5, config=shapes.ShapesConfig(image_size=32))


def _cfg(**kw):
    base = dict(resolution=32, group_size=3, batch_size=6, r_max=4, seed=7)
    base.update(kw)
    return pipeline.PipelineConfig(**base)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_contract_shapes_and_dtypes():
    (batch,) = _take(pipeline.make_iterator(SRC, _cfg(), process_index=0, process_count=1), 1)
    spec = {
        "source": ((6, 32, 32, 3), np.uint8),
        "target": ((6, 32, 32, 3), np.uint8),
        "has_target": ((6,), np.bool_),
        "boxes": ((6, 4, 4), np.float32),
        "region_valid": ((6, 4), np.bool_),
        "region_masks": ((6, 4, 32, 32), np.bool_),
        "has_masks": ((6,), np.bool_),
        "example_index": ((6,), np.int64),
        "group_id": ((6,), np.int32),
        "id": ((6,), object),
        "instruction": ((6,), object),
        "region_labels": ((6, 4), object),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: (s, np.dtype(d)) for k, (s, d) in spec.items()
    }
    assert batch["has_target"].all() and batch["has_masks"].all()
    # Shapes at its native size: the batch carries the generated example exactly.
    ref = SRC[int(batch["example_index"][0])]
    np.testing.assert_array_equal(batch["source"][0], ref.source)
    np.testing.assert_array_equal(batch["target"][0], ref.target)
    k = len(ref.regions)
    np.testing.assert_array_equal(batch["region_masks"][0, :k], np.stack([r.mask for r in ref.regions]))
    np.testing.assert_allclose(batch["boxes"][0, :k], [r.box for r in ref.regions])
    # Numeric fields become global jax arrays sharded over the 8 simulated devices.
    mesh = runtime.make_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:2])
    out = runtime.host_local_to_global(pipeline.numeric_fields(batch), mesh)
    assert set(out) == set(spec) - set(pipeline.STRING_FIELDS)
    np.testing.assert_array_equal(np.asarray(out["boxes"]), batch["boxes"])


def test_group_integrity():
    cfg = _cfg(group_size=4, batch_size=12)
    for batch in _take(pipeline.make_iterator(SRC, cfg, process_index=0, process_count=1), 4):
        assert batch["group_id"].tolist() == [g for g in range(3) for _ in range(4)]
        for g in range(3):
            rows = slice(4 * g, 4 * g + 4)
            for key, value in batch.items():
                group = value[rows]
                assert all(np.array_equal(group[0], x) for x in group[1:]), key
        assert len(set(batch["example_index"][::4].tolist())) == 3  # distinct examples per batch


def test_two_hosts_disjoint_complete_and_equal_to_one_host():
    cfg = _cfg(num_epochs=2)  # 2 groups per host per step
    hosts = [list(pipeline.make_iterator(SRC, cfg, process_index=p, process_count=2)) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 2 * (N // 4)
    one = list(
        pipeline.make_iterator(SRC, _cfg(num_epochs=2, batch_size=12), process_index=0, process_count=1)
    )
    per_epoch = N // 4
    for step, (b0, b1) in enumerate(zip(*hosts, strict=True)):
        ex0, ex1 = set(b0["example_index"].tolist()), set(b1["example_index"].tolist())
        assert not ex0 & ex1  # disjoint
        assert b0["group_id"].tolist() == [0, 0, 0, 1, 1, 1] and b1["group_id"].tolist() == [2, 2, 2, 3, 3, 3]
        # Concatenated in process order, the hosts' batches are the single-host global batch.
        glob = {k: np.concatenate([b0[k], b1[k]]) for k in b0}
        assert _equal(glob, one[step])
    for epoch in range(2):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = [int(i) for s in steps for b in (hosts[0][s], hosts[1][s]) for i in b["example_index"][::3]]
        assert sorted(seen) == list(range(N))  # every example once per epoch, none twice
    first = [int(i) for s in range(per_epoch) for i in hosts[0][s]["example_index"][::3]]
    second = [int(i) for s in range(per_epoch, 2 * per_epoch) for i in hosts[0][s]["example_index"][::3]]
    assert first != second  # reshuffled per epoch


def test_unshuffled_order_for_evaluation():
    cfg = _cfg(shuffle=False, group_size=1, batch_size=4, num_epochs=1)
    batches = list(pipeline.make_iterator(SRC, cfg, process_index=0, process_count=1))
    assert np.concatenate([b["example_index"] for b in batches]).tolist() == list(range(N))


def test_dropped_tail_and_too_small_dataset():
    cfg = _cfg(batch_size=15, group_size=3, num_epochs=1)  # 5 groups per step: 12 -> 2 steps, 2 dropped
    assert pipeline.steps_per_epoch(N, cfg) == 2
    assert len(list(pipeline.make_iterator(SRC, cfg, process_index=0, process_count=1))) == 2
    with pytest.raises(ValueError, match="fewer than one global step"):
        pipeline.make_iterator(SRC, cfg, process_index=0, process_count=3)


def test_resume_yields_the_same_batches():
    cfg = _cfg(num_threads=2, prefetch=3)
    full = _take(pipeline.make_iterator(SRC, cfg, process_index=1, process_count=2), 8)
    it = pipeline.make_iterator(SRC, cfg, process_index=1, process_count=2)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    _take(it, 2)  # the interrupted run went on a bit before dying
    resumed = pipeline.make_iterator(SRC, cfg, process_index=1, process_count=2, state=state)
    for want, got in zip(full[3:], _take(resumed, 5), strict=True):
        assert _equal(want, got)
    # A different seed gives a different order.
    other = _take(pipeline.make_iterator(SRC, _cfg(seed=8), process_index=1, process_count=2), 1)[0]
    assert not _equal(other, full[0])


def test_worker_process_gives_the_same_batches():
    base = _take(pipeline.make_iterator(SRC, _cfg(), process_index=0, process_count=1), 3)
    it = pipeline.make_iterator(SRC, _cfg(num_workers=1), process_index=0, process_count=1)
    for want, got in zip(base, _take(it, 3), strict=True):
        assert _equal(want, got)
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    resumed = pipeline.make_iterator(SRC, _cfg(num_workers=1), process_index=0, process_count=1, state=state)
    want = _take(pipeline.make_iterator(SRC, _cfg(), process_index=0, process_count=1), 4)[3]
    assert _equal(want, next(resumed))
    resumed.close()


def _covers(box, mask, slack=1, hug=2):
    """Every mask pixel lies in the box grown by ``slack`` px, and the box hugs the mask within ``hug`` px.

    Nearest-neighbour downscaling may drop a thin tip (a triangle's apex), hence the looser ``hug``.
    """
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    x1, y1, x2, y2 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    inside = (xs >= x1 - slack) & (xs + 1 <= x2 + slack) & (ys >= y1 - slack) & (ys + 1 <= y2 + slack)
    edges = (xs.min() - x1, xs.max() + 1 - x2, ys.min() - y1, ys.max() + 1 - y2)
    return bool(inside.all()) and max(abs(e) for e in edges) <= hug


@pytest.mark.parametrize(
    "size, resolution, mode",
    [
        (64, 32, "resize"),
        (32, 64, "resize"),
        (64, (32, 48), "resize"),
        (64, (32, 48), "center_crop"),
        (48, 32, "center_crop"),
    ],
)
def test_resize_keeps_boxes_on_the_same_pixels(size, resolution, mode):
    src = shapes.ShapesSource(
        12, seed=1, config=shapes.ShapesConfig(image_size=size, min_size=0.3, max_size=0.4)
    )
    cfg = _cfg(resolution=resolution, resize_mode=mode, group_size=1, batch_size=12, num_epochs=1)
    (batch,) = list(pipeline.make_iterator(src, cfg, process_index=0, process_count=1))
    h, w = cfg.size
    assert batch["source"].shape[1:3] == (h, w) and batch["region_masks"].shape[2:] == (h, w)
    checked = 0
    for row in range(12):
        rec = src[int(batch["example_index"][row])]
        for r in range(len(rec.regions)):
            box, mask = batch["boxes"][row, r], batch["region_masks"][row, r]
            if not mask.any():  # cropped away: the box must say so too
                assert not batch["region_valid"][row, r]
                continue
            assert batch["region_valid"][row, r]
            if mode == "center_crop" and (
                mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
            ):
                continue  # clipped by the crop: the clipped box hugs the crop edge, not the shape
            assert _covers(box, mask), (row, r, box)
            checked += 1
    assert checked >= 4


def test_center_crop_box_arithmetic():
    # A 40x80 image, a box over its middle half columns: cropping to 32x32 keeps the centre 40 columns.
    img = np.zeros((40, 80, 3), np.uint8)
    middle, left = np.zeros((40, 80), bool), np.zeros((40, 80), bool)
    middle[:, 30:50] = True
    left[:, 0:8] = True
    regions = (
        Region((30 / 80, 0.0, 50 / 80, 1.0), "middle", middle),
        Region((0.0, 0.0, 0.1, 1.0), "left", left),
    )
    rec = EditRecord("c", img, "x", regions)
    source, _, boxes, valid, masks = pipeline.fit_to_resolution(rec, (32, 32), "center_crop")
    assert source.shape == (32, 32, 3)
    # Scale 0.8 -> 32x64, offset 16 columns: x' = (x*64 - 16) / 32.
    np.testing.assert_allclose(
        boxes[0], [(30 / 80 * 64 - 16) / 32, 0, (50 / 80 * 64 - 16) / 32, 1], atol=1e-6
    )
    assert valid.tolist() == [True, False]  # the left strip is cropped away
    assert _covers(boxes[0], masks[0], slack=0, hug=0) and not masks[1].any()


def test_config_and_record_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        pipeline.make_iterator(SRC, _cfg(batch_size=7), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="multiples of 16"):
        pipeline.make_iterator(SRC, _cfg(resolution=40), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.make_iterator(SRC, _cfg(), process_index=2, process_count=2)
    big = [
        EditRecord(f"r{i}", np.zeros((32, 32, 3), np.uint8), "x", (Region((0, 0, 1, 1)),) * 3)
        for i in range(6)
    ]
    with pytest.raises(RecordError, match=r"record r\d: field 'regions'.*R_max=2"):
        next(pipeline.make_iterator(big, _cfg(r_max=2, num_threads=0), process_index=0, process_count=1))


def test_one_row_per_group_without_repeat():
    repeated = _take(pipeline.make_iterator(SRC, _cfg(), process_index=1, process_count=2), 2)
    cfg = _cfg(repeat_groups=False)
    single = _take(pipeline.make_iterator(SRC, cfg, process_index=1, process_count=2), 2)
    for r, s in zip(repeated, single, strict=True):
        assert s["source"].shape[0] == 2 and s["group_id"].tolist() == [2, 3]
        assert all(np.array_equal(r[k][::3], s[k]) for k in r)


def test_without_masks():
    (batch,) = _take(pipeline.make_iterator(SRC, _cfg(with_masks=False), process_index=0, process_count=1), 1)
    assert "region_masks" not in batch and batch["has_masks"].all()
