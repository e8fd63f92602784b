"""The credit study's report: per-run curves and finals read from the runs' ``metrics.jsonl``, then
``summary.json``, ``study.md`` and ``study.png`` (see ``sfgrpo.experiments.credit``).

Statistics are over seeds: means with two-sided 95% Student-t intervals, paired differences against the
scalar arm (runs of one seed share the held-out noise and the data order), and the iterations each arm
needs to reach the scalar arm's final reward, seed by seed (median over seeds, with the range).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfgrpo.metrics import read_metrics

REWARD = "eval/reward/mean"
# The rollouts' own mean reward R^g per iteration. Runs of one seed draw the same prompts in the same order,
# so the last quarter of iterations, paired by seed, compares arms on 5 times the held-out evaluation's
# samples (32 rollouts x 5 iterations against 32 examples, at 20 iterations), from the rollout sampler.
TRAIN_REWARD = "reward/mean"
# What a run's final evaluation reports, under the names summary.json uses.
FINAL_KEYS = {
    "reward": REWARD,
    "region_success_rate": "eval/reward/region_success_rate",
    "multi_region_success": "eval/reward/multi_region_success",
    "background_preservation": "eval/reward/background_preservation",
    "region_reward": "eval/reward/region_mean",
    "background_reward": "eval/reward/background_mean",
    "aesthetics": "eval/reward/aes_mean",
}
# Training diagnostics averaged over a run's GRPO iterations (clip fractions split by region).
# token_clipfrac/*: the share of per-token ratios outside the clip range, over edit and background tokens.
TRAIN_KEYS = (
    "clipfrac",
    "token_clipfrac/edit",
    "token_clipfrac/background",
    "reward/mean",
    "adv/zero_spread_frac",
    "approx_kl",
    "kl",  # the KL penalty's per-token KL to the base (logged as 0 when rl.kl_beta is 0: not measured then)
)

# Two-sided 95% Student-t quantiles t_{0.975, df}; beyond 30 degrees of freedom, the normal's 1.96 is within
# 2% of the exact value.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: Sequence[float]) -> dict[str, float | int | None]:
    """{'mean', 'ci95' (half-width; None for fewer than 2 values), 'n'} of finite ``values``."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if x.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    half = float(t975(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None
    return {"mean": float(x.mean()), "ci95": half, "n": int(x.size)}


def run_record(run_dir: Path) -> dict[str, Any]:
    """One run's eval curve [[step, reward], ...], its final evaluation and training diagnostics.

    Raises ValueError naming the run when it has no evaluation.
    """
    records = read_metrics(run_dir / "metrics.jsonl")
    # Step 0's evaluation has its own line; later ones ride on the GRPO iteration's line.
    evals = [r for r in records if r.get("stage") in ("eval", "grpo") and REWARD in r]
    if not evals:
        raise ValueError(f"{run_dir}: metrics.jsonl holds no evaluation ({REWARD})")
    by_step = {int(r["step"]): r for r in evals}  # a resumed run may repeat a step; the last one counts
    curve = [[step, float(by_step[step][REWARD])] for step in sorted(by_step)]
    last = by_step[max(by_step)]
    final = {name: _float(last.get(key)) for name, key in FINAL_KEYS.items()}
    grpo = [r for r in records if r.get("stage") == "grpo"]
    train = {key: mean_ci([_float(r.get(key)) for r in grpo])["mean"] for key in TRAIN_KEYS}
    by_iteration = {int(r["step"]): float(r[TRAIN_REWARD]) for r in grpo if TRAIN_REWARD in r}
    train["reward_late"] = late_mean([by_iteration[s] for s in sorted(by_iteration)])
    train_curve = [[s, by_iteration[s]] for s in sorted(by_iteration)]
    return {"eval_curve": curve, "final": final, "train": train, "train_curve": train_curve}


