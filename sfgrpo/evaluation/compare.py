"""Two evaluations of one benchmark under one protocol, compared example by example: B − A deltas per task
type and overall, with bootstrap 95% intervals; ``compare.json``, ``compare.md`` and ``compare.png``.

Rows are paired by (key, seed): both evaluations edit an (example, seed) from the same noise, so the paired
difference takes the example's difficulty and the noise out. A pair where either side failed is left out
and counted. A task type's delta is the mean over its pairs of B − A (equal to B's mean minus A's on the
paired rows, the summary's per-type rule); the overall delta is the unweighted mean over task types, as the
summary's overall is.

Intervals are percentile bootstraps over examples: the seeds of one example share its source image and
instruction, so they are not independent draws and are resampled together (a cluster bootstrap). The
overall's bootstrap resamples within each task type (stratified), as the benchmark's composition is fixed.
A task type with fewer than two examples gets no interval (one cluster has no spread to resample).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfgrpo.evaluation.aggregate import check_rows, fmt, is_number, read_rows

_log = logging.getLogger(__name__)

Pair = tuple[Mapping[str, Any], Mapping[str, Any]]
# Per-example mean deltas within this of zero count as ties (float noise of equal scores).
_TIE = 1e-9


def load(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows of ``scores.jsonl``, ``summary.json``) of an evaluation folder; ValueError naming the folder
    when either is missing."""
    run_dir = Path(run_dir)
    for name in ("scores.jsonl", "summary.json"):
        if not (run_dir / name).is_file():
            raise ValueError(
                f"{run_dir}: has no {name}; is it an evaluation folder (python -m sfgrpo.evaluate)?"
            )
    rows = read_rows(run_dir / "scores.jsonl")
    check_rows(rows)
    return rows, json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def _examples(pairs: Sequence[Any], n: int = 3) -> str:
    return ", ".join(repr(p) for p in sorted(pairs, key=str)[:n]) + (", ..." if len(pairs) > n else "")


def check_comparable(
    dir_a: Path,
    dir_b: Path,
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
    summary_a: Mapping[str, Any],
    summary_b: Mapping[str, Any],
) -> None:
    """Raises ValueError naming both folders when the evaluations cannot be paired: different protocols,
    benchmarks (``summary["benchmark"]["sha256"]`` when both have one), judge models or prompts
    (``summary["judge"]["model"]`` / ``["prompts_sha256"]`` when both have them), (key, seed) sets, or task
    types of a key."""
    where = f"cannot compare {dir_a} (A) with {dir_b} (B)"
    if summary_a.get("protocol") != summary_b.get("protocol"):
        raise ValueError(
            f"{where}: protocols differ ({summary_a.get('protocol')!r} vs {summary_b.get('protocol')!r})"
        )
    for section, field in (("benchmark", "sha256"), ("judge", "model"), ("judge", "prompts_sha256")):
        va = (summary_a.get(section) or {}).get(field)
        vb = (summary_b.get(section) or {}).get(field)
        if va is not None and vb is not None and va != vb:
            raise ValueError(f"{where}: {section} {field} differs ({va!r} vs {vb!r})")
        if (va is None) != (vb is None):
            _log.warning("%s: only one summary records %s %s; not checked", where, section, field)
    keys_a = {(r["key"], r["seed"]) for r in rows_a}
    keys_b = {(r["key"], r["seed"]) for r in rows_b}
    if keys_a != keys_b:
        only_a, only_b = keys_a - keys_b, keys_b - keys_a
        raise ValueError(
            f"{where}: the (key, seed) rows differ: {len(only_a)} only in A (e.g. {_examples(only_a)}), "
            f"{len(only_b)} only in B (e.g. {_examples(only_b)}); evaluate both on the same examples and "
            "seeds"
        )
    type_a = {r["key"]: r["task_type"] for r in rows_a}
    type_b = {r["key"]: r["task_type"] for r in rows_b}
    differ = [k for k in sorted(type_a, key=str) if type_a[k] != type_b[k]]
    if differ:
        raise ValueError(f"{where}: {len(differ)} keys have other task types in B, e.g. {_examples(differ)}")


def pair_rows(
    rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]]
) -> tuple[list[Pair], dict[str, int]]:
    """(pairs where both sides scored, sorted by (key, seed); counts of those left out: {'total',
    'a_failed', 'b_failed', 'both_failed'}). The rows must hold the same (key, seed) set."""
    by_b = {(r["key"], r["seed"]): r for r in rows_b}
    pairs, left = [], {"a_failed": 0, "b_failed": 0, "both_failed": 0}
    for ra in sorted(rows_a, key=lambda r: (str(r["key"]), r["seed"])):
        rb = by_b[(ra["key"], ra["seed"])]
        fa, fb = ra["overall"] is None, rb["overall"] is None
        if fa or fb:
            left["both_failed" if fa and fb else "a_failed" if fa else "b_failed"] += 1
        else:
            pairs.append((ra, rb))
    return pairs, {"total": sum(left.values()), **left}


