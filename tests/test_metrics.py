"""Tests for sfgrpo.metrics: JSONL records, TensorBoard events, resume truncation, grids, the reward plot."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sfgrpo import metrics as M


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_records_keys_and_types(tmp_path):
    with M.MetricsWriter(tmp_path, enabled=True) as w:
        w.write(1, "grpo", {"loss": jnp.float32(0.5), "reward/mean": 0.25, "count": np.int32(3)})
        w.write(2, "grpo", {"loss": jnp.array([1.5])})
    recs = _lines(tmp_path / M.METRICS_FILE)
    assert recs == [
        {"step": 1, "stage": "grpo", "loss": 0.5, "reward/mean": 0.25, "count": 3.0},
        {"step": 2, "stage": "grpo", "loss": 1.5},
    ]
    assert list(recs[0])[:2] == ["step", "stage"]
    assert isinstance(recs[0]["loss"], float)


def test_nonfinite_values_are_strict_json_and_read_back(tmp_path):
    with M.MetricsWriter(tmp_path, enabled=True) as w:
        w.write(0, "grpo", {"a": float("nan"), "b": jnp.inf, "c": -jnp.inf, "d": 1.0})
    text = (tmp_path / M.METRICS_FILE).read_text()
    # Strict parsing: Python's json accepts NaN/Infinity tokens by default, so refuse them here.
    rec = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert rec["a"] == "nan" and rec["b"] == "inf" and rec["c"] == "-inf" and rec["d"] == 1.0
    back = M.read_metrics(tmp_path / M.METRICS_FILE)[0]
    assert math.isnan(back["a"]) and back["b"] == math.inf and back["c"] == -math.inf


def test_rejects_reserved_keys_and_non_scalars(tmp_path):
    with M.MetricsWriter(tmp_path, enabled=True) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write(0, "grpo", {"step": 1.0})
        with pytest.raises(ValueError, match="scalar"):
            w.write(0, "grpo", {"x": np.zeros(3)})


def test_tensorboard_events_hold_scalars_and_images(tmp_path):
    with M.MetricsWriter(tmp_path, enabled=True) as w:
        w.write(3, "grpo", {"reward/mean": 0.75})
        w.write(4, "grpo", {"reward/mean": 0.5})
        w.write_images(4, "eval", "grid", np.zeros((8, 12, 3), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            w.write_images(4, "eval", "grid", np.zeros((8, 12, 3), np.float32))
    assert list((tmp_path / M.TB_DIR / "grpo").glob("events.out.tfevents.*"))
    scalars = M.read_tb_scalars(tmp_path / M.TB_DIR)
    assert scalars["grpo/reward/mean"] == [(3, 0.75), (4, 0.5)]

    from tensorboardX.proto import event_pb2

    tags = [
        v.tag
        for f in (tmp_path / M.TB_DIR).rglob("events.out.tfevents.*")
        for p in M._event_records(f)
        for v in event_pb2.Event.FromString(p).summary.value
        if v.HasField("image")
    ]
    assert tags == ["eval/grid"]


def test_disabled_writer_writes_nothing(tmp_path):
    with M.MetricsWriter(tmp_path / "run", enabled=False) as w:
        w.write(0, "grpo", {"loss": 1.0})
        w.write_images(0, "eval", "g", np.zeros((4, 4, 3), np.uint8))
        assert w.truncate_after(0) == 0
        w.flush()
    assert not (tmp_path / "run").exists()


def test_appends_on_reopen_and_truncates_on_resume(tmp_path):
    with M.MetricsWriter(tmp_path, enabled=True) as w:
        w.write(0, "warmup", {"loss": 1.0})
        w.write(5, "warmup", {"loss": 0.75})
        for step in range(1, 5):
            w.write(step, "grpo", {"loss": float(step)})
            if step % 2 == 0:
                w.write(step, "eval", {"eval/reward/mean": step / 8})
    with M.MetricsWriter(tmp_path, enabled=True) as w:  # a plain reopen appends
        w.write(5, "grpo", {"loss": 5.0})
    assert len(_lines(tmp_path / M.METRICS_FILE)) == 9

    # Resume from a checkpoint at grpo step 2: the grpo and eval records after it go, warmup's stay.
    with M.MetricsWriter(tmp_path, enabled=True) as w:
        assert w.truncate_after(2, stage=("grpo", "eval")) == 4
        w.write(3, "grpo", {"loss": 33.0})
        w.write(4, "grpo", {"loss": 44.0})
        # Truncating a stage whose TensorBoard writer is open reopens it with the purge.
        assert w.truncate_after(3, stage="grpo") == 1
        w.write(4, "grpo", {"loss": 444.0})
    recs = _lines(tmp_path / M.METRICS_FILE)
    assert [(r["stage"], r["step"], r.get("loss")) for r in recs] == [
        ("warmup", 0, 1.0),
        ("warmup", 5, 0.75),
        ("grpo", 1, 1.0),
        ("grpo", 2, 2.0),
        ("eval", 2, None),
        ("grpo", 3, 33.0),
        ("grpo", 4, 444.0),
    ]
    # TensorBoard (as read_tb_scalars reads it) purged the same events, per stage.
    scalars = M.read_tb_scalars(tmp_path / M.TB_DIR)
    assert scalars["grpo/loss"] == [(1, 1.0), (2, 2.0), (3, 33.0), (4, 444.0)]
    assert scalars["eval/eval/reward/mean"] == [(2, 0.25)]
    assert scalars["warmup/loss"] == [(0, 1.0), (5, 0.75)]


def test_truncate_keeps_unparsable_lines_and_torn_line_does_not_merge(tmp_path):
    path = tmp_path / M.METRICS_FILE
    path.write_text(
        '{"step": 1, "stage": "s", "x": 1.0}\nnot json\n{"step": 9, "stage": "s", "x": 2.0}\n{"step": 3'
    )
    with M.MetricsWriter(tmp_path, enabled=True) as w:
        w.write(4, "s", {"x": 4.0})  # after the torn line, on a line of its own
    assert [r["step"] for r in M.read_metrics(path)] == [1, 9, 4]
    assert M.truncate_jsonl(path, 4) == 1
    lines = path.read_text().splitlines()
    assert lines[1] == "not json" and lines[2] == '{"step": 3'
    assert [r["step"] for r in M.read_metrics(path)] == [1, 4]
    assert M.truncate_jsonl(tmp_path / "absent.jsonl", 0) == 0


def _box_edges(grid, x0, y0, box, panel, width):
    """Pixels on a drawn box's outline and just inside it, in grid coordinates."""
    left, top, right, bottom = M._box_pixels(box, panel, panel)
    on = grid[y0 + (top + bottom) // 2, x0 + left]  # the left edge, halfway down
    inside = grid[y0 + (top + bottom) // 2, x0 + left + width + 2]
    return (x0 + left, y0 + top, x0 + right, y0 + bottom), on, inside


def test_eval_grid_layout_upscale_and_boxes():
    b, h, w = 3, 32, 32
    source = np.zeros((b, h, w, 3), np.uint8)
    edited = np.full((b, h, w, 3), 200, np.uint8)
    boxes = np.zeros((b, 2, 4), np.float32)
    boxes[:, 0] = (0.25, 0.25, 0.75, 0.75)
    boxes[:, 1] = (0.0, 0.0, 0.5, 0.5)
    valid = np.array([[True, False]] * b)
    grid = M.eval_grid(source, edited, None, boxes, valid, labels=["a", "b", "c"], max_rows=2)

    scale = M.panel_scale(h, w)
    panel = h * scale
    assert scale == 8 and panel == 256
    row_h = M.GRID_LABEL + panel + M.GRID_PAD
    assert grid.dtype == np.uint8
    assert grid.shape == (M.GRID_HEADER + 2 * row_h + M.GRID_PAD, 3 * panel + 4 * M.GRID_PAD, 3)

    y0 = M.GRID_HEADER + row_h + M.GRID_LABEL  # second row's panels
    for col in range(3):
        x0 = M.GRID_PAD + col * (panel + M.GRID_PAD)
        (bx0, by0, bx1, by1), on, inside = _box_edges(grid, x0, y0, boxes[1, 0], panel, 2)
        assert (bx0, by0, bx1, by1) == (x0 + 64, y0 + 64, x0 + 191, y0 + 191)
        assert tuple(on) == M._BOX_COLORS[0]
        # The corners of the box outline carry the colour; the image (or blank panel) is intact elsewhere.
        assert tuple(grid[by0, bx0]) == tuple(grid[by1, bx1]) == M._BOX_COLORS[0]
        expected_fill = (0, 0, 0) if col == 0 else (200, 200, 200) if col == 1 else M._BLANK
        assert tuple(inside) == expected_fill
        assert tuple(grid[y0 + 8, x0 + 8]) == expected_fill  # the invalid box at the top-left is not drawn


def test_eval_grid_target_panel_and_validation():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    boxes = np.zeros((2, 1, 4), np.float32)
    valid = np.zeros((2, 1), bool)
    grid = M.eval_grid(imgs, imgs, imgs[::-1], boxes, valid, min_panel=48)
    scale = M.panel_scale(16, 24, 48)
    assert scale == 2
    # The target panel of row 0 is image 1, upscaled by 2 with nearest neighbour.
    x0, y0 = M.GRID_PAD + 2 * (48 + M.GRID_PAD), M.GRID_HEADER
    np.testing.assert_array_equal(grid[y0 : y0 + 32 : 2, x0 : x0 + 48 : 2], imgs[1])
    with pytest.raises(ValueError, match="uint8"):
        M.eval_grid(imgs.astype(np.float32), imgs, None, boxes, valid)
    with pytest.raises(ValueError, match="boxes"):
        M.eval_grid(imgs, imgs, None, boxes[:1], valid)


def test_save_png_and_plot_rewards(tmp_path):
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    M.save_png(tmp_path / "sub" / "g.png", img)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "g.png")), img)

    with M.MetricsWriter(tmp_path, enabled=True) as w:
        for step in range(5):
            w.write(step, "grpo", {"reward/mean": 0.1 * step, "loss": 1.0})
        w.write(5, "grpo", {"reward/mean": float("nan")})
        w.write(0, "eval", {"eval/reward/mean": 0.2})
        w.write(4, "eval", {"eval/reward/mean": 0.6})
    out = tmp_path / "plots" / "rewards.png"
    assert M.plot_rewards(tmp_path / M.METRICS_FILE, out) == 2
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100

    # Missing keys and a missing file still give a PNG.
    assert M.plot_rewards(tmp_path / M.METRICS_FILE, tmp_path / "none.png", keys=("absent",)) == 0
    assert M.plot_rewards(tmp_path / "missing.jsonl", tmp_path / "empty.png") == 0
    for name in ("none.png", "empty.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG"
