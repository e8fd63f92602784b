"""The FLUX.2 transformer (diffusers' ``Flux2Transformer2DModel``) in Flax NNX.

Double-stream blocks (separate image/text weights, joint attention) run first, then single-stream blocks
(one fused attention+MLP projection over the joined sequence). Each kind of block is stored once with a
leading ``layers`` axis on every parameter and run with ``jax.lax.scan``, so compile time does not grow
with depth. Parameter paths mirror diffusers' module names without the block index
(``transformer_blocks.attn.to_q.kernel`` <-> ``transformer_blocks.{i}.attn.to_q.weight``).

Editing (SPEC §10): reference-image tokens follow the target tokens in ``hidden_states`` with their own
ids (see :func:`make_position_ids`); the caller slices the output back to the target tokens.

Reference K/V caching (``Flux2KleinKVPipeline``, ``config.reference_kv``): reference tokens attend only to
themselves, modulated at timestep 0, so their post-RoPE keys and values at every block depend on the
reference alone. :meth:`Flux2Transformer.reference_kv` computes them once (a forward of the reference
tokens by themselves); every step's forward then takes only the target tokens, whose attention sees the
text, the target and the cached reference keys. That is the pipeline's "extract" step and "cached" steps
at once: the extract step's target output equals the cached forward's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sfgrpo.models import attention
from sfgrpo.models.flux2_config import CONFIGS, Flux2Config, get_config
from sfgrpo.models.layers import (
    Linear,
    RMSNorm,
    apply_rope,
    layer_norm,
    mesh_of,
    rope,
    scan_layers,
    shard,
    split,
    swiglu,
    timestep_features,
)

__all__ = [
    "CONFIGS",
    "Flux2Config",
    "Flux2Transformer",
    "ReferenceKV",
    "from_pretrained",
    "make_position_ids",
]

_ACT = ("batch", None, None)  # (B, L, C) activations: batch over (data, fsdp), the rest replicated


class ReferenceKV(NamedTuple):
    """The reference tokens' post-RoPE keys and values at every block (``Flux2KleinKVPipeline``'s cache).

    double, single: (k, v), each (layers, B, Lr, N, D) in the param dtype, for the double- and the
    single-stream blocks; None for a kind of block the model does not have.
    """

    double: tuple[jax.Array, jax.Array] | None
    single: tuple[jax.Array, jax.Array] | None


KV = tuple[jax.Array, jax.Array]  # one layer's (k, v), each (B, L, N, D)


def _with_reference(k: jax.Array, v: jax.Array, ref: KV | None) -> KV:
    """Appends one layer's cached reference keys/values (B, Lr, N, D) to the sequence's own."""
    if ref is None:
        return k, v
    return jnp.concatenate([k, ref[0].astype(k.dtype)], 1), jnp.concatenate([v, ref[1].astype(v.dtype)], 1)


def _chunks(mod: jax.Array, n: int) -> list[jax.Array]:
    """(B, n*C) modulation -> n arrays (B, 1, C), broadcastable over tokens."""
    return jnp.split(mod[:, None, :], n, axis=-1)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str | None) -> jax.Array:
    """(B, L, N, D) each -> (B, L, N*D), softmax scale 1/sqrt(D), no mask (see models/attention.py)."""
    out = attention.attention(q, k, v, impl)
    return out.reshape(*out.shape[:2], -1)


class FeedForward(nnx.Module):
    """SwiGLU MLP: C -> 2F (gate, linear) -> F -> C."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]) -> None:
        # The packed (gate, linear) axis stays unsharded over "tensor": splitting it would need comms.
        self.linear_in = Linear(dim, 2 * hidden, axes=("embed", None), rngs=rngs, dtype=dtype, stack=stack)
        self.linear_out = Linear(hidden, dim, axes=(None, "embed"), rngs=rngs, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_out(swiglu(self.linear_in(x)))


class JointAttention(nnx.Module):
    """Attention over [text; image] tokens with per-stream projections and QK RMS-norms."""

    def __init__(self, cfg: Flux2Config, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]) -> None:
        c, d, kw = cfg.inner_dim, cfg.attention_head_dim, dict(rngs=rngs, dtype=dtype, stack=stack)
        self.heads, self.impl = cfg.num_attention_heads, cfg.attention
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(self, name, Linear(c, c, axes=("embed", "heads"), **kw))
        self.to_out = Linear(c, c, axes=("heads", "embed"), **kw)
        self.to_add_out = Linear(c, c, axes=("heads", "embed"), **kw)
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            setattr(self, name, RMSNorm(d, eps=cfg.eps, dtype=dtype, stack=stack))

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:2], self.heads, -1)

    def __call__(
        self, x: jax.Array, c: jax.Array, cos: jax.Array, sin: jax.Array, ref: KV | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """x (B, Li, C) image, c (B, Lt, C) text -> (image out, text out); ``ref``: cached reference
        (k, v) that the text and image tokens attend to as well."""
        q = jnp.concatenate(
            [self.norm_added_q(self._heads(self.add_q_proj(c))), self.norm_q(self._heads(self.to_q(x)))], 1
        )
        k = jnp.concatenate(
            [self.norm_added_k(self._heads(self.add_k_proj(c))), self.norm_k(self._heads(self.to_k(x)))], 1
        )
        v = jnp.concatenate([self._heads(self.add_v_proj(c)), self._heads(self.to_v(x))], 1)
        k, v = _with_reference(apply_rope(k, cos, sin), v, ref)
        out = _attention(apply_rope(q, cos, sin), k, v, self.impl)
        out_c, out_x = split(out, (c.shape[1], x.shape[1]), axis=1)
        return self.to_out(out_x), self.to_add_out(out_c)

    def reference(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, KV]:
        """Reference tokens x (B, Lr, C) attending only to themselves, through the image-stream weights
        -> (image out (B, Lr, C), their post-RoPE (k, v))."""
        q = apply_rope(self.norm_q(self._heads(self.to_q(x))), cos, sin)
        k = apply_rope(self.norm_k(self._heads(self.to_k(x))), cos, sin)
        v = self._heads(self.to_v(x))
        return self.to_out(_attention(q, k, v, self.impl)), (k, v)


class DoubleStreamBlock(nnx.Module):
    """Diffusers' ``Flux2TransformerBlock``: modulated joint attention, then per-stream SwiGLU MLPs."""

    def __init__(self, cfg: Flux2Config, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int] = ()) -> None:
        self.eps = cfg.eps
        self.attn = JointAttention(cfg, rngs=rngs, dtype=dtype, stack=stack)
        kw = dict(rngs=rngs, dtype=dtype, stack=stack)
        self.ff = FeedForward(cfg.inner_dim, cfg.mlp_hidden_dim, **kw)
        self.ff_context = FeedForward(cfg.inner_dim, cfg.mlp_hidden_dim, **kw)

    def __call__(
        self,
        x: jax.Array,
        c: jax.Array,
        mod_img: jax.Array,
        mod_txt: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        ref: KV | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """x (B, Li, C), c (B, Lt, C), mods (B, 6C) -> updated (x, c); ``ref``: this block's cached
        reference (k, v)."""
        sh, sc, g, sh2, sc2, g2 = _chunks(mod_img, 6)
        csh, csc, cg, csh2, csc2, cg2 = _chunks(mod_txt, 6)
        attn_x, attn_c = self.attn(
            (1 + sc) * layer_norm(x, self.eps) + sh, (1 + csc) * layer_norm(c, self.eps) + csh, cos, sin, ref
        )
        x = self._mlp(x + g * attn_x, sh2, sc2, g2, self.ff)
        c = self._mlp(c + cg * attn_c, csh2, csc2, cg2, self.ff_context)
        return shard(x, _ACT), shard(c, _ACT)

    def reference(
        self, x: jax.Array, mod_img: jax.Array, cos: jax.Array, sin: jax.Array
    ) -> tuple[jax.Array, KV]:
        """The image stream alone on reference tokens x (B, Lr, C) attending to themselves -> (updated x,
        this block's (k, v))."""
        sh, sc, g, sh2, sc2, g2 = _chunks(mod_img, 6)
        attn_x, kv = self.attn.reference((1 + sc) * layer_norm(x, self.eps) + sh, cos, sin)
        return shard(self._mlp(x + g * attn_x, sh2, sc2, g2, self.ff), _ACT), kv

    def _mlp(
        self, x: jax.Array, shift: jax.Array, scale: jax.Array, gate: jax.Array, ff: FeedForward
    ) -> jax.Array:
        return x + gate * ff(layer_norm(x, self.eps) * (1 + scale) + shift)


class ParallelSelfAttention(nnx.Module):
    """Diffusers' ``Flux2ParallelSelfAttention``: one input projection to [q, k, v, gate, linear] and one
    output projection from [attention, MLP]."""

    def __init__(self, cfg: Flux2Config, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]) -> None:
        c, f = cfg.inner_dim, cfg.mlp_hidden_dim
        kw = dict(rngs=rngs, dtype=dtype, stack=stack)
        self.heads, self.impl, self.inner = cfg.num_attention_heads, cfg.attention, c
        # Packed axes are not tensor-sharded (see FeedForward); fsdp shards the model dimension.
        self.to_qkv_mlp_proj = Linear(c, 3 * c + 2 * f, axes=("embed", None), **kw)
        self.to_out = Linear(c + f, c, axes=(None, "embed"), **kw)
        self.norm_q = RMSNorm(cfg.attention_head_dim, eps=cfg.eps, dtype=dtype, stack=stack)
        self.norm_k = RMSNorm(cfg.attention_head_dim, eps=cfg.eps, dtype=dtype, stack=stack)

    def __call__(
        self, h: jax.Array, cos: jax.Array, sin: jax.Array, ref: KV | None = None
    ) -> tuple[jax.Array, KV]:
        """h (B, L, C) -> (out (B, L, C), the post-RoPE (k, v) of h's tokens); ``ref``: cached reference
        (k, v) that h's tokens attend to as well."""
        proj = self.to_qkv_mlp_proj(h)
        c = self.inner
        q, k, v, mlp = split(proj, (c, c, c, proj.shape[-1] - 3 * c))
        q, k, v = (x.reshape(*h.shape[:2], self.heads, -1) for x in (q, k, v))
        q, k = apply_rope(self.norm_q(q), cos, sin), apply_rope(self.norm_k(k), cos, sin)
        out = _attention(q, *_with_reference(k, v, ref), self.impl)
        return self.to_out(jnp.concatenate([out, swiglu(mlp)], axis=-1)), (k, v)


