"""Loading a diffusers-format FLUX.2 transformer folder into sharded Flax parameters.

The mapping between diffusers tensor names and our parameter paths is a declarative table
(:func:`linear_modules`, :func:`param_table`): each of our parameters names the diffusers tensor(s) it
comes from, whether it is stacked over blocks, and whether it is transposed (torch ``Linear.weight`` is
(out, in); our ``kernel`` is (in, out)). Tensors are read lazily from memory-mapped safetensors and each
device's shard is built by ``jax.make_array_from_callback``, so no host or device ever holds the whole
model unless it is that device's share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sfgrpo import runtime
from sfgrpo.models.flux2_config import Flux2Config, config_from_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"

# ---------------------------------------------------------------------------------------------------------
# The name table. Keys: our module path; values: the diffusers module path ("{i}" = block index).
_TOP_LINEARS = {
    "x_embedder": "x_embedder",
    "context_embedder": "context_embedder",
    "time_guidance_embed.timestep_embedder.linear_1": "time_guidance_embed.timestep_embedder.linear_1",
    "time_guidance_embed.timestep_embedder.linear_2": "time_guidance_embed.timestep_embedder.linear_2",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.linear",
    "single_stream_modulation.linear": "single_stream_modulation.linear",
    "norm_out.linear": "norm_out.linear",
    "proj_out": "proj_out",
}
_GUIDANCE_LINEARS = {
    "time_guidance_embed.guidance_embedder.linear_1": "time_guidance_embed.guidance_embedder.linear_1",
    "time_guidance_embed.guidance_embedder.linear_2": "time_guidance_embed.guidance_embedder.linear_2",
}
_DOUBLE_LINEARS = {
    "attn.to_q": "attn.to_q",
    "attn.to_k": "attn.to_k",
    "attn.to_v": "attn.to_v",
    "attn.to_out": "attn.to_out.0",
    "attn.add_q_proj": "attn.add_q_proj",
    "attn.add_k_proj": "attn.add_k_proj",
    "attn.add_v_proj": "attn.add_v_proj",
    "attn.to_add_out": "attn.to_add_out",
    "ff.linear_in": "ff.linear_in",
    "ff.linear_out": "ff.linear_out",
    "ff_context.linear_in": "ff_context.linear_in",
    "ff_context.linear_out": "ff_context.linear_out",
}
_DOUBLE_NORMS = {n: n for n in ("attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")}
_SINGLE_LINEARS = {"attn.to_qkv_mlp_proj": "attn.to_qkv_mlp_proj", "attn.to_out": "attn.to_out"}
_SINGLE_NORMS = {n: n for n in ("attn.norm_q", "attn.norm_k")}
_DOUBLE, _SINGLE = "transformer_blocks", "single_transformer_blocks"


@dataclasses.dataclass(frozen=True)
class Module:
    """One of our modules and its diffusers name; ``layers`` > 0 when stacked (name has ``{i}``)."""

    ours: str
    theirs: str
    layers: int = 0

    def names(self) -> list[str]:
        """The diffusers module names, one per stacked layer."""
        return [self.theirs.format(i=i) for i in range(self.layers)] if self.layers else [self.theirs]


def _modules(cfg: Flux2Config, top: Mapping[str, str], double: Mapping, single: Mapping) -> list[Module]:
    out = [Module(k, v) for k, v in top.items()]
    for prefix, table, n in ((_DOUBLE, double, cfg.num_layers), (_SINGLE, single, cfg.num_single_layers)):
        if n:
            out += [Module(f"{prefix}.{k}", f"{prefix}.{{i}}.{v}", n) for k, v in table.items()]
    return out


def linear_modules(cfg: Flux2Config) -> list[Module]:
    """Every linear layer of the model (their params: ``kernel`` <-> transposed ``weight``)."""
    top = {**_TOP_LINEARS, **(_GUIDANCE_LINEARS if cfg.guidance_embeds else {})}
    return _modules(cfg, top, _DOUBLE_LINEARS, _SINGLE_LINEARS)


@dataclasses.dataclass(frozen=True)
class Entry:
    """Our parameter <- checkpoint tensor(s): ``names`` has one name per layer for a stacked parameter;
    ``transpose`` for torch ``Linear.weight`` (out, in) -> our ``kernel`` (in, out)."""

    names: tuple[str, ...]
    stacked: bool
    transpose: bool


def param_table(cfg: Flux2Config) -> dict[str, Entry]:
    """Our parameter path ("a.b.kernel") -> its source tensors."""
    table = {}
    for m in linear_modules(cfg):
        table[m.ours + ".kernel"] = Entry(tuple(n + ".weight" for n in m.names()), m.layers > 0, True)
    for m in _modules(cfg, {}, _DOUBLE_NORMS, _SINGLE_NORMS):
        table[m.ours + ".weight"] = Entry(tuple(n + ".weight" for n in m.names()), True, False)
    return table


# ---------------------------------------------------------------------------------------------------------
# Safetensors, read lazily.
_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,  # e.g. a BatchNorm's num_batches_tracked, which loaders skip
}


class WeightsError(ValueError):
    """A weight file that cannot be read as it says: not safetensors, a broken header, or truncated."""


def read_safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(header length in bytes, {tensor name: {'dtype', 'shape', 'data_offsets'}}) of a safetensors file,
    checked against the file's size, so that a truncated download is named here rather than failing as an
    out-of-range memory map later. Raises WeightsError."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise WeightsError(f"{file}: header of {n} bytes in a file of {size} bytes (truncated?)")
            header = json.loads(f.read(n))
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{file}: not a safetensors header (a JSON {type(header).__name__})")
    header.pop("__metadata__", None)
    end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    if 8 + n + end > size:
        raise WeightsError(
            f"{file} is truncated: its tensors need {8 + n + end} bytes, the file has {size} "
            "(an interrupted download or copy?)"
        )
    return n, header


_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def folder_fingerprint(folder: str | os.PathLike, weights_name: str = WEIGHTS_NAME) -> str:
    """A sha256 that tells a model folder's weights apart from any other's, without reading them all: the
    config.json, and for each weight file its name, size, safetensors header and 16 samples of 64 KiB
    spread over its data. Training changes nearly every weight, so a fine-tuned or other model differs in
    the samples; the same files copied elsewhere keep the fingerprint. Raises like ``weight_files``."""
    folder = resolve_folder(folder)
    digest = hashlib.sha256((folder / CONFIG_NAME).read_bytes())
    for file in weight_files(folder, weights_name):
        n, _ = read_safetensors_header(file)
        size = file.stat().st_size
        digest.update(f"{file.name}|{size}|".encode())
        with open(file, "rb") as f:
            digest.update(f.read(8 + n))
            data = size - 8 - n
            for i in range(_SAMPLES):
                f.seek(8 + n + (data * i) // _SAMPLES)
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


class SafetensorsReader:
    """Memory-maps the tensors of one or more safetensors files: ``reader[name]`` is a lazy np array."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, tuple[Path, str, tuple[int, ...], int]] = {}
        for file in files:
            n, header = read_safetensors_header(file)
            for name, info in header.items():
                if info["dtype"] not in _DTYPES:
                    raise WeightsError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
                self._where[name] = (
                    file,
                    info["dtype"],
                    tuple(info["shape"]),
                    8 + n + info["data_offsets"][0],
                )

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def __getitem__(self, name: str) -> np.ndarray:
        file, dtype, shape, offset = self._where[name]
        return np.memmap(file, dtype=_DTYPES[dtype], mode="r", offset=offset, shape=shape)


