"""Test-wide set-up: eight simulated CPU devices, so sharding tests run on any machine.

XLA reads the flag when the backend starts, so it must be set before anything imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
