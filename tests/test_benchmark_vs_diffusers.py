"""benchmarks/vs_diffusers.py: a tiny run of every section as a subprocess, checked through its JSON report
(figures, not speed: the timings only have to exist), and its errors for bad flags."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_diffusers.py"


def _run(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def _positive_timings(timings: dict) -> None:
    assert {"jax", "torch_eager"} <= set(timings)
    for name, t in timings.items():
        assert t["median"] > 0 and t["min"] > 0 and t["max"] >= t["min"], name
        assert len(t["all"]) >= 1


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("vs_diffusers") / "out.json"
    # One torch thread: on a busy machine, OpenMP threads waiting for each other make tiny ops very slow.
    done = _run("--tiny", "--torch-threads", "1", "--json", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "parity:" in done.stdout and "OK" in done.stdout
    return json.loads(out.read_text())


def test_parity_and_setup(report):
    parity = report["parity"]
    assert parity["ok"] and parity["relative"] < 1e-4 and parity["max_abs_diff"] < 1e-4
    assert report["workload"] == dict(batch=2, tokens=16, ref_tokens=16, text_tokens=8, seq=40)
    assert report["machine"]["torch_threads"] == 1
    assert len(report["machine"]["load_before"]) == 3 and len(report["machine"]["load_after"]) == 3
    assert report["errors"] == {}


def test_rollout_and_update_timings(report):
    for section in ("rollout", "update"):
        r = report[section]
        _positive_timings(r["times"])
        assert set(r["ratios"]) == {f"{n}/jax" for n in r["times"] if n != "jax"}
        assert all(v > 0 for v in r["ratios"].values())
        assert r["compile_s"]["jax compile"] > 0
        assert r["flops_jaxpr"] > 0
    assert report["rollout"]["max_abs_diff"] < 1e-4
    update = report["update"]
    assert update["lora_params"]["jax"] == update["lora_params"]["torch"] > 0
    assert math.isclose(update["first_loss"]["jax"], update["first_loss"]["torch"], rel_tol=1e-4)


def test_flops_and_mfu(report):
    mfu = report["mfu"]
    hand = mfu["forward_flops_hand"]
    assert hand["total"] == pytest.approx(hand["linear"] + hand["attention"])
    assert abs(mfu["forward_flops_jaxpr"] / hand["total"] - 1) < 0.10
    assert abs(mfu["jaxpr_over_hand"] - 1) < 0.10
    assert mfu["matmul_peak"]["jax_gflops"] > 0 and mfu["matmul_peak"]["torch_gflops"] > 0
    _positive_timings(mfu["forward_times"])
    for key in ("forward", "rollout", "update"):
        for figures in mfu[key].values():
            assert figures["gflops"] > 0 and figures["pct_of_peak"] > 0
    # 6 steps of one forward each; an update is a forward and a backward (more than one forward of work).
    assert mfu["rollout_flops_over_forward"] == pytest.approx(6, rel=0.01)
    assert mfu["update_forwards_of_work"] > 1.5
    assert set(mfu["update_forwards_of_time"]) == set(report["update"]["times"])
    assert all(v > 0 for v in mfu["update_forwards_of_time"].values())
    assert set(report["update"]["breakdown"]) == {"jax", "torch_eager"}
    for stages in report["update"]["breakdown"].values():
        assert stages["forward"] > 0 and stages["step"] > 0


def test_scaling_fit(report):
    scaling = report["scaling"]
    assert scaling["sizes"] == [16, 64] and len(scaling["rows"]) == 2
    for fit in scaling["fit"].values():
        assert len(fit["predicted_s"]) == len(fit["measured_s"]) == 2
        assert all(math.isfinite(p) for p in fit["predicted_s"])
        assert all(m > 0 for m in fit["measured_s"])


def test_kv_section(report):
    kv = report["kv"]
    assert kv["parity"]["ok"] and kv["parity"]["max_abs_diff"] < 1e-4
    assert set(kv["rollout"]["times"]) == {"jax", "jax_per_step", "jax_joint", "torch_kv_eager"}
    assert set(kv["update"]["times"]) == {"jax", "jax_per_step", "jax_joint"}
    for section in ("rollout", "update"):
        for name, t in kv[section]["times"].items():
            assert t["median"] > 0 and t["min"] > 0, (section, name)
        assert all(c > 0 for c in kv[section]["compile_s"].values())
    assert set(kv["saving"]) == {
        "rollout per_step/once",
        "rollout joint/once",
        "update per_step/once",
        "update joint/once",
    }
    assert all(v > 0 for v in kv["saving"].values())
    # Cached references and a reference pass inside every step are the same model: the same loss.
    losses = kv["update"]["losses"]
    assert math.isclose(losses["once"], losses["per_step"], rel_tol=1e-5)
    assert math.isfinite(losses["joint"])


def test_unroll_section(report):
    unroll = report["unroll"]
    assert unroll["scan_unroll"] == {"rolled": 1, "unrolled": 4}  # the tiny preset's 4 single blocks
    # Unrolling changes the program, not the arithmetic.
    assert unroll["rollout"]["max_abs_diff"] < 1e-5
    losses = unroll["update"]["losses"]
    assert math.isclose(losses["rolled"], losses["unrolled"], rel_tol=1e-5)
    for section in ("rollout", "update"):
        assert set(unroll[section]["times"]) == {"rolled", "unrolled"}
        assert all(t["median"] > 0 for t in unroll[section]["times"].values())
    assert set(unroll["speedup"]) == {"rollout rolled/unrolled", "update rolled/unrolled"}
    assert all(v > 0 for v in unroll["speedup"].values())
    assert set(unroll["compile_s"]) == {
        f"{w} {v}" for w in ("rollout", "update") for v in ("rolled", "unrolled")
    }


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--remat", "some"], "--remat must be one of"),
        (["--sections", "rollout,speed"], "--sections: unknown"),
        (["--head-dim", "12"], "--head-dim must be a multiple of 8"),
        (["--scaling-sizes", "16"], "at least 2 distinct"),
        (["--reps", "0"], "--reps must be >= 1"),
        (["--scan-unroll", "0"], "--scan-unroll must be >= 1"),
    ],
)
def test_bad_flags(flags, message):
    done = _run(*flags, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