class SingleStreamBlock(nnx.Module):
    """Diffusers' ``Flux2SingleTransformerBlock``: h + gate * parallel_attn(modulated LN(h))."""

    def __init__(self, cfg: Flux2Config, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int] = ()) -> None:
        self.eps = cfg.eps
        self.attn = ParallelSelfAttention(cfg, rngs=rngs, dtype=dtype, stack=stack)

    def __call__(
        self, h: jax.Array, mod: jax.Array, cos: jax.Array, sin: jax.Array, ref: KV | None = None
    ) -> tuple[jax.Array, KV]:
        """h (B, L, C), mod (B, 3C) -> (updated h (B, L, C), the (k, v) of h's tokens); ``ref``: this
        block's cached reference (k, v). On reference tokens alone (with their own ``mod``) this is the
        reference pass."""
        shift, scale, gate = _chunks(mod, 3)
        out, kv = self.attn((1 + scale) * layer_norm(h, self.eps) + shift, cos, sin, ref)
        return shard(h + gate * out, _ACT), kv


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2 on sinusoidal features."""

    def __init__(self, in_dim: int, dim: int, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.linear_1 = Linear(in_dim, dim, axes=(None, "embed"), rngs=rngs, dtype=dtype)
        self.linear_2 = Linear(dim, dim, axes=("embed", None), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeGuidanceEmbed(nnx.Module):
    """temb (B, C) = embed(features(t)) [+ embed(features(guidance))]."""

    def __init__(self, cfg: Flux2Config, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.channels = cfg.timestep_guidance_channels
        self.timestep_embedder = TimestepEmbedding(self.channels, cfg.inner_dim, rngs=rngs, dtype=dtype)
        self.guidance_embedder = nnx.data(
            TimestepEmbedding(self.channels, cfg.inner_dim, rngs=rngs, dtype=dtype)
            if cfg.guidance_embeds
            else None
        )

    def __call__(self, t: jax.Array, guidance: jax.Array | None) -> jax.Array:
        dtype = t.dtype
        temb = self.timestep_embedder(timestep_features(t, self.channels).astype(dtype))
        if guidance is not None and self.guidance_embedder is not None:
            temb = temb + self.guidance_embedder(timestep_features(guidance, self.channels).astype(dtype))
        return temb


class Modulation(nnx.Module):
    """SiLU -> linear to 3 * sets * C shift/scale/gate vectors, shared by all blocks of a kind."""

    def __init__(self, dim: int, sets: int, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.linear = Linear(dim, 3 * sets * dim, axes=("embed", None), rngs=rngs, dtype=dtype)

    def __call__(self, temb: jax.Array) -> jax.Array:
        return shard(self.linear(jax.nn.silu(temb)), ("batch", None))


class OutputNorm(nnx.Module):
    """Diffusers' ``AdaLayerNormContinuous``: LN(h) * (1 + scale) + shift, (scale, shift) from temb."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, dtype: Any) -> None:
        self.eps = eps
        self.linear = Linear(dim, 2 * dim, axes=("embed", None), rngs=rngs, dtype=dtype)

    def __call__(self, h: jax.Array, temb: jax.Array) -> jax.Array:
        scale, shift = _chunks(self.linear(jax.nn.silu(temb)), 2)
        return layer_norm(h, self.eps) * (1 + scale) + shift


