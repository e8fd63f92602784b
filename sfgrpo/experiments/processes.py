"""A pool of training or evaluation subprocesses, each logging to its own file, for the experiment runners.

The runners decide what to start and when; the pool starts a command, reports the ones that ended, and on
Ctrl-C or SIGTERM tells every live one to stop (a training run checkpoints then) and waits for it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import IO

from sfgrpo import compile_cache


def environment(jobs: int, compile_cache_dir: Path | None = None) -> dict[str, str]:
    """The subprocesses' environment: with several at once, no XLA process spins a thread pool over every
    core, and on a GPU none reserves most of the memory up front. With ``compile_cache_dir``, they share a
    persistent compilation cache there (``sfgrpo/compile_cache.py``): a program compiles once for all the
    runs that share it, unless the environment already names a cache (``JAX_COMPILATION_CACHE_DIR``)."""
    env = dict(os.environ)
    if compile_cache_dir is not None and not env.get("JAX_COMPILATION_CACHE_DIR"):
        env.update(compile_cache.environment(compile_cache_dir))
    if jobs > 1:
        flags = env.get("XLA_FLAGS", "")
        if jobs >= (os.cpu_count() or 1) and "multi_thread_eigen" not in flags:
            env["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


@dataclasses.dataclass(frozen=True)
class Ended:
    """A subprocess that exited: the key it was started with, its exit status and its wall time (s)."""

    key: Hashable
    returncode: int
    seconds: float


class ProcessPool:
    """Subprocesses keyed by the caller's objects; ``len(pool)`` is how many are live."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._live: dict[Hashable, tuple[subprocess.Popen, float, IO[str]]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._live

    def start(self, key: Hashable, command: Sequence[str], log_file: Path) -> None:
        """Starts ``command`` with stdout and stderr appended to ``log_file``."""
        if key in self._live:
            raise ValueError(f"ProcessPool.start: {key!r} is already running")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(log_file, "a")  # noqa: SIM115 - closed when the process ends
        proc = subprocess.Popen(list(command), stdout=handle, stderr=subprocess.STDOUT, env=self._env)
        self._live[key] = (proc, time.monotonic(), handle)

    def ended(self, wait: float = 0.5) -> Iterator[Ended]:
        """Sleeps ``wait`` seconds, then yields every subprocess that has exited since the last call."""
        time.sleep(wait)
        for key, (proc, t0, handle) in list(self._live.items()):
            rc = proc.poll()
            if rc is None:
                continue
            handle.close()
            del self._live[key]
            yield Ended(key, rc, time.monotonic() - t0)

    def stop(self) -> None:
        """SIGTERM to every live subprocess, then waits for each (a training run checkpoints and exits)."""
        for proc, _, _ in self._live.values():
            proc.terminate()
        for proc, _, handle in self._live.values():
            proc.wait()
            handle.close()
        self._live.clear()
