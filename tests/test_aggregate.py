"""sfgrpo.evaluation.aggregate: the summary of a hand-computed table (per task type, the unweighted mean over
types, per language, scores, failures), summary.md, and reading scores.jsonl with a torn last line."""

import json
import logging
import math

import pytest

from sfgrpo.evaluation.aggregate import read_rows, summarize, write_summary_md


def row(key, task_type, language, overall, scores=None, seed=0, reason=None):
    failure = None if reason is None else {"reason": reason, "message": f"{key}: {reason}"}
    return {
        "key": key,
        "seed": seed,
        "task_type": task_type,
        "language": language,
        "instruction": f"edit {key}",
        "source": f"images/{key}_source.png",
        "edit": f"images/{key}_seed{seed}.png",
        "scores": scores or {},
        "overall": overall,
        "failure": failure,
        "judge": {"answers": {}},
    }


# 'add' has one row (8), 'remove' three scored rows (2, 4, 6) and a failed one: the unweighted mean over types
# is (8 + 4) / 2 = 6, the plain row mean (8 + 2 + 4 + 6) / 4 = 5.
TABLE = [
    row("a1", "add", "en", 8.0, {"sc": 9.0, "pq": 7.0}),
    row("r1", "remove", "en", 2.0, {"sc": 1.0, "pq": 4.0}),
    row("r2", "remove", "zh", 4.0, {"sc": 3.0, "pq": 4.0}),
    row("r3", "remove", "zh", 6.0, {"sc": 5.0, "pq": 4.0}),
    row("r4", "remove", "zh", None, reason="unparsable"),
]
META = {"policy": {"workdir": "/runs/x", "step": 100}, "judge": {"model": "qwen-vl", "temperature": 0.0}}


def test_macro_mean_over_task_types_differs_from_row_mean():
    s = summarize(TABLE, protocol="viescore", meta=META)
    assert s["by_task_type"] == {"add": 8.0, "remove": 4.0}
    assert s["overall"] == pytest.approx(6.0)
    assert s["overall_row_mean"] == pytest.approx(5.0)
    assert s["n"] == 5 and s["n_scored"] == 4
    assert s["counts_by_task_type"] == {"add": {"n": 1, "n_scored": 1}, "remove": {"n": 4, "n_scored": 3}}
    assert s["protocol"] == "viescore" and s["policy"] == META["policy"] and s["judge"] == META["judge"]
    json.dumps(s)  # summary.json must serialise


def test_scores_are_aggregated_like_the_overall():
    s = summarize(TABLE, protocol="viescore", meta={})
    assert s["scores"]["sc"] == {"overall": pytest.approx(6.0), "by_task_type": {"add": 9.0, "remove": 3.0}}
    assert s["scores"]["pq"]["overall"] == pytest.approx(5.5)


def test_per_language_uses_that_languages_rows_and_types():
    s = summarize(TABLE, protocol="viescore", meta={})
    en, zh = s["by_language"]["en"], s["by_language"]["zh"]
    assert en["by_task_type"] == {"add": 8.0, "remove": 2.0} and en["overall"] == pytest.approx(5.0)
    # zh has no 'add' row: its overall is over the one type it has.
    assert zh["by_task_type"] == {"remove": 5.0} and zh["overall"] == pytest.approx(5.0)
    assert (en["n"], en["n_scored"], zh["n"], zh["n_scored"]) == (2, 2, 3, 2)
    assert zh["scores"]["sc"]["overall"] == pytest.approx(4.0)


def test_failures_are_counted_and_never_scored():
    rows = [*TABLE, row("r5", "remove", "en", None, reason="out_of_range"), row("r6", "remove", "en", None)]
    s = summarize(rows, protocol="viescore", meta={})
    assert s["by_task_type"]["remove"] == 4.0  # not pulled towards 0 by a default score
    assert s["failures"] == {
        "total": 3,
        "by_reason": {"out_of_range": 1, "unparsable": 1, "unspecified": 1},
        "task_types_without_scores": [],
    }


def test_a_task_type_without_scored_rows_nulls_the_overall():
    rows = [
        *TABLE,
        row("s1", "style", "en", None, reason="endpoint"),
        row("s2", "style", "zh", None, reason="endpoint"),
    ]
    s = summarize(rows, protocol="viescore", meta={})
    assert s["by_task_type"]["style"] is None
    assert s["overall"] is None and s["scores"]["sc"]["overall"] is None
    assert s["overall_row_mean"] == pytest.approx(5.0)
    assert s["failures"]["task_types_without_scores"] == ["style"]
    assert s["failures"]["by_reason"] == {"endpoint": 2, "unparsable": 1}
    assert s["by_language"]["en"]["overall"] is None


@pytest.mark.parametrize(
    "bad, message",
    [
        ({**TABLE[0], "failure": {"reason": "x", "message": ""}}, "has an overall"),
        ({**TABLE[0], "overall": math.nan}, "finite number"),
        ({**TABLE[0], "overall": "8"}, "finite number"),
        ({k: v for k, v in TABLE[0].items() if k != "task_type"}, "has no 'task_type'"),
        ({**TABLE[1], "key": "a1"}, "appears twice"),
    ],
)
def test_rows_breaking_the_schema_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        summarize([TABLE[0], bad], protocol="viescore", meta={})


def test_meta_cannot_replace_a_computed_key():
    with pytest.raises(ValueError, match=r"meta: keys \['overall'\]"):
        summarize(TABLE, protocol="viescore", meta={"overall": 10.0})


def test_summary_md(tmp_path):
    rows = [*TABLE, row("s1", "style", "en", None, reason="endpoint")]
    s = summarize(rows, protocol="viescore", meta=META)
    write_summary_md(s, tmp_path / "summary.md")
    md = (tmp_path / "summary.md").read_text()
    assert "# Evaluation: viescore" in md and "qwen-vl" in md and "/runs/x" in md
    assert "**Overall: –**" in md and "Task types without a scored row: style" in md
    assert "| remove | 4 | 3 | 4.000 | 4.000 | 3.000 |" in md  # n, scored, overall, pq, sc
    assert "## Language: en" in md and "## Language: zh" in md
    assert "| endpoint | 1 |" in md and "| unparsable | 1 |" in md
    write_summary_md(summarize(TABLE[:2], protocol="viescore", meta={}), tmp_path / "one.md")
    one = (tmp_path / "one.md").read_text()
    assert "**Overall: 5.000**" in one and "## Language" not in one and "None." in one


def test_read_rows_ignores_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "scores.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in TABLE[:3])
    path.write_text(text + json.dumps(TABLE[3])[:40])
    with caplog.at_level(logging.WARNING):
        rows = read_rows(path)
    assert rows == TABLE[:3]
    assert "line 4 is torn" in caplog.text
    path.write_text(text + "\n")  # a blank line is not a row
    assert read_rows(path) == TABLE[:3]


def test_read_rows_refuses_a_corrupt_line_in_the_middle(tmp_path):
    path = tmp_path / "scores.jsonl"
    lines = [json.dumps(TABLE[0]), json.dumps(TABLE[1])[:30], json.dumps(TABLE[2])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not valid JSON"):
        read_rows(path)
    path.write_text(json.dumps(TABLE[0]) + "\n[1, 2]\n" + json.dumps(TABLE[1]) + "\n")
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        read_rows(path)
