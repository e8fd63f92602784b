"""Test-wide set-up: eight simulated CPU devices, so sharding tests run on any machine, a lower XLA
optimisation level, which halves CPU compile times (the tests' programs are tiny; compiling dominates), and
a persistent compilation cache for the session, so that the many runs of the same programs (resumes,
reruns, the processes of the multi-host tests, which inherit it) compile once.

XLA reads the flags when the backend starts, so they must be set before anything imports jax.
"""

import atexit
import os
import shutil
import tempfile

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_FLAGS]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sfgrpo-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
