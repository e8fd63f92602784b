"""Reading a diffusers VAE folder (``AutoencoderKLFlux2`` or ``AutoencoderKL``) into a ``vae.KLAutoencoder``.

Our parameter paths mirror diffusers' state-dict names, so the mapping is a rule (:func:`diffusers_name`):
``kernel`` is torch's ``weight`` (conv OIHW -> HWIO, linear (out, in) -> (in, out)), and three modules
are single-entry lists in diffusers (``downsamplers.0``, ``upsamplers.0``, ``to_out.0``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sfgrpo.models.weights import CONFIG_NAME, SafetensorsReader, resolve_folder, weight_files

__all__ = [
    "CONFIG_NAME",
    "diffusers_name",
    "load_state",
    "read_config_dict",
    "resolve_vae_folder",
    "torch_shape",
]

_RENAMES = {"downsample": "downsamplers.0", "upsample": "upsamplers.0", "to_out": "to_out.0"}
# Buffers diffusers saves that we do not use: BatchNorm's update counter (statistics are frozen here).
_IGNORED = frozenset({"bn.num_batches_tracked"})


def resolve_vae_folder(path: str | os.PathLike) -> Path:
    """The folder holding the VAE's config.json: ``path/vae`` (a pipeline folder) or ``path`` itself."""
    return resolve_folder(path, "vae", "diffusers VAE")


def read_config_dict(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict; invalid JSON or a non-object raises naming the file."""
    file = folder / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def diffusers_name(path: tuple[Any, ...]) -> str:
    """Our flat parameter path -> the diffusers state-dict name."""
    parts = [_RENAMES.get(str(p), str(p)) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def torch_shape(ours: tuple[int, ...], is_kernel: bool) -> tuple[int, ...]:
    """The diffusers shape of one of our variables (``is_kernel``: its name is ``kernel``)."""
    if is_kernel and len(ours) == 4:  # HWIO <- OIHW
        return (ours[3], ours[2], ours[0], ours[1])
    if is_kernel and len(ours) == 2:  # (in, out) <- (out, in)
        return (ours[1], ours[0])
    return ours


def _from_torch(t: np.ndarray, is_kernel: bool) -> np.ndarray:
    if is_kernel and t.ndim == 4:
        return np.transpose(t, (2, 3, 1, 0))
    if is_kernel and t.ndim == 2:
        return t.T
    return t


def load_state(folder: Path, abstract_state: nnx.State, mesh: Mesh | None) -> nnx.State:
    """Fills an abstract ``KLAutoencoder`` state from the folder's safetensors (variables keep their dtype).

    Missing, unexpected or mis-shaped tensors raise one ``ValueError`` naming the folder and all of them.
    """
    reader = SafetensorsReader(weight_files(folder))
    names = set(reader.keys())
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    missing, wrong, used = [], [], set()
    flat = nnx.to_flat_state(abstract_state)
    for path, var in flat:
        name = diffusers_name(path)
        used.add(name)
        aval = var.get_value()
        is_kernel = path[-1] == "kernel"
        want = torch_shape(tuple(aval.shape), is_kernel)
        if name not in names:
            missing.append(name)
            continue
        if reader.shape(name) != want:
            wrong.append(f"{name}: file {reader.shape(name)}, expected {want}")
            continue
        value = _from_torch(np.asarray(reader[name]), is_kernel).astype(aval.dtype)
        var.set_value(jax.device_put(value, replicated) if replicated is not None else jnp.asarray(value))
    unexpected = sorted(names - used - _IGNORED)
    if missing or unexpected or wrong:
        parts = [
            f"{label} ({len(names)}): {names}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if names
        ]
        raise ValueError(f"VAE checkpoint in {folder} does not match its config: " + "; ".join(parts))
    return nnx.from_flat_state(flat)
