"""Writing a transformer (FLUX.2 or OmniGen2) as a diffusers-format folder: ``config.json``, safetensors
shards and their index.

The inverse of the loaders (``weights.load_flux2``, ``omnigen2_weights.load``), through the same name
tables: a stacked parameter becomes one tensor per block and a kernel (in, out) becomes torch's ``weight``
(out, in). The folder loads with ``Flux2Transformer2DModel.from_pretrained`` (or upstream's
``OmniGen2Transformer2DModel.from_pretrained``) and with sfgrpo's loaders. Shards are named
as diffusers names them (``diffusion_pytorch_model-00001-of-00002.safetensors``) and indexed by
``diffusion_pytorch_model.safetensors.index.json``, even when there is one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from sfgrpo import runtime
from sfgrpo.models import omnigen2_weights, weights
from sfgrpo.models.flux2_config import Flux2Config
from sfgrpo.models.omnigen2 import OmniGen2Transformer

CLASS_NAME = "Flux2Transformer2DModel"
OMNIGEN2_CLASS_NAME = "OmniGen2Transformer2DModel"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # diffusers' shards of the klein checkpoints are about this size
_EXECUTION_FIELDS = ("remat", "attention", "reference_kv", "scan_unroll")  # ours, not the architecture's


def diffusers_config(cfg: Any) -> dict[str, Any]:
    """The ``config.json`` diffusers writes for a ``Flux2Transformer2DModel`` (or upstream's
    ``OmniGen2Transformer2DModel``) of this architecture."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _EXECUTION_FIELDS}
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    name = CLASS_NAME if isinstance(cfg, Flux2Config) else OMNIGEN2_CLASS_NAME
    return {"_class_name": name, **fields}


def _param_table(model: nnx.Module) -> dict[str, weights.Entry]:
    if isinstance(model, OmniGen2Transformer):
        return omnigen2_weights.param_table(nnx.state(model, nnx.Param), model.config)
    return weights.param_table(model.config)


def _planned_tensors(model: nnx.Module) -> list[tuple[str, Any, weights.Entry]]:
    """(our parameter path, its variable, its table entry) for every parameter, in table order."""
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    table = _param_table(model)
    found = {".".join(map(str, path)): var for path, var in state}
    adapters = [p for p in found if ".lora." in p]
    if adapters:
        raise ValueError(f"merge the LoRA adapters first (lora.merge_lora): {adapters[:3]} are attached")
    missing = sorted(set(table) - set(found))
    extra = sorted(set(found) - set(table))
    if missing or extra:
        raise ValueError(f"the transformer does not match its name table: missing {missing}, extra {extra}")
    return [(path, found[path], entry) for path, entry in table.items()]


def save_transformer(
    model: nnx.Module,
    folder: str | os.PathLike,
    *,
    dtype: Any,
    config: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    write: bool = True,
) -> dict[str, Any]:
    """Writes ``model`` (a FLUX.2 or OmniGen2 transformer without attached adapters) to ``folder`` in
    diffusers' format.

    Args:
      dtype: the tensors' dtype in the files (numpy dtype; bfloat16 is ``ml_dtypes.bfloat16``).
      config: the ``config.json`` to write (a base folder's, to keep its fields as they were); default
        ``diffusers_config(model.config)``.
      max_shard_bytes: a shard is closed before it would grow past this (a tensor larger than it gets a
        shard of its own).
      write: whether this process writes. Every process must call (sharded parameters are gathered one at
        a time); only writers touch the disk.

    Returns the index (``{"metadata": {"total_size"}, "weight_map"}``).
    """
    folder = Path(folder)
    dtype = np.dtype(dtype)
    plan = _planned_tensors(model)
    shards: list[list[tuple[str, Any, weights.Entry]]] = [[]]
    size = 0
    for item in plan:
        var = item[1]
        nbytes = int(np.prod(var.get_value().shape)) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    n = len(shards)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    for shard_name, shard in zip(names, shards, strict=True):
        tensors: dict[str, np.ndarray] = {}
        for _, var, entry in shard:
            value = runtime.to_host(var.get_value()).astype(np.float32).astype(dtype)
            per_layer = list(value) if entry.stacked else [value]
            for name, tensor in zip(entry.names, per_layer, strict=True):
                tensors[name] = np.ascontiguousarray(tensor.T if entry.transpose else tensor)
                weight_map[name] = shard_name
                total += tensors[name].nbytes
        if write:
            save_file(tensors, os.fspath(folder / shard_name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if write:
        (folder / weights.INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        cfg = dict(config) if config is not None else diffusers_config(model.config)
        (folder / weights.CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return index