class Flux2Transformer(nnx.Module):
    """FLUX.2 MMDiT. Call with diffusers' forward arrays; returns the velocity (B, Li, out_channels)."""

    def __init__(self, config: Flux2Config, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        cfg = self.config = config
        c, kw = cfg.inner_dim, dict(rngs=rngs, dtype=dtype)
        self.dtype = dtype
        self.time_guidance_embed = TimeGuidanceEmbed(cfg, **kw)
        self.double_stream_modulation_img = Modulation(c, 2, **kw)
        self.double_stream_modulation_txt = Modulation(c, 2, **kw)
        self.single_stream_modulation = Modulation(c, 1, **kw)
        self.x_embedder = Linear(cfg.in_channels, c, axes=("channels", "embed"), **kw)
        self.context_embedder = Linear(cfg.joint_attention_dim, c, axes=(None, "embed"), **kw)
        self.transformer_blocks = nnx.data(
            DoubleStreamBlock(cfg, stack=(cfg.num_layers,), **kw) if cfg.num_layers else None
        )
        self.single_transformer_blocks = nnx.data(
            SingleStreamBlock(cfg, stack=(cfg.num_single_layers,), **kw) if cfg.num_single_layers else None
        )
        self.norm_out = OutputNorm(c, eps=cfg.eps, **kw)
        self.proj_out = Linear(c, cfg.out_dim, axes=("embed", "channels"), **kw)

    @classmethod
    def from_config(
        cls, config: str | Mapping[str, Any] | Flux2Config, *, rngs: nnx.Rngs, dtype: Any = jnp.float32
    ) -> Flux2Transformer:
        """A randomly initialised model from a config name (``CONFIGS``), a diffusers config dict, or a
        ``Flux2Config``. Create it under ``runtime.use_mesh(mesh)`` to shard it.

        Initialisation runs as one jitted program (one compile instead of one per parameter shape).
        """
        cfg = get_config(config)
        return nnx.jit(lambda r: cls(cfg, rngs=r, dtype=dtype))(rngs)

    def _check(self, hidden: jax.Array, enc: jax.Array, img_ids: jax.Array, txt_ids: jax.Array) -> None:
        cfg, problems = self.config, []
        if hidden.ndim != 3 or hidden.shape[-1] != cfg.in_channels:
            problems.append(f"hidden_states {hidden.shape} must be (B, L_img, {cfg.in_channels})")
        if enc.ndim != 3 or enc.shape[-1] != cfg.joint_attention_dim or enc.shape[0] != hidden.shape[0]:
            problems.append(
                f"encoder_hidden_states {enc.shape} must be (B, L_txt, {cfg.joint_attention_dim})"
            )
        for name, ids, n in (("img_ids", img_ids, hidden.shape[1]), ("txt_ids", txt_ids, enc.shape[1])):
            if ids.ndim not in (2, 3) or ids.shape[-2:] != (n, len(cfg.axes_dims_rope)):
                problems.append(f"{name} {ids.shape} must be ([B,] {n}, {len(cfg.axes_dims_rope)})")
        if problems:
            raise ValueError("Flux2Transformer inputs: " + "; ".join(problems))

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        img_ids: jax.Array,
        txt_ids: jax.Array,
        guidance: jax.Array | None = None,
        reference_kv: ReferenceKV | None = None,
    ) -> jax.Array:
        """Velocity for all image tokens.

        hidden_states (B, Li, in_channels): target tokens then reference tokens; with ``reference_kv``
        (from :meth:`reference_kv`), the target tokens only.
        encoder_hidden_states (B, Lt, joint_attention_dim): text features.
        timestep (B,) or scalar: σ in [0, 1] (×1000 inside). guidance (B,) or None (×1000 inside; used only
        by configs with a guidance embedding).
        img_ids ([B,] Li, 4), txt_ids ([B,] Lt, 4): (T, H, W, L) positions; a batched array uses row 0,
        as diffusers does.
        Returns (B, Li, out_channels) in the param dtype.
        """
        self._check(hidden_states, encoder_hidden_states, img_ids, txt_ids)
        if reference_kv is not None and not self.config.reference_kv:
            raise ValueError(
                "reference_kv given to a transformer whose config has reference_kv=False: its references "
                "are joint-sequence tokens (Flux2KleinPipeline), not a cache (Flux2KleinKVPipeline)"
            )
        with mesh_of(self.x_embedder.kernel[...]):
            return self._forward(
                hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance, reference_kv
            )

    def reference_kv(
        self, reference: jax.Array, ref_ids: jax.Array, guidance: jax.Array | None = None
    ) -> ReferenceKV:
        """The reference tokens' keys and values at every block (``Flux2KleinKVPipeline``'s extract step).

        reference (B, Lr, in_channels): the source image's tokens; ref_ids ([B,] Lr, 4) their position ids
        (a batched array uses row 0); guidance (B,) or None, as for ``__call__``. The references attend
        only to themselves, modulated at timestep 0 (the pipeline's ``ref_fixed_timestep``).
        """
        cfg = self.config
        if not cfg.reference_kv:
            raise ValueError(
                "reference_kv needs a config with reference_kv=True (a Flux2KleinKVPipeline model)"
            )
        # No text in this pass: empty host arrays stand in for it in the shape check.
        self._check(
            reference, np.zeros((reference.shape[0], 0, cfg.joint_attention_dim)), ref_ids, np.zeros((0, 4))
        )
        with mesh_of(self.x_embedder.kernel[...]):
            batch = reference.shape[0]
            ref_ids = shard(ref_ids, (None,) * ref_ids.ndim)[0] if ref_ids.ndim == 3 else ref_ids
            temb = self.time_guidance_embed(jnp.zeros((batch,), self.dtype), self._guidance(guidance, batch))
            x = shard(self.x_embedder(shard(reference, _ACT)), _ACT)
            cos, sin = rope(ref_ids, cfg.axes_dims_rope, cfg.rope_theta)
            double = single = None
            if self.transformer_blocks is not None:
                mod_img = self.double_stream_modulation_img(temb)
                x, double = scan_layers(
                    self.transformer_blocks,
                    x,
                    lambda blk, x, _: blk.reference(x, mod_img, cos, sin),
                    cfg.remat,
                    unroll=cfg.scan_unroll,
                )
            if self.single_transformer_blocks is not None:
                mod_single = self.single_stream_modulation(temb)
                _, single = scan_layers(
                    self.single_transformer_blocks,
                    x,
                    lambda blk, h, _: blk(h, mod_single, cos, sin),
                    cfg.remat,
                    unroll=cfg.scan_unroll,
                )
            return ReferenceKV(double, single)

    def _guidance(self, guidance: jax.Array | None, batch: int) -> jax.Array | None:
        if guidance is None:
            return None
        return jnp.broadcast_to(jnp.asarray(guidance).astype(self.dtype), (batch,)) * 1000

    def _forward(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        img_ids: jax.Array,
        txt_ids: jax.Array,
        guidance: jax.Array | None,
        reference_kv: ReferenceKV | None,
    ) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        batch = hidden_states.shape[0]
        # Batched ids may arrive batch-sharded: replicate before taking row 0.
        img_ids = shard(img_ids, (None,) * img_ids.ndim)[0] if img_ids.ndim == 3 else img_ids
        txt_ids = shard(txt_ids, (None,) * txt_ids.ndim)[0] if txt_ids.ndim == 3 else txt_ids

        t = jnp.broadcast_to(jnp.asarray(timestep).astype(dtype), (batch,)) * 1000
        temb = self.time_guidance_embed(t, self._guidance(guidance, batch))
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        mod_single = self.single_stream_modulation(temb)

        x = shard(self.x_embedder(shard(hidden_states, _ACT)), _ACT)
        c = shard(self.context_embedder(shard(encoder_hidden_states, _ACT)), _ACT)
        cos, sin = rope(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope, cfg.rope_theta)

        cache = reference_kv or ReferenceKV(None, None)
        if self.transformer_blocks is not None:
            (x, c), _ = scan_layers(
                self.transformer_blocks,
                (x, c),
                lambda blk, xc, ref: (blk(xc[0], xc[1], mod_img, mod_txt, cos, sin, ref), None),
                cfg.remat,
                unroll=cfg.scan_unroll,
                xs=cache.double,
            )
        h = jnp.concatenate([c, x], axis=1)
        if self.single_transformer_blocks is not None:
            h, _ = scan_layers(
                self.single_transformer_blocks,
                h,
                lambda blk, h, ref: (blk(h, mod_single, cos, sin, ref)[0], None),
                cfg.remat,
                unroll=cfg.scan_unroll,
                xs=cache.single,
            )
        return self.proj_out(self.norm_out(h[:, c.shape[1] :], temb))


