"""Rows -> the evaluation's summary (``summary.json``) and its readable page (``summary.md``).

The averaging rule is GEdit-Bench's (VIEScore): the rows of each task type are averaged, then the overall is
the unweighted mean over task types, so a type with few examples weighs as much as a large one. Per
language, the same over that language's rows and the task types it has. Every numeric score name is
aggregated the same way.

Failed rows (``overall`` null) are left out of every mean and counted in ``failures`` by reason; they never
get a default score. A task type whose rows all failed has a null mean, and then the overall is null too
(and so is each score's): a macro mean over fewer task types would silently be another benchmark's number.
The types are listed in ``failures["task_types_without_scores"]``.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

# The keys summarize computes; meta may not override them.
_COMPUTED = (
    "protocol",
    "overall",
    "overall_row_mean",
    "by_task_type",
    "counts_by_task_type",
    "by_language",
    "n",
    "n_scored",
    "failures",
    "scores",
)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a score may be."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def macro_mean(per_type: Mapping[str, float | None]) -> float | None:
    """The unweighted mean over task types; None when there is no type or any type's mean is None."""
    if not per_type or any(v is None for v in per_type.values()):
        return None
    return _mean(list(per_type.values()))


def check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """Raises ValueError naming the row when a row breaks the schema of ``sfgrpo.evaluation``: a missing
    key, task type or language; an overall that is not a finite number or null; an overall alongside a
    failure; a repeated (key, seed)."""
    seen: set[tuple[str, int]] = set()
    for i, row in enumerate(rows):
        name = f"row {i} (key {row.get('key')!r}, seed {row.get('seed')!r})"
        for field in ("key", "seed", "task_type", "language", "overall"):
            if field not in row:
                raise ValueError(f"{name}: has no {field!r}")
        if not isinstance(row["task_type"], str) or not isinstance(row["language"], str):
            raise ValueError(f"{name}: task_type and language must be strings")
        overall = row["overall"]
        if overall is not None and not is_number(overall):
            raise ValueError(f"{name}: overall must be a finite number or null, got {overall!r}")
        if overall is not None and row.get("failure"):
            raise ValueError(f"{name}: has an overall ({overall}) and a failure {row['failure']!r}")
        pair = (row["key"], row["seed"])
        if pair in seen:
            raise ValueError(f"{name}: (key, seed) appears twice; a row is one (example, seed)")
        seen.add(pair)


def failure_reason(row: Mapping[str, Any]) -> str:
    """A failed row's reason; 'unspecified' when the row is null without a failure record."""
    failure = row.get("failure") or {}
    return str(failure.get("reason") or "unspecified")


def type_means(rows: Sequence[Mapping[str, Any]], score: str | None = None) -> dict[str, float | None]:
    """{task type: mean over its scored rows} of ``overall`` (``score`` None) or of ``scores[score]``.

    Every task type in ``rows`` is a key, sorted; its value is None when none of its scored rows has the
    value (all failed, or the score is not given for that type).
    """
    values: dict[str, list[float]] = {t: [] for t in sorted({r["task_type"] for r in rows})}
    for r in rows:
        if r["overall"] is None:
            continue
        v = r["overall"] if score is None else (r.get("scores") or {}).get(score)
        if is_number(v):
            values[r["task_type"]].append(float(v))
    return {t: _mean(v) for t, v in values.items()}


def score_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sorted names of the numeric scores any scored row has."""
    return sorted(
        {
            name
            for r in rows
            if r["overall"] is not None
            for name, v in (r.get("scores") or {}).items()
            if is_number(v)
        }
    )


def _counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    out = {t: {"n": 0, "n_scored": 0} for t in sorted({r["task_type"] for r in rows})}
    for r in rows:
        out[r["task_type"]]["n"] += 1
        out[r["task_type"]]["n_scored"] += r["overall"] is not None
    return out


def _block(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The aggregates of some rows (all of them, or one language's): overall, per type, counts, scores."""
    by_type = type_means(rows)
    scores = {}
    for name in score_names(rows):
        per_type = type_means(rows, name)
        # A type with no scored row at all nulls the score's macro mean, as it does the overall's; a type
        # whose scored rows lack this score (a protocol that asks it of some types only) is left out.
        covered = {t: v for t, v in per_type.items() if v is not None}
        scores[name] = {
            "overall": None if any(v is None for v in by_type.values()) else macro_mean(covered),
            "by_task_type": per_type,
        }
    return {
        "overall": macro_mean(by_type),
        "by_task_type": by_type,
        "counts_by_task_type": _counts(rows),
        "n": len(rows),
        "n_scored": sum(r["overall"] is not None for r in rows),
        "scores": scores,
    }


