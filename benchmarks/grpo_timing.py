"""Prints the time per GRPO iteration, split into rollout, reward and update, and the compile times.

Usage: python benchmarks/grpo_timing.py WORKDIR [WORKDIR ...]

Reads the run's metrics.jsonl (written with train.fuse_step=False, which times each stage) and prints
medians over the iterations after the first (the first includes compilation), and the evaluation rewards
at the start and the end of GRPO.
"""

import statistics
import sys
from pathlib import Path

from sfgrpo.metrics import read_metrics


def summarise(workdir: Path) -> None:
    records = read_metrics(workdir / "metrics.jsonl")
    grpo = [r for r in records if r["stage"] == "grpo" and r["step"] > 1]
    print(f"{workdir}: {len(grpo) + 1} GRPO iterations")
    for key in ("time/rollout_s", "time/reward_s", "time/update_s", "time/iteration_s"):
        values = [r[key] for r in grpo if key in r]
        if values:
            print(
                f"  {key:20s} median {statistics.median(values):8.3f} s  "
                f"(min {min(values):.3f}, max {max(values):.3f})"
            )
    for r in records:
        if r["stage"] == "compile":
            for key, value in sorted(r.items()):
                if key.startswith("time/compile_"):
                    print(f"  {key:32s} {value:8.1f} s")
    evals = [(r["step"], r["eval/reward/mean"]) for r in records if "eval/reward/mean" in r]
    if evals:
        print(
            f"  eval/reward/mean at step {evals[0][0]}: {evals[0][1]:.4f}; "
            f"at step {evals[-1][0]}: {evals[-1][1]:.4f}"
        )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        summarise(Path(path))
