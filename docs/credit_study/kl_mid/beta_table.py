"""The KL-penalty runs on the sweep seeds, scored on 512 held-out examples, in one table with the rule.

    python docs/credit_study/kl_mid/beta_table.py SWEEP_DIR [SWEEP_DIR ...] > beta_table.md

Each SWEEP_DIR is a credit study folder whose sweep ran (`--sweep-only`), its finished runs scored on
`shapes:test:512` in `DIR/heldout/test512x1/sweep/<run>/` (`python -m sfgrpo.experiments.credit_heldout
--study DIR --sweep --examples 512`, or `sfgrpo.evaluate` into the same folder for a sweep stopped early)
and its base in `DIR/heldout/test512x1/base_k<K>/`. One line per planned run (unfinished or unscored runs
are listed as such), then per (arm, β) the verdict of `PLAN.md`: "improves" when every seed scores at least
base + 0.010 and no seed preserves less than 93% of the background; "erodes" when some seed preserves less
than 93%.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sfgrpo.experiments import credit, credit_heldout
from sfgrpo.experiments.credit_report import mean_ci

EXAMPLES = "test512x1"
GAIN = 0.010  # the plan's "improves": at least this over the base on every seed
BACKGROUND = 0.93  # the plan's "erodes": a seed below this background preservation
PAIRED = ("reward", "region_success_rate", "background_preservation")  # spatial − scalar, edit by edit


def runs(folder: Path) -> tuple[dict, list[dict], list[str]]:
    """(base means, one record per scored run: its result row with its 512-example means, runs not scored)."""
    plan = json.loads((folder / credit.PLAN_FILE).read_text())
    plan["sweep"].setdefault("steps", plan["steps"])
    root = folder / "heldout" / EXAMPLES
    base = credit_heldout.evaluation_means(root / f"base_k{plan['sweep']['k']}")
    records, missing = [], []
    for run in credit.sweep_runs(folder, plan):
        row = credit.result_of(run)
        scored = root / "sweep" / run.workdir.name
        if row["status"] != "ok" or not (scored / "summary.json").exists():
            scoring = "scoring incomplete" if scored.exists() else "not scored"
            missing.append(f"{run.workdir} (run {row['status']}, {scoring})")
            continue
        means = credit_heldout.evaluation_means(scored)
        gain_ci = credit_heldout.edit_difference(scored, root / f"base_k{run.k}")["ci95"]
        records.append(row | {"heldout": means, "gain_ci": gain_ci, "scored": scored})
    return base, records, missing


def main(folders: list[Path]) -> None:
    records, bases, missing = [], [], []
    for folder in folders:
        base, rs, not_scored = runs(folder)
        bases.append(base["reward"])
        records += [r | {"base": base} for r in rs]
        missing += not_scored
    if len({round(b, 9) for b in bases}) != 1:
        raise SystemExit(f"the folders' bases score differently ({bases}): not one base, not one table")
    base = records[0]["base"]
    print(f"Base (512 examples): reward {base['reward']:.3f}, "
          f"regions right {base['region_success_rate']:.3f}, "
          f"background preserved {base['background_preservation']:.3f}.\n")  # fmt: skip
    print("| arm | β | seed | reward (512) | gain over base (± 95%, examples) | regions right "
          "| background preserved | rollout reward, it. 31-40 | KL to base | clip fraction |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    key = lambda r: (r["arm"], r.get("kl_beta") or 0.0, r["seed"])  # noqa: E731
    for r in sorted(records, key=key):
        h, t = r["heldout"], r["train"]
        kl = t.get("kl") if r.get("kl_beta") else None  # measured only under a penalty
        print(f"| {r['arm']} | {r.get('kl_beta') or 0.0:g} | {r['seed']} | {h['reward']:.3f} | "
              f"{h['reward'] - base['reward']:+.3f} ± {r['gain_ci']:.3f} | {h['region_success_rate']:.3f} | "
              f"{h['background_preservation']:.3f} | {t['reward_late']:.3f} | "
              f"{'–' if kl is None else f'{kl:.1e}'} | {t['clipfrac']:.3f} |")  # fmt: skip
    print("\n| arm | β | seeds | gain over base (mean ± 95% CI) | background preserved | verdict |")
    print("|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["arm"], r.get("kl_beta") or 0.0), []).append(r)
    for (arm, beta), rs in sorted(groups.items()):
        gains = [r["heldout"]["reward"] - base["reward"] for r in rs]
        kept = [r["heldout"]["background_preservation"] for r in rs]
        stat = mean_ci(gains)
        ci = "" if stat["ci95"] is None else f" ± {stat['ci95']:.3f}"
        if min(kept) < BACKGROUND:
            verdict = "erodes"
        elif min(gains) >= GAIN:
            verdict = "improves"
        else:
            verdict = "neither (does not improve on its base)"
        if len(rs) == 1:
            verdict += ", one seed"
        print(f"| {arm} | {beta:g} | {len(rs)} | {stat['mean']:+.3f}{ci} | {min(kept):.3f}-{max(kept):.3f} "
              f"| {verdict} |")  # fmt: skip

    print(
        "\n| spatial − scalar, same β and seed (± 95%, examples) | reward | regions right "
        "| background preserved |"
    )
    print("|---|---|---|---|")
    by = {(r["arm"], r.get("kl_beta") or 0.0, r["seed"]): r for r in records}
    for (arm, beta, seed), a in sorted(by.items()):
        b = by.get(("scalar", beta, seed))
        if arm != "spatial" or b is None:
            continue
        cells = [credit_heldout.edit_difference(a["scored"], b["scored"], name) for name in PAIRED]
        print(
            f"| β = {beta:g}, seed {seed} | "
            + " | ".join(f"{c['mean']:+.4f} ± {c['ci95']:.4f}" for c in cells)
            + " |"
        )
    for line in missing:
        print(f"- not in the table: {line}")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
