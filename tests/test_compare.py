"""sfgrpo.evaluation.compare: paired deltas on tables with known results (constant deltas, a hand-computed
macro mean over two task types of different sizes, seeds resampled together), refusals, failed pairs left
out and counted, and the files written (a valid PNG)."""

import json

import numpy as np
import pytest
from PIL import Image

from sfgrpo.evaluation.aggregate import summarize
from sfgrpo.evaluation.compare import compare


def row(key, seed, task_type, overall, scores=None):
    failed = overall is None
    return {
        "key": key,
        "seed": seed,
        "task_type": task_type,
        "language": "en",
        "instruction": f"edit {key}",
        "source": f"images/{key}_source.png",
        "edit": f"images/{key}_seed{seed}.png",
        "scores": {} if failed else (scores if scores is not None else {"sc": overall}),
        "overall": overall,
        "failure": {"reason": "unparsable", "message": ""} if failed else None,
        "judge": {"answers": {}},
    }


def write_eval(path, rows, protocol="viescore", **meta):
    path.mkdir(parents=True)
    (path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps(summarize(rows, protocol=protocol, meta=meta)))
    return path


def table(deltas, base=5.0):
    """Rows of A and B: deltas = {task type: {key: [B − A per seed]}}; A's overall is base + the seed."""
    a, b = [], []
    for task_type, examples in deltas.items():
        for key, per_seed in examples.items():
            for seed, d in enumerate(per_seed):
                a.append(row(key, seed, task_type, base + seed))
                b.append(row(key, seed, task_type, None if d is None else base + seed + d))
    return a, b


def run(tmp_path, rows_a, rows_b, **kw):
    dir_a = write_eval(tmp_path / "base", rows_a)
    dir_b = write_eval(tmp_path / "tuned", rows_b)
    return compare(dir_a, dir_b, n_boot=kw.pop("n_boot", 500), **kw), dir_a, dir_b


def test_constant_deltas_give_zero_width_intervals_at_the_delta(tmp_path):
    a, b = table(
        {"add": {"a1": [1.5, 1.5], "a2": [1.5, 1.5]}, "remove": {f"r{i}": [1.5, 1.5] for i in range(3)}}
    )
    res, _, _ = run(tmp_path, a, b)
    for s in [*res["by_task_type"].values(), res["overall"], res["scores"]["sc"]["overall"]]:
        assert s["delta"] == pytest.approx(1.5)
        assert s["ci95"] == pytest.approx([1.5, 1.5])
    assert res["overall"]["improved"] == 5 and res["overall"]["worsened"] == res["overall"]["tied"] == 0
    assert res["n_pairs"] == 10 and res["excluded"]["total"] == 0


def test_macro_mean_over_task_types_of_different_sizes(tmp_path):
    # add: 2 examples, mean delta (2 + 2 + 0 + 0) / 4 = 1; remove: 4 examples, (3+3 + 3 * (1+1)) / 8 = 1.5.
    # The macro mean is (1 + 1.5) / 2 = 1.25 (the mean over all 12 pairs would be 16 / 12).
    deltas = {
        "add": {"a1": [2, 2], "a2": [0, 0]},
        "remove": {"r1": [3, 3], **{f"r{i}": [1, 1] for i in (2, 3, 4)}},
    }
    a, b = table(deltas)
    res, _, _ = run(tmp_path, a, b)
    assert res["by_task_type"]["add"]["delta"] == pytest.approx(1.0)
    assert res["by_task_type"]["remove"]["delta"] == pytest.approx(1.5)
    assert res["overall"]["delta"] == pytest.approx(1.25)
    # A's rows are 5 (seed 0) and 6 (seed 1) everywhere: 5.5 per type; B's = A's + the type's delta.
    assert res["overall"]["a"] == pytest.approx(5.5) and res["overall"]["b"] == pytest.approx(6.75)
    add = res["by_task_type"]["add"]
    assert (add["n_pairs"], add["n_examples"], add["improved"], add["worsened"], add["tied"]) == (
        4,
        2,
        1,
        0,
        1,
    )
    lo, hi = res["by_task_type"]["remove"]["ci95"]
    assert 1.0 <= lo < 1.5 < hi <= 3.0  # the bootstrap means lie between the smallest and largest example
    lo, hi = res["overall"]["ci95"]
    assert lo < 1.25 < hi


def test_seeds_of_an_example_are_resampled_together(tmp_path):
    # Each example's two seeds cancel: resampled together every replicate's mean is 0 (a zero-width
    # interval); resampled independently, seeds would not cancel and the interval would be wide.
    a, b = table({"add": {f"a{i}": [d, -d] for i, d in enumerate([1.0, 3.0, 5.0, 2.0])}})
    res, _, _ = run(tmp_path, a, b)
    s = res["by_task_type"]["add"]
    assert s["delta"] == pytest.approx(0.0) and s["ci95"] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert s["tied"] == 4


