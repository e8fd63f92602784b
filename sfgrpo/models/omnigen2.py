"""The OmniGen2 transformer (upstream ``OmniGen2Transformer2DModel``, a Lumina-style DiT) in Flax NNX.

Upstream packs each sample's sequence as [valid text, reference images, target image] followed by padding,
with per-sample Python loops. Here shapes are static, so one compiled program serves every batch:

- Reference images share one layout across the batch (``ref_grids``: the (h, w) token grid of each);
  text is right-padded to a common length T with a (B, T) mask whose valid tokens come first.
- The joint sequence is [reference tokens, target tokens, text tokens], padding last. Attention is
  permutation-equivariant given positions, so only the rotary positions, which follow upstream exactly
  (they depend on each sample's text length), and the key mask matter; the mask is a valid-key length
  per sample (``models.attention``'s ``kv_len``), which every attention implementation supports.
- Position ids (time axis, row, column): text token l -> (l, l, l); reference image j -> (T_b + s_j, row,
  col) with s_j the sum of max(h, w) over the references before it; the target -> (T_b + s_R, row, col),
  T_b being sample b's text length. Rotary tables are gathered from float64-built tables, as upstream.

Blocks (``OmniGen2TransformerBlock``): RMSNorm'd (and, except in the context refiner, modulated) input,
grouped-query attention with QK RMS-norms and 3-axis interleaved RoPE, then a SwiGLU MLP; both residual
branches are RMS-normed again and gated by tanh(gate). Refiners run before the joint layers: the context
refiner over the text, the noise refiner over the target, the reference refiner over each reference image
alone. Each stack of blocks is stored once with a leading ``layers`` axis and scanned.

Tokens are 2x2 patches of the VAE latent, packed (p1 p2 c), row-major over the (H/16, W/16) grid: the
FLUX.1 VAE's ``encode`` output. Parameter paths mirror upstream module names without the block index
(``layers.attn.to_q.kernel`` <-> ``layers.{i}.attn.to_q.weight``; see ``omnigen2_weights``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from sfgrpo.models import attention
from sfgrpo.models.layers import (
    Linear,
    RMSNorm,
    _fitting_spec,
    _spec_of,
    apply_rope,
    layer_norm,
    mesh_of,
    repeat,
    scan_blocks,
    shard,
    timestep_features,
)
from sfgrpo.models.omnigen2_config import CONFIGS, MAX_REFERENCE_IMAGES, OmniGen2Config, get_config

__all__ = ["CONFIGS", "OmniGen2Config", "OmniGen2Transformer", "from_pretrained", "position_ids"]

_ACT = ("batch", None, None)  # (B, L, C) activations: batch over (data, fsdp), the rest replicated
_TIMESTEP_FEATURES = 256  # upstream's frequency_embedding_size
_HEADS = ("batch", None, "heads", None)  # (B, L, N, D) attention operands


def _to_heads(x: jax.Array, heads: int) -> jax.Array:
    """(B, L, N*D) -> (B, L, N, D). When N cannot be sharded like the projection's output (7 K/V heads
    over 2 tensor shards, or 1), the output is gathered first: a split of a sharded axis would otherwise
    shard the head dimension."""
    b, length, c = x.shape
    spec = _fitting_spec((b, length, heads, c // heads), _HEADS)
    if spec is not None and spec[2] is None:
        x = shard(x, ("batch", None, None))
    return x.reshape(b, length, heads, c // heads)


class Attention(nnx.Module):
    """Self-attention with grouped K/V heads, QK RMS-norms (eps 1e-5, upstream's fixed value) and RoPE."""

    def __init__(self, cfg: OmniGen2Config, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]) -> None:
        c, kw = cfg.hidden_size, dict(rngs=rngs, dtype=dtype, stack=stack)
        self.heads, self.kv_heads, self.impl = cfg.num_attention_heads, cfg.num_kv_heads, cfg.attention
        self.to_q = Linear(c, c, axes=("embed", "heads"), **kw)
        self.to_k = Linear(c, cfg.kv_dim, axes=("embed", "heads"), **kw)
        self.to_v = Linear(c, cfg.kv_dim, axes=("embed", "heads"), **kw)
        self.to_out = Linear(c, c, axes=("heads", "embed"), **kw)
        self.norm_q = RMSNorm(cfg.head_dim, eps=1e-5, dtype=dtype, stack=stack)
        self.norm_k = RMSNorm(cfg.head_dim, eps=1e-5, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv_len: jax.Array | None) -> jax.Array:
        """x (B, L, C), rotary tables (B, L, D), kv_len (B,) or None -> (B, L, C)."""
        b, length = x.shape[:2]
        q = _to_heads(self.to_q(x), self.heads)
        k, v = _to_heads(self.to_k(x), self.kv_heads), _to_heads(self.to_v(x), self.kv_heads)
        q, k = apply_rope(self.norm_q(q), cos, sin), apply_rope(self.norm_k(k), cos, sin)
        group = self.heads // self.kv_heads
        if group > 1:  # each K/V head serves `group` consecutive query heads (torch repeat_interleave)
            k, v = shard(repeat(k, group, axis=2), _HEADS), shard(repeat(v, group, axis=2), _HEADS)
        out = attention.attention(q, k, v, self.impl, kv_len=kv_len)
        return self.to_out(out.reshape(b, length, -1))


