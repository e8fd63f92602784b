"""LoRA for the FLUX.2 and OmniGen2 transformers: attach, select for training, export in PEFT/diffusers
format, merge.

``apply_lora`` attaches a low-rank update ``(x @ A) @ B * alpha / rank`` to every :class:`Linear` whose
module path matches one of the patterns (default: the model's own, :func:`default_patterns`). Paths are
ours (``transformer_blocks.attn.to_q``, no block index: a stacked linear gets stacked factors, one pair
per block). B starts at zero, so a fresh LoRA leaves the model's output unchanged. ``LoRAParam`` is the
filter for LoRA-only training; full fine-tuning trains ``nnx.Param`` without attaching LoRA.

Names in files are the upstream module names of the model's own table (:func:`linear_table`: FLUX.2's
``weights.linear_modules``, OmniGen2's ``omnigen2_weights.linear_modules``), chosen from the model's type.
``export_lora`` writes ``transformer.<upstream module>.lora_A.weight`` (r, in) and ``.lora_B.weight``
(out, r) with the PEFT config (r, lora_alpha, target_modules) in the safetensors metadata:

- FLUX.2: the layout ``Flux2KleinPipeline.load_lora_weights`` and
  ``Flux2Transformer2DModel.load_lora_adapter`` read; they take ``lora_alpha / r`` from the metadata.
- OmniGen2: the layout ``OmniGen2Pipeline.load_lora_weights`` (``OmniGen2LoraLoaderMixin``) reads. That
  loader drops the file's metadata (``lora_state_dict`` returns the tensors alone and
  ``load_lora_into_transformer`` calls ``transformer.load_lora_adapter(state_dict, network_alphas=None)``),
  so PEFT gets ``lora_alpha = r``, a scale of 1. The export therefore folds ``alpha / r`` into ``lora_B``
  and writes ``lora_alpha = r``: every loader, metadata-aware or not, then computes the trained update.

``merge_lora`` folds attached adapters into their base kernels; ``read_lora_file`` and ``merge_lora_file``
read a diffusers-format LoRA file (ours, or another trainer's) and fold it into a transformer, with the
scale diffusers gives it (``lora_alpha / r`` from the file's PEFT metadata, 1 without metadata). A file
for the other model family is refused by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sfgrpo import runtime
from sfgrpo.models import omnigen2_weights, weights
from sfgrpo.models.flux2 import Flux2Transformer
from sfgrpo.models.layers import Linear, matmul
from sfgrpo.models.omnigen2 import OmniGen2Transformer

# The attention and MLP projections of every block (SPEC §9: LoRA on attention and MLP projections).
DEFAULT_PATTERNS: tuple[str, ...] = (r"^(single_)?transformer_blocks\.(attn|ff|ff_context)\.",)
FLUX2_PATTERNS = DEFAULT_PATTERNS
# OmniGen2: the attention and SwiGLU projections of the blocks of all four stacks (the EditScore OmniGen2
# RL recipe's targets, used there with r32 / alpha 64); not the adaLN modulations nor the embedders.
OMNIGEN2_PATTERNS: tuple[str, ...] = (
    r"^(noise_refiner|ref_image_refiner|context_refiner|layers)\."
    r"(attn\.(to_q|to_k|to_v|to_out)|feed_forward\.(linear_1|linear_2|linear_3))$",
)


@dataclasses.dataclass(frozen=True)
class _Family:
    """What LoRA needs to know of a transformer family."""

    name: str
    # The block stacks, whose names tell a file's modules apart from the other family's.
    stacks: tuple[str, ...]
    patterns: tuple[str, ...]
    # Export with alpha / r folded into lora_B (and lora_alpha = r): the pipeline's loader drops metadata.
    fold_scale: bool


_FLUX2 = _Family("FLUX.2", ("transformer_blocks", "single_transformer_blocks"), FLUX2_PATTERNS, False)
_OMNIGEN2 = _Family("OmniGen2", omnigen2_weights.STACKS, OMNIGEN2_PATTERNS, True)


def _family(model: nnx.Module) -> _Family:
    if isinstance(model, Flux2Transformer):
        return _FLUX2
    if isinstance(model, OmniGen2Transformer):
        return _OMNIGEN2
    raise TypeError(
        f"LoRA naming needs a Flux2Transformer or OmniGen2Transformer, got {type(model).__name__}"
    )


def default_patterns(model: nnx.Module) -> tuple[str, ...]:
    """The model's default LoRA targets: :data:`FLUX2_PATTERNS` or :data:`OMNIGEN2_PATTERNS`."""
    return _family(model).patterns


