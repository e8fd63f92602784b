"""The plan's rules (PLAN.md) applied to every confirmation seed at once, from the held-out reports.

    python docs/credit_study/kl01_confirm/rules.py HELDOUT_JSON [HELDOUT_JSON ...] > rules.md

Each HELDOUT_JSON is the `heldout.json` that `python -m sfgrpo.experiments.credit_heldout --study DIR
--examples 512` wrote for one study folder (seeds 5-6 in `run/`; later seeds in their own). A seed may
appear in one file only. The rules:
- a pair of arms "beats" when its edit-by-edit difference is above 0 on every seed and its mean over the
  seeds is at least 0.010;
- an arm "improves on its base" when every seed gains at least 0.010 over its own folder's base and none
  preserves less than 93% of the background; it "erodes" when some seed preserves less than 93%.
Each run's gain is read against the base of its own folder, so a rebuilt warm start that scores
differently from the first is used only for the runs that started from it; the bases are printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sfgrpo.experiments.credit_report import mean_ci

GAIN = 0.010  # "improves" and "beats": at least this, in reward
BACKGROUND = 0.93  # "erodes": a seed below this background preservation
PAIRS = ("spatial - scalar", "spatial - placebo", "placebo - scalar")
ARMS = ("scalar", "spatial", "placebo")


def load(paths: list[Path]) -> tuple[list[dict], list[dict], list[str]]:
    """(one record per run, one per same-seed pair, one line per folder's base) from the reports."""
    runs, pairs, bases, seen = [], [], [], {}
    for path in paths:
        doc = json.loads(path.read_text())
        if doc.get("sweep") or doc.get("examples") != 512:
            raise SystemExit(f"{path}: not a 512-example study report (sweep={doc.get('sweep')}, "
                             f"examples={doc.get('examples')})")  # fmt: skip
        for k, group in doc["by_k"].items():
            base = group["base"]
            bases.append(
                f"{path}: K = {k}, reward {base['reward']:.4f}, "
                f"background preserved {base['background_preservation']:.4f}, "
                f"regions right {base['region_success_rate']:.4f}"
            )
        for run in doc["runs"]:
            key = (run["arm"], run["k"], run["seed"])
            if key in seen:
                raise SystemExit(f"{path}: {key} is also in {seen[key]}; each seed belongs to one report")
            seen[key] = path
            runs.append(run | {"report": path})
        pairs += doc["paired_by_seed"]
    return runs, pairs, bases


def _cell(stat: dict) -> str:
    return f"{stat['mean']:+.3f} ± {stat['ci95']:.3f}"


def main(paths: list[Path]) -> None:
    runs, pairs, bases = load(paths)
    seeds = sorted({r["seed"] for r in runs})
    print("Bases (512 examples), each run's gain is over its own folder's base:\n")
    for line in bases:
        print(f"- {line}")
    print(
        '\n"±" is the 95% interval over the 512 edits of an edit-by-edit difference; seed spread comes on '
        "top. The mean over the seeds carries a Student-t interval over the seeds.\n"
    )
    header = " | ".join(f"seed {s}" for s in seeds)
    print(f"| gain over base | {header} | mean over the seeds | verdict |")
    print("|---|" + "---|" * len(seeds) + "---|---|")
    for arm in ARMS:
        by_seed = {r["seed"]: r for r in runs if r["arm"] == arm}
        if not by_seed:
            continue
        gains = [r["gain_edits"]["mean"] for r in by_seed.values()]
        kept = [r["means"]["background_preservation"] for r in by_seed.values()]
        if min(kept) < BACKGROUND:
            verdict = f"erodes (background {min(kept):.1%})"
        elif min(gains) >= GAIN and len(by_seed) == len(seeds):
            verdict = f"improves (background {min(kept):.1%}-{max(kept):.1%})"
        else:
            verdict = f"does not improve (background {min(kept):.1%}-{max(kept):.1%})"
        cells = [_cell(by_seed[s]["gain_edits"]) if s in by_seed else "not run" for s in seeds]
        print(f"| {arm} | {' | '.join(cells)} | {_mean(gains)} | {verdict} |")
    rule = f"beats (every seed > 0, mean ≥ {GAIN})"
    print(f"\n| same seed, edit by edit | {header} | mean over the seeds | {rule} |")
    print("|---|" + "---|" * len(seeds) + "---|---|")
    for name in PAIRS:
        by_seed = {p["seed"]: p["reward"] for p in pairs if p["pair"] == name}
        if not by_seed:
            continue
        diffs = [d["mean"] for d in by_seed.values()]
        complete = len(by_seed) == len(seeds)
        beats = complete and min(diffs) > 0 and sum(diffs) / len(diffs) >= GAIN
        cells = [_cell(by_seed[s]) if s in by_seed else "not run" for s in seeds]
        verdict = ("yes" if beats else "no") + ("" if complete else " (a seed is missing)")
        print(f"| {name} | {' | '.join(cells)} | {_mean(diffs)} | {verdict} |")
    print(f"\n| regions right, same seed, edit by edit | {header} |")
    print("|---|" + "---|" * len(seeds))
    for name in PAIRS:
        by_seed = {p["seed"]: p["region_success_rate"] for p in pairs if p["pair"] == name}
        if by_seed:
            cells = [_cell(by_seed[s]) if s in by_seed else "not run" for s in seeds]
            print(f"| {name} | {' | '.join(cells)} |")


def _mean(values: list[float]) -> str:
    stat = mean_ci(values)
    return f"{stat['mean']:+.3f}" + ("" if stat["ci95"] is None else f" ± {stat['ci95']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main([Path(p) for p in sys.argv[1:]])
