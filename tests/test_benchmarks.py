"""sfgrpo.evaluation.benchmarks: every benchmark format into examples, with named errors for bad records."""

import json

import numpy as np
import PIL.Image
import pytest
from helpers import tiny_config

from sfgrpo.data.records import RecordError
from sfgrpo.data.tfds_builder import write_dataset
from sfgrpo.evaluation import benchmarks
from sfgrpo.evaluation.benchmarks import BenchmarkError, read_benchmark


def _png(path, seed, size=(48, 64)):
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def _gedit(folder, rows=None):
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows or [
        {"key": "a1", "task_type": "color_alter", "instruction": "make it red", "instruction_language": "en"},
        {
            "key": "a2",
            "task_type": "color_alter",
            "instruction": "把它变成红色",
            "instruction_language": "cn",
        },
        {
            "key": "b1",
            "task_type": "subject-remove",
            "instruction": "remove the cat",
            "instruction_language": "en",
        },
    ]
    for i, row in enumerate(rows):
        if "input_image" not in row:
            _png(folder / f"{row['key']}.png", i)
            row["input_image"] = f"{row['key']}.png"
    (folder / "gedit.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return folder


def test_gedit_folder(tmp_path):
    folder = _gedit(tmp_path / "gedit")
    bench = read_benchmark(str(folder))
    assert bench.format == "gedit"
    assert [e.key for e in bench.examples] == ["a1", "a2", "b1"]
    assert [e.language for e in bench.examples] == ["en", "cn", "en"]
    assert bench.describe()["task_types"] == {"color_alter": 2, "subject-remove": 1}
    source = np.asarray(PIL.Image.open(folder / "a2.png").convert("RGB"))
    np.testing.assert_array_equal(bench.examples[1].source, source)
    assert bench.examples[1].instruction == "把它变成红色"
    assert bench.examples[0].boxes.shape == (0, 4)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"task_type": ""}, "task_type"),
        ({"instruction_language": None}, "instruction_language"),
        ({"input_image": "missing.png"}, "input_image"),
    ],
)
def test_gedit_bad_record_names_the_record_and_field(tmp_path, change, field):
    rows = [{"key": "k0", "task_type": "t", "instruction": "do it", "instruction_language": "en"}]
    _png(tmp_path / "k0.png", 0)
    rows[0]["input_image"] = "k0.png"
    rows[0].update(change)
    folder = _gedit(tmp_path, rows)
    with pytest.raises(RecordError, match=rf"'k0'.*gedit.jsonl line 1.*{field}"):
        read_benchmark(str(folder))


def test_imgedit_table(tmp_path):
    (tmp_path / "animal").mkdir()
    _png(tmp_path / "animal" / "001.jpg.png", 1)
    table = {
        "7": {"id": "animal/001.jpg.png", "prompt": "add a hat", "edit_type": "add"},
        "9": {"id": "animal/001.jpg.png", "prompt": "remove the dog", "edit_type": "remove"},
    }
    (tmp_path / "basic_edit.json").write_text(json.dumps(table))
    for path in (tmp_path, tmp_path / "basic_edit.json"):
        bench = read_benchmark(str(path))
        assert bench.format == "imgedit"
        assert [(e.key, e.task_type, e.instruction) for e in bench.examples] == [
            ("7", "add", "add a hat"),
            ("9", "remove", "remove the dog"),
        ]
    table["9"].pop("edit_type")
    (tmp_path / "basic_edit.json").write_text(json.dumps(table))
    with pytest.raises(RecordError, match="'9'.*edit_type"):
        read_benchmark(str(tmp_path))