def linear_table(model: nnx.Module) -> list[weights.Module]:
    """Every linear layer of ``model`` with its upstream module name(s), from the model's own name table
    (FLUX.2: ``weights.linear_modules``; OmniGen2: ``omnigen2_weights.linear_modules``)."""
    if _family(model) is _FLUX2:
        return weights.linear_modules(model.config)
    lins = linear_paths(model)
    out = []
    for ours, theirs in omnigen2_weights.linear_modules(model.config).items():
        # A stacked linear's kernel is (blocks, in, out): one upstream module per block.
        layers = lins[ours].kernel.get_value().shape[0] if "{i}" in theirs else 0
        out.append(weights.Module(ours, theirs, layers))
    return out


class LoRAParam(nnx.Param):
    """A LoRA factor. Use the class as an nnx filter to train only the adapter."""


# Filters: the adapter alone, and the frozen base weights under LoRA training.
LORA = LoRAParam
BASE = nnx.All(nnx.Param, nnx.Not(LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, scale alpha / r, and regexes (``re.search``) over our linear-module paths (None: the
    model's :func:`default_patterns`)."""

    rank: int = 32
    alpha: float = 64.0
    patterns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")


class LoRA(nnx.Module):
    """The low-rank update of a linear layer with kernel (*stack, in, out): A (*stack, in, r) and
    B (*stack, r, out), B zero-initialised.

    The factors are float32 whatever the base model's dtype: Adam's steps of about lr are far below a
    bf16 factor's resolution (2^-8 relative) and would round to zero. They are cast to the input's dtype
    for the products, so a bf16 model still computes in bf16.
    """

    def __init__(
        self,
        kernel_shape: Sequence[int],
        kernel_axes: Sequence[str | None],
        *,
        rank: int,
        alpha: float,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ) -> None:
        *stack, d_in, d_out = kernel_shape
        layers = ("layers",) * len(stack)
        in_axis, out_axis = tuple(kernel_axes)[-2:]
        # PEFT's A init (kaiming-uniform, a=sqrt(5)) is uniform(+-1/sqrt(in)).
        bound = 1.0 / np.sqrt(d_in)
        a = jax.random.uniform(rngs.params(), (*stack, d_in, rank), dtype, -bound, bound)
        self.a = LoRAParam(a, out_sharding=(*layers, in_axis, "lora_rank"))
        self.b = LoRAParam(
            jnp.zeros((*stack, rank, d_out), dtype), out_sharding=(*layers, "lora_rank", out_axis)
        )
        self.rank, self.alpha = rank, float(alpha)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., in) -> (..., out), the update to add to the base layer's output."""
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        return matmul(matmul(x, a), b) * (self.alpha / self.rank)


def _creation_context(kernel: Any) -> contextlib.AbstractContextManager:
    """Annotated variables need a mesh and the logical rules: the current mesh, or the kernel's."""
    if not jax.sharding.get_abstract_mesh().empty:
        return nnx.logical_axis_rules(runtime.LOGICAL_AXIS_RULES)
    mesh = getattr(getattr(kernel, "sharding", None), "mesh", None)
    if isinstance(mesh, jax.sharding.Mesh):
        return runtime.use_mesh(mesh)
    raise ValueError("apply_lora: the model's parameters carry no mesh; call it under runtime.use_mesh(mesh)")


def linear_paths(model: nnx.Module) -> dict[str, Linear]:
    """Our module path ("transformer_blocks.attn.to_q") -> Linear, for every linear layer of ``model``."""
    return {".".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, Linear)}


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Attaches a LoRA to each linear layer whose path matches ``config.patterns`` (None: the model's
    :func:`default_patterns`); returns those paths.

    Raises ``ValueError`` when nothing matches (a typo in a pattern would silently train nothing).
    """
    patterns = default_patterns(model) if config.patterns is None else config.patterns
    targets = {
        path: lin for path, lin in linear_paths(model).items() if any(re.search(p, path) for p in patterns)
    }
    if not targets:
        raise ValueError(f"LoRA patterns {patterns} match no linear layer of the model")
    specs = {}
    for path, lin in targets.items():
        kernel = lin.kernel.get_value()
        axes = lin.kernel.get_metadata().get("out_sharding") or (None,) * len(kernel.shape)
        specs[path] = (tuple(kernel.shape), tuple(axes))

    def create(rngs: nnx.Rngs) -> dict[str, LoRA]:
        # float32 factors under any base dtype (see LoRA).
        return {
            p: LoRA(shape, axes, rank=config.rank, alpha=config.alpha, rngs=rngs, dtype=jnp.float32)
            for p, (shape, axes) in specs.items()
        }

    # One jitted program creates every factor (one compile instead of one per shape).
    with _creation_context(next(iter(targets.values())).kernel.get_value()):
        adapters = nnx.jit(create)(rngs)
    for path, lin in targets.items():
        lin.lora = adapters[path]
    return sorted(targets)


def lora_tensors(
    model: nnx.Module, *, prefix: str = "transformer", fold_scale: bool | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """The adapter as PEFT/diffusers-named float32 arrays, ``<prefix>.<module>.lora_A.weight`` (r, in) and
    ``.lora_B.weight`` (out, r), and its LoRA config (r, lora_alpha, target_modules).

    ``fold_scale`` (None: the model's default, True for OmniGen2, False for FLUX.2) writes
    ``lora_B * alpha / r`` and ``lora_alpha = r``, the same update for loaders that ignore the metadata.
    """
    family = _family(model)
    fold = family.fold_scale if fold_scale is None else fold_scale
    lins = linear_paths(model)
    tensors, targets, ranks, alphas = {}, [], set(), set()
    for module in linear_table(model):
        lin = lins.get(module.ours)
        if lin is None or lin.lora is None:
            continue
        # Every process gathers the whole factor (a collective when it is sharded over processes).
        a = np.asarray(runtime.to_host(lin.lora.a.get_value()), np.float32)
        b = np.asarray(runtime.to_host(lin.lora.b.get_value()), np.float32)
        if fold:
            b = b * np.float32(lin.lora.alpha / lin.lora.rank)
        if not module.layers:
            a, b = a[None], b[None]
        for i, name in enumerate(module.names()):
            tensors[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
            targets.append(name)
        ranks.add(lin.lora.rank)
        alphas.add(lin.lora.alpha)
    if not tensors:
        raise ValueError("the model has no LoRA attached; nothing to export")
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(
            f"export needs one rank and alpha for all layers, got ranks {ranks}, alphas {alphas}"
        )
    rank, alpha = ranks.pop(), alphas.pop()
    peft = {"r": rank, "lora_alpha": float(rank) if fold else alpha, "target_modules": sorted(targets)}
    return tensors, peft


def export_lora(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    prefix: str = "transformer",
    extra_metadata: dict[str, str] | None = None,
    write: bool = True,
    fold_scale: bool | None = None,
) -> None:
    """Writes the adapter to a safetensors file that the model's pipeline loads: diffusers'
    ``Flux2KleinPipeline.load_lora_weights``, or OmniGen2's ``OmniGen2Pipeline.load_lora_weights``.

    ``extra_metadata``: more string entries for the file's metadata (diffusers reads only
    ``lora_adapter_metadata``). ``fold_scale``: see :func:`lora_tensors`; a folded file records the
    trained r and alpha in ``sfgrpo_lora_scale_folded``. A collective on several processes (the factors
    are gathered); only processes with ``write`` write the file.
    """
    fold = _family(model).fold_scale if fold_scale is None else fold_scale
    tensors, peft = lora_tensors(model, prefix=prefix, fold_scale=fold)
    meta = {f"{prefix}.{k}": v for k, v in peft.items()}
    header = {**(extra_metadata or {}), "format": "pt", "lora_adapter_metadata": json.dumps(meta)}
    if fold:
        # Informational only (no loader reads it): what the adapter was trained with.
        lora = next(lin.lora for lin in linear_paths(model).values() if lin.lora is not None)
        header["sfgrpo_lora_scale_folded"] = json.dumps({"r": lora.rank, "lora_alpha": lora.alpha})
    if write:
        save_file(tensors, os.fspath(path), metadata=header)


def merge_lora(model: nnx.Module) -> int:
    """Folds every attached adapter into its base kernel (``kernel + A @ B * alpha / r``, computed in
    float32, stored in the kernel's dtype) and detaches it; returns how many layers were merged."""
    merged = 0
    for lin in linear_paths(model).values():
        if lin.lora is None:
            continue
        kernel = lin.kernel.get_value()
        delta = _lora_delta(lin.lora.a.get_value(), lin.lora.b.get_value(), lin.lora.alpha / lin.lora.rank)
        lin.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
        lin.lora = None
        merged += 1
    return merged


@jax.jit
def _lora_delta(a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """(*stack, in, r) x (*stack, r, out) -> (*stack, in, out) float32, times ``scale``."""
    hi = jax.lax.Precision.HIGHEST
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=hi) * scale


# ----------------------------------------------------------------------------------------------------------
# LoRA files from diffusers (ours or another trainer's).


class LoRAFileError(ValueError):
    """A LoRA file that is unreadable, not in diffusers' format, for another model, or does not fit the
    transformer."""


@dataclasses.dataclass(frozen=True)
class LoRAUpdate:
    """One diffusers module's adapter: ``A`` (r, in), ``B`` (out, r) as in the file, and its scale."""

    a: np.ndarray
    b: np.ndarray
    scale: float


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first key that ends ``module``'s dotted name."""
    for key, value in pattern.items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def read_lora_file(path: str | os.PathLike, *, prefix: str = "transformer") -> dict[str, LoRAUpdate]:
    """Reads a diffusers-format LoRA safetensors file (FLUX.2 or OmniGen2):
    ``[transformer.]<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r) pairs. Returns
    upstream module name -> update.

    The scale of each module is what ``Flux2KleinPipeline.load_lora_weights`` gives it: from the PEFT
    config in the ``lora_adapter_metadata`` entry (``lora_alpha`` / ``r``, ``alpha_pattern``,
    ``rank_pattern``, ``use_rslora``) when the file has one, else 1 (diffusers' ``lora_alpha = r``).
    (``OmniGen2Pipeline.load_lora_weights`` always uses 1; our OmniGen2 exports write ``lora_alpha = r``,
    so both agree on them.) Raises ``LoRAFileError`` naming the file and the problem.
    """
    where = f"LoRA file {os.fspath(path)!r}"
    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as err:
        raise LoRAFileError(f"cannot read {where}: {err}") from None
    if not tensors:
        raise LoRAFileError(f"{where} holds no tensors")
    foreign = [k for k in tensors if ".lora_down." in k or k.startswith(("diffusion_model.", "base_model."))]
    if foreign or any(".lokr_" in k for k in tensors):
        raise LoRAFileError(
            f"{where} is not in diffusers' format (keys like {sorted(tensors)[0]!r}); convert it with "
            "diffusers: state = Flux2KleinPipeline.lora_state_dict(path) (an OmniGen2 one: "
            "OmniGen2Pipeline.lora_state_dict(path)), then save state with safetensors.torch.save_file"
        )
    pairs: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in tensors.items():
        name = key.removeprefix(f"{prefix}.")
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                pairs.setdefault(name.removesuffix(suffix), {})[part] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise LoRAFileError(
            f"{where}: keys that are not LoRA factors ({len(unknown)}): {sorted(unknown)[:5]}"
        )
    peft = _peft_config(header, prefix, where)
    updates = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise LoRAFileError(f"{where}: module {module!r} has only {sorted(pair)}; need lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoRAFileError(
                f"{where}: module {module!r}: lora_A {a.shape} and lora_B {b.shape} are not (r, in), (out, r)"
            )
        rank = a.shape[0]
        if peft is None:
            scale = 1.0
        else:
            r = _pattern_value(peft.get("rank_pattern") or {}, module, peft.get("r", rank))
            alpha = _pattern_value(peft.get("alpha_pattern") or {}, module, peft.get("lora_alpha", r))
            scale = float(alpha) / (float(np.sqrt(r)) if peft.get("use_rslora") else float(r))
        updates[module] = LoRAUpdate(a.astype(np.float32), b.astype(np.float32), scale)
    return updates


def _peft_config(header: dict[str, str], prefix: str, where: str) -> dict[str, Any] | None:
    """The transformer's PEFT config from the file's ``lora_adapter_metadata`` (None when absent)."""
    raw = header.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoRAFileError(f"{where}: lora_adapter_metadata is not JSON ({err})") from None
    if not isinstance(meta, dict):
        raise LoRAFileError(f"{where}: lora_adapter_metadata is not a JSON object")
    # diffusers writes "<component>.<field>"; a bare PEFT config has the fields alone.
    ours = {k.removeprefix(f"{prefix}."): v for k, v in meta.items() if k.startswith(f"{prefix}.")}
    config = ours or meta
    if config.get("use_dora"):
        raise LoRAFileError(f"{where} is a DoRA adapter (use_dora); only LoRA is supported")
    return config


def merge_lora_file(model: nnx.Module, path: str | os.PathLike, *, prefix: str = "transformer") -> list[str]:
    """Folds a diffusers-format LoRA file into ``model``'s kernels (a FLUX.2 or OmniGen2 transformer, each
    with its own module names; see ``read_lora_file`` for the scale); returns the upstream module names
    it changed. Raises ``LoRAFileError`` for a file of the other model family, a module the transformer
    lacks or factors whose shapes do not fit it."""
    family = _family(model)
    updates = read_lora_file(path, prefix=prefix)
    where = f"LoRA file {os.fspath(path)!r}"
    lins = linear_paths(model)
    index = {}
    for module in linear_table(model):
        for i, name in enumerate(module.names()):
            index[name] = (module.ours, i if module.layers else None)
    missing = sorted(set(updates) - set(index))
    others = [f for f in (_FLUX2, _OMNIGEN2) if f is not family]
    foreign = {f.name: [m for m in missing if m.split(".")[0] in f.stacks] for f in others}
    for name, theirs in foreign.items():
        # Block stacks name the family (top-level names such as x_embedder are shared).
        if theirs and not any(m.split(".")[0] in family.stacks for m in updates):
            raise LoRAFileError(
                f"{where} is for {name} (modules like {theirs[0]!r}), not for the {family.name} "
                f"transformer given; modules the transformer does not have ({len(missing)}): {missing[:5]}"
            )
    if missing:
        raise LoRAFileError(
            f"{where}: modules the transformer does not have ({len(missing)}): {missing[:5]} "
            "(a LoRA for another model?)"
        )
    by_layer: dict[str, dict[int | None, LoRAUpdate]] = {}
    for name, update in updates.items():
        ours, layer = index[name]
        by_layer.setdefault(ours, {})[layer] = update
    for ours, layers in by_layer.items():
        lin = lins[ours]
        kernel = lin.kernel.get_value()
        d_in, d_out = kernel.shape[-2:]
        delta = np.zeros(kernel.shape, np.float32)
        for layer, u in layers.items():
            if u.a.shape[1] != d_in or u.b.shape[0] != d_out:
                raise LoRAFileError(
                    f"{where}: module {ours} (layer {layer}) takes {d_in} -> {d_out} features, the file's "
                    f"factors {u.a.shape[1]} -> {u.b.shape[0]}"
                )
            update = (u.a.T.astype(np.float64) @ u.b.T.astype(np.float64) * u.scale).astype(np.float32)
            if layer is None:
                delta += update
            else:
                delta[layer] += update
        sharding = kernel.sharding
        new = (kernel.astype(jnp.float32) + jax.device_put(delta, sharding)).astype(kernel.dtype)
        lin.kernel.set_value(new)
    return sorted(updates)
