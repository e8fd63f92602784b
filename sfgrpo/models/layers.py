"""Building blocks shared by the transformers (FLUX.2, OmniGen2): sharded linear layers, norms, RoPE,
timestep features, scanned and rematerialised block stacks.

Parameters carry logical axis names (``runtime.LOGICAL_AXIS_RULES``); a stacked layer (one parameter per
block, scanned over) carries a leading ``"layers"`` axis. Activations are resharded at a few points with
:func:`shard`, which is a no-op outside a mesh context, so the same code runs with or without a mesh.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from sfgrpo import runtime

PROJECTION = "projection"  # checkpoint name of every Linear output


def _fitting_spec(shape: Sequence[int], logical: Sequence[str | None]) -> PartitionSpec | None:
    """The spec for ``logical`` on the current mesh, dropping mesh axes that do not divide their dimension.

    Returns None when no mesh is set. Dropping keeps odd sizes (batch 1 on eight devices) running,
    replicated, instead of failing.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    spec = runtime.logical_to_spec(logical)
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept, size = [], 1
        for a in axes:
            # Size-1 dims stay unsharded: broadcasting drops their sharding, and types must agree.
            if dim > 1 and dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def mesh_of(x: Any) -> contextlib.AbstractContextManager:
    """A context with the mesh that ``x`` is sharded on, when no mesh is current (else a no-op).

    Lets a model built on a mesh be called without the caller entering ``runtime.use_mesh``.
    """
    if not jax.sharding.get_abstract_mesh().empty:
        return contextlib.nullcontext()
    sharding = getattr(x, "sharding", None)
    if isinstance(getattr(sharding, "mesh", None), jax.sharding.Mesh):
        try:
            return jax.set_mesh(sharding.mesh)
        except ValueError:  # inside a trace (a concrete array closed over): the abstract mesh will do
            pass
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
    if mesh is not None and not mesh.empty:
        return jax.sharding.use_abstract_mesh(mesh)
    return contextlib.nullcontext()