def test_deterministic_for_a_seed(tmp_path):
    a, b = table({"add": {f"a{i}": [d, d / 2] for i, d in enumerate([1.0, -3.0, 5.0, 2.0, 0.5])}})
    dir_a, dir_b = write_eval(tmp_path / "a", a), write_eval(tmp_path / "b", b)
    first = compare(dir_a, dir_b, tmp_path / "one", n_boot=300, seed=1)
    assert compare(dir_a, dir_b, tmp_path / "two", n_boot=300, seed=1) == first
    assert (
        compare(dir_a, dir_b, tmp_path / "three", n_boot=300, seed=2)["overall"]["ci95"]
        != first["overall"]["ci95"]
    )


def test_failed_pairs_are_left_out_and_counted(tmp_path):
    a, b = table(
        {"add": {"a1": [1.0, 1.0], "a2": [2.0, None]}, "remove": {"r1": [4.0, 4.0], "r2": [None, None]}}
    )
    a[0] = row("a1", 0, "add", None)  # A failed a1/0
    a[6] = row("r2", 0, "remove", None)  # both failed r2/0
    res, _, _ = run(tmp_path, a, b)
    assert res["excluded"] == {"total": 4, "a_failed": 1, "b_failed": 2, "both_failed": 1}
    assert res["n_pairs"] == 4
    assert res["by_task_type"]["add"]["delta"] == pytest.approx(1.5)  # a1/1 (+1) and a2/0 (+2)
    assert res["by_task_type"]["remove"]["delta"] == pytest.approx(4.0)  # r1 only
    assert res["by_task_type"]["remove"]["ci95"] is None  # one example: no spread to resample
    assert res["overall"]["delta"] == pytest.approx(2.75)


def test_a_task_type_without_pairs_nulls_the_overall(tmp_path):
    a, b = table({"add": {"a1": [1.0], "a2": [2.0]}, "remove": {"r1": [None]}})
    res, _, _ = run(tmp_path, a, b)
    assert res["by_task_type"]["remove"]["delta"] is None
    assert res["overall"]["delta"] is None and res["overall"]["ci95"] is None
    assert res["by_task_type"]["add"]["delta"] == pytest.approx(1.5)


def test_only_common_scores_are_compared(tmp_path):
    a = [row("a1", 0, "add", 5.0, {"sc": 4.0, "pq": 6.0}), row("a2", 0, "add", 5.0, {"sc": 4.0, "pq": 6.0})]
    b = [row("a1", 0, "add", 6.0, {"sc": 5.0}), row("a2", 0, "add", 7.0, {"sc": 7.0})]
    res, _, _ = run(tmp_path, a, b)
    assert list(res["scores"]) == ["sc"]
    assert res["scores"]["sc"]["overall"]["delta"] == pytest.approx(2.0)


def test_files_are_written(tmp_path):
    a, b = table(
        {"add": {"a1": [1.0, 0.5], "a2": [-1.0, 0.0]}, "remove": {"r1": [0.0, 2.0], "r2": [1.0, 1.0]}}
    )
    res, _, dir_b = run(tmp_path, a, b)
    out = dir_b / "compare_vs_base"
    assert json.loads((out / "compare.json").read_text()) == res
    md = (out / "compare.md").read_text()
    assert "| add | 4 | 2 | 5.500 | 5.625 | +0.125 |" in md and "**overall (macro)**" in md
    assert "Left out (a side failed): 0 pairs" in md
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "compare.png") as im:
        im.load()
        assert im.size[0] > 100 and im.size[1] > 100
        assert np.asarray(im.convert("L")).std() > 0  # something is drawn


def test_different_protocols_are_refused(tmp_path):
    a, b = table({"add": {"a1": [1.0]}})
    dir_a = write_eval(tmp_path / "a", a, protocol="viescore")
    dir_b = write_eval(tmp_path / "b", b, protocol="imgedit")
    with pytest.raises(
        ValueError, match=rf"cannot compare {dir_a} \(A\) with {dir_b} \(B\): protocols differ"
    ):
        compare(dir_a, dir_b)


def test_different_benchmarks_are_refused(tmp_path):
    a, b = table({"add": {"a1": [1.0]}})
    dir_a = write_eval(tmp_path / "a", a, benchmark={"name": "gedit", "sha256": "aa"})
    dir_b = write_eval(tmp_path / "b", b, benchmark={"name": "gedit", "sha256": "bb"})
    with pytest.raises(ValueError, match="benchmark sha256 differs"):
        compare(dir_a, dir_b)


def test_different_key_sets_are_refused(tmp_path):
    a, b = table({"add": {"a1": [1.0, 1.0], "a2": [1.0, 1.0]}})
    b = [r for r in b if r["key"] != "a2" or r["seed"] != 1] + [
        row("a3", 0, "add", 1.0),
        row("a4", 0, "add", 1.0),
    ]
    dir_a, dir_b = write_eval(tmp_path / "a", a), write_eval(tmp_path / "b", b)
    with pytest.raises(ValueError, match=r"1 only in A \(e.g. \('a2', 1\)\), 2 only in B \(e.g. \('a3', 0\)"):
        compare(dir_a, dir_b)


def test_a_folder_without_scores_is_refused(tmp_path):
    a, _ = table({"add": {"a1": [1.0]}})
    dir_a = write_eval(tmp_path / "a", a)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: has no scores.jsonl"):
        compare(dir_a, tmp_path / "empty")