def make_position_ids(
    height: int,
    width: int,
    text_len: int,
    refs: Sequence[tuple[int, int]] = (),
    batch: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Position ids as ``Flux2KleinPipeline`` builds them, for a (height, width) token grid.

    Target tokens get (0, h, w, 0), row-major; reference image k (grid refs[k]) gets (10·(k+1), h, w, 0)
    and follows the target; text token l gets (0, 0, 0, l).
    Returns host (numpy) int32 arrays (img_ids, txt_ids) of shape (Li, 4) and (Lt, 4), or (B, ...) with
    ``batch``; being host constants, they bind to no mesh.
    """
    grids = [(0, height, width)] + [(10 * (k + 1), h, w) for k, (h, w) in enumerate(refs)]
    parts = []
    for t, h, w in grids:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        parts.append(np.stack([np.full(h * w, t), hh.ravel(), ww.ravel(), np.zeros(h * w)], -1))
    img = np.concatenate(parts, axis=0).astype(np.int32)
    txt = np.stack([np.zeros(text_len), np.zeros(text_len), np.zeros(text_len), np.arange(text_len)], -1)
    txt = txt.astype(np.int32)
    if batch is not None:
        img, txt = (np.broadcast_to(a, (batch, *a.shape)) for a in (img, txt))
    return img, txt


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    remat: str | None = None,
    attention: str | None = None,
    reference_kv: bool | None = None,
    scan_unroll: int | None = None,
) -> Flux2Transformer:
    """Loads a diffusers ``Flux2Transformer2DModel`` folder (or a pipeline folder with ``transformer/``).

    Each tensor goes straight to its sharding on ``mesh`` (default: a 1x1x1 mesh on the first device).
    ``remat``/``attention``/``reference_kv``/``scan_unroll`` set our options of the config
    (``Flux2Config``); a diffusers config holds none of them (``reference_kv`` is the pipeline's:
    ``klein.uses_reference_kv``).
    """
    from sfgrpo.models import weights  # noqa: PLC0415 - weights imports the name table lazily

    def build(cfg: Flux2Config) -> Flux2Transformer:
        options = (
            ("remat", remat),
            ("attention", attention),
            ("reference_kv", reference_kv),
            ("scan_unroll", scan_unroll),
        )
        changes = {k: v for k, v in options if v is not None}
        return Flux2Transformer(cfg.replace(**changes), rngs=nnx.Rngs(0), dtype=dtype)

    return weights.load_flux2(path, build, mesh=mesh)
