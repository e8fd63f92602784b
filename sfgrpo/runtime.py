"""The runtime: multi-host initialisation, the device mesh, logical sharding axes, host data to global arrays.

Sharding is declared once, by logical axis names (ARCHITECTURE.md): model code annotates parameters and
activations with names such as ``("embed", "mlp")``; ``LOGICAL_AXIS_RULES`` maps those names onto the
mesh axes ``("data", "fsdp", "tensor")``. One device is a 1x1x1 mesh, so the code path is the same
everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Unlisted names (and None) are replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("channels", None),
    ("lora_rank", None),
    ("layers", None),
)

_log = logging.getLogger(__name__)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Initialises multi-host JAX when more than one process takes part; a no-op for a single process.

    On Cloud TPU and under SLURM/Open MPI, jax discovers the arguments itself; pass them explicitly
    elsewhere (for example two processes on 127.0.0.1 in tests).
    """
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        return
    if num_processes is None and coordinator_address is None:
        # Auto-detection: only worth trying on clusters jax knows how to read.
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as err:
            _log.info("jax.distributed auto-initialisation skipped: %s", err)
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        coordinator_bind_address=coordinator_bind_address(coordinator_address),
    )


def coordinator_bind_address(coordinator_address: str | None) -> str | None:
    """Where process 0's coordinator listens: the coordinator address itself when it is a loopback address
    (jax's default binds every interface, which would expose a test or single-machine job to the network);
    None (jax's default, all interfaces) otherwise, so that the other hosts can reach it."""
    if not coordinator_address or ":" not in coordinator_address:
        return None
    host = coordinator_address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return coordinator_address
    try:
        return coordinator_address if ipaddress.ip_address(host).is_loopback else None
    except ValueError:  # a host name: it may resolve to any interface
        return None


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds the ("data", "fsdp", "tensor") mesh. One of the sizes may be -1: it takes the remainder.

    Axes are Explicit (jax's default since 0.9), so shardings propagate through the program by type.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name!r} must be a positive size or -1, got {size}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh sizes {sizes} do not divide the {len(devices)} devices: "
                f"{len(devices)} is not a multiple of {fixed}"
            )
        sizes[free[0]] = len(devices) // fixed
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh sizes {sizes} need {total} devices, but {len(devices)} are available")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Explicit,) * len(MESH_AXES),
        devices=devices,
    )


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec over the mesh axes; unknown names are replicated.

    A mesh axis is used at most once per spec: a later logical axis that maps to an axis already taken
    is replicated, as in flax's logical partitioning.
    """
    table = dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    """NamedSharding on ``mesh`` for an array whose dimensions carry ``logical_axes``."""
    return NamedSharding(mesh, logical_to_spec(logical_axes))


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Makes ``mesh`` current and installs the logical axis rules, for model creation and tracing.

    Flax requires annotated variables to be created under ``jax.set_mesh``.
    """
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield mesh


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an nnx State (or abstract state) from its variables' logical annotations."""
    with nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        return nnx.get_named_sharding(state, mesh)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch-major array: the leading axis over ("data", "fsdp"), the rest replicated."""
    return logical_sharding(mesh, ("batch",) + (None,) * (ndim - 1))


def host_local_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this host's slice of a batch into global arrays sharded along the batch axis.

    Every host passes its own rows (the same number on each); the global batch is their concatenation in
    process order.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"batch field {key!r} is a scalar; every field needs a leading batch axis")
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out


def global_to_host_local(x: jax.Array) -> np.ndarray:
    """This host's rows of a batch-sharded global array, as numpy (the inverse of host_local_to_global).

    The rows come from the addressable shards in order; replicated copies of a shard are read once.
    """
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    pieces: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        start = (shard.index[0].start or 0) if shard.index else 0
        if start not in pieces:
            pieces[start] = np.asarray(shard.data)
    return np.concatenate([pieces[k] for k in sorted(pieces)], axis=0)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole global array as numpy on every process (a collective when it spans processes): for
    writing parameters to files. Gathers one array at a time, so the host holds one tensor extra."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def first_rows(tree: Any, rows: int) -> Any:
    """The first ``rows`` rows of each batch-sharded global array, replicated on every device, so that any
    process can read them as numpy (a grid's few images, not the whole batch). A collective: every process
    calls it; call under ``use_mesh``. One small program per shape, compiled once."""
    return _first_rows(tree, rows)


@functools.partial(jax.jit, static_argnums=1)
def _first_rows(tree: Any, rows: int) -> Any:
    return jax.tree.map(lambda x: jax.sharding.reshard(x, PartitionSpec())[:rows], tree)


def sum_over_processes(values: Mapping[str, float]) -> dict[str, float]:
    """Host-side scalars (failure counts, valid images) summed over every process; a collective.

    Every process must pass the same keys (they are sent in sorted order, as float32).
    """
    if jax.process_count() == 1:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    local = np.asarray([float(values[k]) for k in keys], np.float32)
    gathered = np.asarray(multihost_utils.process_allgather(local))  # (processes, len(keys))
    return {k: float(v) for k, v in zip(keys, gathered.sum(axis=0), strict=True)}


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective; every process gets the same answer)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


def all_processes(flag: bool) -> bool:
    """Whether ``flag`` is true on every process (a collective)."""
    return not any_process(not flag)


def writes_here(directory: str | Path) -> bool:
    """Whether this process writes files meant for every host in ``directory``: on a filesystem the hosts
    share (NFS, GCS-fuse) only process 0 does; on each host's local disk every process writes its own copy.
    A collective; it finds out by having process 0 leave a probe file that the others look for."""
    if jax.process_count() == 1:
        return True
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = int(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(secrets.randbits(31), np.int32))))
    probe = directory / f".sfgrpo-shared-probe-{token}"
    if jax.process_index() == 0:
        probe.touch()
    barrier(f"probe written {token}")
    shared = all_processes(probe.exists())
    barrier(f"probe read {token}")
    if jax.process_index() == 0:
        probe.unlink()
    _log.info("%s is %s", directory, "shared by the hosts" if shared else "local to each host")
    return jax.process_index() == 0 or not shared


CLI_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def log_to_stderr() -> None:
    """INFO logging on stderr for a command line tool. absl (imported with Orbax) may already have given
    the root logger a bare handler, which ``logging.basicConfig`` would leave as it is: reformat it."""
    root = logging.getLogger()
    logging.basicConfig(level=logging.INFO, format=CLI_LOG_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(CLI_LOG_FORMAT))
    root.setLevel(logging.INFO)
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend discovery notes
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's notes on every read


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
