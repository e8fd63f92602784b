"""The persistent compilation cache (sfgrpo/compile_cache.py): a second process loads what the first
compiled and computes the same; the folder is checked; the trainer's entry point turns it on and says so."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from helpers import tiny_config
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from sfgrpo import compile_cache, main

ROOT = Path(__file__).resolve().parents[1]

# One process: a program with a loop and a matmul (compiling takes a while on CPU), run on fixed data.
_PROGRAM = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from sfgrpo import compile_cache
compile_cache.use(sys.argv[1])
def f(x):
    return jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ c.T + i), x).sum(axis=0)
before = compile_cache.hits()
out = jax.jit(f).lower(jnp.ones((64, 64))).compile()(jnp.linspace(-1, 1, 64 * 64).reshape(64, 64))
print(json.dumps({"out": np.asarray(out).tolist(), "origin": compile_cache.origin(before)}))
"""


def _run(folder: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROGRAM, str(folder)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_program_the_first_compiled_and_computes_the_same(tmp_path):
    folder = tmp_path / "cache" / "nested"
    first = _run(folder)
    assert first["origin"] == "XLA compiled it"
    assert compile_cache.entries(str(folder)) >= 1
    second = _run(folder)
    assert second["origin"] == "loaded from the persistent compilation cache"
    assert second["out"] == first["out"]  # bit for bit: the same executable


def test_check_creates_a_local_folder_and_passes_a_remote_one_on(tmp_path):
    folder = tmp_path / "a" / "b"
    assert compile_cache.check(str(folder)) == str(folder) and folder.is_dir()
    assert compile_cache.check("gs://bucket/jax_cache") == "gs://bucket/jax_cache"
    assert compile_cache.entries("gs://bucket/jax_cache") == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: str(root / "file"), "exists and is not a folder"),
        (lambda root: str(root / "file" / "below"), "cannot create"),
        (lambda root: "  ", "expected a folder path"),
        (lambda root: 3, "expected a folder path, got 3"),
    ],
    ids=["a file", "below a file", "blank", "not a string"],
)
def test_check_names_the_key_and_what_is_wrong(tmp_path, make, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="config.train.compilation_cache_dir: .*" + message):
        compile_cache.check(make(tmp_path))


@pytest.fixture
def restore_jax_cache_config():
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_compilation_cache_max_size", saved[1])
    jax_compilation_cache.reset_cache()  # reopened at the next compile, in the suite's folder


def test_the_trainer_turns_the_configured_cache_on_and_logs_it(tmp_path, caplog, restore_jax_cache_config):
    config = tiny_config()
    config.train.compilation_cache_dir = str(tmp_path / "compiled")
    with caplog.at_level(logging.INFO):
        assert main._use_compilation_cache(config) is None
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "compiled")
    # Size-limited, so jax locks the folder: processes that share it never read a half-written entry.
    assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES
    assert f"persistent compilation cache: {tmp_path / 'compiled'} (0 programs)" in caplog.text
