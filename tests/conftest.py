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

# The longest test files first (minutes on 2 cores): with two workers taking a file each at a time
# (pyproject's addopts), a long file started last would leave one worker running it alone at the end.
_LONGEST_FIRST = (
    "test_train.py",
    "test_multihost.py",
    "test_credit_study.py",
    "test_omnigen2_recipe.py",
    "test_export.py",
    "test_evaluate.py",
    "test_eval_benchmark.py",
    "test_step.py",
    "test_flux2.py",
    "test_reward_stage.py",
    "test_klein_config.py",
    "test_omnigen2.py",
    "test_edit_omnigen2.py",
    "test_regions.py",
    "test_dry_run.py",
    "test_lora.py",
    "test_warmstart.py",
    "test_bad_inputs.py",
    "test_vae.py",
    "test_benchmark_device_grpo.py",
    "test_attention.py",
    "test_benchmark_vs_diffusers.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