class FeedForward(nnx.Module):
    """Upstream ``LuminaFeedForward``: linear_2(silu(linear_1 x) * linear_3 x), no biases."""

    def __init__(self, cfg: OmniGen2Config, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]) -> None:
        c, f, kw = cfg.hidden_size, cfg.mlp_hidden_dim, dict(rngs=rngs, dtype=dtype, stack=stack)
        self.linear_1 = Linear(c, f, axes=("embed", "mlp"), **kw)
        self.linear_3 = Linear(c, f, axes=("embed", "mlp"), **kw)
        self.linear_2 = Linear(f, c, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)) * self.linear_3(x))


class ModulatedNorm(nnx.Module):
    """Upstream ``LuminaRMSNormZero``: RMSNorm(x) * (1 + scale_msa), plus the block's other modulations
    (gate_msa, scale_mlp, gate_mlp), all from linear(silu(temb))."""

    def __init__(self, cfg: OmniGen2Config, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]) -> None:
        c = cfg.hidden_size
        self.linear = Linear(
            cfg.temb_dim, 4 * c, axes=(None, "embed"), rngs=rngs, dtype=dtype, stack=stack, bias=True
        )
        self.norm = RMSNorm(c, eps=cfg.norm_eps, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, ...]:
        mod = self.linear(jax.nn.silu(temb))[:, None, :]
        scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
        return self.norm(x) * (1 + scale_msa), gate_msa, scale_mlp, gate_mlp


