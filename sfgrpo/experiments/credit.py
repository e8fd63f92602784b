"""The spatial credit study: does mapping region rewards onto tokens beat one whole-image reward?

    python -m sfgrpo.experiments.credit --out DIR [--ks 1,2,4] [--seeds 5] \\
        [--arms scalar,spatial,placebo,region,mix] [--steps N] [--jobs J]

Every run is an ordinary training run (``python -m sfgrpo.main`` on ``configs/default.py:multi_k<K>``, its
workdir under ``DIR/runs``), identical across arms but for credit:
  scalar   Flow-GRPO: one global reward per image (rl.credit=scalar);
  spatial  token credit, lambda = 1 (rl.credit=spatial, rl.mix_lambda=1);
  mix      lambda = 0.5;
  region   region-level ratios (rl.credit=region);
  placebo  spatial credit with each input's region-to-token map replaced by another input's
           (rl.token_map=shuffled): credit that is spatial but wrong, with spatial's hyperparameters;
  null     scalar credit from another group's rewards (rl.rewards_from=other_group): updates of the
           same size with no signal, with scalar's hyperparameters (not in the default --arms).
All arms of one K start from one warm-started base model (``DIR/base/k<K>``: fixed data and warm-start
seeds), see the same rollouts, updates and evaluation budget, and differ by seed only in the LoRA
initialisation, the sampling noise and the batch order. Each arm's learning rate and clip range come from a
sweep on seeds the study does not use (``DIR/sweep``, reported in ``DIR/sweep.md`` and ``DIR/sweep.json``,
its choice in ``DIR/hparams.json``), or from ``--hparams FILE``.

Rerunning the command resumes: finished runs are skipped, an interrupted one resumes from its checkpoint,
and with a larger ``--steps`` every finished run continues from its last checkpoint to the new length.
The report (``summary.json``, ``study.md``, ``study.png``) is rewritten at the end of every invocation.
``python -m sfgrpo.experiments.credit_heldout --study DIR`` then scores the bases and the final checkpoints
on more held-out examples than the runs' own evaluations use (``--sweep``: the sweep's runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sfgrpo.experiments import credit_report, processes

ARMS: dict[str, dict[str, Any]] = {
    "scalar": {"rl.credit": "scalar"},
    "spatial": {"rl.credit": "spatial", "rl.mix_lambda": 1.0},
    "mix": {"rl.credit": "spatial", "rl.mix_lambda": 0.5},
    "region": {"rl.credit": "region"},
    "placebo": {"rl.credit": "spatial", "rl.mix_lambda": 1.0, "rl.token_map": "shuffled"},
    "null": {"rl.credit": "scalar", "rl.rewards_from": "other_group"},
}
# The controls must differ from the arm they control in one switch only, so they are not swept: they take
# its settings (the placebo spatial's map, the no-signal control scalar's rewards).
HPARAMS_FROM = {"placebo": "spatial", "null": "scalar"}
COMPILE_CACHE = "compile_cache"  # the study's runs and scoring share compiled programs here
TASK_SEED = 0  # data.seed and warmstart.seed of every run: one task and one base model per K
SWEEP_SEED0 = 1000  # sweep seeds are 1000, 1001, ...; study seeds are first-seed .. first-seed+seeds-1
PLAN_FILE = "study.json"
SWEEP_FILE = "sweep.json"  # the sweep's result rows and settings
CONFIG_FILE = Path(__file__).resolve().parents[2] / "configs" / "default.py"


class StudyError(Exception):
    """A bad flag or an --out that holds another study; the message names it."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study: its workdir and config overrides."""

    phase: str  # 'base', 'sweep' or 'study'
    k: int
    arm: str
    seed: int
    workdir: Path
    overrides: tuple[tuple[str, Any], ...]
    lr: float | None = None
    clip: float | None = None
    kl_beta: float | None = None

    def command(self) -> list[str]:
        flags = [f"--config.{key}={_flag_value(value)}" for key, value in self.overrides]
        return [
            sys.executable,
            "-m",
            "sfgrpo.main",
            f"--config={CONFIG_FILE}:multi_k{self.k}",
            f"--workdir={self.workdir}",
            *flags,
        ]

    @property
    def done_file(self) -> Path:
        return self.workdir / "study_done.json"