def _getter(score: str | None) -> Callable[[Mapping[str, Any]], Any]:
    if score is None:
        return lambda r: r["overall"]
    return lambda r: (r.get("scores") or {}).get(score)


def clusters(pairs: Sequence[Pair], score: str | None) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{task type: {key: [(A value, B value) per seed]}} of ``overall`` (``score`` None) or a score, over the
    pairs where both sides have a number; types and keys sorted."""
    get = _getter(score)
    out: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for ra, rb in pairs:
        va, vb = get(ra), get(rb)
        if is_number(va) and is_number(vb):
            out[ra["task_type"]][str(ra["key"])].append((float(va), float(vb)))
    return {t: dict(sorted(out[t].items())) for t in sorted(out)}


def bootstrap_means(
    sums: np.ndarray, counts: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """[n_boot] means of a cluster bootstrap: each replicate draws ``len(sums)`` clusters with replacement
    and divides their summed deltas by their summed pair counts. sums, counts: [n_clusters]."""
    out = np.empty(n_boot, np.float64)
    chunk = max(1, 2_000_000 // max(1, sums.size))  # bounds the [chunk, n_clusters] index array's memory
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, sums.size, size=(min(chunk, n_boot - start), sums.size))
        out[start : start + idx.shape[0]] = sums[idx].sum(1) / counts[idx].sum(1)
    return out


def _interval(reps: np.ndarray) -> list[float]:
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_stats(
    by_type: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    task_types: Sequence[str],
    *,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Per task type and overall: B − A delta with its 95% bootstrap interval, A's and B's means on the
    pairs, counts, and examples improved/worsened/tied (by the mean delta over an example's seeds).

    ``task_types`` are all the benchmark's types: one without pairs has null statistics and makes the
    overall null (as in the summary). Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    per_type: dict[str, Any] = {}
    reps: list[np.ndarray] = []
    for t in task_types:
        groups = by_type.get(t, {})
        if not groups:
            per_type[t] = {"delta": None, "ci95": None, "a": None, "b": None, "n_pairs": 0, "n_examples": 0}
            continue
        a = np.array([sum(x for x, _ in g) for g in groups.values()])
        b = np.array([sum(y for _, y in g) for g in groups.values()])
        counts = np.array([len(g) for g in groups.values()], np.float64)
        example_delta = (b - a) / counts
        boot = bootstrap_means(b - a, counts, n_boot, rng)
        reps.append(boot)
        n = counts.sum()
        per_type[t] = {
            "delta": float((b - a).sum() / n),
            "ci95": _interval(boot) if len(groups) > 1 else None,
            "a": float(a.sum() / n),
            "b": float(b.sum() / n),
            "n_pairs": int(n),
            "n_examples": len(groups),
            "improved": int((example_delta > _TIE).sum()),
            "worsened": int((example_delta < -_TIE).sum()),
            "tied": int((np.abs(example_delta) <= _TIE).sum()),
        }
    complete = bool(task_types) and all(s["delta"] is not None for s in per_type.values())

    def macro(field: str) -> float | None:
        return float(np.mean([s[field] for s in per_type.values()])) if complete else None

    overall = {
        "delta": macro("delta"),
        # Stratified: each type's replicates come from its own examples; a replicate of the overall is the
        # mean over types of one replicate each.
        "ci95": _interval(np.mean(reps, axis=0)) if complete else None,
        "a": macro("a"),
        "b": macro("b"),
        "n_pairs": sum(s["n_pairs"] for s in per_type.values()),
        "n_examples": sum(s["n_examples"] for s in per_type.values()),
        **{k: sum(s.get(k, 0) for s in per_type.values()) for k in ("improved", "worsened", "tied")},
    }
    return {"overall": overall, "by_task_type": per_type}


def compare(
    dir_a: str | Path,
    dir_b: str | Path,
    out_dir: str | Path | None = None,
    *,
    n_boot: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compares evaluation B (``dir_b``) against A (``dir_a``) and writes ``compare.json``, ``compare.md`` and
    ``compare.png`` to ``out_dir`` (default ``dir_b/compare_vs_<name of dir_a>``). Returns compare.json's
    content: {"a", "b", "protocol", "n_boot", "seed", "n_pairs", "excluded": {"total", "a_failed",
    "b_failed", "both_failed"}, "overall": {...}, "by_task_type": {type: {...}}, "scores": {name: {"overall",
    "by_task_type"}}}, each statistic {"delta" (B − A), "ci95": [lo, hi], "a", "b", "n_pairs",
    "n_examples", "improved", "worsened", "tied"}. Raises ValueError when the two cannot be paired (see
    :func:`check_comparable`).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    rows_a, summary_a = load(dir_a)
    rows_b, summary_b = load(dir_b)
    check_comparable(dir_a, dir_b, rows_a, rows_b, summary_a, summary_b)
    pairs, excluded = pair_rows(rows_a, rows_b)
    task_types = sorted({r["task_type"] for r in rows_a})
    names_a = {n for r in rows_a for n, v in (r.get("scores") or {}).items() if is_number(v)}
    names_b = {n for r in rows_b for n, v in (r.get("scores") or {}).items() if is_number(v)}
    main = paired_stats(clusters(pairs, None), task_types, n_boot=n_boot, seed=seed)
    result = {
        "a": str(dir_a),
        "b": str(dir_b),
        "protocol": summary_a.get("protocol"),
        "benchmark_sha256": (summary_a.get("benchmark") or {}).get("sha256"),
        "n_boot": n_boot,
        "seed": seed,
        "n_pairs": len(pairs),
        "excluded": excluded,
        **main,
        "scores": {
            name: paired_stats(clusters(pairs, name), task_types, n_boot=n_boot, seed=seed)
            for name in sorted(names_a & names_b)
        },
    }
    out = Path(out_dir) if out_dir is not None else dir_b / f"compare_vs_{dir_a.resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "compare.md").write_text(markdown(result), encoding="utf-8")
    plot(result, out / "compare.png")
    return result


def _ci(ci: Sequence[float] | None) -> str:
    return "–" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _delta(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def markdown(result: Mapping[str, Any]) -> str:
    """compare.md: per task type and overall, A, B, B − A with its interval and the examples that moved;
    then each score's deltas; then the pairs left out."""
    lines = [
        f"# {result['b']} (B) vs {result['a']} (A)",
        "",
        f"Protocol `{result['protocol']}`; {result['n_pairs']} paired (example, seed) rows. B − A per task "
        "type is the mean over its pairs; the overall is the unweighted mean over task types. 95% intervals: "
        f"percentile bootstrap over examples ({result['n_boot']} replicates, seed {result['seed']}), an "
        "example's seeds resampled together, the overall's stratified by task type; '–' for a type with one "
        "example. Improved / worsened / tied count examples by their mean delta over seeds.",
        "",
        "| task type | pairs | examples | A | B | B − A | 95% CI | improved / worsened / tied |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    rows = [*result["by_task_type"].items(), ("**overall (macro)**", result["overall"])]
    for t, s in rows:
        moved = f"{s.get('improved', 0)} / {s.get('worsened', 0)} / {s.get('tied', 0)}"
        lines.append(
            f"| {t} | {s['n_pairs']} | {s['n_examples']} | {fmt(s['a'])} | {fmt(s['b'])} | "
            f"{_delta(s['delta'])} | {_ci(s['ci95'])} | {moved} |"
        )
    if result["scores"]:
        names = list(result["scores"])
        lines += [
            "",
            "## Scores: B − A [95% CI]",
            "",
            "| task type | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for t in [*result["by_task_type"], None]:
            cells = []
            for name in names:
                s = (
                    result["scores"][name]["overall"]
                    if t is None
                    else result["scores"][name]["by_task_type"][t]
                )
                cells.append(f"{_delta(s['delta'])} {_ci(s['ci95'])}")
            lines.append(f"| {t or '**overall (macro)**'} | " + " | ".join(cells) + " |")
    ex = result["excluded"]
    lines += [
        "",
        f"Left out (a side failed): {ex['total']} pairs — A failed {ex['a_failed']}, "
        f"B failed {ex['b_failed']}, both {ex['both_failed']}.",
        "",
    ]
    return "\n".join(lines)


def plot(result: Mapping[str, Any], path: str | Path) -> None:
    """compare.png: B − A of the overall score per task type and overall (macro), with 95% interval bars
    and a zero line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    stats = [*result["by_task_type"].items(), ("overall", result["overall"])]
    fig = Figure(figsize=(max(4.0, 0.6 * len(stats) + 1.5), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.axhline(0.0, color="0.5", lw=0.8)
    for i, (name, s) in enumerate(stats):
        if s["delta"] is None or not math.isfinite(s["delta"]):
            continue
        err = None if s["ci95"] is None else [[s["delta"] - s["ci95"][0]], [s["ci95"][1] - s["delta"]]]
        color = "C3" if name == "overall" else "C0"
        ax.errorbar([i], [s["delta"]], yerr=err, fmt="o", color=color, capsize=3, lw=1.4)
    ax.set_xticks(range(len(stats)), [name for name, _ in stats], rotation=45, ha="right", fontsize=8)
    ax.axvline(len(stats) - 1.5, color="0.8", lw=0.8, ls=":")
    ax.set_ylabel("B − A (overall score)")
    ax.set_title(f"{Path(result['b']).name} vs {Path(result['a']).name} ({result['protocol']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path))