def late_mean(values: Sequence[float]) -> float | None:
    """The mean of the last quarter of ``values`` (at least one); None when there are none."""
    if not values:
        return None
    return _float(np.mean(values[-max(1, len(values) // 4) :]))


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def steps_to_reach(curve: Sequence[Sequence[float]], threshold: float) -> int | None:
    """The first evaluated step whose reward is >= ``threshold``; None when no evaluation reaches it."""
    for step, reward in curve:
        if reward >= threshold:
            return int(step)
    return None


def median_steps(steps: Sequence[int | None]) -> float | None:
    """The median over seeds with runs that never reached counted as beyond every step (infinite); None
    when more than half never reached."""
    ordered = sorted(math.inf if s is None else s for s in steps)
    if not ordered:
        return None
    median = float(np.median(ordered))
    return None if math.isinf(median) or math.isnan(median) else median


def summarise(rows: Sequence[Mapping[str, Any]], ks: Sequence[int], arms: Sequence[str]) -> dict[str, Any]:
    """Per (K, arm) statistics of finished rows: finals with CIs, iterations to reach the scalar arm's
    final reward (each seed against the scalar run of that seed), and paired differences against scalar.
    Rows whose 'status' is not 'ok' are counted, not used."""
    out: dict[str, Any] = {}
    for k in ks:
        ok = [r for r in rows if r["k"] == k and r.get("status") == "ok"]
        scalar_by_seed = {
            r["seed"]: r["final"]["reward"]
            for r in ok
            if r["arm"] == "scalar" and r["final"]["reward"] is not None
        }
        scalar_start_by_seed = {r["seed"]: r["eval_curve"][0][1] for r in ok if r["arm"] == "scalar"}
        scalar_late_by_seed = {r["seed"]: r["train"].get("reward_late") for r in ok if r["arm"] == "scalar"}
        scalar_train_by_seed = {r["seed"]: r.get("train_curve", []) for r in ok if r["arm"] == "scalar"}
        per_arm: dict[str, Any] = {}
        for arm in arms:
            mine = [r for r in ok if r["arm"] == arm]
            others = [
                r.get("status") for r in rows if r["k"] == k and r["arm"] == arm and r.get("status") != "ok"
            ]
            # A stopped run (status 'missing': no final evaluation yet) resumes on a rerun; only a run the
            # study recorded as failed is one.
            stats: dict[str, Any] = {
                "runs": len(mine),
                "failed": others.count("failed"),
                "unfinished": len(others) - others.count("failed"),
            }
            for name in FINAL_KEYS:
                stats[name] = mean_ci([r["final"][name] for r in mine])
            if scalar_by_seed:
                # Each seed's threshold is the scalar run of that seed: the held-out noise is drawn from the
                # seed, so levels differ between seeds by more than training moves them, and no other seed's
                # scalar run can stand in. A seed without one is left out and counted.
                thresholds = [scalar_by_seed.get(r["seed"]) for r in mine]
                no_scalar = [t is None for t in thresholds]
                # A scalar run that ends at or below its own start sets a target every run meets before
                # training (step 0): the count says nothing there, so such seeds are left out and counted.
                declined = [
                    t is not None and t <= scalar_start_by_seed[r["seed"]]
                    for r, t in zip(mine, thresholds, strict=True)
                ]
                skipped = [a or b for a, b in zip(no_scalar, declined, strict=True)]
                reach = [
                    None if skip else steps_to_reach(r["eval_curve"], t)
                    for r, t, skip in zip(mine, thresholds, skipped, strict=True)
                ]
                defined = [s for s, skip in zip(reach, skipped, strict=True) if not skip]
                reached = [s for s in defined if s is not None]
                stats["steps_to_scalar_final"] = {
                    "thresholds": thresholds,
                    "per_seed": reach,
                    "scalar_did_not_improve": sum(declined),
                    "no_scalar_run": sum(no_scalar),
                    "median": median_steps(defined),
                    "range": [min(reached), max(reached)] if reached else None,
                    "reached": len(reached),
                }
            paired = [
                r["final"]["reward"] - scalar_by_seed[r["seed"]]
                for r in mine
                if r["seed"] in scalar_by_seed and r["final"]["reward"] is not None
            ]
            if arm != "scalar" and paired:
                stats["minus_scalar"] = mean_ci(paired)
            stats["train_late"] = mean_ci([r["train"].get("reward_late") for r in mine])
            if arm != "scalar":
                stats["train_late_minus_scalar"] = _paired(mine, scalar_late_by_seed)
                stats["train_minus_scalar_curve"] = _paired_curve(mine, scalar_train_by_seed)
            # Each run against its own base: the seeds' held-out levels differ by more than training moves
            # them, and this is the one column that says whether an arm improved at all.
            stats["gain"] = mean_ci(
                [
                    r["final"]["reward"] - r["eval_curve"][0][1]
                    for r in mine
                    if r["final"]["reward"] is not None
                ]
            )
            stats["curve"] = _mean_curve([r["eval_curve"] for r in mine])
            # Each run's reward minus its step-0 reward: the seeds' held-out levels differ (their noise),
            # and this takes that offset out of the intervals.
            stats["gain_curve"] = _mean_curve(
                [[[s, v - r["eval_curve"][0][1]] for s, v in r["eval_curve"]] for r in mine]
            )
            per_arm[arm] = stats
        if "spatial" in per_arm and "placebo" in per_arm:
            # The placebo control: the same credit with the wrong map, paired by seed.
            placebo = [r for r in ok if r["arm"] == "placebo"]
            spatial = [r for r in ok if r["arm"] == "spatial"]
            per_arm["spatial"]["minus_placebo"] = mean_ci(
                [
                    r["final"]["reward"] - p["final"]["reward"]
                    for r in spatial
                    for p in placebo
                    if p["seed"] == r["seed"] and None not in (r["final"]["reward"], p["final"]["reward"])
                ]
            )
            placebo_late = {r["seed"]: r["train"].get("reward_late") for r in placebo}
            per_arm["spatial"]["train_late_minus_placebo"] = _paired(spatial, placebo_late)
        if "null" in per_arm:
            # The no-signal control: each arm against updates of its size that carry no signal, by seed.
            null_by_seed = {r["seed"]: r["final"]["reward"] for r in ok if r["arm"] == "null"}
            null_train_by_seed = {r["seed"]: r.get("train_curve", []) for r in ok if r["arm"] == "null"}
            for arm, stats in per_arm.items():
                if arm != "null":
                    stats["train_minus_null_curve"] = _paired_curve(
                        [r for r in ok if r["arm"] == arm], null_train_by_seed
                    )
                    stats["minus_null"] = mean_ci(
                        [
                            r["final"]["reward"] - null_by_seed[r["seed"]]
                            for r in ok
                            if r["arm"] == arm
                            and r["final"]["reward"] is not None
                            and null_by_seed.get(r["seed"]) is not None
                        ]
                    )
        out[str(k)] = per_arm
    return out


def _paired(rows: Sequence[Mapping[str, Any]], other_by_seed: Mapping[int, float | None]) -> dict[str, Any]:
    """mean_ci of each row's late training reward minus the other arm's run of the same seed."""
    diffs = []
    for r in rows:
        mine, other = r["train"].get("reward_late"), other_by_seed.get(r["seed"])
        if mine is not None and other is not None:
            diffs.append(mine - other)
    return mean_ci(diffs)


def _curve_minus(curve: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> list[list[float]]:
    """[[step, value - other's value], ...] at the steps both curves hold."""
    at = {int(s): v for s, v in other}
    return [[int(s), v - at[int(s)]] for s, v in curve if int(s) in at]


def _paired_curve(
    rows: Sequence[Mapping[str, Any]], reference_by_seed: Mapping[int, Sequence[Sequence[float]]]
) -> list[dict[str, float | None]]:
    """Mean ± CI over seeds of each row's rollout-reward curve minus the reference arm's run of that seed;
    rows whose seed the reference did not run are left out."""
    return _mean_curve(
        [
            _curve_minus(r.get("train_curve", []), reference_by_seed[r["seed"]])
            for r in rows
            if r["seed"] in reference_by_seed
        ]
    )


def _mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> list[dict[str, float | None]]:
    """Mean ± CI of the reward at each step every curve evaluated."""
    if not curves:
        return []
    common = sorted(set.intersection(*[{int(s) for s, _ in c} for c in curves]))
    at = [dict((int(s), v) for s, v in c) for c in curves]
    return [{"step": s, **mean_ci([a[s] for a in at])} for s in common]


def _fmt(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    ci = stat.get("ci95")
    return f"{stat['mean']:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def _fmt_steps(stat: Mapping[str, Any] | None, total_runs: int) -> str:
    if not stat:
        return "–"
    left_out = [
        (stat.get("scalar_did_not_improve", 0), "scalar did not improve on its base"),
        (stat.get("no_scalar_run", 0), "no scalar run of that seed"),
    ]
    left_out = [(n, why) for n, why in left_out if n]
    counted = total_runs - sum(n for n, _ in left_out)
    if counted == 0:
        return "undefined: " + "; ".join(f"{why} ({n}/{total_runs} seeds)" for n, why in left_out)
    median = "not reached" if stat["median"] is None else f"{stat['median']:g}"
    spread = "" if stat["range"] is None else f" [{stat['range'][0]}–{stat['range'][1]}]"
    notes = "".join(f"; {n} seeds left out: {why}" for n, why in left_out)
    return f"{median}{spread} ({stat['reached']}/{counted} reached{notes})"


def markdown(summary: Mapping[str, Any], plan: Mapping[str, Any], hparams: Mapping[str, Any]) -> str:
    """study.md: the settings, one table per K, the placebo check and the hyperparameters used."""
    overrides = dict(plan.get("overrides") or {})
    sampler = overrides.get("sampler.kind")
    # The study's own --set flags change every run, so the rollout sampler is named from them.
    sampler_text = (
        f"`sampler.kind={sampler}`, set for this study"
        if sampler
        else "the sampler of configs/default.py, `sampler.kind` not overridden"
    )
    rest = "configs/default.py's, but for each arm's credit and the hyperparameters below."
    set_text = (
        "Set on every run (`--set`): "
        + ", ".join(f"`{key}={value}`" for key, value in sorted(overrides.items()))
        + f"; the rest is {rest}"
        if overrides
        else f"No `--set` overrides: every setting is {rest}"
    )
    lines = [
        "# Spatial credit study",
        "",
        "Task: `configs/default.py:multi_k<K>` (K edits per instruction, 128 px, 8x8 tokens). "
        f"{plan['steps']} GRPO iterations per run, held-out ODE evaluation every {plan['eval_every']} on "
        f"{plan.get('eval_examples', '?')} examples; seeds {plan['seeds']}; every run shares its K's "
        "warm-started base model (fixed data and warm-start seeds). Intervals are two-sided 95% Student-t"
        " over seeds; 'vs scalar' is the paired (same seed) difference of final held-out rewards; "
        "'gain over base' is each run's final minus its own iteration-0 reward; "
        "'rollout reward, last quarter' is the training rollouts' mean R^g over the last quarter of "
        f"iterations (training prompts, which runs of one seed share; {sampler_text}), and 'vs scalar' next "
        "to it its paired difference; "
        "'iterations to scalar's final' is the first evaluated iteration at which a run reaches the final"
        " reward of the scalar run of its seed (the held-out noise is drawn from the seed), median "
        "[range] over seeds; a seed whose scalar run ends at or below its own start is left out (every "
        "run meets that target before training), and so is a seed with no scalar run of its own. "
        "'final reward' is the image reward R^g (SPEC: from the "
        "overall success and preservation and the aesthetics), which is what the scalar arm maximises; "
        "'region reward' and 'background reward' are the region rewards R_r the spatial arms' tokens are "
        "credited with, over edit regions and the background; success means a success score >= 0.8 C; "
        "preservation is the background score / C.",
        "",
        set_text,
        "",
        "Arms (identical but for credit): `scalar` = Flow-GRPO's global reward; `spatial` = token credit "
        "(lambda = 1); `mix` = lambda 0.5; `region` = region-level ratios; `placebo` = spatial credit with "
        "each input's region-to-token map replaced by another input's (`rl.token_map=shuffled`); `null` = "
        "scalar credit from another group's rewards (`rl.rewards_from=other_group`), the no-signal control.",
        "",
        "'clipfrac edit / background' is the share of per-token ratios outside the arm's own clip range, "
        "over edit and background tokens. The scalar arm's loss clips the image ratio, not token ratios: "
        "its column applies its (image) clip range to token ratios as a diagnostic only.",
        "",
    ]
    for k, per_arm in summary.items():
        lines += [
            f"## K = {k}",
            "",
            "| arm | final reward | gain over base | vs scalar | iterations to scalar's final "
            "| region reward | background reward | region success | multi-region success "
            "| background preservation | clipfrac edit / background | rollout reward, last quarter "
            "| rollout reward vs scalar |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, s in per_arm.items():
            train = s.get("train_clipfrac", "")
            lines.append(
                f"| {arm} | {_fmt(s['reward'])} | {_fmt(s.get('gain'))} | {_fmt(s.get('minus_scalar'))} | "
                f"{_fmt_steps(s.get('steps_to_scalar_final'), s['runs'])} | "
                f"{_fmt(s['region_reward'])} | {_fmt(s['background_reward'])} | "
                f"{_fmt(s['region_success_rate'], 2)} | "
                f"{_fmt(s['multi_region_success'], 2)} | {_fmt(s['background_preservation'], 3)} | {train} | "
                f"{_fmt(s.get('train_late'))} | {_fmt(s.get('train_late_minus_scalar'))} |"
            )
            left_out = [f"{s['failed']} failed"] if s["failed"] else []
            if s.get("unfinished"):
                left_out.append(f"{s['unfinished']} not finished (stopped or not yet run; a rerun resumes)")
            if left_out:
                lines.append(f"| ({arm}: {', '.join(left_out)}; not counted) |" + " |" * 12)
        lines.append("")
        if per_arm.get("spatial", {}).get("minus_placebo", {}).get("n"):
            check = per_arm["spatial"]["minus_placebo"]
            late = per_arm["spatial"].get("train_late_minus_placebo")
            lines += [
                f"Placebo check: spatial − placebo (paired, same seed) {_fmt(check)} held-out, "
                f"{_fmt(late)} rollout reward over the last quarter; {check['n']} seeds.",
                "",
            ]
        null_checks = [
            f"{arm} {_fmt(s['minus_null'])} ({s['minus_null']['n']} seeds)"
            for arm, s in per_arm.items()
            if s.get("minus_null", {}).get("n")
        ]
        if null_checks:
            lines += [
                "No-signal check: final held-out reward minus the `null` run's of the same seed: "
                + "; ".join(null_checks)
                + ".",
                "",
            ]
    lines += ["## Hyperparameters", "", "```json", json.dumps(hparams, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


def plot(summary: Mapping[str, Any], path: Path) -> None:
    """study.png, one column per K: the held-out reward's gain over step 0 (top) and each arm's rollout
    reward minus the scalar run's of the same seed (bottom; the null run's where K has no scalar run),
    mean ± 95% CI per arm against iterations."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    ks = list(summary)
    fig = Figure(figsize=(4.2 * len(ks), 6.8), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(ks), squeeze=False)
    arms = list(dict.fromkeys(arm for k in ks for arm in summary[k]))
    colour = {arm: f"C{i}" for i, arm in enumerate(arms)}  # an arm keeps its colour in every panel
    for col, k in enumerate(ks):
        panels = [("gain_curve", "held-out reward (ODE) - step 0"), _paired_panel(summary[k])]
        for row, (key, ylabel) in enumerate(panels):
            ax = axes[row][col]
            for arm, s in summary[k].items():
                curve = (s.get(key) or []) if key else []
                if not curve:
                    continue  # an arm with no finished run, or the reference against itself
                steps = np.array([c["step"] for c in curve])
                mean = np.array([c["mean"] for c in curve])
                half = np.array([c["ci95"] or 0.0 for c in curve])
                ax.plot(steps, mean, label=f"{arm} (n={s['runs']})", lw=1.6, color=colour[arm])
                ax.fill_between(steps, mean - half, mean + half, color=colour[arm], alpha=0.15)
            if key is None:
                ax.text(0.5, 0.5, ylabel, ha="center", va="center", transform=ax.transAxes, fontsize=8)
            elif row == 1:
                ax.axhline(0.0, color="0.4", lw=0.8)
            ax.set_title(f"K = {k}")
            ax.set_xlabel("GRPO iteration")
            ax.set_ylabel("rollout reward, paired" if key is None else ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _paired_panel(per_arm: Mapping[str, Any]) -> tuple[str | None, str]:
    """(summary key, y label) of one K's lower panel: rollout reward against scalar's, or against the
    no-signal control's where the study ran no scalar arm; (None, why) where it has neither."""
    for key, reference in (("train_minus_scalar_curve", "scalar"), ("train_minus_null_curve", "null")):
        if any(s.get(key) for s in per_arm.values()):
            return key, f"rollout reward - {reference}'s (paired)"
    return None, "no scalar or null run to pair with:\nno paired rollout curve"


def write(out: Path, rows: list[dict[str, Any]], plan: Mapping[str, Any], hparams: Mapping[str, Any]) -> dict:
    """Writes summary.json, study.md and study.png in ``out``; returns the per-K summary."""
    summary = summarise(rows, plan["ks"], plan["arms"])
    for k, per_arm in summary.items():
        for arm, s in per_arm.items():
            mine = [r for r in rows if str(r["k"]) == k and r["arm"] == arm and r.get("status") == "ok"]
            edit = mean_ci([r["train"].get("token_clipfrac/edit") for r in mine])["mean"]
            back = mean_ci([r["train"].get("token_clipfrac/background") for r in mine])["mean"]
            s["train_clipfrac"] = "–" if edit is None or back is None else f"{edit:.3f} / {back:.3f}"
    doc = {"plan": dict(plan), "hparams": dict(hparams), "rows": rows, "by_k": summary}
    (out / "summary.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    (out / "study.md").write_text(markdown(summary, plan, hparams))
    plot(summary, out / "study.png")
    return summary


def sweep_markdown(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """The sweep's table: one line per (arm, lr, clip, kl_beta), its seeds' mean, and every run's score.

    ``rows`` are the sweep runs' result rows (``credit.result_of``); ``settings`` the plan's sweep entry.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        key = (row["arm"], row["lr"], row["clip"], row.get("kl_beta") or 0.0)
        groups.setdefault(key, []).append(row)
    lines = [
        "# Hyperparameter sweep",
        "",
        f"K = {settings.get('k')}, sweep seeds {settings.get('seeds')} (never study seeds). Score: the mean "
        "of a run's last two held-out evaluations (what chooses each arm's setting). Held-out reward, "
        "regions edited right and background preserved are the final evaluation's; the rollout reward is "
        "the mean over the last quarter of iterations. Clip fraction: image ratios for scalar, token ratios "
        "otherwise. Approx. KL: between consecutive policies (the clip's concern); KL to base: the "
        "penalty's per-token KL to the base model, averaged over iterations (measured only when β > 0). "
        "Means over seeds.",
        "",
        "| arm | lr | clip | β (KL) | runs | score | per seed | held-out reward: step 0 → final "
        "| regions right | background preserved | rollout reward (late) | clip fraction | approx. KL "
        "| KL to base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def mean_of(values: Sequence[Any], fmt: str) -> str:
        stat = mean_ci([_float(v) for v in values])
        return "–" if stat["mean"] is None else format(stat["mean"], fmt)

    for (arm, lr, clip, beta), group in sorted(groups.items()):
        ok = [r for r in group if r.get("status") == "ok"]
        scores = {r["seed"]: _float(np.mean([v for _, v in r["eval_curve"][-2:]])) for r in ok}
        per_seed = ", ".join(f"{seed}: {score:.3f}" for seed, score in sorted(scores.items()))
        start = mean_of([r["eval_curve"][0][1] for r in ok], ".3f")
        final = mean_of([r["final"]["reward"] for r in ok], ".3f")
        lines.append(
            f"| {arm} | {lr:g} | {clip:g} | {beta:g} | {len(ok)}/{len(group)} | "
            f"{mean_of(list(scores.values()), '.3f')} | {per_seed or '–'} | {start} → {final} | "
            f"{mean_of([r['final']['region_success_rate'] for r in ok], '.0%')} | "
            f"{mean_of([r['final']['background_preservation'] for r in ok], '.1%')} | "
            f"{mean_of([r['train'].get('reward_late') for r in ok], '.3f')} | "
            f"{mean_of([r['train'].get('clipfrac') for r in ok], '.3f')} | "
            f"{mean_of([r['train'].get('approx_kl') for r in ok], '.1e')} | "
            f"{mean_of([r['train'].get('kl') for r in ok], '.1e') if beta > 0 else '–'} |"
        )
    missing = [r["workdir"] for r in rows if r.get("status") != "ok"]
    if missing:
        lines += ["", f"Runs that did not finish ({len(missing)}): " + ", ".join(missing)]
    return "\n".join(lines) + "\n"
