"""A larger held-out evaluation of a finished credit study: each K's base and every run's final step.

    python -m sfgrpo.experiments.credit_heldout --study DIR [--examples 512] [--noise-seeds 1] [--jobs J]
        [--sweep] [--sampler ode|sde|cps [--eta E]] [--shapes-reward KEY=VALUE,...]

The study's own evaluations score 32 held-out examples (``data.shapes_eval``) during training: enough to draw
curves, too few to tell a gain of 0.01-0.02 from noise. This scores the base of each K and every finished
run's final checkpoint on ``shapes:test:<examples>`` (the run's held-out examples first, then new draws of the
task, never trained on) with ``python -m sfgrpo.evaluate`` (ODE sampling, the noise of each (example, noise
seed) fixed, so every policy edits the same inputs from the same noise), in ``DIR/heldout/test<N>x<S>/``
(``..._sde/`` or ``..._cps/`` with ``--sampler``: the rollout's stochastic sampler, whose images GRPO trains
on, its step noise drawn per batch of examples): ``base_k<K>/`` and ``step<steps>/<run>/``, one evaluation
folder each (reruns resume; finished ones are skipped). It then writes ``heldout.json`` and ``heldout.md``
there: per (K, arm) the final reward, its gain over the base, per-region success and background preservation,
mean ± 95% Student-t over seeds, the paired (same seed) differences between arms, and every run's scores.
Differences of two evaluations are also taken edit by edit (the same input from the same noise), with a 95%
interval over the edits: what the examples alone can resolve, for each run's gain over its base and for each
pair of arms on one seed.

With ``--sweep`` it scores the study's hyperparameter sweep instead (``DIR/sweep.json``): every finished
sweep run's final checkpoint, in ``DIR/heldout/test<N>x<S>/sweep/``, one row per setting (arm, lr, clip,
β). The sweep chooses on its runs' 32-example evaluations; this says whether that choice survives more
examples.

With ``--shapes-reward`` every policy is scored by its run's shapes reward with those options changed
(``sfgrpo.evaluate --shapes-reward``), in a folder of its own, ``..._reward-<KEY=VALUE,...>``: the same
edits, judged as a fixed reward would judge them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfgrpo.evaluation import aggregate, editing
from sfgrpo.experiments import credit, processes
from sfgrpo.experiments.credit_report import mean_ci

# The per-edit scores the shapes protocol writes, under the names the report uses.
SCORES = ("reward", "region_success_rate", "multi_region_success", "background_preservation")
# Scores differenced edit by edit, per run against its base and per pair of arms on one seed.
EDIT_SCORES = ("reward", "region_success_rate", "background_preservation")
# Paired differences reported, where both arms ran: (arm, minus arm).
PAIRS = (
    ("spatial", "scalar"),
    ("spatial", "placebo"),
    ("placebo", "scalar"),
    ("mix", "scalar"),
    ("region", "scalar"),
    ("scalar", "null"),
    ("spatial", "null"),
)


class HeldoutError(Exception):
    """A bad flag or a study that cannot be evaluated; the message names it."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sfgrpo.experiments.credit_heldout", description=__doc__)
    p.add_argument("--study", required=True, type=Path, help="a credit study's --out folder")
    p.add_argument("--examples", type=int, default=512, help="held-out examples (shapes:test:N)")
    p.add_argument("--noise-seeds", type=int, default=1, help="noise seeds per example")
    p.add_argument("--jobs", type=int, default=1, help="evaluations run at once")
    p.add_argument("--batch-size", type=int, default=32, help="edits per compiled call")
    p.add_argument("--sweep", action="store_true", help="score the sweep's runs (DIR/sweep.json) instead")
    p.add_argument(
        "--shapes-reward",
        default="",
        help="score with the runs' shapes reward with these options changed: KEY=VALUE,... (sorted in the "
        "folder name)",
    )
    editing.add_sampler_arguments(p)
    args = p.parse_args(argv)
    if (error := editing.sampler_arguments_error(args.sampler, args.eta)) is not None:
        raise HeldoutError(error)
    if args.shapes_reward:
        try:
            options = editing.parse_options(args.shapes_reward)
        except ValueError as err:
            raise HeldoutError(f"--shapes-reward: {err}") from None
        args.shapes_reward = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    for name in ("examples", "noise_seeds", "jobs", "batch_size"):
        if getattr(args, name) < 1:
            raise HeldoutError(f"--{name.replace('_', '-')}: at least 1, got {getattr(args, name)}")
    return args


