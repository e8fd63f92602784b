"""benchmarks/device_grpo.py at toy size on the CPU: one timed GRPO iteration, its JSON report."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_toy_iteration_json(tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # One CPU device (the suite simulates 8): the toy's compiles are what takes the time.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_backend_optimization_level=0"])
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "device_grpo.py"),
            "--toy",
            "--iters",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUMMARY cpu x1" in proc.stdout
    r = json.loads(out.read_text())
    assert r["device"]["platform"] == "cpu" and r["device"]["count"] == 1
    s = r["settings"]
    assert s["toy"] and s["batch"] == 8 and s["group_size"] == 4
    assert s["window"] == 4 and s["sampler_steps"] == 10 and s["optimizer_steps"] == 2
    for stage in ("rollout_s", "reward_s", "update_s", "iteration_s"):
        t = r["times"][stage]
        assert len(t["all"]) == 1 and t["median"] > 0, stage
    for name in ("rollout", "update"):
        assert r["compile"][name]["compile_s"] > 0
        assert r["flops"][name] > 0
        assert 0 < r["mfu"][name] <= 1
    # The model FLOPs of the update leave out remat's recomputation; one forward x the rollout's forwards
    # is part of the rollout's count (which also has the VAE).
    assert 0 < r["flops"]["update_model"] <= r["flops"]["update"]
    assert r["flops"]["forwards"] == 8 * 10
    assert 0 < r["flops"]["forwards"] * r["flops"]["forward"] < r["flops"]["rollout"]
    assert r["images_per_s"] > 0
    assert r["rollout_ideal_s"] > 0 and r["rollout_vs_ideal"] > 0
    assert r["memory"]["source"] == "memory_analysis" and r["memory"]["peak_bytes"] > 0
    assert r["peak_source"].startswith("measured")
