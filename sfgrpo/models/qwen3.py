"""FLUX.2-klein's text encoder: transformers' Qwen3 decoder in Flax NNX, returning selected hidden states.

``Flux2KleinPipeline._get_qwen3_prompt_embeds`` runs ``Qwen3ForCausalLM`` with ``output_hidden_states``
and concatenates ``hidden_states[k]`` for k in (9, 18, 27) along channels. In transformers,
``hidden_states[0]`` is the token embedding, ``hidden_states[k]`` (1 <= k < N) the output of decoder layer
k - 1, and ``hidden_states[N]`` (N = num_hidden_layers) the output of the last layer *after* the final
RMSNorm. :class:`Qwen3TextEncoder` builds only the max(layers) decoder layers it needs (and the final norm
only when N is selected); no LM head.

Attention reproduces transformers' SDPA path: causal mask AND key padding mask (AND a sliding window on
the layers the config marks ``sliding_attention``); position ids are 0..T-1 whatever the padding; a query
row with no visible key (left padding) outputs zeros, as torch's SDPA does. RoPE rotates halves
(``rotate_half``), not interleaved pairs. Parameters live stacked over layers (a leading ``layers`` axis)
and run with ``jax.lax.scan``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from sfgrpo.models.layers import Linear, RMSNorm, mesh_of, shard

__all__ = ["Qwen3Config", "Qwen3TextEncoder", "config_from_dict", "load_qwen3"]

KLEIN_LAYERS = (9, 18, 27)  # the pipeline's default text_encoder_out_layers
_ACT = ("batch", None, None)  # (B, T, C) activations: batch over (data, fsdp), the rest replicated
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """The architecture fields of transformers' ``Qwen3Config`` that the encoder uses.

    ``layer_types`` has one entry per layer, 'full_attention' or 'sliding_attention' (then keys further
    than ``sliding_window - 1`` positions back are masked).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    layer_types: tuple[str, ...]
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        problems = []
        for name in _REQUIRED[:-1]:
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even (RoPE rotates halves)")
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries, not {self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
        if bad:
            problems.append(f"layer_types {bad} (only 'full_attention' and 'sliding_attention')")
        if "sliding_attention" in self.layer_types and (self.sliding_window or 0) < 1:
            problems.append(f"sliding layers need sliding_window >= 1, got {self.sliding_window}")
        if problems:
            raise ValueError("unsupported Qwen3 config: " + "; ".join(problems))

    @property
    def groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads


def config_from_dict(d: Mapping[str, Any], source: str = "config") -> Qwen3Config:
    """Parses a transformers Qwen3 ``config.json`` dict, with transformers' rules for optional keys.

    RoPE comes from ``rope_parameters`` (transformers 5) or the legacy ``rope_theta``/``rope_scaling``;
    a missing theta is transformers' default 10000. Only rope_type 'default' is supported. Layer types
    follow ``layer_types``, or transformers' rule: with ``use_sliding_window``, layers from
    ``max_window_layers`` on slide.
    """
    problems = [f"missing {k!r}" for k in _REQUIRED if d.get(k) is None and k != "num_key_value_heads"]
    if d.get("model_type", "qwen3") != "qwen3":
        problems.append(f"model_type is {d['model_type']!r}, not 'qwen3'")
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={d['hidden_act']!r} (only 'silu')")
    if d.get("attention_bias", False):
        problems.append("attention_bias=True (bias-free projections only)")
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope_type {rope_type!r} (only 'default' RoPE is supported)")
    if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1 is not supported")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    n = int(d["num_hidden_layers"])
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
    layer_types = d.get("layer_types")
    if layer_types is None:
        start = d.get("max_window_layers", 28)
        layer_types = [
            "sliding_attention" if window is not None and i >= start else "full_attention" for i in range(n)
        ]
    try:
        return Qwen3Config(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=n,
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            head_dim=int(d["head_dim"]),
            rms_norm_eps=float(d["rms_norm_eps"]),
            rope_theta=float(theta),
            layer_types=tuple(layer_types),
            sliding_window=None if window is None else int(window),
        )
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err


def normalize_layers(layers: Sequence[int], num_hidden_layers: int) -> tuple[int, ...]:
    """Hidden-state indices as in ``hidden_states[k]``: 0..N, or negative from the end as Python indexes."""
    n = num_hidden_layers
    layers = tuple(int(k) for k in layers)
    if not layers:
        raise ValueError("layers must name at least one hidden state")
    bad = [k for k in layers if not -(n + 1) <= k <= n]
    if bad:
        raise ValueError(
            f"layers {bad} out of range: the model has {n} decoder layers, so hidden_states has indices "
            f"0..{n} (0 = embeddings, {n} = last layer after the final norm) or -{n + 1}..-1"
        )
    return tuple(k % (n + 1) for k in layers)


def _heads_reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Reshapes the non-batch axes of an activation, keeping the batch axis's sharding."""
    if jax.sharding.get_abstract_mesh().empty:
        return x.reshape(shape)
    batch = tuple(jax.typeof(x).sharding.spec)[:1] or (None,)
    return jnp.reshape(x, shape, out_sharding=PartitionSpec(*batch, *([None] * (len(shape) - 1))))


def check_token_ids(token_ids: jax.Array, attention_mask: jax.Array, vocab_size: int) -> None:
    """Raises ``ValueError`` unless token_ids and attention_mask are both (B, T) and the ids integers.
    Concrete ids on this host are checked against the vocabulary; traced ones cannot be (an out-of-range
    id then gathers a clamped row)."""
    if token_ids.ndim != 2 or attention_mask.shape != token_ids.shape:
        raise ValueError(
            f"token_ids {token_ids.shape} and attention_mask {attention_mask.shape} must both be (B, T)"
        )
    if not jnp.issubdtype(token_ids.dtype, jnp.integer):
        raise ValueError(f"token_ids must be integers, got {token_ids.dtype}")
    if not isinstance(token_ids, jax.core.Tracer) and getattr(token_ids, "is_fully_addressable", True):
        ids = np.asarray(token_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(
                f"token_ids must lie in [0, {vocab_size}) (the vocabulary), "
                f"got values in [{ids.min()}, {ids.max()}]"
            )


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each (T, head_dim) float32, for positions 0..T-1; frequencies repeated as two halves.

    Inverse frequencies are computed in float32 as transformers does.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    ang = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, N, D) rotated by (T, D) tables, ``x cos + rotate_half(x) sin``, in float32."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]


def attention_mask_4d(attention_mask: jax.Array, window: int | None) -> jax.Array:
    """(B, T) padding mask -> (B, 1, 1, T, T) bool: query q sees key k iff k <= q, key k is not padding,
    and (with a window) q - k < window."""
    t = attention_mask.shape[-1]
    q, k = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    keys = attention_mask.astype(bool)[:, None, None, None, :]
    return jnp.asarray(allowed)[None, None, None] & keys


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q (B, T, Hkv, G, D), k and v (B, T, Hkv, D), mask (B, 1, 1, T, T) -> (B, T, Hkv, G, D) float32.

    Softmax in float32 with scale 1/sqrt(D); rows with no visible key are zero (torch SDPA's output).
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    scores = jnp.where(mask, scores, -jnp.inf)
    visible = jnp.any(mask, axis=-1, keepdims=True)
    probs = jax.nn.softmax(jnp.where(visible, scores, 0.0), axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32))


class Qwen3Attention(nnx.Module):
    """GQA self-attention with per-head q/k RMSNorm before RoPE (transformers' ``Qwen3Attention``)."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]) -> None:
        c, d, kw = cfg.hidden_size, cfg.head_dim, dict(rngs=rngs, dtype=dtype, stack=stack)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = Linear(c, self.heads * d, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(c, self.kv_heads * d, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(c, self.kv_heads * d, axes=("embed", "heads"), **kw)
        self.o_proj = Linear(self.heads * d, c, axes=("heads", "embed"), **kw)
        self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, T, C) -> (B, T, C) in the param dtype."""
        b, t, _ = x.shape
        h, g, d = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q = self.q_norm(_heads_reshape(self.q_proj(x), (b, t, h * g, d)))
        k = self.k_norm(_heads_reshape(self.k_proj(x), (b, t, h, d)))
        v = _heads_reshape(self.v_proj(x), (b, t, h, d))
        q = _heads_reshape(_rotate(q, cos, sin), (b, t, h, g, d))
        out = _attention(q, _rotate(k, cos, sin), v, mask)
        return self.o_proj(_heads_reshape(out, (b, t, h * g * d)).astype(self.o_proj.kernel.dtype))


class Qwen3MLP(nnx.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]) -> None:
        c, f, kw = cfg.hidden_size, cfg.intermediate_size, dict(rngs=rngs, dtype=dtype, stack=stack)
        self.gate_proj = Linear(c, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(c, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, c, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). Stacked: every parameter has a layers axis."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]) -> None:
        kw = dict(rngs=rngs, dtype=dtype, stack=stack)
        self.self_attn = Qwen3Attention(cfg, **kw)
        self.mlp = Qwen3MLP(cfg, **kw)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype, stack=stack)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, T, C) float32 residual stream -> float32."""
        dtype = self.input_layernorm.weight.dtype
        x = x + self.self_attn(self.input_layernorm(x).astype(dtype), cos, sin, mask).astype(jnp.float32)
        x = shard(x, _ACT)
        return x + self.mlp(self.post_attention_layernorm(x).astype(dtype)).astype(jnp.float32)


class Qwen3Embedding(nnx.Module):
    """Token embedding table (vocab, hidden)."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype: Any) -> None:
        init = nnx.initializers.normal(0.02)
        self.embedding = nnx.Param(init(rngs.params(), (vocab, dim), dtype), out_sharding=("vocab", "embed"))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, C) float32, keeping the batch sharding of the ids.

        A gather, not a one-hot product (which would be (B, T, vocab)). Under a mesh the table is gathered
        whole first, so each device looks up its own rows with no collective on the activations.
        """
        table = self.embedding[...]
        if jax.sharding.get_abstract_mesh().empty:
            return jnp.take(table, token_ids, axis=0).astype(jnp.float32)
        table = jax.sharding.reshard(table, PartitionSpec(None, None))
        batch = tuple(jax.typeof(token_ids).sharding.spec)[:1] or (None,)
        out = table.at[token_ids].get(out_sharding=PartitionSpec(*batch, None, None))
        return out.astype(jnp.float32)


class Qwen3TextEncoder(nnx.Module):
    """The prompt encoder of FLUX.2-klein: (B, T) ids and mask -> (B, T, len(layers) * hidden) float32.

    ``layers`` are indices into transformers' ``hidden_states`` (see the module docstring); the output
    concatenates them along channels in the given order, as the pipeline does. Params in ``dtype``;
    norms, RoPE, softmax and the residual stream are float32.
    """

    def __init__(
        self,
        config: Qwen3Config,
        *,
        layers: Sequence[int] = KLEIN_LAYERS,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ) -> None:
        self.config = config
        self.layers = normalize_layers(layers, config.num_hidden_layers)
        self.num_layers = max(self.layers)  # decoder layers to run
        kw = dict(rngs=rngs, dtype=dtype)
        self.embed_tokens = Qwen3Embedding(config.vocab_size, config.hidden_size, **kw)
        self.decoder = nnx.data(
            Qwen3DecoderLayer(config, stack=(self.num_layers,), **kw) if self.num_layers else None
        )
        # The final norm only touches hidden_states[N].
        uses_norm = config.num_hidden_layers in self.layers
        self.norm = nnx.data(
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype) if uses_norm else None
        )

    @property
    def out_dim(self) -> int:
        return len(self.layers) * self.config.hidden_size

    def __call__(self, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """token_ids (B, T) int, attention_mask (B, T) int/bool (1 = real token) -> (B, T, out_dim) f32.

        Concrete ids on this host are checked against the vocabulary; traced ones cannot be (an
        out-of-range id then gathers a clamped row).
        """
        check_token_ids(token_ids, attention_mask, self.config.vocab_size)
        with mesh_of(self.embed_tokens.embedding[...]):
            return self._forward(token_ids, attention_mask)

    def _forward(self, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        b, t = token_ids.shape
        h = shard(self.embed_tokens(token_ids), _ACT)
        # One buffer slot per distinct selected index, plus a scratch slot for unselected layers.
        wanted = sorted(set(self.layers))
        slot = {k: i for i, k in enumerate(wanted)}
        scratch = len(wanted)
        buf = jnp.broadcast_to(jnp.zeros_like(h)[None], (scratch + 1, *h.shape))
        if 0 in slot:
            buf = jax.lax.dynamic_update_index_in_dim(buf, h, slot[0], 0)
        if self.decoder is not None:
            cos, sin = rope_tables(t, cfg.head_dim, cfg.rope_theta)
            masks = {
                kind: attention_mask_4d(
                    attention_mask, cfg.sliding_window if kind == "sliding_attention" else None
                )
                for kind in set(cfg.layer_types[: self.num_layers])
            }
            kinds = sorted(masks)
            kind_of = np.array([kinds.index(cfg.layer_types[i]) for i in range(self.num_layers)], np.int32)
            slots = np.array([slot.get(i + 1, scratch) for i in range(self.num_layers)], np.int32)
            stacked_masks = jnp.stack([masks[k] for k in kinds])
            graphdef, state = nnx.split(self.decoder)

            def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
                h, buf = carry
                layer_state, kind, where = xs
                mask = stacked_masks[kind] if len(kinds) > 1 else stacked_masks[0]
                h = nnx.merge(graphdef, layer_state)(h, cos, sin, mask)
                return (h, jax.lax.dynamic_update_index_in_dim(buf, h, where, 0)), None

            (h, buf), _ = jax.lax.scan(body, (h, buf), (state, jnp.asarray(kind_of), jnp.asarray(slots)))
        if self.norm is not None:
            last = slot[cfg.num_hidden_layers]
            buf = jax.lax.dynamic_update_index_in_dim(buf, self.norm(buf[last]), last, 0)
        out = buf[np.array([slot[k] for k in self.layers])]  # (S, B, T, C) in the requested order
        out = jnp.transpose(out, (1, 2, 0, 3))
        return _heads_reshape(out, (b, t, self.out_dim))


def load_qwen3(
    path: str | os.PathLike,
    *,
    layers: Sequence[int] = KLEIN_LAYERS,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
) -> Qwen3TextEncoder:
    """Loads a transformers ``Qwen3ForCausalLM``/``Qwen3Model`` folder, or a pipeline folder with
    ``text_encoder/``, into a :class:`Qwen3TextEncoder` sharded on ``mesh`` (default: the first device).

    Tensors the encoder does not use (lm_head, layers above max(layers), the final norm unless layer N is
    selected) are skipped; missing or mis-shaped tensors raise a ValueError naming them and the folder.
    """
    from sfgrpo.models import qwen3_weights  # noqa: PLC0415 - the loader imports this module

    return qwen3_weights.load(path, layers=layers, dtype=dtype, mesh=mesh)
