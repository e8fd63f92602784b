"""The prompt-embedding cache: build, lookup, bfloat16 storage, reuse, rebuilds when it is stale, and two
hosts on a shared or on local disks."""

import logging
import re
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from multiprocess import Group

from sfgrpo.data import prompt_cache, shapes


class Encoder:
    """A deterministic fake text encoder: (n,) strings -> (n, 4, 3) features; counts its calls."""

    def __init__(self, batch_size=2):
        self.calls, self.batch_size = 0, batch_size

    def __call__(self, texts):
        assert len(texts) == self.batch_size  # always a full batch: one compiled shape
        self.calls += 1
        out = np.zeros((len(texts), 4, 3), np.float32)
        for i, t in enumerate(texts):
            out[i] = len(t) + np.arange(12).reshape(4, 3) / 7.0
        return out


def build(tmp_path, instructions, dtype="float32", fingerprint="model-a", encoder=None):
    encoder = encoder or Encoder()
    cache = prompt_cache.build(
        tmp_path / "cache", instructions, encoder, fingerprint=fingerprint, dtype=dtype, batch_size=2
    )
    return cache, encoder


def test_lookup_returns_each_instruction_s_features_and_the_empty_one(tmp_path):
    texts = ["make it red", "remove the cat", "make it red", "x"]
    cache, encoder = build(tmp_path, texts)
    assert len(cache.rows) == 3 and encoder.calls == 3  # "" first, then 3 distinct in batches of 2
    got = cache.lookup(["x", "make it red"])
    assert got.shape == (2, 4, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], 1 + np.arange(12).reshape(4, 3) / 7.0)
    np.testing.assert_allclose(got[1], 11 + np.arange(12).reshape(4, 3) / 7.0)
    np.testing.assert_allclose(cache.uncond[0], np.arange(12).reshape(4, 3) / 7.0)
    with pytest.raises(KeyError, match="not cached, e.g. 'never seen'"):
        cache.lookup(["never seen"])


def test_bfloat16_features_round_trip_through_the_files(tmp_path):
    cache, _ = build(tmp_path, ["make it red"], dtype="bfloat16")
    got = cache.lookup(["make it red"])
    assert got.dtype == ml_dtypes.bfloat16
    want = (11 + np.arange(12).reshape(4, 3) / 7.0).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got, want[None])
    reopened = prompt_cache.PromptCache(tmp_path / "cache")
    np.testing.assert_array_equal(reopened.lookup(["make it red"]), got)


def test_reuse_only_when_complete_and_built_for_the_same_encoder(tmp_path, caplog):
    texts = ["a", "bb"]
    build(tmp_path, texts)
    assert prompt_cache.reuse(tmp_path / "cache", texts, "model-a") is not None
    with caplog.at_level(logging.WARNING):
        assert prompt_cache.reuse(tmp_path / "cache", texts, "model-b") is None
        assert prompt_cache.reuse(tmp_path / "cache", [*texts, "ccc"], "model-a") is None
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "was built for model-a, not model-b" in messages and "lacks 1 instruction" in messages
    assert prompt_cache.reuse(tmp_path / "absent", texts, "model-a") is None
    # A rebuild replaces the old cache.
    cache, _ = build(tmp_path, ["ccc"], fingerprint="model-b")
    assert cache.fingerprint == "model-b" and len(cache.rows) == 1


def test_split_instructions_reads_records():
    source = shapes.ShapesSource(3, split="train", seed=0, config=shapes.ShapesConfig(image_size=32))
    assert prompt_cache.split_instructions(source) == [source[i].instruction for i in range(3)]


def test_a_bad_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        build(tmp_path, ["a"], dtype="int8")


_HOSTS = textwrap.dedent(
    """
    import logging
    import sys
    import numpy as np
    import jax
    from sfgrpo import runtime
    from sfgrpo.data import prompt_cache
    logging.basicConfig(level=logging.INFO)
    pid, port, base, shared = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "shared"
    runtime.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    mesh = runtime.make_mesh(data=-1)
    # A collective fake encoder: each host's rows of one global batch, through a program on every device.
    encode_jit = jax.jit(lambda x: x[:, None, :] * np.arange(1, 5, dtype=np.float32)[None, :, None])
    calls = []

    def encode(texts):
        calls.append(len(texts))
        rows = np.asarray([[len(t), t.count("a"), 1.0] for t in texts], np.float32)
        out = encode_jit(runtime.host_local_to_global({"x": rows}, mesh)["x"])
        return runtime.global_to_host_local(out)[: len(texts)]

    directory = f"{base}/cache" if shared else f"{base}/host{pid}/cache"
    texts = ["make it red", "a banana", "x", "make it red"]
    kw = dict(fingerprint="f", dtype="float32", batch_size=2)
    cache = prompt_cache.open_or_build(directory, texts, encode, **kw)
    print("CALLS", len(calls), "SUM", float(cache.lookup(texts).sum()), flush=True)
    again = prompt_cache.open_or_build(directory, texts, encode, **kw)
    print("REUSED", len(calls), float(again.lookup(texts).sum()), flush=True)
    """
)


@pytest.mark.parametrize("where", ["shared", "local"])
def test_two_hosts_build_once_on_a_shared_disk_and_each_on_local_disks(tmp_path, where):
    script = tmp_path / "hosts.py"
    script.write_text(_HOSTS)
    group = Group(
        lambda pid, port: [sys.executable, str(script), str(pid), str(port), str(tmp_path), where],
        2,
        2,
        tmp_path / "logs",
    )
    assert group.wait(240) == [0, 0], group.output(0)[-3000:] + group.output(1)[-3000:]
    outputs = [group.output(i) for i in (0, 1)]
    writers = ["prompt cache: writing" in out for out in outputs]
    # Shared: process 0 alone writes, both read the same file; local disks: each host writes its own.
    assert writers == ([True, False] if where == "shared" else [True, True])
    sums = [re.search(r"CALLS (\d+) SUM (\S+)", out).groups() for out in outputs]
    assert sums[0] == sums[1] and sums[0][0] == "3"  # "" then 3 distinct instructions in batches of 2
    # A second call finds the cache on every host: no encoder call, the same features.
    for out, (calls, total) in zip(outputs, sums, strict=True):
        assert f"REUSED {calls} {total}" in out
    if where == "local":
        assert (tmp_path / "host0" / "cache" / "meta.json").is_file()
        assert (tmp_path / "host1" / "cache" / "meta.json").is_file()
    assert not list(tmp_path.rglob(".sfgrpo-shared-probe-*"))
