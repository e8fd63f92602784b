"""How much of a remote judge's time the overlap hides: the demo trained through the HTTP reward server, with
``reward.overlap`` on and off, in one process, one after the other.

The judge is sfgrpo's reward server serving the shapes reward on loopback; ``--delay`` adds a fixed
latency per request to stand in for a slower judge (a VLM). Prints medians over the iterations after the
first: rollout (until the images are on the host), the judge's time, the part of it the trainer waited
for, update, and the wall time between finished steps; then the fraction of the judge's time hidden
behind the next rollout, and the speed-up.

    python benchmarks/reward_overlap.py [--steps 12] [--delay 0.5]
"""

import argparse
import importlib.util
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sfgrpo import metrics, train  # noqa: E402
from sfgrpo.rewards.server import make_reward, serve_in_thread  # noqa: E402

KEYS = ("time/rollout_s", "time/reward_s", "time/reward_wait_s", "time/update_s", "wall_per_step_s")


def config(url: str, steps: int, overlap: bool):
    spec = importlib.util.spec_from_file_location("default", ROOT / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.reward.kind = "server"
    c.reward.url = url
    c.reward.overlap = overlap
    c.warmstart.steps = 20  # the policy's quality does not matter here, its shapes do
    c.train.steps = steps
    c.train.eval_every = steps
    c.train.checkpoint_every = steps
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--delay", type=float, default=0.5, help="extra judge latency per request, seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    shapes = make_reward("shapes", pool="4")

    def slow_judge(request):
        time.sleep(args.delay)
        return shapes(request)

    results = {}
    with serve_in_thread(slow_judge) as server, tempfile.TemporaryDirectory() as tmp:
        for overlap in (False, True):
            workdir = Path(tmp) / f"overlap_{overlap}"
            stamps = []
            train.train(
                config(server.url, args.steps, overlap),
                workdir,
                on_step=lambda step, m, stamps=stamps: stamps.append(time.perf_counter()),
            )
            rows = [r for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["stage"] == "grpo"][1:]
            # Wall time between finished steps: with the overlap a step's own stage times overlap others'.
            for r, (a, b) in zip(rows, zip(stamps, stamps[1:], strict=False), strict=False):
                r["wall_per_step_s"] = b - a
            results[overlap] = {k: statistics.median(r[k] for r in rows) for k in KEYS}
            lagged = [r for r in rows if r["policy_lag"] > 0]
            results[overlap]["lagged"] = len(lagged)
            results[overlap]["hidden"] = (
                statistics.median(1 - r["time/reward_wait_s"] / r["time/reward_s"] for r in lagged)
                if lagged
                else 0.0
            )
    print(f"demo config through the HTTP shapes server, judge latency +{args.delay:.2f} s per request")
    print(f"medians over iterations 2..{args.steps} (seconds)")
    print(f"{'':22s}{'overlap off':>14s}{'overlap on':>14s}")
    for k in KEYS:
        print(f"{k:22s}{results[False][k]:14.3f}{results[True][k]:14.3f}")
    print(f"{'steps with lag 1':22s}{results[False]['lagged']:14d}{results[True]['lagged']:14d}")
    hidden = results[True]["hidden"]
    print(f"judge time hidden behind the next rollout (overlapped steps): {100 * hidden:.0f}%")
    speedup = results[False]["wall_per_step_s"] / results[True]["wall_per_step_s"]
    print(f"iteration speed-up from the overlap: {speedup:.2f}x")


if __name__ == "__main__":
    main()
