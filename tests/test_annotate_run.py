"""Tests for the annotator's work on a folder: what each output line holds, kept and failed records, files."""

import json
import os

import numpy as np
import pytest

from sfgrpo.data import annotate, annotate_run, shapes
from sfgrpo.data.records import encode_png, read_jsonl_folder, to_unit_box


def shapes_folder(folder, n, *, split="train", size=32, seed=0, lines=None):
    """Writes ``n`` shapes examples as a record folder without regions; returns the records. ``lines``
    (index -> dict) changes or extends single lines."""
    folder = str(folder)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    records = list(
        shapes.ShapesSource(n, split=split, seed=seed, config=shapes.ShapesConfig(image_size=size))
    )
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i, rec in enumerate(records):
            src, tgt = f"img/{i}.png", f"img/{i}_target.png"
            with open(os.path.join(folder, src), "wb") as g:
                g.write(encode_png(rec.source))
            with open(os.path.join(folder, tgt), "wb") as g:
                g.write(encode_png(rec.target))
            line = {"id": rec.id, "source": src, "instruction": rec.instruction, "target": tgt}
            line.update((lines or {}).get(i, {}))
            f.write(json.dumps(line) + "\n")
    return records


def _run(tmp_path, *extra, method="diff", box_format="pixel"):
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--method", method]
    return annotate.main([*argv, "--box-format", box_format, *extra])


def _lines(folder):
    return [json.loads(t) for t in open(os.path.join(folder, "metadata.jsonl"))]


@pytest.mark.parametrize("box_format", ["pixel", "unit", "qwen1000"])
def test_box_conversions_read_back_as_the_same_box(box_format):
    w, h = 48, 32
    unit = to_unit_box(annotate_run.pixel_box_to((3, 5, 40, 31), box_format, w, h), box_format, w, h)
    x1, y1, x2, y2 = (3 / w, 5 / h, 40 / w, 31 / h)
    if box_format == "qwen1000":  # rounded outwards on the grid: still covers every pixel
        assert unit[0] <= x1 and unit[1] <= y1 and unit[2] >= x2 and unit[3] >= y2
        assert np.allclose(unit, (x1, y1, x2, y2), atol=1e-3)
    else:
        assert np.allclose(unit, (x1, y1, x2, y2), atol=1e-12)
    grid = (125, 250, 500, 1000)
    back = to_unit_box(annotate_run.grid_box_to(grid, box_format, w, h), box_format, w, h)
    assert np.allclose(back, np.asarray(grid) / 1000, atol=1e-12)


def test_output_lines_kept_records_and_copied_files(tmp_path):
    kept = {"regions": [{"bbox": [1, 2, 10, 12], "label": "kept"}], "meta": {"source_set": "x"}}
    recs = shapes_folder(tmp_path / "in", 4, lines={1: kept, 3: {"meta": {"keep": 1}}})
    # Line 3 has no id (it is line3, written out so that skipping lines cannot renumber it); line 4 uses
    # the 'prompt' alias and a source outside the input folder (referred to, not copied).
    meta = tmp_path / "in" / "metadata.jsonl"
    lines = [json.loads(t) for t in meta.read_text().splitlines()]
    del lines[2]["id"]
    lines[3]["prompt"] = lines[3].pop("instruction")
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(encode_png(recs[3].source))
    lines[3]["source"] = str(elsewhere)
    meta.write_text("".join(json.dumps(x) + "\n" for x in lines))

    report = _run(tmp_path)
    assert (report.annotated, report.kept, report.failed, report.written) == (3, 1, 0, 4)
    out = _lines(tmp_path / "out")
    assert [o["id"] for o in out] == [recs[0].id, recs[1].id, "line3", recs[3].id]
    assert out[1]["regions"] == [{"bbox": [1, 2, 10, 12], "label": "kept"}]  # as it was, alias and all
    assert out[1]["meta"] == {"source_set": "x"}
    assert out[3]["meta"]["keep"] == 1 and out[3]["meta"]["annotation"]["method"] == "diff"
    assert out[3]["prompt"] == recs[3].instruction and out[3]["source"] == str(elsewhere)
    for o in out[:3]:
        assert (tmp_path / "out" / o["source"]).read_bytes() == (tmp_path / "in" / o["source"]).read_bytes()
    for o in (out[0], out[2], out[3]):
        ann = o["meta"]["annotation"]
        assert len(ann["confidence"]) == len(o["regions"]) == len(ann["changed_px"])
        assert all(
            r["label"].startswith("changed area") and r["mask"].startswith("annotate_masks/")
            for r in o["regions"]
        )
    # The output builds: every record reads back, with its masks.
    back = list(read_jsonl_folder(str(tmp_path / "out"), "pixel"))
    assert len(back) == 4 and back[0].has_masks and not back[1].has_masks
    union = lambda regions: np.any([r.mask for r in regions], axis=0)  # noqa: E731
    np.testing.assert_array_equal(union(back[0].regions), union(recs[0].regions))


def test_overwrite_reannotates_kept_records(tmp_path):
    shapes_folder(tmp_path / "in", 2, lines={0: {"regions": [{"box": [0, 0, 5, 5], "label": "old"}]}})
    report = _run(tmp_path, "--overwrite")
    assert report.kept == 0 and report.annotated == 2
    assert _lines(tmp_path / "out")[0]["regions"][0]["label"] == "changed area 1"


def test_failures_are_reported_and_skipped_only_when_asked(tmp_path):
    shapes_folder(
        tmp_path / "in",
        5,
        lines={1: {"target": None}, 2: {"source": "img/missing.png"}, 3: {"id": "shapes-train-0-0"}},
    )
    with open(tmp_path / "in" / "metadata.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(annotate_run.AnnotateError, match=r"4 of 6 records failed .*--skip-failed"):
        _run(tmp_path)
    assert not (tmp_path / "out" / "metadata.jsonl").exists()
    failures = [json.loads(t) for t in open(tmp_path / "out" / "failures.jsonl")]
    assert [(f["id"], f["line"], f["reason"]) for f in failures] == [
        ("shapes-train-0-1", 2, "no_target"),
        ("shapes-train-0-2", 3, "bad_record"),
        ("shapes-train-0-0", 4, "duplicate_id"),
        ("line6", 6, "bad_record"),
    ]
    assert "'source'" in failures[1]["message"] and "malformed JSON" in failures[3]["message"]
    report = _run(tmp_path, "--skip-failed", "--preview", "2")
    assert (report.written, report.failed) == (2, 4)
    assert report.failures == {"no_target": 1, "bad_record": 2, "duplicate_id": 1}
    assert [o["id"] for o in _lines(tmp_path / "out")] == ["shapes-train-0-0", "shapes-train-0-4"]
    assert (tmp_path / "out" / "preview.png").stat().st_size > 0


def test_a_rerun_that_fails_leaves_no_stale_metadata(tmp_path):
    shapes_folder(tmp_path / "in", 2)
    _run(tmp_path)
    assert (tmp_path / "out" / "metadata.jsonl").exists()
    with open(tmp_path / "in" / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"id": "new", "source": "img/0.png", "instruction": "x"}) + "\n")  # no target
    with pytest.raises(annotate_run.AnnotateError, match="1 of 3 records failed"):
        _run(tmp_path)
    assert not (tmp_path / "out" / "metadata.jsonl").exists()
