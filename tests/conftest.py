"""Test-wide set-up: eight simulated CPU devices, so sharding tests run on any machine, and a lower XLA
optimisation level, which halves CPU compile times (the tests' programs are tiny; compiling dominates).

XLA reads the flags when the backend starts, so they must be set before anything imports jax.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_FLAGS]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
