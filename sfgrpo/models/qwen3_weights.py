"""Loading a transformers Qwen3 checkpoint folder into a sharded ``Qwen3TextEncoder``.

Accepts a ``Qwen3ForCausalLM`` folder (tensors ``model.layers.{i}...``), a ``Qwen3Model`` folder (no
``model.`` prefix), or a pipeline folder holding one in ``text_encoder/``; weights are ``model.safetensors``
or shards listed in ``model.safetensors.index.json``. Tensors are memory-mapped
(:class:`sfgrpo.models.weights.SafetensorsReader`) and each device's shard is read on its own.
Tensors the encoder does not use are skipped on purpose: ``lm_head``, layers at or above max(layers),
and the final norm unless the last hidden state is selected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sfgrpo import runtime
from sfgrpo.models import weights
from sfgrpo.models.qwen3 import (
    KLEIN_LAYERS,
    Qwen3Config,
    Qwen3TextEncoder,
    config_from_dict,
    normalize_layers,
)
from sfgrpo.models.weights import Entry, SafetensorsReader

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
SUBFOLDER = "text_encoder"

# Our stacked module path -> transformers' per-layer module path (under "layers.{i}.").
_LAYER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LAYER_NORMS = ("self_attn.q_norm", "self_attn.k_norm", "input_layernorm", "post_attention_layernorm")


def resolve_folder(path: str | os.PathLike) -> Path:
    """The folder holding the text encoder's config.json: ``path/text_encoder`` or ``path`` itself."""
    return weights.resolve_folder(path, SUBFOLDER, "Qwen3 text encoder")


def weight_files(folder: Path) -> list[Path]:
    """``model.safetensors``, or the shards that ``model.safetensors.index.json`` lists."""
    return weights.weight_files(folder, WEIGHTS_NAME, "Qwen3 text encoder")


def read_config(folder: Path) -> Qwen3Config:
    file = folder / CONFIG_NAME
    return config_from_dict(json.loads(file.read_text()), source=str(file))


def param_table(num_layers: int, final_norm: bool, prefix: str) -> dict[str, Entry]:
    """Our parameter path ("decoder.mlp.up_proj.kernel") -> its source tensors, for the first
    ``num_layers`` layers; ``prefix`` is "model." for a causal-LM checkpoint, "" for a bare model."""
    layer = [f"{prefix}layers.{i}." for i in range(num_layers)]
    table = {"embed_tokens.embedding": Entry((f"{prefix}embed_tokens.weight",), False, False)}
    for m in _LAYER_LINEARS:
        table[f"decoder.{m}.kernel"] = Entry(tuple(p + m + ".weight" for p in layer), True, True)
    for m in _LAYER_NORMS:
        table[f"decoder.{m}.weight"] = Entry(tuple(p + m + ".weight" for p in layer), True, False)
    if final_norm:
        table["norm.weight"] = Entry((f"{prefix}norm.weight",), False, False)
    return table


def load_state(
    reader: SafetensorsReader, abstract_state: nnx.State, mesh: Mesh, table: dict[str, Entry], where: str
) -> nnx.State:
    """Fills an abstract state from the reader (``weights.fill_state``). Tensors the encoder does not need
    (lm_head, layers above the last one used) are skipped on purpose."""
    what = f"Qwen3 checkpoint {where}"
    return weights.fill_state(reader, abstract_state, mesh, table, what=what, unused_ok=True)


def load(
    path: str | os.PathLike,
    *,
    layers: Sequence[int] = KLEIN_LAYERS,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
) -> Qwen3TextEncoder:
    """See :func:`sfgrpo.models.qwen3.load_qwen3`."""
    folder = resolve_folder(path)
    cfg = read_config(folder)
    files = weight_files(folder)
    reader = SafetensorsReader(files)
    try:
        normalize_layers(layers, cfg.num_hidden_layers)
    except ValueError as err:
        raise ValueError(f"{folder / CONFIG_NAME}: {err}") from err
    prefix = "model." if "model.embed_tokens.weight" in reader.keys() else ""
    mesh = mesh if mesh is not None else runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with runtime.use_mesh(mesh):
        abstract = nnx.eval_shape(lambda: Qwen3TextEncoder(cfg, layers=layers, rngs=nnx.Rngs(0), dtype=dtype))
        table = param_table(abstract.num_layers, abstract.norm is not None, prefix)
        graphdef, abstract_state = nnx.split(abstract)
        state = load_state(reader, abstract_state, mesh, table, str(folder))
        return nnx.merge(graphdef, state)