def shard(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Reshards activation ``x`` to its logical axes on the current mesh (no-op without a mesh)."""
    spec = _fitting_spec(x.shape, logical)
    if spec is None:
        return x
    return jax.sharding.reshard(x, spec)


def _spec_of(x: jax.Array) -> tuple:
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _gather_fsdp(w: jax.Array) -> jax.Array:
    """All-gathers the ``fsdp`` shards of a weight before use (FSDP); tensor shards stay in place."""
    if jax.sharding.get_abstract_mesh().empty:
        return w
    spec = []
    for entry in _spec_of(w):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        axes = tuple(a for a in axes if a != "fsdp")
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return jax.sharding.reshard(w, PartitionSpec(*spec))


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for x (..., I) and w (I, O): the weight is gathered over fsdp, the output keeps x's
    leading sharding and w's output sharding (explicit meshes ask for it when I is tensor-sharded)."""
    w = _gather_fsdp(w)
    if jax.sharding.get_abstract_mesh().empty:
        return x @ w
    out = PartitionSpec(*_spec_of(x)[:-1], _spec_of(w)[-1])
    return jnp.einsum("...i,io->...o", x, w, out_sharding=out)


def repeat(x: jax.Array, repeats: int, axis: int) -> jax.Array:
    """``jnp.repeat`` keeping x's sharding: each shard's elements repeat within the shard, so a sharded
    axis stays sharded alike with no communication (grouped K/V heads serve the query heads of the same
    shard)."""
    if jax.sharding.get_abstract_mesh().empty:
        return jnp.repeat(x, repeats, axis=axis)
    return jnp.repeat(x, repeats, axis=axis, out_sharding=PartitionSpec(*_spec_of(x)))


def _stacked(stack: Sequence[int], names: tuple[str | None, ...]) -> tuple[str | None, ...]:
    return ("layers",) * len(stack) + names


class Linear(nnx.Module):
    """A linear layer, ``y = x @ kernel [+ bias]`` with kernel (*stack, in, out) in the param dtype.

    ``axes`` are the logical names of (in, out); ``bias`` adds a (*stack, out) bias (zero-initialised).
    ``lora`` is None or a ``sfgrpo.models.lora.LoRA`` attached later; it adds its low-rank update to the
    output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        stack: Sequence[int] = (),
        bias: bool = False,
    ) -> None:
        batch_axis = tuple(range(len(stack)))
        init = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=batch_axis
        )
        shape = (*stack, in_features, out_features)
        self.kernel = nnx.Param(init(rngs.params(), shape, dtype), out_sharding=_stacked(stack, axes))
        self.bias = nnx.data(
            nnx.Param(jnp.zeros((*stack, out_features), dtype), out_sharding=_stacked(stack, axes[1:]))
            if bias
            else None
        )
        self.axes = axes
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        y = matmul(x.astype(kernel.dtype), kernel)
        if self.bias is not None:
            y = y + _gather_fsdp(self.bias[...])
        if self.lora is not None:
            y = y + self.lora(x.astype(kernel.dtype)).astype(y.dtype)
        # The remat policy 'dots' saves these outputs (one per layer, LoRA update included).
        return checkpoint_name(y, PROJECTION)


class RMSNorm(nnx.Module):
    """RMS norm over the last axis with a learned scale (QK-norm), computed in float32 as torch does."""

    def __init__(
        self, dim: int, *, eps: float, dtype: jnp.dtype = jnp.float32, stack: Sequence[int] = ()
    ) -> None:
        self.weight = nnx.Param(jnp.ones((*stack, dim), dtype), out_sharding=_stacked(stack, ("kv",)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters over the last axis, in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def split(x: jax.Array, sizes: tuple[int, ...], axis: int = -1) -> tuple[jax.Array, ...]:
    """``x`` cut into consecutive pieces of ``sizes`` along ``axis`` (the sizes sum to its length).

    The same values as slicing; the backward pass concatenates the pieces' cotangents in one copy, where
    slicing's transpose pads each cotangent to the full width and adds them (measured ~1.6x slower for
    the single-stream blocks' fused projection on CPU).
    """
    if sum(sizes) != x.shape[axis]:
        raise ValueError(f"split: sizes {sizes} do not sum to axis {axis}'s length {x.shape[axis]}")
    return tuple(jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=axis))


def _split_fwd(x: jax.Array, sizes: tuple[int, ...], axis: int) -> tuple[tuple[jax.Array, ...], None]:
    return split(x, sizes, axis), None


def _split_bwd(sizes: tuple[int, ...], axis: int, _: None, grads: tuple[jax.Array, ...]) -> tuple[jax.Array]:
    return (jnp.concatenate(grads, axis=axis),)


split.defvjp(_split_fwd, _split_bwd)


def swiglu(x: jax.Array) -> jax.Array:
    """SiLU(first half) * second half of the last axis: (..., 2F) -> (..., F)."""
    half = x.shape[-1] // 2
    gate, lin = split(x, (half, half))
    return jax.nn.silu(gate) * lin


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0, scale: float = 1.0) -> jax.Array:
    """Sinusoidal features of t (B,) -> (B, dim) float32, cosines first (diffusers ``Timesteps`` with
    flip_sin_to_cos=True, downscale_freq_shift=0; ``scale`` multiplies the angles, after t * frequency,
    in diffusers' order)."""
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    if scale != 1.0:
        args = args * jnp.float32(scale)
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def rope(ids: jax.Array, axes_dims: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for position ids (L, n_axes) -> (cos, sin), each (L, sum(axes_dims)) float32.

    Axis i uses the first axes_dims[i] channels; each frequency is repeated twice (interleaved pairs).
    Frequencies are computed in float64 on the host, as diffusers does on CPU.
    """
    pos = ids.astype(jnp.float32)
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        freqs = jnp.asarray(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d), jnp.float32)
        ang = pos[:, i, None] * freqs[None, :]
        cos.append(jnp.repeat(jnp.cos(ang), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(ang), 2, axis=-1))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved channel pairs of x (B, L, N, D) by (cos, sin), (L, D) shared by the batch or
    (B, L, D) per sequence; float32 inside."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos, sin = (t[None] if t.ndim == 2 else t for t in (cos, sin))
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


REMAT_POLICIES = ("none", "full", "dots")


def remat(fn: Any, policy: str) -> Any:
    """``fn`` rematerialised by ``policy``: 'none', 'full' (recompute everything in the backward pass) or
    'dots' (keep each linear layer's output, base + LoRA, see PROJECTION; recompute the rest, attention
    scores included)."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    if policy == "dots":
        return jax.checkpoint(
            fn, prevent_cse=False, policy=jax.checkpoint_policies.save_only_these_names(PROJECTION)
        )
    raise ValueError(f"remat policy {policy!r}: expected one of {REMAT_POLICIES}")


def scan_unroll_problem(value: Any) -> str | None:
    """Why ``value`` is not a ``scan_unroll`` (an int >= 1, the blocks per loop iteration), or None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"scan_unroll={value!r} (an int >= 1: blocks per iteration of the block loops)"
    return None


def scan_layers(
    blocks: nnx.Module, carry: Any, step: Any, policy: str, xs: Any = None, unroll: int = 1
) -> tuple[Any, Any]:
    """Runs ``carry, y_i = step(block_i, carry, xs_i)`` over blocks stacked on a leading ``layers`` axis
    with ``lax.scan``, each step rematerialised by ``policy``; returns (carry, ys stacked on a leading
    layers axis). ``xs``: per-layer inputs (leading layers axis) or None. ``unroll``: blocks per loop
    iteration (``lax.scan``'s); 1 compiles one body whatever the depth, a value >= the depth compiles
    straight-line code, which spares the loop's stacked per-layer buffers (residuals, gradients) at a
    compile time that grows with the depth."""
    graphdef, state = nnx.split(blocks)

    def body(carry: Any, layer: tuple[Any, Any]) -> tuple[Any, Any]:
        layer_state, x = layer
        return step(nnx.merge(graphdef, layer_state), carry, x)

    return jax.lax.scan(remat(body, policy), carry, (state, xs), unroll=unroll)


def scan_blocks(blocks: nnx.Module, carry: Any, step: Any, policy: str, unroll: int = 1) -> Any:
    """``carry = step(block_i, carry)`` over stacked blocks (see :func:`scan_layers`); returns the carry."""
    carry, _ = scan_layers(blocks, carry, lambda block, c, _: (step(block, c), None), policy, unroll=unroll)
    return carry
