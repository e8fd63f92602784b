"""sfgrpo/experiments/processes.py: the experiment runners' subprocess pool, on real (tiny) subprocesses."""

from __future__ import annotations

import sys
import time

import pytest

from sfgrpo import compile_cache
from sfgrpo.experiments import processes


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_the_pool_reports_each_ended_process_once_with_its_status_and_log(tmp_path):
    pool = processes.ProcessPool(processes.environment(1))
    pool.start("ok", _python("print('hello')"), tmp_path / "ok" / "log.txt")
    pool.start(
        "bad", _python("import sys; print('oops', file=sys.stderr); sys.exit(3)"), tmp_path / "bad.txt"
    )
    with pytest.raises(ValueError, match="already running"):
        pool.start("ok", _python("pass"), tmp_path / "again.txt")
    ended = {}
    deadline = time.monotonic() + 60
    while len(pool):
        assert time.monotonic() < deadline, "the subprocesses did not end"
        for e in pool.ended(wait=0.05):
            assert e.key not in ended and e.seconds >= 0
            ended[e.key] = e.returncode
    assert ended == {"ok": 0, "bad": 3}
    assert "ok" not in pool and list(pool.ended(wait=0)) == []
    assert (tmp_path / "ok" / "log.txt").read_text() == "hello\n"
    assert "oops" in (tmp_path / "bad.txt").read_text()  # stderr goes to the same log


def test_stop_terminates_and_waits_for_every_live_process(tmp_path):
    pool = processes.ProcessPool(processes.environment(1))
    code = (
        "import signal, sys, time, pathlib\n"
        "def stop(*_):\n"
        "    pathlib.Path(sys.argv[1]).write_text('stopped')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "pathlib.Path(sys.argv[1] + '.started').write_text('')\n"
        "time.sleep(60)\n"
    )
    marker = tmp_path / "marker"
    pool.start("sleeper", [*_python(code), str(marker)], tmp_path / "log.txt")
    deadline = time.monotonic() + 60
    while not (tmp_path / "marker.started").exists():
        assert time.monotonic() < deadline, "the sleeper did not start"
        time.sleep(0.05)
    pool.stop()
    assert len(pool) == 0 and marker.read_text() == "stopped"


def test_several_jobs_get_one_xla_thread_each_and_no_gpu_preallocation(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.setattr(processes.os, "cpu_count", lambda: 2)
    one = processes.environment(1)
    assert one["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in one
    two = processes.environment(2)
    assert two["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2",
        "--xla_cpu_multi_thread_eigen=false",
    ]
    assert two["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def test_a_compile_cache_folder_is_shared_unless_the_environment_names_one(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    env = processes.environment(2, tmp_path / "compile_cache")
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "compile_cache")
    # Size-limited: jax then locks the folder, so runs started together never read a half-written entry.
    assert int(env["JAX_COMPILATION_CACHE_MAX_SIZE"]) == compile_cache.MAX_BYTES
    assert "JAX_COMPILATION_CACHE_DIR" not in processes.environment(2)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    assert processes.environment(2, tmp_path / "compile_cache")["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"
