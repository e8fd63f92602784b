"""Seconds from SIGTERM to exit: the demo (``python -m sfgrpo.main``) is sent SIGTERM once ``metrics.jsonl``
logs GRPO iteration ``--after``; it finishes the iteration under way, saves a checkpoint and exits 0.
Prints the exit status, the seconds, and the run's one-line message; ``--resume`` then reruns the command
and prints how long the resumed run took to finish.

    python benchmarks/preemption_latency.py --workdir /tmp/preempt [--after 3] [--resume] [-- --config.K=V]

The workdir must be new (or hold a finished warm start, to skip it). Overrides after ``--`` go to
``sfgrpo.main``.
"""

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _iterations(log: Path) -> int:
    if not log.exists():
        return 0
    steps = [0]
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if record.get("stage") == "grpo":
            steps.append(int(record["step"]))
    return max(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--after", type=int, default=3, help="GRPO iteration after which SIGTERM is sent")
    parser.add_argument("--resume", action="store_true", help="rerun the command once it has stopped")
    parser.add_argument("overrides", nargs="*", help="--config.KEY=VALUE overrides for sfgrpo.main")
    args = parser.parse_args()
    command = [
        sys.executable,
        "-m",
        "sfgrpo.main",
        f"--config={ROOT / 'configs' / 'default.py'}",
        f"--workdir={args.workdir}",
        *args.overrides,
    ]
    output = args.workdir.with_name(args.workdir.name + ".log")
    with open(output, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        while _iterations(args.workdir / "metrics.jsonl") < args.after:
            if proc.poll() is not None:
                sys.exit(f"the run exited ({proc.returncode}) before iteration {args.after}; see {output}")
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait()
    seconds = time.monotonic() - sent
    message = [line.strip() for line in output.read_text().splitlines() if line.startswith("sfgrpo:")]
    print(f"exit status {status}, {seconds:.2f} s from SIGTERM to exit")
    print(message[-1] if message else f"(no message; see {output})")
    if args.resume:
        start = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        print(f"resumed run: exit status {done.returncode} after {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