class Block(nnx.Module):
    """Upstream ``OmniGen2TransformerBlock``; ``modulation=False`` is the context refiner's variant."""

    def __init__(
        self, cfg: OmniGen2Config, *, modulation: bool, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]
    ) -> None:
        kw = dict(rngs=rngs, dtype=dtype, stack=stack)
        self.modulation = modulation
        self.attn = Attention(cfg, **kw)
        self.feed_forward = FeedForward(cfg, **kw)
        if modulation:
            self.norm1 = ModulatedNorm(cfg, **kw)
        else:
            self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, stack=stack)
        for name in ("norm2", "ffn_norm1", "ffn_norm2"):
            setattr(self, name, RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, stack=stack))

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        kv_len: jax.Array | None,
        temb: jax.Array | None,
    ) -> jax.Array:
        """x (B, L, C), rotary tables (B, L, D), kv_len (B,) or None, temb (B, temb_dim) -> (B, L, C)."""
        if self.modulation:
            h, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)
            x = x + jnp.tanh(gate_msa) * self.norm2(self.attn(h, cos, sin, kv_len))
            mlp = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
            x = x + jnp.tanh(gate_mlp) * self.ffn_norm2(mlp)
        else:
            x = x + self.norm2(self.attn(self.norm1(x), cos, sin, kv_len))
            x = x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        return shard(x, _ACT)


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (with biases) on sinusoidal features of t * timestep_scale."""

    def __init__(self, cfg: OmniGen2Config, *, rngs: nnx.Rngs, dtype: Any) -> None:
        d, kw = cfg.temb_dim, dict(rngs=rngs, dtype=dtype, bias=True)
        self.linear_1 = Linear(_TIMESTEP_FEATURES, d, axes=(None, "embed"), **kw)
        self.linear_2 = Linear(d, d, axes=("embed", None), **kw)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(features)))


class CaptionEmbedder(nnx.Module):
    """RMSNorm then a linear layer (with bias): text features (B, T, text_feat_dim) -> (B, T, C)."""

    def __init__(self, cfg: OmniGen2Config, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.norm = RMSNorm(cfg.text_feat_dim, eps=cfg.norm_eps, dtype=dtype)
        self.linear = Linear(
            cfg.text_feat_dim, cfg.hidden_size, axes=(None, "embed"), rngs=rngs, dtype=dtype, bias=True
        )

    def __call__(self, text: jax.Array) -> jax.Array:
        return self.linear(self.norm(text))


class TimeCaptionEmbed(nnx.Module):
    """Upstream ``Lumina2CombinedTimestepCaptionEmbedding``."""

    def __init__(self, cfg: OmniGen2Config, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.scale = cfg.timestep_scale
        self.timestep_embedder = TimestepEmbedding(cfg, rngs=rngs, dtype=dtype)
        self.caption_embedder = CaptionEmbedder(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, t: jax.Array, text: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
        features = timestep_features(t, _TIMESTEP_FEATURES, scale=self.scale)
        return self.timestep_embedder(features.astype(dtype)), self.caption_embedder(text)


class OutputNorm(nnx.Module):
    """Upstream ``LuminaLayerNormContinuous``: linear_2(LN(x) * (1 + linear_1(silu(temb)))), LN without
    affine parameters, eps 1e-6."""

    def __init__(self, cfg: OmniGen2Config, *, rngs: nnx.Rngs, dtype: Any) -> None:
        c, kw = cfg.hidden_size, dict(rngs=rngs, dtype=dtype, bias=True)
        self.linear_1 = Linear(cfg.temb_dim, c, axes=(None, "embed"), **kw)
        self.linear_2 = Linear(c, cfg.out_dim, axes=("embed", "channels"), **kw)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        scale = self.linear_1(jax.nn.silu(temb))[:, None, :]
        return self.linear_2(layer_norm(x, 1e-6) * (1 + scale))


def _rotary_tables(cfg: OmniGen2Config) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per axis i: (cos, sin), each (axes_lens[i], axes_dim_rope[i] / 2) float32, from float64 angles
    (upstream builds its complex table in float64 and stores it in complex64)."""
    tables = []
    for dim, length in zip(cfg.axes_dim_rope, cfg.axes_lens, strict=True):
        freqs = 1.0 / 10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.outer(np.arange(length, dtype=np.float64), freqs)
        tables.append((np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)))
    return tables


