"""Loading an OmniGen2 ``transformer/`` folder (upstream ``OmniGen2Transformer2DModel`` safetensors, one
file or sharded) into sharded Flax parameters.

The name table follows from our parameter paths by three rules: a stacked block's path gains the block
index after its stack (``layers.attn.to_q`` -> ``layers.{i}.attn.to_q``); a few modules are renamed
(:data:`RENAMES`: torch ``Sequential`` indices, ``to_out.0``); a linear ``kernel`` (in, out) is the
transposed torch ``weight`` (out, in), everything else is read as is. Reading and placing the tensors is
``weights.fill_state``'s (the FLUX.2 loader's), so a checkpoint that does not match its config is named in
one error listing every missing, unexpected and mis-shaped tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from sfgrpo import runtime
from sfgrpo.models import weights
from sfgrpo.models.omnigen2_config import OmniGen2Config, config_from_dict

STACKS = ("noise_refiner", "ref_image_refiner", "context_refiner", "layers")
# Our module path -> upstream's, where they differ beyond the block index.
RENAMES = {
    "time_caption_embed.caption_embedder.norm": "time_caption_embed.caption_embedder.0",
    "time_caption_embed.caption_embedder.linear": "time_caption_embed.caption_embedder.1",
    "attn.to_out": "attn.to_out.0",
}


def upstream_module(ours: str) -> tuple[str, bool]:
    """Our module path -> (upstream module path with ``{i}`` for a stacked block's index, stacked?)."""
    stack, _, rest = ours.partition(".")
    stacked = stack in STACKS and bool(rest)
    body = rest if stacked else ours
    for mine, theirs in RENAMES.items():
        if body == mine or body.startswith(mine + "."):
            body = theirs + body[len(mine) :]
            break
    return (f"{stack}.{{i}}.{body}" if stacked else body), stacked


def entry(path: str, cfg: OmniGen2Config) -> weights.Entry:
    """Our parameter path ("layers.attn.to_q.kernel") -> its upstream tensor(s)."""
    module, _, leaf = path.rpartition(".")
    if not module:  # a top-level parameter (image_index_embedding)
        return weights.Entry((leaf,), False, False)
    theirs, stacked = upstream_module(module)
    name = f"{theirs}.{'weight' if leaf == 'kernel' else leaf}"
    layers = cfg.num_layers if module.startswith("layers.") else cfg.num_refiner_layers
    names = tuple(name.format(i=i) for i in range(layers)) if stacked else (name,)
    return weights.Entry(names, stacked, leaf == "kernel")


def param_table(abstract_state: nnx.State, cfg: OmniGen2Config) -> dict[str, weights.Entry]:
    """Every parameter of a model's state -> its upstream tensors."""
    table = {}
    for path, _ in nnx.to_flat_state(abstract_state):
        key = ".".join(map(str, path))
        table[key] = entry(key, cfg)
    return table


def linear_modules(cfg: OmniGen2Config) -> dict[str, str]:
    """Our path of every linear layer -> upstream's module name (``{i}`` for the block index), for
    LoRA export."""
    from sfgrpo.models.omnigen2 import OmniGen2Transformer  # noqa: PLC0415 - omnigen2 imports us lazily

    with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        abstract = nnx.eval_shape(lambda: OmniGen2Transformer(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(abstract)):
        key = ".".join(map(str, path))
        if key.endswith(".kernel"):
            out[key[: -len(".kernel")]] = upstream_module(key[: -len(".kernel")])[0]
    return out


def read_config(folder: Path) -> OmniGen2Config:
    file = folder / weights.CONFIG_NAME
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return config_from_dict(data, source=str(file))


def load(
    path: str | os.PathLike,
    build: Callable[[OmniGen2Config], nnx.Module],
    *,
    mesh: Mesh | None = None,
) -> Any:
    """Reads config and weights of an OmniGen2 transformer folder (``path/transformer`` or ``path``) into
    ``build(config)``'s structure (its param dtype), sharded on ``mesh`` (default: one device)."""
    folder = weights.resolve_folder(path, "transformer", "OmniGen2 transformer")
    cfg = read_config(folder)
    reader = weights.SafetensorsReader(weights.weight_files(folder, what="OmniGen2 transformer"))
    mesh = mesh if mesh is not None else runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with runtime.use_mesh(mesh):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: build(cfg)))
        table = param_table(abstract_state, cfg)
        state = weights.fill_state(reader, abstract_state, mesh, table, what=f"OmniGen2 checkpoint {folder}")
        return nnx.merge(graphdef, state)
