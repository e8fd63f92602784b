"""Tests for the TFDS builder and the build CLI: JSONL folder -> TFDS -> pipeline, bad input, no TF."""

import io
import json
import logging
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from sfgrpo.data import build, pipeline, shapes, tfds_builder
from sfgrpo.data.records import RecordError, encode_png

H, W = 32, 48


def _image(seed):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _jpeg(image):
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _folder(tmp_path, lines, images=3):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(images):
        (folder / f"src{i}.png").write_bytes(encode_png(_image(i)))
        (folder / f"tgt{i}.jpg").write_bytes(_jpeg(_image(100 + i)))
    (folder / "metadata.jsonl").write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    )
    return folder


GOOD = [
    {
        "id": "a",
        "source": "src0.png",
        "instruction": "make the cup red",
        "target": "tgt0.jpg",
        "regions": [{"box": [4, 8, 20, 24], "label": "cup"}, {"box": [0, 0, 48, 32], "label": "table"}],
    },
    {
        "id": "b",
        "source": "src1.png",
        "instruction": "remove the lamp",
        "regions": [{"box": [10, 2, 30, 12], "label": "lamp"}],
    },
    {"id": "c", "source": "src2.png", "instruction": "add a hat", "target": "tgt2.jpg", "regions": []},
]


def test_jsonl_folder_to_tfds_to_pipeline_round_trip(tmp_path):
    folder = _folder(tmp_path, GOOD)
    report = build.build_from_folder(str(folder), str(tmp_path / "data"), "pixel")
    assert report.num_examples == {"train": 3} and report.skipped == 0
    src = tfds_builder.load_split(str(tmp_path / "data"), "train")
    assert len(src) == 3
    assert tfds_builder.load_metadata(str(tmp_path / "data"))["box_format"] == "pixel"
    cfg = pipeline.PipelineConfig(resolution=(H, W), group_size=2, batch_size=6, r_max=3, num_epochs=1)
    batches = list(pipeline.make_iterator(src, cfg, process_index=0, process_count=1))
    assert len(batches) == 1
    batch = batches[0]
    assert sorted(set(batch["id"])) == ["a", "b", "c"]
    for row in range(0, 6, 2):
        rid = batch["id"][row]
        i = "abc".index(rid)
        line = GOOD[i]
        np.testing.assert_array_equal(batch["source"][row], _image(i))  # PNG: lossless
        assert batch["instruction"][row] == line["instruction"]
        assert bool(batch["has_target"][row]) == ("target" in line)
        if "target" in line:  # JPEG bytes are stored unchanged, so they decode exactly as the file does
            expected = np.asarray(PIL.Image.open(folder / line["target"]).convert("RGB"))
            np.testing.assert_array_equal(batch["target"][row], expected)
        else:
            assert not batch["target"][row].any()
        k = len(line["regions"])
        want = np.array([r["box"] for r in line["regions"]], np.float32).reshape(-1, 4) / [W, H, W, H]
        np.testing.assert_allclose(batch["boxes"][row, :k], want, atol=1e-6)
        assert not batch["boxes"][row, k:].any()
        assert batch["region_valid"][row].tolist() == [True] * k + [False] * (3 - k)
        assert list(batch["region_labels"][row]) == [r["label"] for r in line["regions"]] + [""] * (3 - k)
        assert not batch["has_masks"][row] and not batch["region_masks"][row].any()
        assert src[int(batch["example_index"][row])]["id"].decode() == rid


def test_shapes_build_round_trip_and_heldout(tmp_path):
    cfg = shapes.ShapesConfig(image_size=32)
    report = build.build_shapes(str(tmp_path), 6, seed=4, heldout=3, config=cfg)
    assert report.num_examples == {"train": 6, "test": 3}
    for split, n in (("train", 6), ("test", 3)):
        src = tfds_builder.load_split(str(tmp_path), split)
        got = sorted(
            (tfds_builder.example_to_record(src[i]) for i in range(n)), key=lambda r: r.meta["index"]
        )
        for i, rec in enumerate(got):
            ref = shapes.generate(i, split=split, seed=4, config=cfg)
            assert rec.id == ref.id and rec.instruction == ref.instruction and rec.meta == ref.meta
            np.testing.assert_array_equal(rec.source, ref.source)
            np.testing.assert_array_equal(rec.target, ref.target)
            for a, b in zip(rec.regions, ref.regions, strict=True):
                assert a.label == b.label and a.box == pytest.approx(b.box)
                np.testing.assert_array_equal(a.mask, b.mask)
    with pytest.raises(FileExistsError):
        build.build_shapes(str(tmp_path), 6, seed=4, config=cfg)


