"""The persistent compilation cache: compiled programs saved in a folder and loaded by later processes.

A run compiles its programs (the warm-start step, the rollout, the reward, the update, the evaluation)
once, but every restart, every resume after a preemption and every run of a study compiles the same
programs again: seconds each for the CPU demo, minutes for FLUX.2-klein at 512 px. With
``train.compilation_cache_dir`` set, XLA's executables are written there, keyed by the program, its
devices, the compiler flags and the jax version, and a later process that compiles the same program loads
it instead. A loaded program computes exactly what a compiled one does.

Several processes may share one folder (a study's runs, the processes of a multi-host run on a shared
disk): the cache is size-limited, which makes jax lock the folder around every read and write, so no
process reads an entry another is still writing.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

MAX_BYTES = 32 * 2**30  # least recently used entries go beyond this; a study's programs take ~100 MB
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_hits = 0


def _count(event: str, **_: object) -> None:
    global _hits
    if event == _HIT_EVENT:
        _hits += 1


monitoring.register_event_listener(_count)


def hits() -> int:
    """How many compiles of this process loaded their program from the persistent cache so far."""
    return _hits


def origin(hits_before: int) -> str:
    """How a compile that started at ``hits()`` == ``hits_before`` got its program, for the compile log."""
    return "loaded from the persistent compilation cache" if _hits > hits_before else "XLA compiled it"


def check(path: str, key: str = "config.train.compilation_cache_dir") -> str:
    """The folder as jax takes it, created when local; raises ValueError naming ``key`` when it cannot be.

    Remote folders (``gs://...``) are passed on as they are: jax reads them through etils.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{key}: expected a folder path, got {path!r}")
    if "://" in path:
        return path
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{key}: {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{key}: cannot create {folder}: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{key}: {folder} is not writable")
    return str(folder)


def use(path: str, key: str = "config.train.compilation_cache_dir") -> str:
    """Makes this process's later compiles read and write the cache in ``path``; returns the folder.

    Raises ValueError naming ``key`` for a folder that cannot be used. Only process 0 of a multi-process
    run writes (jax's rule); every process reads.
    """
    folder = check(path, key)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    # jax opens its cache at the first compile and keeps it; anything compiled before this call (a
    # collective at start-up, a cache named by JAX_COMPILATION_CACHE_DIR) would keep the old folder.
    jax_compilation_cache.reset_cache()
    return folder


def environment(path: str | Path) -> dict[str, str]:
    """Environment variables that give a subprocess the same cache as :func:`use` (jax reads them at
    import), for the experiment runners' subprocesses."""
    return {"JAX_COMPILATION_CACHE_DIR": str(path), "JAX_COMPILATION_CACHE_MAX_SIZE": str(MAX_BYTES)}


def entries(path: str) -> int:
    """The number of programs in a local cache folder (0 for a remote one: not listed)."""
    if "://" in path:
        return 0
    return sum(1 for _ in Path(path).expanduser().glob("*-cache"))
