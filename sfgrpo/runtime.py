"""The runtime: multi-host initialisation, the device mesh, logical sharding axes, host data to global arrays.

Sharding is declared once, by logical axis names (ARCHITECTURE.md): model code annotates parameters and
activations with names such as ``("embed", "mlp")``; ``LOGICAL_AXIS_RULES`` maps those names onto the
mesh axes ``("data", "fsdp", "tensor")``. One device is a 1x1x1 mesh, so the code path is the same
everywhere.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
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
    )


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
