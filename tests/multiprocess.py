"""Real processes on loopback for the multi-host tests: N copies of a command, each one JAX process.

Each process gets ``--xla_force_host_platform_device_count`` CPU devices; with ``n > 1`` they find each
other through a coordinator on 127.0.0.1. Output goes to files (a pipe that nobody reads could block a
process). They inherit the session's persistent compilation cache (tests/conftest.py), so reruns of the
same programs (resumes, the second leg of a preempted run) skip XLA's compiler.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict[str, str]:
    """The environment of one test process: ``devices`` CPU devices, the tests' XLA flags, and ``tests/``
    on the path (for test judges such as brightness_judge)."""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=path)


class Group:
    """N processes of one job, started together; ``wait`` collects exit codes and outputs."""

    def __init__(
        self, command: Callable[[int, int], Sequence[str]], n: int, devices: int, logdir: Path
    ) -> None:
        """``command(process_id, port)`` -> argv of process ``process_id``."""
        logdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.logs = [logdir / f"process{i}.log" for i in range(n)]
        self.procs = []
        for i in range(n):
            with open(self.logs[i], "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        list(command(i, port)),
                        env=env(devices),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                        start_new_session=True,
                    )
                )

    def output(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def wait(self, timeout: float) -> list[int]:
        """Exit codes, in process order; kills every process and fails if one is still running at the
        deadline."""
        deadline = time.monotonic() + timeout
        codes = []
        try:
            for p in self.procs:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            self.kill()
            tails = "\n".join(f"--- process {i}:\n{self.output(i)[-3000:]}" for i in range(len(self.procs)))
            raise AssertionError(f"processes still running after {timeout} s:\n{tails}") from None
        return codes

    def signal(self, i: int, sig: int) -> None:
        self.procs[i].send_signal(sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)


def run_script(source: str, logdir: Path, n: int = 2, devices: int = 2, timeout: float = 180) -> list[str]:
    """Runs the Python ``source`` as n processes of ``devices`` devices each (argv: process id, coordinator
    port); fails unless all exit 0. Returns their outputs, in process order."""
    logdir.mkdir(parents=True, exist_ok=True)
    script = logdir / "worker.py"
    script.write_text(source)
    group = Group(lambda pid, port: [sys.executable, str(script), str(pid), str(port)], n, devices, logdir)
    codes = group.wait(timeout)
    outputs = [group.output(i) for i in range(n)]
    assert codes == [0] * n, "\n".join(f"--- process {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))
    return outputs


def main_command(workdir: Path, overrides: Sequence[str], n: int) -> Callable[[int, int], list[str]]:
    """``python -m sfgrpo.main`` on the demo config with ``overrides``, as process i of n."""

    def command(i: int, port: int) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "sfgrpo.main",
            f"--config={ROOT / 'configs' / 'default.py'}",
            f"--workdir={workdir}",
            *overrides,
        ]
        if n > 1:
            argv += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"]
        return argv

    return command


def wait_for(condition: Callable[[], bool], group: Group, timeout: float, what: str) -> None:
    """Polls ``condition`` every 50 ms until true; fails (killing the group) at the deadline or if a
    process exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if not group.running() or time.monotonic() > deadline:
            group.kill()
            tails = "\n".join(f"--- process {i}:\n{group.output(i)[-3000:]}" for i in range(len(group.procs)))
            raise AssertionError(f"never saw {what} (a process exited, or {timeout} s passed):\n{tails}")
        time.sleep(0.05)