def study_rows(study: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The study's plan and its summary rows (written by ``sfgrpo.experiments.credit``)."""
    try:
        plan = json.loads((study / credit.PLAN_FILE).read_text())
        rows = json.loads((study / "summary.json").read_text())["rows"]
    except (OSError, ValueError, KeyError) as err:
        raise HeldoutError(
            f"--study {study}: not a credit study with a report (study.json and summary.json: {err})"
        ) from None
    return plan, rows


def sweep_rows(study: Path) -> tuple[int, list[dict[str, Any]]]:
    """The sweep's length and its result rows (``DIR/sweep.json``), each row's 'arm' the setting's label."""
    path = study / credit.SWEEP_FILE
    try:
        doc = json.loads(path.read_text())
        steps, rows = int(doc["settings"]["steps"]), doc["rows"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HeldoutError(
            f"--study {study} --sweep: no readable {path.name} ({err}); rerun the study's command (with "
            "--sweep-only for a sweep alone): finished runs are skipped and it writes the file"
        ) from None
    for row in rows:
        row["arm"] = setting_label(row)
    return steps, rows


def setting_label(row: Mapping[str, Any]) -> str:
    return f"{row['arm']} lr={row['lr']:g} clip={row['clip']:g} β={row.get('kl_beta') or 0.0:g}"


def evaluation_command(workdir: Path, step: int | str, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "sfgrpo.evaluate",
        "--benchmark", f"shapes:test:{args.examples}",
        "--workdir", str(workdir), "--step", str(step), "--out", str(out),
        "--seeds", str(args.noise_seeds), "--batch-size", str(args.batch_size), "--sampler", args.sampler,
        *(["--eta", repr(args.eta)] if args.eta is not None else []),
        *(["--shapes-reward", args.shapes_reward] if args.shapes_reward else []),
    ]  # fmt: skip


def sampler_label(args: argparse.Namespace) -> str:
    """The evaluations' sampler in words, for heldout.md."""
    if args.sampler == "ode":
        return "ODE sampling"
    eta = "each run's eta" if args.eta is None else f"eta {args.eta:g}"
    return f"the rollout sampler with {args.sampler} window noise, {eta}, step noise drawn per batch"


def evaluations_root(args: argparse.Namespace) -> Path:
    """DIR/heldout/test<N>x<S>[_<sampler>[_eta<E>]][_reward-<options>]: one folder per sampler and reward,
    so they never mix."""
    name = f"test{args.examples}x{args.noise_seeds}"
    if args.sampler != "ode":
        name += f"_{args.sampler}" + ("" if args.eta is None else f"_eta{args.eta:g}")
    if args.shapes_reward:
        name += f"_reward-{args.shapes_reward}"
    return args.study / "heldout" / name


def _complete(out: Path, expected: int) -> bool:
    """Whether the evaluation in ``out`` holds every (example, noise seed) row and its summary."""
    try:
        return (out / "summary.json").exists() and len(aggregate.read_rows(out / "scores.jsonl")) == expected
    except (OSError, ValueError):
        return False


def run_evaluations(
    jobs: Sequence[tuple[Path, list[str]]],
    parallel: int,
    expected: int,
    log: Any,
    compile_cache_dir: Path | None = None,
) -> list[Path]:
    """Runs each (out folder, command) whose evaluation is not complete, ``parallel`` at a time; returns the
    folders whose evaluation failed (their ``log.txt`` says why). With ``compile_cache_dir`` they share a
    persistent compilation cache there."""
    pending = [(out, cmd) for out, cmd in jobs if not _complete(out, expected)]
    if len(pending) < len(jobs):
        log(f"{len(jobs) - len(pending)} of {len(jobs)} evaluations already complete: skipped")
    pool = processes.ProcessPool(processes.environment(parallel, compile_cache_dir))
    failed: list[Path] = []
    try:
        while pending or len(pool):
            while pending and len(pool) < parallel:
                out, cmd = pending.pop(0)
                pool.start(out, cmd, out / "log.txt")
                log(f"evaluating {out}")
            for ended in pool.ended():
                out = ended.key
                if ended.returncode != 0 or not _complete(out, expected):
                    failed.append(out)
                    log(f"FAILED evaluation {out} (exit {ended.returncode}); see {out / 'log.txt'}")
    except KeyboardInterrupt:
        pool.stop()
        raise
    return failed


def _check_same_benchmark(base: Path, runs: Sequence[Path]) -> None:
    """Refuses a K whose runs were scored on other examples than its base (a run with another data seed)."""
    want = json.loads((base / "summary.json").read_text())["benchmark"]["sha256"]
    for out in runs:
        if json.loads((out / "summary.json").read_text())["benchmark"]["sha256"] != want:
            raise HeldoutError(
                f"{out}: scored on other held-out examples than the base {base} (another data seed?); "
                "runs of one K must share the task"
            )


def evaluation_means(out: Path) -> dict[str, Any]:
    """Mean of each score over an evaluation's scored edits (as ``sfgrpo.evaluate``'s summary averages);
    'failed' counts the edits the reward marked invalid, which have no scores and are reported apart."""
    rows = aggregate.read_rows(out / "scores.jsonl")
    scored = [r for r in rows if r["overall"] is not None]
    if not scored:
        raise HeldoutError(f"{out}: every edit was marked invalid; see its summary.md")
    means: dict[str, Any] = {name: float(np.mean([r["scores"][name] for r in scored])) for name in SCORES}
    means["failed"] = len(rows) - len(scored)
    means["edits"] = len(rows)
    return means


def edit_difference(a: Path, b: Path, score: str = "reward") -> dict[str, Any]:
    """Evaluation ``a``'s score minus ``b``'s, edit by edit over the (example, noise seed) keys both scored:
    'mean', 'ci95' (1.96 standard errors over the edits; None under two edits) and 'edits'. The interval is
    the examples' alone: seed-to-seed spread comes on top."""
    values = [
        {
            r["key"]: r["scores"][score]
            for r in aggregate.read_rows(f / "scores.jsonl")
            if r["overall"] is not None
        }
        for f in (a, b)
    ]
    keys = sorted(values[0].keys() & values[1].keys())
    if not keys:
        raise HeldoutError(f"{a} and {b}: no edit scored in both, so no edit-by-edit difference")
    diffs = np.array([values[0][k] - values[1][k] for k in keys])
    ci = float(1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else None
    return {"mean": float(diffs.mean()), "ci95": ci, "edits": len(keys)}


def paired_by_seed(finished: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each listed arm pair and seed (and K) where both finished, the edit-by-edit difference of each of
    ``EDIT_SCORES``; each run mapping has 'k', 'arm', 'seed' and its evaluation folder 'heldout'."""
    by = {(r["k"], r["arm"], r["seed"]): r["heldout"] for r in finished}
    out = []
    for a, b in PAIRS:
        for k, arm, seed in sorted(by):
            if arm == a and (k, b, seed) in by:
                diffs = {n: edit_difference(by[(k, a, seed)], by[(k, b, seed)], n) for n in EDIT_SCORES}
                out.append({"pair": f"{a} - {b}", "k": k, "seed": seed} | diffs)
    return out


def summarise(base: Mapping[int, Mapping[str, Any]], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per K and arm: mean ± CI over seeds of each score and of the reward's gain over the K's base; and
    the paired differences of the listed arm pairs (same seed)."""
    out: dict[str, Any] = {}
    for k in sorted({r["k"] for r in runs}):
        mine = [r for r in runs if r["k"] == k]
        arms = sorted({r["arm"] for r in mine})
        per_arm: dict[str, Any] = {}
        for arm in arms:
            rows = [r for r in mine if r["arm"] == arm]
            stats = {name: mean_ci([r["means"][name] for r in rows]) for name in SCORES}
            stats["gain"] = mean_ci([r["means"]["reward"] - base[k]["reward"] for r in rows])
            stats["failed_edits"] = sum(r["means"]["failed"] for r in rows)
            per_arm[arm] = stats
        by = {(r["arm"], r["seed"]): r["means"]["reward"] for r in mine}
        pairs = {}
        for a, b in PAIRS:
            seeds = sorted(s for arm, s in by if arm == a and (b, s) in by)
            if seeds:
                diffs = [by[(a, s)] - by[(b, s)] for s in seeds]
                pairs[f"{a} - {b}"] = mean_ci(diffs) | {"positive": sum(d > 0 for d in diffs)}
        out[str(k)] = {"base": dict(base[k]), "arms": per_arm, "paired": pairs}
    return out


def _fmt(stat: Mapping[str, Any], digits: int = 3, signed: bool = False) -> str:
    if stat.get("mean") is None:
        return "–"
    ci = stat.get("ci95")
    text = f"{stat['mean']:{'+' if signed else ''}.{digits}f}"
    return text if ci is None else f"{text} ± {ci:.{digits}f}"


def markdown(
    summary: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    steps: int,
    args: argparse.Namespace,
    pairs: Sequence[Mapping[str, Any]] = (),
) -> str:
    what = "the sweep's runs (one row per setting)" if args.sweep else "the study's runs"
    over_seeds = (
        "Then, per setting, mean ± 95% Student-t over its seeds."
        if args.sweep
        else "Then, per arm, mean ± 95% Student-t over seeds; a paired difference is between two arms' runs "
        "of one seed, with the number of seeds where it is positive."
    )
    lines = [
        f"# Held-out evaluation of {what}: {args.examples} examples x {args.noise_seeds} noise seeds",
        "",
        f"Each K's base and every run's step {steps}, scored on `shapes:test:{args.examples}` by "
        f"`python -m sfgrpo.evaluate` ({sampler_label(args)}; every policy edits the same inputs from the "
        "same noise). "
        + (f"Scored by each run's shapes reward with `{args.shapes_reward}`. " if args.shapes_reward else "")
        + f"Per run: the mean over its edits. {over_seeds} '± edits' is a 95% interval over the edits of an "
        "edit-by-edit difference: what the examples alone resolve; seed-to-seed spread comes on top.",
        "",
    ]
    for k, s in summary.items():
        b = s["base"]
        lines += [
            f"## K = {k}",
            "",
            f"Base: reward {b['reward']:.3f}, region success {b['region_success_rate']:.2f}, "
            f"multi-region success {b['multi_region_success']:.2f}, background preserved "
            f"{b['background_preservation']:.3f} ({b['edits']} edits, {b['failed']} invalid).",
            "",
            "| arm | seeds | final reward | gain over base | region success | multi-region success "
            "| background preservation | invalid edits |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arm, a in s["arms"].items():
            lines.append(
                f"| {arm} | {a['reward']['n']} | {_fmt(a['reward'])} | {_fmt(a['gain'], signed=True)} | "
                f"{_fmt(a['region_success_rate'], 2)} | {_fmt(a['multi_region_success'], 2)} | "
                f"{_fmt(a['background_preservation'])} | {a['failed_edits']} |"
            )
        if s["paired"]:  # none in a sweep's report: its rows are settings, not the paired arms
            lines += [
                "",
                "| paired difference of final rewards | mean ± 95% CI | positive seeds |",
                "|---|---|---|",
            ]
        for name, p in s["paired"].items():
            lines.append(f"| {name} | {_fmt(p, signed=True)} | {p['positive']}/{p['n']} |")
        mine = [p for p in pairs if str(p["k"]) == k]
        if mine:
            lines += [
                "",
                "| same seed, edit by edit (± edits) | seed | reward | region success "
                "| background preservation |",
                "|---|---|---|---|---|",
            ]
        for p in mine:
            cells = " | ".join(_fmt(p[n], 4, signed=True) for n in EDIT_SCORES)
            lines.append(f"| {p['pair']} | {p['seed']} | {cells} |")
        lines += [
            "",
            "| run | reward | gain over base (± edits) | region success | background preservation "
            "| invalid edits |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted((r for r in records if str(r["k"]) == k), key=lambda r: (r["arm"], r["seed"])):
            m = r["means"]
            lines.append(
                f"| {r['run']} | {m['reward']:.3f} | {_fmt(r['gain_edits'], signed=True)} | "
                f"{m['region_success_rate']:.2f} | {m['background_preservation']:.3f} | {m['failed']} |"
            )
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace, log: Any = print) -> int:
    if args.sweep:
        steps, rows = sweep_rows(args.study)
    else:
        plan, rows = study_rows(args.study)
        steps = plan["steps"]
    finished = [r for r in rows if r.get("status") == "ok"]
    if not finished:
        raise HeldoutError(f"--study {args.study}: no finished runs to evaluate")
    if len(finished) < len(rows):
        log(f"{len(rows) - len(finished)} of {len(rows)} runs did not finish: left out")
    root = evaluations_root(args)
    jobs: list[tuple[Path, list[str]]] = []
    bases = {}
    for k in sorted({r["k"] for r in finished}):
        bases[k] = root / f"base_k{k}"
        jobs.append((bases[k], evaluation_command(args.study / "base" / f"k{k}", "base", bases[k], args)))
    out_dir = root / ("sweep" if args.sweep else f"step{steps}")
    for r in finished:
        # Relative to the study folder; the join keeps an older study's absolute paths as they are.
        workdir = args.study / r["workdir"]
        out = out_dir / workdir.name
        r["heldout"] = out
        jobs.append((out, evaluation_command(workdir, steps, out, args)))
    failed = run_evaluations(
        jobs, args.jobs, args.examples * args.noise_seeds, log, args.study / credit.COMPILE_CACHE
    )
    if failed:
        log(f"{len(failed)} evaluations failed (e.g. {failed[0]}); rerun the command to retry them")
        return 1
    for k, base in bases.items():
        _check_same_benchmark(base, [r["heldout"] for r in finished if r["k"] == k])
    base_means = {k: evaluation_means(out) for k, out in bases.items()}
    records = [
        {"k": r["k"], "arm": r["arm"], "seed": r["seed"], "run": r["heldout"].name,
         "means": evaluation_means(r["heldout"]), "gain_edits": edit_difference(r["heldout"], bases[r["k"]])}
        for r in finished
    ]  # fmt: skip
    summary = summarise(base_means, records)
    pairs = [] if args.sweep else paired_by_seed(finished)  # a sweep's rows are settings, not arms
    doc = {"examples": args.examples, "noise_seeds": args.noise_seeds, "steps": steps, "sweep": args.sweep,
           "runs": records, "by_k": summary, "paired_by_seed": pairs}  # fmt: skip
    (out_dir / "heldout.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    (out_dir / "heldout.md").write_text(markdown(summary, records, steps, args, pairs))
    log(f"wrote {out_dir / 'heldout.md'} and {out_dir / 'heldout.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(parse_args(sys.argv[1:] if argv is None else argv))
    except HeldoutError as err:
        print(f"sfgrpo.experiments.credit_heldout: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
