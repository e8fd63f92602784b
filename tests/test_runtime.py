"""Mesh creation, logical sharding rules, and host-local batches to global arrays (1 and 2 processes)."""

import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from multiprocess import run_script

from sfgrpo import runtime


def test_mesh_sizes_and_remainder():
    assert len(jax.devices()) == 8
    mesh = runtime.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    one = runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    assert one.devices.size == 1


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((3, 1, 1), "need 3 devices"),
        ((-1, 3, 1), "not a multiple of 3"),
        ((-1, -1, 1), "at most one"),
        ((0, 1, 1), "positive"),
    ],
)
def test_mesh_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        runtime.make_mesh(*sizes)


def test_logical_rules():
    assert runtime.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert runtime.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert runtime.logical_to_spec(("heads", None, "unknown")) == P("tensor", None, None)


def test_host_local_to_global_single_process():
    mesh = runtime.make_mesh(data=4, fsdp=2)
    batch = {"x": np.arange(32, dtype=np.float32).reshape(8, 4), "ids": np.arange(8)}
    out = runtime.host_local_to_global(batch, mesh)
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    assert out["x"].sharding.spec == P(("data", "fsdp"), None)
    assert len(out["x"].addressable_shards) == 8
    with pytest.raises(ValueError, match="'bad'"):
        runtime.host_local_to_global({"bad": np.float32(1.0)}, mesh)


_WORKER = textwrap.dedent(
    """
    import logging
    import sys
    import numpy as np
    import jax
    from sfgrpo import runtime
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    logging.basicConfig(level=logging.INFO)
    runtime.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    mesh = runtime.make_mesh(data=-1)
    local = np.full((2, 3), pid, np.float32) + np.arange(2, dtype=np.float32)[:, None] * 10
    g = runtime.host_local_to_global({"x": local}, mesh)["x"]
    assert g.shape == (4, 3), g.shape
    total = jax.jit(lambda a: a.sum(axis=1), out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(g)
    print("ROWS", np.asarray(total).tolist(), flush=True)
    print("LOCAL", runtime.global_to_host_local(g)[:, 0].tolist(), flush=True)
    with runtime.use_mesh(mesh):
        first = runtime.first_rows({"x": g}, 3)["x"]
    print("FIRST", np.asarray(first)[:, 0].tolist(), flush=True)
    print("SUM", runtime.sum_over_processes({"b": 1.0 + pid, "a": 10.0}), flush=True)
    print("ANY", runtime.any_process(pid == 1), runtime.any_process(False), flush=True)
    print("ALL", runtime.all_processes(pid == 1), runtime.all_processes(True), flush=True)
    jax.distributed.shutdown()
    """
)


def test_collectives_on_two_processes(tmp_path):
    outputs = run_script(_WORKER, tmp_path)
    # The coordinator of a loopback address listens on loopback only.
    assert "Starting JAX distributed service on 127.0.0.1:" in outputs[0]
    # Global rows in process order: host 0's two rows, then host 1's; each host reads back its own.
    for pid, out in enumerate(outputs):
        assert "ROWS [0.0, 30.0, 3.0, 33.0]" in out, out
        assert f"LOCAL {[float(pid), 10.0 + pid]}" in out, out
        assert "FIRST [0.0, 10.0, 1.0]" in out, out  # the first 3 global rows, readable on every host
        assert "SUM {'a': 20.0, 'b': 3.0}" in out, out
        assert "ANY True False" in out and "ALL False True" in out, out


@pytest.mark.parametrize(
    "address, bind",
    [
        ("127.0.0.1:1234", "127.0.0.1:1234"),
        ("127.0.0.2:99", "127.0.0.2:99"),
        ("localhost:1234", "localhost:1234"),
        ("[::1]:1234", "[::1]:1234"),
        ("10.0.0.2:1234", None),  # other hosts must reach it: every interface, jax's default
        ("host0:1234", None),
        (None, None),
    ],
)
def test_coordinator_binds_loopback_only_for_a_loopback_address(address, bind):
    assert runtime.coordinator_bind_address(address) == bind
