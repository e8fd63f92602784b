"""Scored images per second through the HTTP reward path, for 512x512 shapes images.

Two paths, each judge in its own process on loopback:
  server: ``python -m sfgrpo.rewards.server --reward shapes`` and the trainer's client (``ServerJudge``),
          one image per request, ``c`` requests in flight;
  vlm:    the fake OpenAI-compatible judge (``tests/fake_vlm.py``, the shapes scorer behind VLM-style
          answers) and ``VLMJudge``, two requests per image, ``c`` in flight.
Each figure is the median over ``--repeats`` batches of ``--images`` images after a warm-up batch, and
includes the client's PNG encoding and the judge's decoding and scoring.

    python benchmarks/reward_throughput.py [--images 32] [--repeats 3] [--concurrency 1 4 16]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fake_vlm import MODEL, ShapesOracle, edited_variants, request_from_examples, wait_for_line  # noqa: E402

from sfgrpo.data.shapes import ShapesConfig, ShapesSource  # noqa: E402
from sfgrpo.rewards.remote import ServerJudge  # noqa: E402
from sfgrpo.rewards.vlm import VLMJudge  # noqa: E402


def start(command: list[str], pattern: str, timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Starts a judge process and returns it with the URL it logs once it listens."""
    proc = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        return proc, wait_for_line(proc, pattern, timeout_s).group(1)
    except RuntimeError:
        proc.kill()
        raise


def rate(judge, request, repeats: int) -> float:
    """Median images per second over ``repeats`` calls, after one warm-up call."""
    judge(request)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = judge(request)
        times.append(time.perf_counter() - t0)
        assert scores.valid.all(), scores.failures
    return request.batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="images per scored batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()

    res, n = args.resolution, args.images
    config = ShapesConfig(image_size=res, max_edits=3)
    records = list(ShapesSource(n, split="train", seed=0, config=config))
    examples = list(ShapesOracle.from_records(records, res).examples.values())
    request = request_from_examples(examples, edited_variants(examples), r_max=3)
    common = dict(scale=25.0, timeout_s=300.0, retries=0, backoff_s=0.0, on_failure="fail")
    print(f"{n} images of {res}x{res} per batch, median of {args.repeats} batches")

    server, url = start(
        [sys.executable, "-m", "sfgrpo.rewards.server", "--reward", "shapes", "--port", "0"],
        r"serving reward 'shapes' at (\S+)",
    )
    try:
        for c in args.concurrency:
            judge = ServerJudge(url, max_concurrency=c, request_batch=1, **common)
            judge.check()
            print(f"server  concurrency {c:2d}: {rate(judge, request, args.repeats):7.2f} images/s")
    finally:
        server.terminate()
        server.wait(timeout=30)

    vlm, url = start(
        [
            sys.executable,
            "tests/fake_vlm.py",
            "--port",
            "0",
            "--resolution",
            str(res),
            "--train",
            str(n),
            "--eval",
            "1",
            "--seed",
            "0",
            "--max-edits",
            "3",
        ],
        r"at (http://\S+/v1)",
    )
    try:
        for c in args.concurrency:
            judge = VLMJudge(url, MODEL, max_concurrency=c, **common)
            judge.check()
            print(f"vlm     concurrency {c:2d}: {rate(judge, request, args.repeats):7.2f} images/s")
    finally:
        vlm.terminate()
        vlm.wait(timeout=30)


if __name__ == "__main__":
    main()