def _flag_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(str(v) for v in value) + ")"
    return str(value)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sfgrpo.experiments.credit", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, type=Path, help="the study's folder (created; reruns resume)")
    p.add_argument("--ks", default="1,2,4", help="edits per instruction, comma-separated, each 1..4")
    p.add_argument(
        "--seeds", type=int, default=5, help="seeds per (arm, K): first-seed .. first-seed+seeds-1"
    )
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the first study seed (e.g. 5: confirm on seeds not yet seen)",
    )
    p.add_argument(
        "--arms", default="scalar,spatial,placebo,region,mix", help=f"comma-separated of {list(ARMS)}"
    )
    p.add_argument(
        "--steps", type=int, default=60, help="GRPO iterations per run (a rerun with more continues the runs)"
    )
    p.add_argument("--eval-every", type=int, default=5, help="iterations between held-out evaluations")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at once (single-threaded XLA each when jobs >= cores)"
    )
    p.add_argument("--hparams", type=Path, help="a JSON {arm: {lr, clip}} to use instead of the sweep")
    p.add_argument("--sweep-k", type=int, default=2, help="the K the sweep runs at")
    p.add_argument("--sweep-seeds", type=int, default=1, help="sweep seeds per setting (1000, 1001, ...)")
    p.add_argument("--sweep-lrs", default="5e-4,1e-3", help="learning rates the sweep tries")
    # Log-probs are channel means (SPEC section 4), so ratios stay within about 1e-3 of 1: a range of 0.1
    # never clips anything.
    p.add_argument("--sweep-clips", default="1e-4,1e-3", help="clip ranges (symmetric) the sweep tries")
    p.add_argument(
        "--sweep-kl-betas",
        default="0",
        help="KL-penalty weights (rl.kl_beta; 0: none) the sweep tries; sweep.md gives their KL to the base",
    )
    p.add_argument(
        "--sweep-only",
        action="store_true",
        help="run the base and the sweep, write hparams.json and sweep.md, and stop before the study runs",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run (e.g. warmstart.steps=1500); repeatable",
    )
    return p.parse_args(argv)