def test_record_folder_and_its_tfds_build_agree(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    lines = []
    for i, (task, lang) in enumerate([("recolour", "en"), ("remove", None), (None, None)]):
        _png(folder / f"s{i}.png", i, size=(40, 40))
        meta = {k: v for k, v in (("task_type", task), ("language", lang)) if v is not None}
        regions = [{"box": [4, 4, 20, 30], "label": f"thing {i}"}]
        lines.append({"id": f"r{i}", "source": f"s{i}.png", "instruction": f"edit {i}", "regions": regions,
                      "meta": meta})  # fmt: skip
    (folder / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(BenchmarkError, match="--box-format"):
        read_benchmark(str(folder))
    bench = read_benchmark(str(folder), box_format="pixel")
    assert bench.format == "records"
    assert [e.task_type for e in bench.examples] == ["recolour", "remove", benchmarks.UNTYPED]
    assert [e.language for e in bench.examples] == ["en", "und", "und"]
    np.testing.assert_allclose(bench.examples[0].boxes, [[0.1, 0.1, 0.5, 0.75]])
    assert bench.examples[0].labels == ("thing 0",)

    from sfgrpo.data.records import read_jsonl_folder

    data_dir = tmp_path / "tfds"
    records = list(read_jsonl_folder(str(folder), "pixel"))
    write_dataset(str(data_dir), {"test": lambda: records}, metadata={"box_format": "pixel"})
    built = read_benchmark(str(data_dir))
    assert built.format == "tfds"
    assert built.sha256 == bench.sha256  # the same examples, read from the dataset
    assert read_benchmark(f"{data_dir}:test").sha256 == bench.sha256
    with pytest.raises(BenchmarkError, match="no 'train' split"):
        read_benchmark(f"{data_dir}:train")


def test_shapes_split_of_a_run():
    config = tiny_config()
    bench = read_benchmark("shapes:test", run_config=config)
    assert len(bench.examples) == config.data.shapes_eval
    e = bench.examples[0]
    assert e.target is not None and e.masks is not None and e.masks.shape[0] == len(e.labels) >= 1
    assert all(set(x.task_type.split("+")) <= {"recolour", "remove"} for x in bench.examples)
    with pytest.raises(BenchmarkError, match="--workdir"):
        read_benchmark("shapes:test")
    with pytest.raises(BenchmarkError, match="shapes:train or shapes:test"):
        read_benchmark("shapes:eval", run_config=config)
    # shapes:test:N: the run's held-out examples first, then new ones of the same task; the config is kept.
    n = config.data.shapes_eval
    more = read_benchmark(f"shapes:test:{n + 5}", run_config=config)
    assert len(more.examples) == n + 5 and config.data.shapes_eval == n
    assert [e.key for e in more.examples[:n]] == [e.key for e in bench.examples]
    for old, new in zip(bench.examples, more.examples[:n], strict=True):
        assert new.instruction == old.instruction and (new.source == old.source).all()
    train_keys = {e.key for e in read_benchmark("shapes:train", run_config=config).examples}
    assert not train_keys & {e.key for e in more.examples}
    assert len(read_benchmark("shapes:test:3", run_config=config).examples) == 3
    for bad in ("shapes:test:0", "shapes:test:many", "shapes:test:4:5"):
        with pytest.raises(BenchmarkError, match=bad):
            read_benchmark(bad, run_config=config)


def test_hash_selection_and_errors(tmp_path):
    folder = _gedit(tmp_path / "g")
    full = read_benchmark(str(folder))
    assert read_benchmark(str(folder)).sha256 == full.sha256
    only = read_benchmark(str(folder), task_types=["subject-remove"])
    assert [e.key for e in only.examples] == ["b1"] and only.sha256 != full.sha256
    assert [e.key for e in read_benchmark(str(folder), limit=2).examples] == ["a1", "a2"]
    with pytest.raises(BenchmarkError, match=r"\['nope'\].*color_alter"):
        read_benchmark(str(folder), task_types=["nope"])
    _png(folder / "a1.png", 99)  # other pixels: another benchmark
    assert read_benchmark(str(folder)).sha256 != full.sha256

    dup = tmp_path / "dup"
    _gedit(dup, [{"key": "x", "task_type": "t", "instruction": "i", "instruction_language": "en"}] * 2)
    with pytest.raises(RecordError, match="'x'.*duplicate"):
        read_benchmark(str(dup))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkError, match="holds no benchmark"):
        read_benchmark(str(tmp_path / "empty"))
    with pytest.raises(BenchmarkError, match="does not exist"):
        read_benchmark(str(tmp_path / "nowhere"))