def resolve_folder(
    path: str | os.PathLike, subfolder: str = "transformer", what: str = "diffusers transformer"
) -> Path:
    """The folder holding a component's config.json: ``path/subfolder`` (a pipeline) or ``path`` itself."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {str(path)!r} does not exist (or is not a folder)")
    for cand in (path / subfolder, path):
        if (cand / CONFIG_NAME).is_file():
            return cand
    raise FileNotFoundError(
        f"{str(path)!r} is not a {what} folder: neither {path / subfolder / CONFIG_NAME} "
        f"nor {path / CONFIG_NAME} exists"
    )


def weight_files(folder: Path, weights_name: str = WEIGHTS_NAME, what: str = "") -> list[Path]:
    """The safetensors files of a model folder: ``weights_name``, or the shards its index lists."""
    index_name = weights_name + ".index.json"
    if (folder / index_name).is_file():
        index = json.loads((folder / index_name).read_text())
        files = sorted({folder / f for f in index["weight_map"].values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder / index_name} lists shards that do not exist: {missing}")
        return files
    if (folder / weights_name).is_file():
        return [folder / weights_name]
    raise FileNotFoundError(
        f"{what + ' folder ' if what else ''}{folder} has no {weights_name} or {index_name}"
    )


def read_config(folder: Path) -> Flux2Config:
    file = folder / CONFIG_NAME
    return config_from_dict(json.loads(file.read_text()), source=str(file))


def shard_callback(reader: SafetensorsReader, entry: Entry, dtype: Any) -> Callable[[tuple], np.ndarray]:
    """Builds the shard at ``index`` (a tuple of slices into our parameter) from the source tensors."""

    def read(name: str, index: tuple) -> np.ndarray:
        if entry.transpose:  # ours (in, out)[i, o] == theirs (out, in)[o, i]
            return np.asarray(reader[name][index[1], index[0]]).T
        return np.asarray(reader[name][index])

    def cb(index: tuple) -> np.ndarray:
        if entry.stacked:
            layers = range(len(entry.names))[index[0]]
            out = np.stack([read(entry.names[i], index[1:]) for i in layers])
        else:
            out = read(entry.names[0], index)
        return out.astype(dtype)

    return cb


def fill_state(
    reader: SafetensorsReader,
    abstract_state: nnx.State,
    mesh: Mesh,
    table: Mapping[str, Entry],
    *,
    what: str,
    unused_ok: bool = False,
) -> nnx.State:
    """Fills an abstract state (from ``nnx.eval_shape``) with the reader's tensors through a name table,
    each placed with the sharding of its logical axes on ``mesh``. Missing or mis-shaped tensors, and
    tensors the table does not use (unless ``unused_ok``), raise one ``ValueError`` naming them all and
    ``what`` (the checkpoint)."""
    shardings = nnx.to_flat_state(runtime.state_shardings(abstract_state, mesh))
    available = set(reader.keys())
    missing, wrong, used = [], [], set()
    flat = nnx.to_flat_state(abstract_state)
    for (path, var), (_, sharding) in zip(flat, shardings, strict=True):
        key = ".".join(map(str, path))
        entry = table.get(key)
        if entry is None:
            raise ValueError(f"parameter {key!r} has no entry in the name table of the {what}")
        aval = var.get_value()
        per_layer = aval.shape[1:] if entry.stacked else aval.shape
        want = tuple(reversed(per_layer)) if entry.transpose else tuple(per_layer)
        ok = True
        for name in entry.names:
            used.add(name)
            if name not in available:
                missing.append(name)
                ok = False
            elif reader.shape(name) != want:
                wrong.append(f"{name}: file {reader.shape(name)}, expected {want}")
                ok = False
        if ok:
            cb = shard_callback(reader, entry, aval.dtype)
            var.set_value(jax.make_array_from_callback(aval.shape, sharding.get_value(), cb))
    unexpected = [] if unused_ok else sorted(available - used)
    if missing or unexpected or wrong:
        parts = [
            f"{label} ({len(names)}): {names}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if names
        ]
        raise ValueError(f"{what} does not match its config: " + "; ".join(parts))
    return nnx.from_flat_state(flat)


def load_state(
    reader: SafetensorsReader, abstract_state: nnx.State, mesh: Mesh, cfg: Flux2Config
) -> nnx.State:
    """Fills an abstract Flux2 state from the reader (see ``fill_state``)."""
    return fill_state(reader, abstract_state, mesh, param_table(cfg), what="Flux2 checkpoint")


def load_flux2(
    path: str | os.PathLike,
    build: Callable[[Flux2Config], nnx.Module],
    *,
    mesh: Mesh | None = None,
) -> Any:
    """Reads config and weights of a diffusers FLUX.2 transformer folder into ``build(config)``'s
    structure (its param dtype), sharded on ``mesh`` (default: one device)."""
    folder = resolve_folder(path)
    cfg = read_config(folder)
    reader = SafetensorsReader(weight_files(folder))
    mesh = mesh if mesh is not None else runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with runtime.use_mesh(mesh):
        abstract = nnx.eval_shape(lambda: build(cfg))
        graphdef, abstract_state = nnx.split(abstract)
        state = load_state(reader, abstract_state, mesh, cfg)
        return nnx.merge(graphdef, state)
