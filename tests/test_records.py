"""Tests for sfgrpo.data.records: box formats, validation, and the JSONL reader's errors."""

import json

import numpy as np
import pytest

from sfgrpo.data.records import (
    BadRecords,
    EditRecord,
    RecordError,
    Region,
    encode_png,
    read_jsonl_folder,
    to_unit_box,
    validate_record,
)


def test_box_formats_convert_to_unit():
    assert to_unit_box([10, 20, 30, 40], "pixel", width=100, height=50) == pytest.approx((0.1, 0.4, 0.3, 0.8))
    assert to_unit_box([0.1, 0.2, 0.3, 0.4], "unit", 7, 9) == pytest.approx((0.1, 0.2, 0.3, 0.4))
    assert to_unit_box([100, 200, 300, 1000], "qwen1000", 7, 9) == pytest.approx((0.1, 0.2, 0.3, 1.0))
    # A pixel box over the full image is exactly the unit square.
    assert to_unit_box([0, 0, 64, 48], "pixel", 64, 48) == (0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "box, problem",
    [
        ([0, 0, 65, 10], "outside"),
        ([-1, 0, 10, 10], "outside"),
        ([10, 10, 10, 20], "zero area"),
        ([10, 20, 30, 5], "zero area"),
        ([1, 2, 3], "4 numbers"),
        (["a", 2, 3, 4], "4 numbers"),
        ([0, 0, float("nan"), 4], "non-finite"),
    ],
)
def test_bad_boxes_name_record_and_field(box, problem):
    with pytest.raises(RecordError, match=problem) as info:
        to_unit_box(box, "pixel", 64, 64, record="r7", field="regions[1].box")
    assert info.value.record == "r7" and info.value.field == "regions[1].box"
    assert "r7" in str(info.value) and "regions[1].box" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_box_format():
    with pytest.raises(ValueError, match="box_format"):
        to_unit_box([0, 0, 1, 1], "xywh", 4, 4)


def _record(**kw):
    base = dict(
        id="x",
        source=np.zeros((8, 8, 3), np.uint8),
        instruction="do it",
        regions=(Region((0, 0, 0.5, 0.5), "a"),),
    )
    base.update(kw)
    return EditRecord(**base)


def test_validate_record():
    validate_record(_record())
    with pytest.raises(RecordError, match="instruction"):
        validate_record(_record(instruction="  "))
    with pytest.raises(RecordError, match="R_max=1"):
        validate_record(_record(regions=(Region((0, 0, 1, 1)),) * 2), r_max=1)
    with pytest.raises(RecordError, match="target"):
        validate_record(_record(target=np.zeros((4, 8, 3), np.uint8)))
    with pytest.raises(RecordError, match=r"regions\[0\].box.*4 numbers"):
        validate_record(_record(regions=(Region((0, 0, 1)),)))
    with pytest.raises(RecordError, match=r"regions\[0\].box.*outside"):
        validate_record(_record(regions=(Region((0, 0, 1.5, 1)),)))
    with pytest.raises(RecordError, match=r"regions\[0\].mask"):
        validate_record(_record(regions=(Region((0, 0, 1, 1), mask=np.zeros((3, 3), bool)),)))


def test_reader_accepts_aliases_and_masks(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (6, 10, 3), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(encode_png(img))
    mask = np.zeros((6, 10), bool)
    mask[1:3, 2:5] = True
    (tmp_path / "m.png").write_bytes(encode_png(mask))
    line = {
        "id": 5,
        "image": "a.png",
        "prompt": "edit",
        "regions": [{"bbox_2d": [200, 0, 500, 500], "mask": "m.png"}],
    }
    (tmp_path / "metadata.jsonl").write_text(json.dumps(line) + "\n\n")
    (rec,) = list(read_jsonl_folder(str(tmp_path), "qwen1000"))
    assert rec.id == "5" and rec.instruction == "edit" and rec.regions[0].label == ""
    np.testing.assert_array_equal(rec.source, img)
    np.testing.assert_array_equal(rec.regions[0].mask, mask)
    assert rec.regions[0].box == pytest.approx((0.2, 0.0, 0.5, 0.5))
    assert rec.source_bytes is not None  # PNG RGB: stored unchanged


def test_missing_metadata_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        read_jsonl_folder(str(tmp_path), "unit")


def test_bad_records_counts_only_when_skipping():
    err = RecordError("r", "f", "bad")
    with pytest.raises(RecordError):
        BadRecords(skip=False).handle(err)
    bad = BadRecords(skip=True)
    bad.handle(err)
    bad.handle(err)
    assert bad.count == 2 and bad.messages == [str(err)] * 2