def summarize(rows: Sequence[Mapping[str, Any]], *, protocol: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The content of ``summary.json`` for the rows of one evaluation (see the module docstring's rule).

    Returns {"protocol", "overall" (macro mean over task types, or None), "overall_row_mean" (the plain
    mean over scored rows, for reference only), "by_task_type": {type: mean overall}, "counts_by_task_type":
    {type: {"n", "n_scored"}}, "n", "n_scored", "scores": {name: {"overall", "by_task_type"}},
    "by_language": {lang: the same six keys over that language's rows}, "failures": {"total",
    "by_reason", "task_types_without_scores"}, **meta}. Task types and languages are sorted. Raises
    ValueError for rows that break the schema and for meta keys that would replace a computed one.
    """
    check_rows(rows)
    clash = sorted(set(meta) & set(_COMPUTED))
    if clash:
        raise ValueError(f"meta: keys {clash} are computed by summarize and cannot be given")
    whole = _block(rows)
    scored = [float(r["overall"]) for r in rows if r["overall"] is not None]
    failed = [r for r in rows if r["overall"] is None]
    languages = sorted({r["language"] for r in rows})
    return {
        "protocol": protocol,
        **whole,
        "overall_row_mean": _mean(scored),
        "by_language": {lang: _block([r for r in rows if r["language"] == lang]) for lang in languages},
        "failures": {
            "total": len(failed),
            "by_reason": dict(sorted(Counter(failure_reason(r) for r in failed).items())),
            "task_types_without_scores": [t for t, v in whole["by_task_type"].items() if v is None],
        },
        **meta,
    }


def fmt(value: Any, digits: int = 3) -> str:
    """A number to ``digits`` decimals; '–' for None."""
    return "–" if value is None else f"{value:.{digits}f}" if is_number(value) else str(value)


def _cell(value: Any) -> str:
    # A '|' in a task type or failure reason would end a Markdown table cell.
    return str(value).replace("|", "\\|")


def _meta_lines(summary: Mapping[str, Any]) -> list[str]:
    """The settings meta holds, as '- **name**: value' lines; nested dicts (the judge, the benchmark, the
    policy) one line per field."""
    lines = []
    for name, value in summary.items():
        if name in _COMPUTED:
            continue
        if isinstance(value, Mapping):
            lines.append(f"- **{name}**:")
            lines += [f"  - {k}: `{v}`" for k, v in value.items()]
        else:
            lines.append(f"- **{name}**: `{value}`")
    return lines


def _type_table(
    by_type: Mapping[str, float | None],
    counts: Mapping[str, Mapping[str, int]],
    scores: Mapping[str, Mapping[str, Any]],
    overall: float | None,
) -> list[str]:
    names = list(scores)
    lines = [
        "| task type | n | scored | overall | " + " | ".join(names) + (" |" if names else "|"),
        "|---|---:|---:|---:|" + "---:|" * len(names),
    ]
    for t, mean in by_type.items():
        cells = [_cell(t), str(counts[t]["n"]), str(counts[t]["n_scored"]), fmt(mean)]
        cells += [fmt(scores[name]["by_task_type"].get(t)) for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    total_n = sum(c["n"] for c in counts.values())
    total_scored = sum(c["n_scored"] for c in counts.values())
    cells = ["**macro mean**", str(total_n), str(total_scored), f"**{fmt(overall)}**"]
    cells += [fmt(scores[name].get("overall")) for name in names]
    return [*lines, "| " + " | ".join(cells) + " |"]


def markdown(summary: Mapping[str, Any]) -> str:
    """summary.md's text: the settings, the overall, a per-task-type table, per-language tables when there
    is more than one language, and the failures by reason."""
    failures = summary["failures"]
    lines = [
        f"# Evaluation: {summary['protocol']}",
        "",
        *_meta_lines(summary),
        "",
        f"**Overall: {fmt(summary['overall'])}** — the unweighted mean over task types of each type's mean "
        f"over its scored rows (GEdit-Bench's rule); {summary['n_scored']} of {summary['n']} rows scored. "
        f"The plain mean over scored rows, for reference: {fmt(summary['overall_row_mean'])}.",
        "",
        "Failed rows are left out of every mean, never given a default score. When a task type has no "
        "scored row, its mean and the overall are '–' (null): a mean over fewer task types would be another "
        "benchmark's number.",
        "",
        "## By task type",
        "",
        *_type_table(
            summary["by_task_type"], summary["counts_by_task_type"], summary["scores"], summary["overall"]
        ),
        "",
    ]
    if len(summary["by_language"]) > 1:
        for lang, s in summary["by_language"].items():
            lines += [
                f"## Language: {lang}",
                "",
                f"Overall {fmt(s['overall'])}; {s['n_scored']} of {s['n']} rows scored.",
                "",
                *_type_table(s["by_task_type"], s["counts_by_task_type"], s["scores"], s["overall"]),
                "",
            ]
    lines += ["## Failures", ""]
    if failures["total"] == 0:
        lines += ["None.", ""]
    else:
        lines += ["| reason | rows |", "|---|---:|"]
        lines += [f"| {_cell(reason)} | {n} |" for reason, n in failures["by_reason"].items()]
        lines += [f"| **total** | {failures['total']} |", ""]
        if failures["task_types_without_scores"]:
            lines += [
                f"Task types without a scored row: {', '.join(failures['task_types_without_scores'])}.",
                "",
            ]
    return "\n".join(lines)


def write_summary_md(summary: Mapping[str, Any], path: str | Path) -> None:
    """Writes :func:`markdown` of ``summary`` to ``path``."""
    Path(path).write_text(markdown(summary), encoding="utf-8")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``scores.jsonl``, in file order; blank lines are skipped.

    An unparsable last line is an interrupted write: it is dropped with a warning (the example will be
    missing; rerunning the evaluation writes it). An unparsable line before it, or a line that is not a JSON
    object, raises ValueError naming the file and the line number (1-based).
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                _log.warning("%s: line %d is torn (an interrupted write); ignoring it", path, i + 1)
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e.msg}); the file is corrupt") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {i + 1} is not a JSON object but {type(row).__name__}")
        rows.append(row)
    return rows
