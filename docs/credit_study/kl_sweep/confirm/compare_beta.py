"""Pairs the follow-up's scalar runs (β = 1) with the extension's (β = 0) and spatial runs, seed by seed.

    python docs/credit_study/kl_sweep/confirm/compare_beta.py KL_STUDY EXTENSION_STUDY

Both folders are credit studies of seeds 5-9 at 40 iterations with `heldout/test512x1/step40/heldout.json`
(run `sfgrpo.experiments.credit_heldout --examples 512` on each). Prints mean ± 95% Student-t over seeds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sfgrpo.experiments.credit_report import mean_ci


def _rows(study: Path) -> dict[tuple[str, int], dict]:
    summary = json.loads((study / "summary.json").read_text())["rows"]
    heldout = json.loads((study / "heldout" / "test512x1" / "step40" / "heldout.json").read_text())["runs"]
    held = {(r["arm"], r["seed"]): r["means"] for r in heldout}
    return {(r["arm"], r["seed"]): r | {"heldout": held.get((r["arm"], r["seed"]))} for r in summary}


def _measures(row: dict) -> dict[str, float]:
    return {
        "rollout reward, iterations 31-40": row["train"]["reward_late"],
        "held-out reward (32 examples, step 40)": row["final"]["reward"],
        "background preserved (32 examples)": row["final"]["background_preservation"],
        "held-out reward (512 examples)": row["heldout"]["reward"],
        "background preserved (512 examples)": row["heldout"]["background_preservation"],
        "regions right (512 examples)": row["heldout"]["region_success_rate"],
    }


def main(kl_study: Path, extension: Path) -> None:
    kl, ext = _rows(kl_study), _rows(extension)
    seeds = sorted(seed for arm, seed in kl if arm == "scalar")
    pairs = {
        "scalar(β=1) − scalar(β=0)": (kl, "scalar", ext, "scalar"),
        "spatial − scalar(β=1)": (ext, "spatial", kl, "scalar"),
        "spatial − scalar(β=0)": (ext, "spatial", ext, "scalar"),
    }
    for name, (a, arm_a, b, arm_b) in pairs.items():
        print(f"## {name} (seeds {seeds})")
        for measure in _measures(a[(arm_a, seeds[0])]):
            diffs = [_measures(a[(arm_a, s)])[measure] - _measures(b[(arm_b, s)])[measure] for s in seeds]
            stat = mean_ci(diffs)
            wins = sum(d > 0 for d in diffs)
            print(f"- {measure}: {stat['mean']:+.3f} ± {stat['ci95']:.3f} ({wins}/{len(diffs)} positive)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
