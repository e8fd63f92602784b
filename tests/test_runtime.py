"""Mesh creation, logical sharding rules, and host-local batches to global arrays (1 and 2 processes)."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

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
    import sys
    import numpy as np
    import jax
    from sfgrpo import runtime
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    runtime.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    mesh = runtime.make_mesh(data=-1)
    local = np.full((2, 3), pid, np.float32) + np.arange(2, dtype=np.float32)[:, None] * 10
    g = runtime.host_local_to_global({"x": local}, mesh)["x"]
    assert g.shape == (4, 3), g.shape
    total = jax.jit(lambda a: a.sum(axis=1), out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(g)
    print("ROWS", np.asarray(total).tolist(), flush=True)
    jax.distributed.shutdown()
    """
)


def test_host_local_to_global_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(pid), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    # Global rows in process order: host 0's two rows, then host 1's.
    for out in outputs:
        assert "ROWS [0.0, 30.0, 3.0, 33.0]" in out, out