def _gather_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table (N, D) rows at ids (B, L) -> (B, L, D), sharded as the ids are (a replicated table, so no
    communication)."""
    if jax.sharding.get_abstract_mesh().empty:
        return jnp.take(table, ids, axis=0)
    return table.at[ids].get(out_sharding=PartitionSpec(*_spec_of(ids), None))


def position_ids(
    text_len: jax.Array, text_tokens: int, grid_hw: tuple[int, int], ref_grids: Sequence[tuple[int, int]]
) -> jax.Array:
    """(B, Lr + Li + T, 3) int32 position ids of the joint sequence [references, target, text].

    text_len (B,) int32: each sample's number of valid text tokens; text_tokens: T, the padded length.
    See the module docstring for the values; they equal upstream's for every valid token.
    """
    text_len = jnp.asarray(text_len, jnp.int32)
    b = text_len.shape[0]

    def grid(h: int, w: int, shift: int) -> jax.Array:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        ids = np.stack([np.full(h * w, shift), rows.ravel(), cols.ravel()], axis=-1)
        return (
            jnp.asarray(ids, jnp.int32)[None]
            + jnp.stack([text_len, jnp.zeros_like(text_len), jnp.zeros_like(text_len)], axis=-1)[:, None, :]
        )

    parts, shift = [], 0
    for h, w in ref_grids:
        parts.append(grid(h, w, shift))
        shift += max(h, w)
    parts.append(grid(*grid_hw, shift))
    # Built from text_len so that every part carries its (batch) sharding.
    text = jnp.zeros_like(text_len)[:, None, None] + jnp.arange(text_tokens, dtype=jnp.int32)[None, :, None]
    text = jnp.broadcast_to(text, (b, text_tokens, 3))
    return jnp.concatenate([*parts, text], axis=1)


class OmniGen2Transformer(nnx.Module):
    """OmniGen2's DiT. Call with tokens, text features and OmniGen2 timesteps; returns its prediction
    (B, Li, 4 * out_channels) for the target tokens."""

    def __init__(self, config: OmniGen2Config, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        cfg = self.config = config
        c, kw = cfg.hidden_size, dict(rngs=rngs, dtype=dtype)
        self.dtype = dtype
        self.x_embedder = Linear(cfg.token_channels, c, axes=("channels", "embed"), bias=True, **kw)
        self.ref_image_patch_embedder = Linear(
            cfg.token_channels, c, axes=("channels", "embed"), bias=True, **kw
        )
        self.time_caption_embed = TimeCaptionEmbed(cfg, **kw)
        n, r = cfg.num_layers, cfg.num_refiner_layers
        self.noise_refiner = nnx.data(Block(cfg, modulation=True, stack=(r,), **kw) if r else None)
        self.ref_image_refiner = nnx.data(Block(cfg, modulation=True, stack=(r,), **kw) if r else None)
        self.context_refiner = nnx.data(Block(cfg, modulation=False, stack=(r,), **kw) if r else None)
        self.layers = nnx.data(Block(cfg, modulation=True, stack=(n,), **kw) if n else None)
        self.norm_out = OutputNorm(cfg, **kw)
        self.image_index_embedding = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (MAX_REFERENCE_IMAGES, c), dtype),
            out_sharding=(None, None),
        )

    @classmethod
    def from_config(
        cls, config: str | Mapping[str, Any] | OmniGen2Config, *, rngs: nnx.Rngs, dtype: Any = jnp.float32
    ) -> OmniGen2Transformer:
        """A randomly initialised model (create it under ``runtime.use_mesh(mesh)`` to shard it)."""
        cfg = get_config(config)
        return nnx.jit(lambda r: cls(cfg, rngs=r, dtype=dtype))(rngs)

    def _check(
        self,
        x: jax.Array,
        grid_hw: tuple[int, int],
        text: jax.Array,
        text_mask: jax.Array,
        refs: jax.Array | None,
        ref_grids: Sequence[tuple[int, int]],
    ) -> None:
        cfg, problems = self.config, []
        tc = cfg.token_channels
        h, w = grid_hw
        if x.ndim != 3 or x.shape[-1] != tc or x.shape[1] != h * w:
            problems.append(f"hidden_states {x.shape} must be (B, {h}*{w}, {tc}) for grid_hw {grid_hw}")
        b = x.shape[0]
        if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.text_feat_dim:
            problems.append(f"text {text.shape} must be ({b}, T, {cfg.text_feat_dim})")
        if text_mask.shape != text.shape[:2]:
            problems.append(f"text_mask {text_mask.shape} must be (B, T) = {text.shape[:2]}")
        if len(ref_grids) > MAX_REFERENCE_IMAGES:
            problems.append(f"{len(ref_grids)} reference images (the model has {MAX_REFERENCE_IMAGES} slots)")
        lr = sum(rh * rw for rh, rw in ref_grids)
        if (refs is None) != (lr == 0):
            problems.append(
                f"refs {None if refs is None else refs.shape} disagree with ref_grids {ref_grids}"
            )
        elif refs is not None and refs.shape != (b, lr, tc):
            problems.append(f"refs {refs.shape} must be ({b}, {lr}, {tc}) for ref_grids {ref_grids}")
        # Positions index fixed tables: the largest must exist (upstream would fail on the gather).
        need = (
            text.shape[1] + sum(max(g) for g in ref_grids),
            max([h, *(g[0] for g in ref_grids)]),
            max([w, *(g[1] for g in ref_grids)]),
        )
        if any(n > length for n, length in zip(need, cfg.axes_lens, strict=True)):
            problems.append(
                f"positions up to {need} (text length + reference extents, rows, columns) exceed the "
                f"rotary tables' axes_lens {cfg.axes_lens}"
            )
        if problems:
            raise ValueError("OmniGen2Transformer inputs: " + "; ".join(problems))

    def __call__(
        self,
        hidden_states: jax.Array,
        grid_hw: tuple[int, int],
        timestep: jax.Array,
        text: jax.Array,
        text_mask: jax.Array,
        refs: jax.Array | None = None,
        ref_grids: Sequence[tuple[int, int]] = (),
    ) -> jax.Array:
        """The model's prediction for the target tokens.

        hidden_states (B, h*w, 4*in_channels): noisy target tokens on the (h, w) = ``grid_hw`` grid.
        timestep (B,) or scalar: OmniGen2's t, 0 = noise, 1 = data.
        text (B, T, text_feat_dim) and text_mask (B, T): right-padded text features, valid tokens first.
        refs (B, Lr, 4*in_channels) or None: the reference images' tokens, image after image, with grids
        ``ref_grids`` (the same for every sample).
        Returns (B, h*w, 4*out_channels) in the param dtype: upstream's output (x_data - x_noise direction).
        """
        grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        ref_grids = tuple((int(h), int(w)) for h, w in ref_grids)
        self._check(hidden_states, grid_hw, text, text_mask, refs, ref_grids)
        with mesh_of(self.x_embedder.kernel[...]):
            return self._forward(hidden_states, grid_hw, timestep, text, text_mask, refs, ref_grids)

    def _rotary(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, L, 3) position ids -> (cos, sin), each (B, L, head_dim) float32, pairs interleaved."""
        cos, sin = [], []
        for axis, (c, s) in enumerate(_rotary_tables(self.config)):
            cos.append(_gather_rows(jnp.asarray(c), ids[..., axis]))
            sin.append(_gather_rows(jnp.asarray(s), ids[..., axis]))
        cos, sin = jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)
        return jnp.repeat(cos, 2, axis=-1), jnp.repeat(sin, 2, axis=-1)

    def _run(
        self, blocks: Block | None, x: jax.Array, rot: tuple[jax.Array, jax.Array], kv_len: Any, temb: Any
    ) -> jax.Array:
        if blocks is None:
            return x
        cos, sin = rot

        def step(blk: Block, h: jax.Array) -> jax.Array:
            return blk(h, cos, sin, kv_len, temb)

        return scan_blocks(blocks, x, step, self.config.remat, unroll=self.config.scan_unroll)

    def _forward(
        self,
        hidden_states: jax.Array,
        grid_hw: tuple[int, int],
        timestep: jax.Array,
        text: jax.Array,
        text_mask: jax.Array,
        refs: jax.Array | None,
        ref_grids: tuple[tuple[int, int], ...],
    ) -> jax.Array:
        dtype = self.dtype
        b, li = hidden_states.shape[:2]
        t_len = text.shape[1]
        lr = sum(h * w for h, w in ref_grids)
        text_len = jnp.sum(text_mask.astype(jnp.int32), axis=1)
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
        temb, c = self.time_caption_embed(t, shard(text, _ACT).astype(dtype), dtype)
        temb = shard(temb, ("batch", None))

        cos, sin = self._rotary(position_ids(text_len, t_len, grid_hw, ref_grids))
        cos, sin = shard(cos, _ACT), shard(sin, _ACT)

        def part(start: int, length: int) -> tuple[jax.Array, jax.Array]:
            return cos[:, start : start + length], sin[:, start : start + length]

        c = self._run(self.context_refiner, shard(c, _ACT), part(lr + li, t_len), text_len, None)
        x = self.x_embedder(shard(hidden_states, _ACT).astype(dtype))
        x = self._run(self.noise_refiner, shard(x, _ACT), part(lr, li), None, temb)
        pieces, start = [], 0
        if refs is not None:
            r = self.ref_image_patch_embedder(shard(refs, _ACT).astype(dtype))
            for j, (h, w) in enumerate(ref_grids):
                # Each reference image is refined alone (upstream batches them as separate sequences).
                rj = r[:, start : start + h * w] + self.image_index_embedding[j]
                pieces.append(
                    self._run(self.ref_image_refiner, shard(rj, _ACT), part(start, h * w), None, temb)
                )
                start += h * w
        joint = jnp.concatenate([*pieces, x, c], axis=1)
        joint = self._run(self.layers, shard(joint, _ACT), (cos, sin), lr + li + text_len, temb)
        return self.norm_out(joint[:, lr : lr + li], temb)


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    remat: str | None = None,
    attention: str | None = None,
    scan_unroll: int | None = None,
) -> OmniGen2Transformer:
    """Loads an OmniGen2 ``transformer/`` folder (or a model folder holding one), each tensor straight to
    its sharding on ``mesh`` (default: one device). ``remat``/``attention``/``scan_unroll`` override the
    config's."""
    from sfgrpo.models import omnigen2_weights  # noqa: PLC0415 - the table imports this module

    def build(cfg: OmniGen2Config) -> OmniGen2Transformer:
        options = (("remat", remat), ("attention", attention), ("scan_unroll", scan_unroll))
        changes = {k: v for k, v in options if v is not None}
        return OmniGen2Transformer(cfg.replace(**changes), rngs=nnx.Rngs(0), dtype=dtype)

    return omnigen2_weights.load(path, build, mesh=mesh)
