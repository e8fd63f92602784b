"""The credit study: its statistics and report, its plan and arms, and a real (tiny) study end to end."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sfgrpo.evaluation import aggregate
from sfgrpo.experiments import credit, credit_heldout, credit_report


def test_t_quantiles_and_mean_ci():
    assert credit_report.t975(1) == pytest.approx(12.706)
    assert credit_report.t975(4) == pytest.approx(2.776)
    assert credit_report.t975(200) == pytest.approx(1.96)
    stat = credit_report.mean_ci([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["n"] == 3
    assert stat["ci95"] == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert credit_report.mean_ci([5.0]) == {"mean": 5.0, "ci95": None, "n": 1}
    assert credit_report.mean_ci([None, float("nan")])["n"] == 0


def test_steps_to_reach_and_median_count_unreached_runs_as_beyond():
    curve = [[0, 0.1], [5, 0.3], [10, 0.5]]
    assert credit_report.steps_to_reach(curve, 0.3) == 5
    assert credit_report.steps_to_reach(curve, 0.6) is None
    assert credit_report.median_steps([5, 10, None]) == 10.0
    assert credit_report.median_steps([5, None, None]) is None


def _row(k, arm, seed, rewards, status="ok", late=0.4):
    curve = [[5 * i, r] for i, r in enumerate(rewards)]
    final = dict.fromkeys(credit_report.FINAL_KEYS, 0.5) | {"reward": rewards[-1]}
    train = {"token_clipfrac/edit": 0.1, "token_clipfrac/background": 0.05, "reward_late": late}
    return {
        "k": k,
        "arm": arm,
        "seed": seed,
        "status": status,
        "eval_curve": curve,
        "final": final,
        "train": train,
    }


def test_summary_pairs_seeds_and_counts_iterations_to_the_scalar_final(tmp_path):
    rows = [
        _row(2, "scalar", 0, [0.1, 0.2, 0.3]),
        _row(2, "scalar", 1, [0.1, 0.3, 0.5]),  # scalar final mean 0.4
        _row(2, "spatial", 0, [0.1, 0.4, 0.6], late=0.5),
        _row(2, "spatial", 1, [0.1, 0.2, 0.45], late=0.6),
        _row(2, "placebo", 0, [0.1, 0.1, 0.2], late=0.35),
        _row(2, "placebo", 1, [0.1, 0.1, 0.1], status="failed"),
        _row(2, "placebo", 2, [0.1, 0.1, 0.1], status="missing"),  # stopped: resumes on a rerun
    ]
    summary = credit_report.summarise(rows, [2], ["scalar", "spatial", "placebo"])["2"]
    assert summary["scalar"]["reward"]["mean"] == pytest.approx(0.4)
    # Seed 0 against scalar's 0.3 (reached at 5), seed 1 against 0.5 (never).
    assert summary["spatial"]["steps_to_scalar_final"]["per_seed"] == [5, None]
    assert summary["spatial"]["steps_to_scalar_final"]["median"] is None
    assert summary["spatial"]["minus_scalar"]["mean"] == pytest.approx((0.3 - 0.05) / 2)
    assert summary["placebo"]["runs"] == 1 and summary["placebo"]["failed"] == 1
    assert summary["placebo"]["unfinished"] == 1
    assert summary["placebo"]["steps_to_scalar_final"]["median"] is None
    # Gains over each run's own base; the placebo check pairs spatial with the placebo run of its seed.
    assert summary["spatial"]["gain"]["mean"] == pytest.approx((0.5 + 0.35) / 2)
    assert summary["spatial"]["minus_placebo"] == {"mean": pytest.approx(0.4), "ci95": None, "n": 1}
    assert "minus_placebo" not in summary["scalar"]
    assert summary["spatial"]["train_late_minus_scalar"]["mean"] == pytest.approx(0.15)
    assert summary["spatial"]["train_late_minus_placebo"]["mean"] == pytest.approx(0.15)
    plan = {
        "ks": [2],
        "arms": ["scalar", "spatial", "placebo"],
        "steps": 10,
        "eval_every": 5,
        "seeds": [0, 1, 2],
    }
    credit_report.write(tmp_path, rows, plan, {"chosen": {}})
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert len(doc["rows"]) == 7 and doc["rows"][0]["eval_curve"][1] == [5, 0.2]
    md = (tmp_path / "study.md").read_text()
    assert "| spatial | 0.525 ± " in md and "not reached [5–5] (1/2 reached)" in md
    assert "`sampler.kind` not overridden" in md and "No `--set` overrides: every setting is " in md
    assert "| placebo | 0.200 | 0.100 | -0.100 |" in md
    assert (
        "Placebo check: spatial − placebo (paired, same seed) 0.400 held-out, 0.150 rollout reward over the "
        "last quarter; 1 seeds." in md
    )
    assert "(placebo: 1 failed, 1 not finished (stopped or not yet run; a rerun resumes); not counted)" in md
    assert (tmp_path / "study.png").stat().st_size > 10_000


def test_summary_sets_every_arm_against_the_no_signal_run_of_its_seed(tmp_path):
    rows = [
        _row(4, "scalar", 0, [0.3, 0.25]),
        _row(4, "scalar", 1, [0.3, 0.35]),
        _row(4, "spatial", 0, [0.3, 0.4]),
        _row(4, "null", 0, [0.3, 0.2]),
        _row(4, "null", 1, [0.3, 0.3]),
    ]
    summary = credit_report.summarise(rows, [4], ["scalar", "spatial", "null"])["4"]
    assert summary["scalar"]["minus_null"]["mean"] == pytest.approx(0.05)
    assert summary["scalar"]["minus_null"]["n"] == 2
    assert summary["spatial"]["minus_null"] == {"mean": pytest.approx(0.2), "ci95": None, "n": 1}
    assert "minus_null" not in summary["null"]
    plan = {
        "ks": [4],
        "arms": ["scalar", "spatial", "null"],
        "steps": 5,
        "eval_every": 5,
        "seeds": [0, 1],
        "overrides": {"sampler.kind": "cps", "rl.inner_epochs": "2"},
    }
    credit_report.write(tmp_path, rows, plan, {"chosen": {}})
    md = (tmp_path / "study.md").read_text()
    # The study's --set flags are stated, and the rollout sampler is named from them.
    assert "(training prompts, which runs of one seed share; `sampler.kind=cps`, set for this study)" in md
    assert "SDE" not in md
    assert "Set on every run (`--set`): `rl.inner_epochs=2`, `sampler.kind=cps`; the rest is " in md
    assert (
        "No-signal check: final held-out reward minus the `null` run's of the same seed: scalar 0.050 ± "
        in md
    )
    assert "; spatial 0.200 (1 seeds)." in md


def test_without_a_scalar_arm_the_paired_rollout_panel_is_against_the_null_run(tmp_path):
    def run(arm, seed, rollout):
        return _row(4, arm, seed, [0.3, 0.3]) | {"train_curve": [[1, 0.5], [2, rollout]]}

    rows = [run("spatial", 8, 0.7), run("spatial", 9, 0.6), run("null", 8, 0.5), run("null", 9, 0.5)]
    summary = credit_report.summarise(rows, [4], ["spatial", "null"])
    curve = summary["4"]["spatial"]["train_minus_null_curve"]
    assert [(c["step"], c["mean"], c["n"]) for c in curve] == [(1, 0.0, 2), (2, pytest.approx(0.15), 2)]
    assert "train_minus_null_curve" not in summary["4"]["null"]
    assert credit_report._paired_panel(summary["4"]) == (
        "train_minus_null_curve",
        "rollout reward - null's (paired)",
    )
    with_scalar = credit_report.summarise(rows + [run("scalar", 8, 0.55)], [4], ["scalar", "spatial", "null"])
    assert credit_report._paired_panel(with_scalar["4"])[0] == "train_minus_scalar_curve"
    alone = credit_report.summarise(rows[:2], [4], ["spatial"])
    assert credit_report._paired_panel(alone["4"])[0] is None
    credit_report.plot(summary, tmp_path / "study.png")
    credit_report.plot(alone, tmp_path / "alone.png")
    assert (tmp_path / "study.png").stat().st_size > 10_000 and (
        tmp_path / "alone.png"
    ).stat().st_size > 10_000


def test_run_record_reads_the_rollout_reward_of_the_last_quarter_of_iterations(tmp_path):
    lines = [{"step": 0, "stage": "eval", credit_report.REWARD: 0.3}]
    lines += [{"step": s, "stage": "grpo", "reward/mean": 0.1 * s, "clipfrac": 0.0} for s in range(1, 9)]
    lines[-1][credit_report.REWARD] = 0.4
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    record = credit_report.run_record(tmp_path)
    assert record["eval_curve"] == [[0, 0.3], [8, 0.4]]
    assert record["train"]["reward_late"] == pytest.approx((0.7 + 0.8) / 2)  # iterations 7 and 8 of 8
    assert credit_report.late_mean([0.2]) == 0.2 and credit_report.late_mean([]) is None
    assert record["train_curve"][:2] == [[1, 0.1], [2, 0.2]] and len(record["train_curve"]) == 8
    # Per iteration, paired by seed against scalar; iterations only one run holds are left out.
    scalar = _row(2, "scalar", 0, [0.3, 0.4]) | {"train_curve": [[1, 0.5], [2, 0.5]]}
    spatial = _row(2, "spatial", 0, [0.3, 0.4]) | {"train_curve": [[1, 0.5], [2, 0.7], [3, 0.9]]}
    curve = credit_report.summarise([scalar, spatial], [2], ["scalar", "spatial"])["2"]["spatial"]
    assert [(c["step"], c["mean"]) for c in curve["train_minus_scalar_curve"]] == [
        (1, 0.0),
        (2, pytest.approx(0.2)),
    ]


def test_iterations_to_the_scalar_final_are_undefined_where_scalar_did_not_improve(tmp_path):
    rows = [
        _row(2, "scalar", 0, [0.5, 0.45, 0.4]),  # ends below its start: every run meets 0.4 at step 0
        _row(2, "scalar", 1, [0.1, 0.3, 0.5]),
        _row(2, "spatial", 0, [0.5, 0.6, 0.6]),
        _row(2, "spatial", 1, [0.1, 0.5, 0.5]),
    ]
    steps = credit_report.summarise(rows, [2], ["scalar", "spatial"])["2"]["spatial"]["steps_to_scalar_final"]
    assert steps["per_seed"] == [None, 5] and steps["scalar_did_not_improve"] == 1
    assert steps["median"] == 5.0 and steps["reached"] == 1
    assert (
        credit_report._fmt_steps(steps, 2)
        == "5 [5–5] (1/1 reached; 1 seeds left out: scalar did not improve on its base)"
    )
    only_declining = credit_report.summarise(rows[:1] + rows[2:3], [2], ["scalar", "spatial"])["2"]
    text = credit_report._fmt_steps(only_declining["spatial"]["steps_to_scalar_final"], 1)
    assert text == "undefined: scalar did not improve on its base (1/1 seeds)"


def test_a_seed_without_its_own_scalar_run_is_left_out_of_the_iterations_count():
    # Seed 1's scalar run is missing. The scalar mean (0.5, seed 0's run alone) must not stand in for it:
    # seed 1 starts above that level and would count as reaching it at iteration 0.
    rows = [
        _row(2, "scalar", 0, [0.1, 0.3, 0.5]),
        _row(2, "spatial", 0, [0.1, 0.5, 0.6]),
        _row(2, "spatial", 1, [0.6, 0.7, 0.8]),
    ]
    steps = credit_report.summarise(rows, [2], ["scalar", "spatial"])["2"]["spatial"]["steps_to_scalar_final"]
    assert steps["thresholds"] == [0.5, None] and steps["per_seed"] == [5, None]
    assert steps["no_scalar_run"] == 1 and steps["scalar_did_not_improve"] == 0
    assert steps["median"] == 5.0 and steps["reached"] == 1
    assert (
        credit_report._fmt_steps(steps, 2)
        == "5 [5–5] (1/1 reached; 1 seeds left out: no scalar run of that seed)"
    )
    alone = credit_report.summarise(rows[:1] + rows[2:], [2], ["scalar", "spatial"])["2"]["spatial"]
    assert credit_report._fmt_steps(alone["steps_to_scalar_final"], 1) == (
        "undefined: no scalar run of that seed (1/1 seeds)"
    )


def _args(tmp_path, *extra):
    return credit.parse_args(["--out", str(tmp_path / "study"), *extra])


def test_plan_refuses_bad_flags_by_name(tmp_path):
    for flags, name in [
        (["--arms", "scalar,nope"], "--arms"),
        (["--ks", "0,2"], "--ks"),
        (["--ks", "two"], "--ks"),
        (["--seeds", "0"], "--seeds"),
        (["--first-seed", "-1"], "--first-seed"),
        (["--first-seed", "998", "--seeds", "3"], "--first-seed"),
        (["--steps", "0"], "--steps"),
        (["--jobs", "0"], "--jobs"),
        (["--sweep-lrs", "0.5,2"], "--sweep-lrs"),
        (["--sweep-kl-betas", "0,-1"], "--sweep-kl-betas"),
        (["--sweep-kl-betas", "1,1"], "--sweep-kl-betas"),
        (["--sweep-only", "--hparams", "h.json"], "--sweep-only"),
        (["--sweep-seeds", "0"], "--hparams"),
        (["--set", "warmstart.steps"], "--set"),
        (["--set", "rl.credit=scalar"], "--set rl.credit"),
    ]:
        with pytest.raises(credit.StudyError, match=name):
            credit.make_plan(_args(tmp_path, *flags))


def test_first_seed_starts_the_study_seeds_and_runs_go_seed_by_seed(tmp_path):
    plan = credit.make_plan(_args(tmp_path, "--first-seed", "5", "--seeds", "3", "--arms", "scalar,spatial"))
    assert plan["seeds"] == [5, 6, 7]
    assert credit.base_run(tmp_path, plan, 2).seed == 5
    hparams = {"chosen": {"scalar": {"lr": 1e-4, "clip": 1e-4}, "spatial": {"lr": 1e-4, "clip": 1e-3}}}
    runs = credit.study_runs(tmp_path, {**plan, "ks": [2]}, hparams)
    assert [(r.seed, r.arm) for r in runs] == [(s, a) for s in (5, 6, 7) for a in ("scalar", "spatial")]


def test_an_out_folder_holding_another_study_is_refused(tmp_path):
    plan = credit.make_plan(_args(tmp_path, "--steps", "10"))
    credit.check_plan(tmp_path / "study", plan)
    credit.check_plan(tmp_path / "study", credit.make_plan(_args(tmp_path, "--steps", "10", "--jobs", "2")))
    with pytest.raises(credit.StudyError, match="eval_every"):
        credit.check_plan(
            tmp_path / "study", credit.make_plan(_args(tmp_path, "--steps", "10", "--eval-every", "2"))
        )
    # More seeds, K values, arms or steps extend the study (its finished runs stay valid or continue); fewer
    # do not.
    grown = credit.make_plan(_args(tmp_path, "--steps", "20", "--seeds", "7", "--ks", "1,2,4"))
    credit.check_plan(tmp_path / "study", grown)
    assert json.loads((tmp_path / "study" / credit.PLAN_FILE).read_text()) == grown
    with pytest.raises(credit.StudyError, match="seeds"):
        credit.check_plan(
            tmp_path / "study", credit.make_plan(_args(tmp_path, "--steps", "20", "--seeds", "2"))
        )
    with pytest.raises(credit.StudyError, match="steps"):
        credit.check_plan(
            tmp_path / "study",
            credit.make_plan(_args(tmp_path, "--steps", "10", "--seeds", "7", "--ks", "1,2,4")),
        )


def test_a_longer_study_keeps_its_sweep_and_the_sweeps_choice(tmp_path):
    flags = ["--arms", "scalar", "--sweep-lrs", "1e-3", "--sweep-clips", "0.2"]
    credit.check_plan(tmp_path / "a", credit.make_plan(_args(tmp_path, *flags, "--steps", "10")))
    longer = credit.make_plan(_args(tmp_path, *flags, "--steps", "20"))
    credit.check_plan(tmp_path / "a", longer)
    assert longer["steps"] == 20 and longer["sweep"]["steps"] == 10
    assert json.loads((tmp_path / "a" / credit.PLAN_FILE).read_text())["sweep"]["steps"] == 10
    (sweep,) = credit.sweep_runs(tmp_path / "a", longer)
    assert dict(sweep.overrides)["train.steps"] == 10
    hparams = {"chosen": {"scalar": {"lr": 1e-3, "clip": 0.2}}}
    (study,) = credit.study_runs(tmp_path / "a", {**longer, "seeds": [0], "ks": [2]}, hparams)
    assert dict(study.overrides)["train.steps"] == 20
    # A plan stored before the sweep recorded its length swept at the study's stored steps.
    legacy = credit.make_plan(_args(tmp_path, *flags, "--steps", "10"))
    del legacy["sweep"]["steps"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / credit.PLAN_FILE).write_text(json.dumps(legacy))
    longer = credit.make_plan(_args(tmp_path, *flags, "--steps", "30"))
    credit.check_plan(tmp_path / "b", longer)
    assert longer["sweep"]["steps"] == 10


def test_arms_differ_only_in_credit_and_the_placebo_copies_spatials_settings(tmp_path):
    plan = credit.make_plan(_args(tmp_path))
    hparams = {"chosen": {"scalar": {"lr": 1e-3, "clip": 0.2}, "spatial": {"lr": 5e-4, "clip": 0.1}}}
    runs = {
        arm: dict(
            credit.arm_run(tmp_path, plan, "study", 2, arm, 3, *credit.arm_hparams(hparams, arm)).overrides
        )
        for arm in ("scalar", "spatial", "placebo")
    }
    assert runs["placebo"]["rl.token_map"] == "shuffled" and "rl.token_map" not in runs["spatial"]
    assert runs["placebo"]["rl.lr"] == runs["spatial"]["rl.lr"] == 5e-4
    assert runs["placebo"]["rl.clip_range_spatial"] == (0.1, 0.1)
    assert runs["scalar"]["rl.clip_range_scalar"] == (0.2, 0.2) and runs["scalar"]["rl.lr"] == 1e-3
    for r in runs.values():
        assert r["seed"] == 3 and r["data.seed"] == r["warmstart.seed"] == credit.TASK_SEED
    assert credit.swept_arms(["scalar", "placebo", "null"]) == ["scalar", "spatial"]
    # The no-signal control is scalar with another group's rewards, at scalar's settings.
    null = dict(
        credit.arm_run(tmp_path, plan, "study", 2, "null", 3, *credit.arm_hparams(hparams, "null")).overrides
    )
    assert null == {**runs["scalar"], "rl.rewards_from": "other_group"}
    with pytest.raises(credit.StudyError, match="region"):
        credit.arm_hparams(hparams, "region")


def test_choose_hparams_takes_the_best_mean_of_the_last_two_evaluations(tmp_path):
    plan = credit.make_plan(
        _args(tmp_path, "--arms", "scalar", "--sweep-lrs", "1e-4,1e-3", "--sweep-clips", "0.2")
    )
    runs = credit.sweep_runs(tmp_path, plan)
    results = {
        runs[0]: {"status": "ok", "eval_curve": [[0, 0.1], [5, 0.4], [10, 0.2]]},  # lr 1e-4: 0.3
        runs[1]: {"status": "ok", "eval_curve": [[0, 0.1], [5, 0.3], [10, 0.35]]},  # lr 1e-3: 0.325
    }
    chosen = credit.choose_hparams(runs, results)["chosen"]["scalar"]
    assert chosen["lr"] == 1e-3 and chosen["score"] == pytest.approx(0.325)


def test_the_sweep_can_try_kl_penalties_and_the_study_takes_the_chosen_one(tmp_path):
    flags = ["--arms", "scalar", "--sweep-lrs", "1e-3", "--sweep-clips", "0.2"]
    # A sweep without a KL penalty stores the plan it stored before β could be swept (resumable studies).
    assert "kl_betas" not in credit.make_plan(_args(tmp_path, *flags))["sweep"]
    plan = credit.make_plan(_args(tmp_path, *flags, "--sweep-kl-betas", "0,0.5"))
    assert plan["sweep"]["kl_betas"] == [0.0, 0.5]
    runs = credit.sweep_runs(tmp_path, plan)
    assert [r.workdir.name for r in runs] == [
        "k2_scalar_lr0.001_clip0.2_s1000",
        "k2_scalar_lr0.001_clip0.2_kl0.5_s1000",
    ]
    assert [dict(r.overrides)["rl.kl_beta"] for r in runs] == [0.0, 0.5]
    results = {
        runs[0]: {"status": "ok", "eval_curve": [[0, 0.5], [5, 0.4], [10, 0.3]]},
        runs[1]: {"status": "ok", "eval_curve": [[0, 0.5], [5, 0.5], [10, 0.6]]},
    }
    hparams = credit.choose_hparams(runs, results)
    assert hparams["chosen"]["scalar"]["kl_beta"] == 0.5
    assert [row["kl_beta"] for row in hparams["runs"]] == [0.0, 0.5]
    study = credit.arm_run(tmp_path, plan, "study", 2, "scalar", 3, *credit.arm_hparams(hparams, "scalar"))
    assert dict(study.overrides)["rl.kl_beta"] == 0.5 and study.workdir.name == "k2_scalar_s3"
    # Settings given without kl_beta (every study before β was swept) have no penalty; a bad one is refused.
    assert credit.arm_hparams({"chosen": {"scalar": {"lr": 1e-3, "clip": 0.2}}}, "scalar") == (1e-3, 0.2, 0.0)
    for bad in (-1, "x"):
        with pytest.raises(credit.StudyError, match="kl_beta"):
            credit.arm_hparams({"chosen": {"scalar": {"lr": 1e-3, "clip": 0.2, "kl_beta": bad}}}, "scalar")


def test_the_sweep_table_has_a_line_per_setting_and_every_seed(tmp_path):
    def row(seed, beta, curve, status="ok"):
        base = {"arm": "scalar", "lr": 5e-4, "clip": 1e-4, "kl_beta": beta, "seed": seed, "status": status}
        if status != "ok":
            return base | {"workdir": f"/runs/kl{beta}_s{seed}"}
        final = {"reward": curve[-1][1], "region_success_rate": 0.5, "background_preservation": 0.9}
        train = {"reward_late": 0.6, "clipfrac": 0.05, "approx_kl": 1e-9, "kl": 2e-3 if beta else 0.0}
        return base | {"eval_curve": curve, "final": final, "train": train, "workdir": f"/runs/s{seed}"}

    rows = [
        row(1000, 0.0, [[0, 0.5], [5, 0.6], [10, 0.4]]),
        row(1001, 0.0, [[0, 0.5], [5, 0.7], [10, 0.5]]),
        row(1000, 1.0, [[0, 0.5], [5, 0.6], [10, 0.6]]),
        row(1001, 1.0, None, status="failed"),
    ]
    text = credit_report.sweep_markdown(rows, {"k": 2, "seeds": [1000, 1001]})
    lines = [line for line in text.splitlines() if line.startswith("| scalar")]
    assert len(lines) == 2
    assert "| 0 | 2/2 | 0.550 | 1000: 0.500, 1001: 0.600 | 0.500 → 0.450 |" in lines[0]
    assert lines[0].rstrip().endswith("| – |")  # no KL to base is measured without the penalty
    assert "| 1 | 1/2 | 0.600 | 1000: 0.600 |" in lines[1] and lines[1].rstrip().endswith("| 2.0e-03 |")
    assert "did not finish (1): /runs/kl1.0_s1001" in text


# A study small enough for the test suite: one K, one seed, the scalar arm and the placebo, two iterations
# of 2 groups of 8, a 4-step warm start. It runs the real command in subprocesses.
_TINY = [
    "--ks", "1", "--seeds", "1", "--arms", "scalar,placebo", "--steps", "2", "--eval-every", "1",
    "--set", "warmstart.steps=4", "--set", "data.shapes_train=64", "--set", "data.shapes_eval=8",
    "--set", "rl.batch_size=16", "--set", "rl.micro_batch=16", "--set", "rl.grad_accum=1",
    "--set", "sampler.num_steps=3", "--set", "sampler.eval_steps=3", "--set", "sampler.window_hi=1",
    "--set", "data.resolution=64",
]  # fmt: skip


def test_a_tiny_study_runs_resumes_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # one device per run: the sharded placebo is tested in test_step
    hparams = tmp_path / "hparams.json"
    hparams.write_text(
        json.dumps({"scalar": {"lr": 5e-4, "clip": 0.2}, "spatial": {"lr": 5e-4, "clip": 0.2}})
    )
    out = tmp_path / "study"
    flags = ["--out", str(out), *_TINY, "--hparams", str(hparams), "--jobs", "2"]
    lines: list[str] = []
    assert credit.run_study(credit.parse_args(flags), log=lines.append) == 0, lines
    doc = json.loads((out / "summary.json").read_text())
    assert {(r["arm"], r["status"]) for r in doc["rows"]} == {("scalar", "ok"), ("placebo", "ok")}
    for row in doc["rows"]:
        assert [s for s, _ in row["eval_curve"]] == [0, 1, 2]
        assert 0.0 <= row["final"]["region_success_rate"] <= 1.0
        assert 0.0 <= row["final"]["background_preservation"] <= 1.0
    placebo = next(r for r in doc["rows"] if r["arm"] == "placebo")
    assert placebo["workdir"] == "runs/k1_placebo_s0"  # relative: a moved study still names its runs
    assert json.loads((out / placebo["workdir"] / "config.json").read_text())["rl"]["token_map"] == "shuffled"
    # Every run of the K started from the base's warm start (loaded, not trained again).
    assert "loaded the cached parameters" in (out / placebo["workdir"] / "log.txt").read_text()
    assert (out / "study.md").exists() and (out / "study.png").exists()
    # A rerun skips every finished run and rewrites the report.
    lines.clear()
    assert credit.run_study(credit.parse_args(flags), log=lines.append) == 0
    assert not any(line.startswith("started") for line in lines), lines
    # A rerun with more steps continues every run from its last checkpoint (the base is not rerun).
    lines.clear()
    longer = [*flags, "--steps", "3"]  # the later --steps wins
    assert credit.run_study(credit.parse_args(longer), log=lines.append) == 0, lines
    assert sorted(line for line in lines if line.startswith("continuing")) == [
        "continuing k1_placebo_s0 to step 3",
        "continuing k1_scalar_s0 to step 3",
    ]
    assert not any(line.startswith("started base") for line in lines), lines
    doc = json.loads((out / "summary.json").read_text())
    for row in doc["rows"]:
        assert row["status"] == "ok" and [s for s, _ in row["eval_curve"]] == [0, 1, 2, 3]
        assert "resuming from step 2" in (out / row["workdir"] / "log.txt").read_text()

    # Stopped (SIGTERM, a time limit) before a new seed's runs start: the report keeps what finished and
    # lists the rest as not finished, so that credit_heldout can score it.
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(credit, "execute", stopped)
    with pytest.raises(KeyboardInterrupt):
        credit.run_study(credit.parse_args([*longer, "--seeds", "2"]), log=lines.append)
    doc = json.loads((out / "summary.json").read_text())
    assert sorted((r["arm"], r["seed"], r["status"]) for r in doc["rows"]) == [
        ("placebo", 0, "ok"), ("placebo", 1, "missing"), ("scalar", 0, "ok"), ("scalar", 1, "missing"),
    ]  # fmt: skip


def test_a_sweep_only_run_tries_a_kl_penalty_reports_it_and_starts_no_study_run(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    out = tmp_path / "study"
    # Two iterations: the second starts from a policy the first moved, so the penalty has a drift to see.
    flags = ["--out", str(out), *_TINY, "--arms", "scalar", "--sweep-k", "1"]
    flags += ["--sweep-lrs", "1e-3", "--sweep-clips", "0.2", "--sweep-kl-betas", "0,0.5", "--sweep-only"]
    flags += ["--jobs", "2"]
    lines: list[str] = []
    assert credit.run_study(credit.parse_args(flags), log=lines.append) == 0, lines
    assert not (out / "runs").exists() and any("--sweep-only" in line for line in lines), lines
    penalised = out / "sweep" / "k1_scalar_lr0.001_clip0.2_kl0.5_s1000"
    assert json.loads((penalised / "config.json").read_text())["rl"]["kl_beta"] == 0.5
    hparams = json.loads((out / "hparams.json").read_text())
    assert {row["kl_beta"] for row in hparams["runs"]} == {0.0, 0.5}
    table = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| scalar")]
    assert len(table) == 2 and table[0].rstrip().endswith("| – |")
    kl_to_base = float(table[1].rstrip(" |").rsplit("|", 1)[1])
    assert kl_to_base > 0  # measured: the penalised run drifted from its base in its second iteration
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["settings"] == json.loads((out / "study.json").read_text())["sweep"]
    assert sorted((r["kl_beta"], r["status"], Path(r["workdir"]).name) for r in sweep["rows"]) == [
        (0.0, "ok", "k1_scalar_lr0.001_clip0.2_s1000"),
        (0.5, "ok", penalised.name),
    ]
    # The sweep scored on more held-out examples than its runs' evaluations (3 here), setting by setting.
    args = credit_heldout.parse_args(["--study", str(out), "--sweep", "--examples", "3", "--jobs", "2"])
    assert credit_heldout.run(args, log=lines.append) == 0, lines
    scored = out / "heldout" / "test3x1" / "sweep"
    doc = json.loads((scored / "heldout.json").read_text())
    assert doc["sweep"] and doc["steps"] == 2 and doc["paired_by_seed"] == []
    labels = ["scalar lr=0.001 clip=0.2 β=0", "scalar lr=0.001 clip=0.2 β=0.5"]
    assert sorted(doc["by_k"]["1"]["arms"]) == labels
    for record in doc["runs"]:
        rows = aggregate.read_rows(scored / record["run"] / "scores.jsonl")
        assert len(rows) == 3 and record["means"]["reward"] == pytest.approx(
            np.mean([r["scores"]["reward"] for r in rows if r["overall"] is not None])
        )
        assert json.loads((scored / record["run"] / "summary.json").read_text())["policy"]["step"] == 2
    report = (scored / "heldout.md").read_text()
    assert f"| {penalised.name} |" in report and "paired difference" not in report  # no pairs in a sweep


def test_failed_runs_are_recorded_and_reported(tmp_path):
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps({"scalar": {"lr": 5e-4, "clip": 0.2}}))
    out = tmp_path / "study"
    flags = ["--out", str(out), "--ks", "1", "--seeds", "1", "--arms", "scalar", "--hparams", str(hparams)]
    flags += ["--set", "train.no_such_key=1"]
    lines: list[str] = []
    assert credit.run_study(credit.parse_args(flags), log=lines.append) == 1
    assert (out / "base" / "k1" / "study_failed.json").exists()
    assert json.loads((out / "runs" / "k1_scalar_s0" / "study_failed.json").read_text())["why"].startswith(
        "its base run"
    )
    assert json.loads((out / "summary.json").read_text())["rows"][0]["status"] == "failed"


def test_the_command_exits_2_with_one_line_for_a_bad_flag(tmp_path, capsys):
    assert credit.main(["--out", str(tmp_path / "s"), "--arms", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--arms" in err[0]


_SLEEPING_RUN = """
import pathlib, signal, sys, time
def stop(*_):
    pathlib.Path(sys.argv[1]).write_text("checkpointed")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
pathlib.Path(sys.argv[1] + ".started").write_text("")
time.sleep(120)
"""


def test_sigterm_stops_the_runs_and_the_runner(tmp_path):
    # The runner in its own process, its one run a sleeper that records the SIGTERM it gets (a training
    # run checkpoints there); `kill` on the runner must reach the run and wait for it.
    runner = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from sfgrpo.experiments import credit
        tmp = Path({str(tmp_path)!r})
        class SleepingRun(credit.Run):
            def command(self):
                return [sys.executable, "-c", {_SLEEPING_RUN!r}, str(tmp / "run_stopped")]
        def study(args, log=print):
            credit.execute([SleepingRun("study", 2, "scalar", 0, tmp / "run", ())], 1, {{}}, log)
            return 0
        credit.run_study = study
        sys.exit(credit.main(["--out", str(tmp / "study")]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", runner], stderr=subprocess.PIPE, text=True)
    started = tmp_path / "run_stopped.started"
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the sleeping run did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (tmp_path / "run_stopped").read_text() == "checkpointed"
    assert "rerun the command to resume" in err
    assert not (tmp_path / "run" / "study_done.json").exists()