BAD = {
    "missing image": ({"id": "m", "source": "nope.png", "instruction": "x", "regions": []}, "'m'", "source"),
    "undecodable image": (
        {"id": "u", "source": "junk.png", "instruction": "x", "regions": []},
        "'u'",
        "source",
    ),
    "box outside": (
        {"id": "o", "source": "src0.png", "instruction": "x", "regions": [{"box": [0, 0, 49, 10]}]},
        "'o'",
        "regions[0].box",
    ),
    "zero area": (
        {"id": "z", "source": "src0.png", "instruction": "x", "regions": [{"box": [5, 5, 5, 10]}]},
        "'z'",
        "regions[0].box",
    ),
    "empty instruction": (
        {"id": "e", "source": "src0.png", "instruction": "", "regions": []},
        "'e'",
        "instruction",
    ),
    "too many regions": (
        {"id": "r", "source": "src0.png", "instruction": "x", "regions": [{"box": [0, 0, 4, 4]}] * 3},
        "'r'",
        "regions",
    ),
    "malformed line": ('{"id": "j", "source": ', "line 2", "<line>"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_record_and_field(tmp_path, case):
    line, record, field = BAD[case]
    folder = _folder(tmp_path, [GOOD[1], line])
    (folder / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(RecordError) as info:
        build.build_from_folder(str(folder), str(tmp_path / "data"), "pixel", r_max=2)
    assert info.value.field == field
    assert record in str(info.value) and repr(field) in str(info.value)


def test_skip_bad_records_counts_and_reports(tmp_path, caplog):
    folder = _folder(tmp_path, [GOOD[0]] + [BAD[c][0] for c in BAD] + [GOOD[1]])
    (folder / "junk.png").write_bytes(b"\x89PNG broken")
    with caplog.at_level(logging.WARNING):
        report = build.build_from_folder(
            str(folder), str(tmp_path / "data"), "pixel", r_max=2, skip_bad_records=True
        )
    assert report.skipped == len(BAD) and len(report.skipped_messages) == len(BAD)
    assert report.num_examples == {"train": 2}
    assert tfds_builder.load_metadata(str(tmp_path / "data"))["skipped_bad_records"] == len(BAD)
    assert sum("skipping bad record" in r.message for r in caplog.records) == len(BAD)
    assert len(tfds_builder.load_split(str(tmp_path / "data"), "train")) == 2


def test_duplicate_ids_are_bad_records(tmp_path):
    folder = _folder(tmp_path, [GOOD[1], GOOD[1]])
    with pytest.raises(RecordError, match="duplicate"):
        build.build_from_folder(str(folder), str(tmp_path / "data"), "pixel")


def test_cli_in_process(tmp_path, capsys):
    folder = _folder(tmp_path, GOOD)
    argv = [
        "--input",
        str(folder),
        "--output",
        str(tmp_path / "d"),
        "--box-format",
        "pixel",
        "--split",
        "eval",
    ]
    report = build.main(argv)
    assert report.num_examples == {"eval": 3}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_examples"] == {"eval": 3}
    with pytest.raises(SystemExit):  # --box-format must be explicit
        build.main(["--input", str(folder), "--output", str(tmp_path / "e")])
    with pytest.raises(SystemExit):  # --input and --shapes exclude each other
        build.main(["--input", str(folder), "--shapes", "3", "--output", str(tmp_path / "e")])


def test_cli_subprocess_without_tensorflow(tmp_path):
    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "sfgrpo.data.build", "--shapes", "5", "--seed", "2", "--image-size", "32"]
    run = subprocess.run([*cmd, "--output", str(out)], capture_output=True, text=True, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1])["num_examples"] == {"train": 5, "test": 1}
    read = (
        "import sys, tensorflow_datasets as tfds; from sfgrpo.data import build;"
        f"build.build_shapes({str(tmp_path / 'e')!r}, 3, 0);"
        f"s = tfds.data_source('sfgrpo_edit', data_dir={str(out)!r}, split='train'); s[0];"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'; print(len(s))"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", read], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
        == "5"
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text(
        '{"id": "q", "source": "gone.png", "instruction": "x", "regions": []}\n'
    )
    run = subprocess.run(
        [*cmd[:3], "--input", str(bad), "--box-format", "unit", "--output", str(tmp_path / "f")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "record 'q'" in run.stderr and "'source'" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "f").exists()  # the partial build is removed