def _int_list(text: str, name: str, lo: int, hi: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StudyError(f"--{name}: comma-separated integers, got {text!r}") from None
    if not values or any(not lo <= v <= hi for v in values) or len(set(values)) != len(values):
        raise StudyError(f"--{name}: distinct integers in {lo}..{hi}, got {text!r}")
    return values


def _numbers(text: str, name: str) -> list[float]:
    """Comma-separated, distinct, finite numbers (at least one)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StudyError(f"--{name}: comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values) or len(set(values)) != len(values):
        raise StudyError(f"--{name}: distinct finite numbers, got {text!r}")
    return values


def _float_list(text: str, name: str) -> list[float]:
    values = _numbers(text, name)
    if any(not (0 < v < 1) for v in values):
        raise StudyError(f"--{name}: numbers in (0, 1), got {text!r}")
    return values


def _parse_set(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise StudyError(f"--set {item!r}: expected KEY=VALUE, as in warmstart.steps=1500")
        if key in ("seed", "data.seed", "warmstart.seed") or key.startswith("rl.credit"):
            raise StudyError(f"--set {key}: the study sets it itself")
        out[key] = value
    return out


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The study's settings as checked, JSON-able values (stored in DIR/study.json)."""
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if not arms or unknown or len(set(arms)) != len(arms):
        raise StudyError(f"--arms: distinct names among {list(ARMS)}, got {args.arms!r}")
    if args.seeds < 1:
        raise StudyError(f"--seeds: at least 1 seed per (arm, K), got {args.seeds}")
    if args.first_seed < 0 or args.first_seed + args.seeds > SWEEP_SEED0:
        raise StudyError(
            f"--first-seed: 0 .. {SWEEP_SEED0 - args.seeds} (seeds from {SWEEP_SEED0} are the sweep's), "
            f"got {args.first_seed}"
        )
    if args.steps < 1 or args.eval_every < 1:
        raise StudyError(f"--steps and --eval-every must be >= 1, got {args.steps} and {args.eval_every}")
    if args.jobs < 1:
        raise StudyError(f"--jobs: at least 1, got {args.jobs}")
    if args.sweep_seeds < 0:
        raise StudyError(f"--sweep-seeds: 0 (no sweep: needs --hparams) or more, got {args.sweep_seeds}")
    if not 1 <= args.sweep_k <= 4:
        raise StudyError(f"--sweep-k: 1..4, got {args.sweep_k}")
    if args.sweep_only and args.hparams is not None:
        raise StudyError("--sweep-only runs the sweep, and --hparams skips it: give one of them")
    if args.hparams is None and args.sweep_seeds == 0:
        raise StudyError("--sweep-seeds 0 runs no sweep: give the arms' settings with --hparams FILE")
    plan = {
        "ks": _int_list(args.ks, "ks", 1, 4),
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
        "arms": arms,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "overrides": _parse_set(args.set),
        "task_seed": TASK_SEED,
    }
    if args.hparams is None:
        plan["sweep"] = {
            "k": args.sweep_k,
            "seeds": [SWEEP_SEED0 + i for i in range(args.sweep_seeds)],
            "lrs": _float_list(args.sweep_lrs, "sweep-lrs"),
            "clips": _float_list(args.sweep_clips, "sweep-clips"),
            "steps": args.steps,
        }
        betas = _numbers(args.sweep_kl_betas, "sweep-kl-betas")
        if any(b < 0 for b in betas):
            raise StudyError(f"--sweep-kl-betas: numbers >= 0, got {args.sweep_kl_betas!r}")
        # Stored only when the sweep tries a KL penalty: studies planned before the flag (no penalty) stay
        # resumable, their stored plans having no such key.
        if betas != [0.0]:
            plan["sweep"]["kl_betas"] = betas
    else:
        plan["hparams_file"] = str(args.hparams)
    return plan


def check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Stores ``plan`` in a new --out, or refuses one whose stored plan differs.

    A plan may grow a stored one: more K values, seeds or arms (each run's settings depend only on its own
    (K, arm, seed), so the finished runs stay valid and are kept), or more steps (finished runs continue from
    their last checkpoint: the learning rate is constant and resume is exact, so a run continued from N to M
    iterations is the M-iteration run); anything else that differs is refused.
    """
    path = out / PLAN_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        _keep_sweep_length(stored, plan)
        changed = sorted(
            k
            for k in set(stored) | set(plan)
            if stored.get(k) != plan.get(k) and not (k in GROWABLE and _grows(stored.get(k), plan.get(k)))
        )
        if changed:
            raise StudyError(
                f"--out {out} holds a study with other settings ({', '.join(changed)} differ: stored "
                f"{ {k: stored.get(k) for k in changed} }); rerun it with the same flags (more --ks, "
                "--seeds or --arms may be added) or use another --out"
            )
        if stored == plan:
            return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=1, sort_keys=True))


# Plan keys that a rerun may extend: every stored list entry must stay, and steps may only grow.
GROWABLE = ("ks", "seeds", "arms", "steps")


def _keep_sweep_length(stored: dict[str, Any], plan: dict[str, Any]) -> None:
    """Gives ``plan``'s sweep the stored sweep's length: a longer study continues its runs, not the sweep.

    Continued sweep runs could choose other settings, and the study runs they had trained would then be
    refused on resume (their learning rate changed). A plan stored before the sweep recorded its length
    swept at the study's stored steps.
    """
    if "sweep" in stored and "sweep" in plan:
        old = dict(stored["sweep"])
        old.setdefault("steps", stored.get("steps"))
        stored["sweep"] = old
        plan["sweep"]["steps"] = old["steps"]


def _grows(stored: Any, new: Any) -> bool:
    if isinstance(stored, int) and isinstance(new, int):
        return new >= stored
    return isinstance(stored, list) and isinstance(new, list) and set(stored) <= set(new)


def _common(plan: dict[str, Any], seed: int, steps: int) -> list[tuple[str, Any]]:
    return [
        ("seed", seed),
        ("data.seed", plan["task_seed"]),
        ("warmstart.seed", plan["task_seed"]),
        ("train.steps", steps),
        ("train.eval_every", plan["eval_every"]),
        ("train.checkpoint_every", plan["eval_every"]),
        *plan["overrides"].items(),
    ]


def base_run(out: Path, plan: dict[str, Any], k: int) -> Run:
    """The run that trains K's warm start (and evaluates the base model at step 0); one GRPO iteration."""
    overrides = _common(plan, plan["seeds"][0], 1) + [("train.eval_every", 1)]
    return Run("base", k, "base", plan["seeds"][0], out / "base" / f"k{k}", tuple(dict(overrides).items()))


def arm_run(
    out: Path,
    plan: dict[str, Any],
    phase: str,
    k: int,
    arm: str,
    seed: int,
    lr: float,
    clip: float,
    kl_beta: float = 0.0,
) -> Run:
    steps = plan["sweep"]["steps"] if phase == "sweep" else plan["steps"]
    overrides = dict(_common(plan, seed, steps))
    overrides.update(ARMS[arm])
    overrides["rl.lr"] = lr
    overrides[f"rl.clip_range_{ARMS[arm]['rl.credit']}"] = (clip, clip)
    overrides["rl.kl_beta"] = kl_beta
    # Sweep folders name β only when it is not 0: folders of sweeps made before β was swept still match.
    kl = f"_kl{kl_beta:g}" if kl_beta else ""
    name = f"k{k}_{arm}_s{seed}" if phase == "study" else f"k{k}_{arm}_lr{lr:g}_clip{clip:g}{kl}_s{seed}"
    return Run(phase, k, arm, seed, out / ("runs" if phase == "study" else "sweep") / name,
               tuple(overrides.items()), lr, clip, kl_beta)  # fmt: skip


def swept_arms(arms: Sequence[str]) -> list[str]:
    """The arms the sweep tunes: the study's, with each control replaced by the arm it copies."""
    return sorted({HPARAMS_FROM.get(a, a) for a in arms})


def sweep_runs(out: Path, plan: dict[str, Any]) -> list[Run]:
    s = plan["sweep"]
    return [
        arm_run(out, plan, "sweep", s["k"], arm, seed, lr, clip, beta)
        for arm in swept_arms(plan["arms"])
        for lr in s["lrs"]
        for clip in s["clips"]
        for beta in s.get("kl_betas", [0.0])
        for seed in s["seeds"]
    ]


def study_runs(out: Path, plan: dict[str, Any], hparams: dict[str, Any]) -> list[Run]:
    """The study's runs, seed by seed: a study stopped early holds every arm of the seeds it finished."""
    return [
        arm_run(out, plan, "study", k, arm, seed, *arm_hparams(hparams, arm))
        for k in plan["ks"]
        for seed in plan["seeds"]
        for arm in plan["arms"]
    ]


def choose_hparams(runs: Sequence[Run], results: dict[Run, dict[str, Any]]) -> dict[str, Any]:
    """Per arm, the (lr, clip, kl_beta) whose sweep runs end with the highest mean held-out reward (the mean
    of each run's last two evaluations, to damp one evaluation's noise)."""
    table: dict[tuple[str, float, float, float], list[float]] = {}
    rows = []
    for run in runs:
        result = results.get(run)
        if result is None or result.get("status") != "ok":
            continue
        tail = [r for _, r in result["eval_curve"][-2:]]
        score = sum(tail) / len(tail)
        beta = run.kl_beta or 0.0
        table.setdefault((run.arm, run.lr, run.clip, beta), []).append(score)
        row = {"arm": run.arm, "lr": run.lr, "clip": run.clip, "kl_beta": beta, "seed": run.seed}
        rows.append(row | {"score": score})
    chosen: dict[str, Any] = {}
    for (arm, lr, clip, beta), scores in sorted(table.items()):
        mean = sum(scores) / len(scores)
        if arm not in chosen or mean > chosen[arm]["score"]:
            chosen[arm] = {"lr": lr, "clip": clip, "kl_beta": beta, "score": mean}
    return {
        "chosen": chosen,
        "criterion": "mean over sweep seeds of the mean of each run's last two held-out rewards",
        "runs": rows,
    }


def arm_hparams(hparams: dict[str, Any], arm: str) -> tuple[float, float, float]:
    """(lr, clip, kl_beta) of ``arm`` (a control's are its arm's: HPARAMS_FROM); an entry without kl_beta
    has no KL penalty (0), as every study had before β was swept."""
    source = HPARAMS_FROM.get(arm, arm)
    try:
        entry = hparams["chosen"][source]
        lr, clip = float(entry["lr"]), float(entry["clip"])
    except (KeyError, TypeError, ValueError):
        raise StudyError(f"the hyperparameters hold no lr and clip for arm {source!r}") from None
    try:
        beta = float(entry.get("kl_beta", 0.0))
    except (TypeError, ValueError):
        raise StudyError(f"arm {source!r}: kl_beta must be a number, got {entry.get('kl_beta')!r}") from None
    if not beta >= 0:
        raise StudyError(f"arm {source!r}: kl_beta must be >= 0, got {beta}")
    return lr, clip, beta


def load_hparams(path: Path) -> dict[str, Any]:
    """--hparams FILE: {"chosen": {arm: {"lr", "clip"[, "kl_beta"]}}} (a study's hparams.json) or the same
    without "chosen"."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StudyError(f"--hparams {path}: cannot read it as JSON ({err})") from None
    if not isinstance(data, dict):
        raise StudyError(f"--hparams {path}: expected a JSON object of arms")
    return data if "chosen" in data else {"chosen": data, "criterion": f"given by --hparams {path}"}


# --- running ------------------------------------------------------------------------------------------


def _finished(run: Run) -> dict[str, Any] | None:
    """The run's done record, or None: not run, failed, or finished at fewer steps than it now has."""
    try:
        done = json.loads(run.done_file.read_text())
    except (OSError, ValueError):
        return None
    return done if _has_final_eval(run) else None


def result_of(run: Run) -> dict[str, Any]:
    """The run's row: its identity, hyperparameters, status and (when it finished) its curve and finals."""
    row: dict[str, Any] = {
        "k": run.k,
        "arm": run.arm,
        "seed": run.seed,
        "lr": run.lr,
        "clip": run.clip,
        "kl_beta": run.kl_beta,
        # Relative to the study folder (runs/<name>, sweep/<name>), so that a moved or committed study
        # still names its runs; credit_heldout resolves it against --study.
        "workdir": str(run.workdir.relative_to(run.workdir.parents[1])),
    }
    done = _finished(run)
    if done is None:
        return row | {"status": "failed" if (run.workdir / "study_failed.json").exists() else "missing"}
    return row | {"status": "ok", "seconds": done.get("seconds")} | credit_report.run_record(run.workdir)


def execute(
    runs: Sequence[Run],
    jobs: int,
    needs: dict[Run, Run],
    log: Any = print,
    compile_cache_dir: Path | None = None,
) -> None:
    """Runs every unfinished run, ``jobs`` at a time; a run waits for the run ``needs`` names (its base).
    With ``compile_cache_dir`` the runs share a persistent compilation cache there.

    A run that fails is recorded (``study_failed.json`` with its exit status and log) and the others go on;
    runs that need a failed one are not started.
    """
    pending = [r for r in runs if _finished(r) is None]
    skipped = len(runs) - len(pending)
    if skipped:
        log(f"{skipped} of {len(runs)} runs already finished: skipped")
    pool = processes.ProcessPool(processes.environment(jobs, compile_cache_dir))
    failed: set[Run] = set()
    ready: set[Run] = set()  # needs seen finished: the polling loop stops re-reading their metrics
    start, done_count = time.monotonic(), 0
    try:
        while pending or len(pool):
            for run in list(pending):
                if len(pool) >= jobs:
                    break
                need = needs.get(run)
                if need is not None and need in failed:
                    pending.remove(run)
                    failed.add(run)
                    _record_failure(run, None, f"its base run {need.workdir} failed")
                    continue
                if need is not None and need not in ready:
                    if _finished(need) is None:
                        continue
                    ready.add(need)
                pending.remove(run)
                if need is not None:
                    _copy_warm_start(need.workdir, run.workdir)
                run.workdir.mkdir(parents=True, exist_ok=True)
                if run.done_file.exists():  # finished at fewer steps: it resumes from its last checkpoint
                    run.done_file.unlink()
                    log(f"continuing {run.workdir.name} to step {dict(run.overrides)['train.steps']}")
                (run.workdir / "study_failed.json").unlink(missing_ok=True)
                (run.workdir / "command.txt").write_text(" ".join(run.command()) + "\n")
                pool.start(run, run.command(), run.workdir / "log.txt")
                log(f"started {run.phase} {run.workdir.name}")
            for ended in pool.ended():
                run = ended.key
                if ended.returncode == 0 and _has_final_eval(run):
                    run.done_file.write_text(json.dumps({"seconds": ended.seconds, "command": run.command()}))
                    done_count += 1
                    left = len(pending) + len(pool)
                    eta = left * (time.monotonic() - start) / done_count / 60
                    log(
                        f"finished {run.workdir.name} in {ended.seconds:.0f} s; {left} to go (~{eta:.0f} min)"
                    )
                else:
                    failed.add(run)
                    rc = ended.returncode
                    _record_failure(run, rc, "exited without its final evaluation" if rc == 0 else "")
                    log(f"FAILED {run.workdir.name} (exit {rc}); see {run.workdir / 'log.txt'}")
    except KeyboardInterrupt:
        pool.stop()  # SIGTERM: each run checkpoints and exits; a rerun resumes it
        raise


def _has_final_eval(run: Run) -> bool:
    steps = dict(run.overrides)["train.steps"]
    try:
        curve = credit_report.run_record(run.workdir)["eval_curve"]
    except (OSError, ValueError):
        return False
    return bool(curve) and curve[-1][0] == steps


def _record_failure(run: Run, rc: int | None, why: str) -> None:
    run.workdir.mkdir(parents=True, exist_ok=True)
    (run.workdir / "study_failed.json").write_text(json.dumps({"exit_status": rc, "why": why}))


def _copy_warm_start(base: Path, workdir: Path) -> None:
    """Gives the run its K's warm-started base (the warm-start cache: the fingerprint matches)."""
    target = workdir / "warmstart"
    if not target.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(base / "warmstart", target)


# --- the command --------------------------------------------------------------------------------------


def run_study(args: argparse.Namespace, log: Any = print) -> int:
    """Plans, runs (resuming) and reports the study; returns the exit status (1 if any run failed)."""
    plan = make_plan(args)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out}: exists and is not a folder")
    check_plan(out, plan)
    ks = sorted(set(plan["ks"]) | ({plan["sweep"]["k"]} if "sweep" in plan else set()))
    bases = {k: base_run(out, plan, k) for k in ks}
    hparams_path = out / "hparams.json"
    all_runs: list[Run] = list(bases.values())
    if "sweep" in plan:
        sweep = sweep_runs(out, plan)
        execute(
            [*bases.values(), *sweep], args.jobs, {r: bases[r.k] for r in sweep}, log, out / COMPILE_CACHE
        )
        results = {r: result_of(r) for r in sweep}
        failed = [r for r in sweep if results[r]["status"] != "ok"]
        if failed:
            log(f"{len(failed)} sweep runs failed (e.g. {failed[0].workdir}); the study needs them: rerun")
            return 1
        hparams = choose_hparams(sweep, results)
        hparams["settings"] = plan["sweep"]
        all_runs += sweep
        rows = list(results.values())
        (out / "sweep.md").write_text(credit_report.sweep_markdown(rows, plan["sweep"]))
        # The rows again as data, for a larger held-out scoring of the sweep (credit_heldout --sweep).
        sweep_doc = {"settings": plan["sweep"], "rows": rows}
        (out / SWEEP_FILE).write_text(json.dumps(sweep_doc, indent=1, sort_keys=True))
    else:
        hparams = load_hparams(Path(plan["hparams_file"]))
    hparams_path.write_text(json.dumps(hparams, indent=1, sort_keys=True))
    if args.sweep_only:
        log(
            f"wrote {out / 'sweep.md'}, {out / SWEEP_FILE} and {hparams_path}; "
            "--sweep-only: the study's runs were not started"
        )
        return 0
    study = study_runs(out, plan, hparams)
    try:
        execute(
            [*bases.values(), *study], args.jobs, {r: bases[r.k] for r in study}, log, out / COMPILE_CACHE
        )
    except KeyboardInterrupt:
        # A study stopped at a time limit still reports (and credit_heldout can score) what finished.
        _write_report(out, plan, bases, study, hparams, log)
        raise
    missing = _write_report(out, plan, bases, study, hparams, log)
    if missing:
        log(f"{len(missing)} runs did not finish (status failed or missing); rerun the command to retry them")
        return 1
    return 0


def _write_report(
    out: Path, plan: dict[str, Any], bases: dict[int, Run], study: list[Run], hparams: dict, log: Any
) -> list[dict[str, Any]]:
    """Writes study.md, study.png and summary.json over ``study`` (unfinished runs as such); returns the
    rows of the runs that did not finish."""
    rows = [result_of(r) for r in study]
    plan_report = plan | {"eval_examples": _eval_examples(bases[plan["ks"][0]])}
    credit_report.write(out, rows, plan_report, hparams)
    log(f"wrote {out / 'study.md'}, {out / 'study.png'} and {out / 'summary.json'} ({len(rows)} runs)")
    return [r for r in rows if r["status"] != "ok"]


def _eval_examples(base: Run) -> Any:
    try:
        config = json.loads((base.workdir / "config.json").read_text())
        return config["data"]["shapes_eval"]
    except (OSError, ValueError, KeyError):
        return "?"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # `kill` (SIGTERM) stops the study as Ctrl-C does: its runs are told to checkpoint and are waited for,
    # instead of being left running without the runner.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_study(args)
    except StudyError as err:
        print(f"sfgrpo.experiments.credit: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sfgrpo.experiments.credit: stopped; rerun the command to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
