"""LoRA for the FLUX.2 transformer: attach, select for training, export in PEFT/diffusers format.

``apply_lora`` attaches a low-rank update ``(x @ A) @ B * alpha / rank`` to every :class:`Linear` whose
module path matches one of the patterns. Paths are ours (``transformer_blocks.attn.to_q``, no block
index: a stacked linear gets stacked factors, one pair per block). B starts at zero, so a fresh LoRA
leaves the model's output unchanged. ``LoRAParam`` is the filter for LoRA-only training; full fine-tuning
trains ``nnx.Param`` without attaching LoRA.

``export_lora`` writes ``transformer.<diffusers module>.lora_A.weight`` (r, in) and ``.lora_B.weight``
(out, r) with the PEFT config (r, lora_alpha, target_modules) in the safetensors metadata, the layout
``Flux2KleinPipeline.load_lora_weights`` and ``Flux2Transformer2DModel.load_lora_adapter`` read.
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
from safetensors.numpy import save_file

from sfgrpo import runtime
from sfgrpo.models.layers import Linear, matmul
from sfgrpo.models.weights import linear_modules

# The attention and MLP projections of every block (SPEC §9: LoRA on attention and MLP projections).
DEFAULT_PATTERNS: tuple[str, ...] = (r"^(single_)?transformer_blocks\.(attn|ff|ff_context)\.",)


class LoRAParam(nnx.Param):
    """A LoRA factor. Use the class as an nnx filter to train only the adapter."""


# Filters: the adapter alone, and the frozen base weights under LoRA training.
LORA = LoRAParam
BASE = nnx.All(nnx.Param, nnx.Not(LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, scale alpha / r, and regexes (``re.search``) over our linear-module paths."""

    rank: int = 32
    alpha: float = 64.0
    patterns: tuple[str, ...] = DEFAULT_PATTERNS

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
    """Attaches a LoRA to each linear layer whose path matches ``config.patterns``; returns those paths.

    Raises ``ValueError`` when nothing matches (a typo in a pattern would silently train nothing).
    """
    targets = {
        path: lin
        for path, lin in linear_paths(model).items()
        if any(re.search(p, path) for p in config.patterns)
    }
    if not targets:
        raise ValueError(f"LoRA patterns {config.patterns} match no linear layer of the model")
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


def lora_tensors(model: nnx.Module, *, prefix: str = "transformer") -> tuple[dict[str, np.ndarray], dict]:
    """The adapter as PEFT/diffusers-named float32 arrays, and its LoRA config (rank, alpha, targets)."""
    lins = linear_paths(model)
    tensors, targets, ranks, alphas = {}, [], set(), set()
    for module in linear_modules(model.config):
        lin = lins.get(module.ours)
        if lin is None or lin.lora is None:
            continue
        # jax.device_get assembles a sharded array on this host (single-host; multi-host needs a gather).
        a = np.asarray(jax.device_get(lin.lora.a.get_value()), np.float32)
        b = np.asarray(jax.device_get(lin.lora.b.get_value()), np.float32)
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
    peft = {"r": ranks.pop(), "lora_alpha": alphas.pop(), "target_modules": sorted(targets)}
    return tensors, peft


def export_lora(model: nnx.Module, path: str | os.PathLike, *, prefix: str = "transformer") -> None:
    """Writes the adapter to a safetensors file that diffusers' Flux2 LoRA loaders accept."""
    tensors, peft = lora_tensors(model, prefix=prefix)
    meta = {f"{prefix}.{k}": v for k, v in peft.items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
