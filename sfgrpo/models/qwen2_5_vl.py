"""OmniGen2's text encoder: the language model of transformers' Qwen2.5-VL in Flax NNX, last hidden state.

``OmniGen2Pipeline._get_qwen2_prompt_embeds`` runs ``Qwen2_5_VLForConditionalGeneration(input_ids,
attention_mask=mask, output_hidden_states=True).hidden_states[-1]`` on the chat-templated instruction alone
(text only, no images), tokenised with ``padding="longest"``. :class:`Qwen2_5_VLTextEncoder` returns that
tensor, (B, T, hidden) float32; the vision tower and the LM head are not built.

What transformers 5 does there, and so what this module does (checked against transformers 5.24):

* ``hidden_states[-1]`` is the output of the last decoder layer *after* the final RMSNorm (it equals the
  text model's ``last_hidden_state``).
* Position ids are 0..T-1 whatever the padding: without images ``Qwen2_5_VLModel.compute_3d_position_ids``
  returns None and the text model falls back to ``arange(T)`` for all three M-RoPE axes. (transformers 4.x
  used ``cumsum(mask) - 1``, padding set to 1; RoPE being relative, the real tokens' outputs agree with
  that up to float rounding, ~1e-6, and only the padding rows differ.)
* M-RoPE with equal temporal/height/width positions is plain 1D RoPE: each ``mrope_section`` chunk of the
  frequencies is taken from one of three identical tables, so ``mrope_section`` does not matter here. RoPE
  rotates halves (``rotate_half``) with theta from the config (1e6 for the released models).
* Attention is transformers' SDPA path: causal AND key padding (AND a sliding window on layers marked
  ``sliding_attention``); a query row with no visible key (left padding) gets zeros from attention, as
  torch's SDPA does, then runs through the MLP and the norm like any row.
* Unlike Qwen3: q/k/v projections have biases (o_proj none), no q/k norm, head_dim = hidden / heads.

The pieces shared with Qwen3 (RoPE tables, masked attention, SwiGLU MLP, embedding) are imported from
:mod:`sfgrpo.models.qwen3`. Parameters are stacked over layers and run with ``jax.lax.scan``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sfgrpo import runtime
from sfgrpo.models import weights
from sfgrpo.models.layers import Linear, RMSNorm, mesh_of, shard
from sfgrpo.models.qwen3 import (
    Qwen3Embedding,
    Qwen3MLP,
    _attention,
    _heads_reshape,
    _rotate,
    attention_mask_4d,
    check_token_ids,
    rope_tables,
)
from sfgrpo.models.weights import Entry, SafetensorsReader

__all__ = ["Qwen2_5_VLTextConfig", "Qwen2_5_VLTextEncoder", "config_from_dict", "load_qwen2_5_vl"]

SUBFOLDER = "mllm"  # where an OmniGen2 model folder keeps the Qwen2.5-VL model
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_THETA = 1_000_000.0  # Qwen2_5_VLTextConfig.default_theta
_ACT = ("batch", None, None)  # (B, T, C) activations: batch over (data, fsdp), the rest replicated
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
)
# Tensor-name prefixes of the language model, tried in order: transformers 5 in memory / some v5 saves,
# transformers 4 and v5's default save (v5 converts back to the old names), a bare Qwen2_5_VLModel (v5), a
# bare text model.
_PREFIXES = ("model.language_model.", "model.", "language_model.", "")
_LAYER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LAYER_BIASES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLTextConfig:
    """The fields of transformers' ``Qwen2_5_VLTextConfig`` that the language model uses.

    ``layer_types`` has one entry per layer, 'full_attention' or 'sliding_attention' (then keys further
    than ``sliding_window - 1`` positions back are masked). head_dim is hidden_size / num_attention_heads.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float = DEFAULT_THETA
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * int(self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        problems = []
        for name in _REQUIRED[:-1]:
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if not problems:
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(
                    f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                    f"num_key_value_heads={self.num_key_value_heads}"
                )
            if self.hidden_size % self.num_attention_heads:
                problems.append(
                    f"hidden_size={self.hidden_size} is not a multiple of "
                    f"num_attention_heads={self.num_attention_heads}"
                )
            elif self.head_dim % 2:
                problems.append(f"head_dim = hidden_size / heads = {self.head_dim} must be even (RoPE)")
        if not self.rms_norm_eps > 0:
            problems.append(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        if not self.rope_theta > 0:
            problems.append(f"rope_theta={self.rope_theta} must be > 0")
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries, not {self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
        if bad:
            problems.append(f"layer_types {bad} (only 'full_attention' and 'sliding_attention')")
        if "sliding_attention" in self.layer_types and (self.sliding_window or 0) < 1:
            problems.append(f"sliding layers need sliding_window >= 1, got {self.sliding_window}")
        if problems:
            raise ValueError("unsupported Qwen2.5-VL text config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads


def config_from_dict(d: Mapping[str, Any], source: str = "config") -> Qwen2_5_VLTextConfig:
    """Parses a transformers Qwen2.5-VL ``config.json`` dict (the whole model's, or its text config).

    The text fields come from ``text_config`` when present (transformers 5 saves, and 4.x ones from 4.52
    on), else from the top level (older 4.x saves), as ``Qwen2_5_VLConfig`` reads them. RoPE comes from
    ``rope_parameters`` or the legacy ``rope_scaling`` (type 'mrope' or 'default'), theta from there or
    ``rope_theta``, else transformers' default 1e6. Layer types follow ``layer_types`` or transformers' rule
    (with ``use_sliding_window``, layers from ``max_window_layers`` on slide). Problems raise one
    ``ValueError`` naming ``source`` and every bad field.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    problems = []
    model_type = d.get("model_type", "qwen2_5_vl")
    if model_type not in ("qwen2_5_vl", "qwen2_5_vl_text"):
        problems.append(f"model_type is {model_type!r}, not 'qwen2_5_vl' or 'qwen2_5_vl_text'")
    text, where = d, ""
    if d.get("text_config") is not None:
        text, where = d["text_config"], "text_config."
        if not isinstance(text, Mapping):
            raise ValueError(f"{source}: text_config must be an object, got {type(text).__name__}")
    problems += [
        f"missing {where + k!r}" for k in _REQUIRED if text.get(k) is None and k != "num_key_value_heads"
    ]
    if text.get("hidden_act", "silu") != "silu":
        problems.append(f"{where}hidden_act={text['hidden_act']!r} (only 'silu')")
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        problems.append(f"{where}rope_parameters must be an object, got {rope!r}")
        rope = {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        problems.append(f"{where}rope_type {rope_type!r} (only 'default'/'mrope' RoPE is supported)")
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    head_dim = text.get("head_dim")
    numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in (head_dim, heads, hidden))
    if head_dim is not None and numbers and heads and head_dim * heads != hidden:
        # The attention uses hidden / heads; a different head_dim would only reach the RoPE tables.
        problems.append(f"{where}head_dim={head_dim} is not hidden_size / num_attention_heads")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    try:
        if "rope_theta" in rope:  # rope_parameters (v5) or rope_scaling (v4) carries it, else the top level
            theta = _float(rope, "rope_theta", where + "rope_parameters.")
        else:
            theta = _float(text, "rope_theta", where, DEFAULT_THETA)
        n = _int(text, "num_hidden_layers", where)
        window = text.get("sliding_window", 4096) if text.get("use_sliding_window", False) else None
        layer_types = text.get("layer_types")
        if layer_types is None:
            start = text.get("max_window_layers", 80)
            layer_types = [
                "sliding_attention" if window is not None and i >= start else "full_attention"
                for i in range(n)
            ]
        heads = _int(text, "num_attention_heads", where)
        return Qwen2_5_VLTextConfig(
            vocab_size=_int(text, "vocab_size", where),
            hidden_size=_int(text, "hidden_size", where),
            intermediate_size=_int(text, "intermediate_size", where),
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=_int(text, "num_key_value_heads", where, heads),
            rms_norm_eps=_float(text, "rms_norm_eps", where),
            rope_theta=theta,
            layer_types=tuple(layer_types),
            sliding_window=None if window is None else _int(text, "sliding_window", where, 4096),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from err


def _int(d: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    """``d[key]`` as an int (``default`` when absent or null); a clear error naming the field otherwise."""
    value = d.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"{where}{key}={value!r} must be an integer")
    return int(value)


def _float(d: Mapping[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = d.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}{key}={value!r} must be a number")
    return float(value)


class Qwen2_5_VLAttention(nnx.Module):
    """GQA self-attention with q/k/v biases and RoPE, no q/k norm (transformers' ``Qwen2_5_VLAttention``)."""

    def __init__(
        self, cfg: Qwen2_5_VLTextConfig, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]
    ) -> None:
        c, d, kw = cfg.hidden_size, cfg.head_dim, dict(rngs=rngs, dtype=dtype, stack=stack)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = Linear(c, self.heads * d, axes=("embed", "heads"), bias=True, **kw)
        self.k_proj = Linear(c, self.kv_heads * d, axes=("embed", "heads"), bias=True, **kw)
        self.v_proj = Linear(c, self.kv_heads * d, axes=("embed", "heads"), bias=True, **kw)
        self.o_proj = Linear(self.heads * d, c, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, T, C), cos/sin (T, head_dim), mask (B, 1, 1, T, T) -> (B, T, C) in the param dtype."""
        b, t, _ = x.shape
        h, g, d = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q = _heads_reshape(self.q_proj(x), (b, t, h * g, d))
        k = _heads_reshape(self.k_proj(x), (b, t, h, d))
        v = _heads_reshape(self.v_proj(x), (b, t, h, d))
        # Query head j uses key/value head j // g, as torch's repeat_kv.
        q = _heads_reshape(_rotate(q, cos, sin), (b, t, h, g, d))
        out = _attention(q, _rotate(k, cos, sin), v, mask)
        return self.o_proj(_heads_reshape(out, (b, t, h * g * d)).astype(self.o_proj.kernel.dtype))


class Qwen2_5_VLDecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). Stacked: every parameter has a layers axis."""

    def __init__(
        self, cfg: Qwen2_5_VLTextConfig, *, rngs: nnx.Rngs, dtype: Any, stack: Sequence[int]
    ) -> None:
        kw = dict(rngs=rngs, dtype=dtype, stack=stack)
        self.self_attn = Qwen2_5_VLAttention(cfg, **kw)
        self.mlp = Qwen3MLP(cfg, **kw)  # the same SwiGLU (Qwen2MLP); it reads hidden/intermediate sizes
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype, stack=stack)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, T, C) float32 residual stream -> float32."""
        dtype = self.input_layernorm.weight.dtype
        x = x + self.self_attn(self.input_layernorm(x).astype(dtype), cos, sin, mask).astype(jnp.float32)
        x = shard(x, _ACT)
        return x + self.mlp(self.post_attention_layernorm(x).astype(dtype)).astype(jnp.float32)


class Qwen2_5_VLTextEncoder(nnx.Module):
    """The prompt encoder of OmniGen2: (B, T) ids and mask -> (B, T, hidden) float32, transformers'
    ``hidden_states[-1]`` (after the final norm; see the module docstring).

    Params in ``dtype``; norms, RoPE, softmax and the residual stream are float32.
    """

    def __init__(self, config: Qwen2_5_VLTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype)
        self.embed_tokens = Qwen3Embedding(config.vocab_size, config.hidden_size, **kw)
        self.decoder = Qwen2_5_VLDecoderLayer(config, stack=(config.num_hidden_layers,), **kw)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

    @property
    def out_dim(self) -> int:
        return self.config.hidden_size

    def __call__(self, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """token_ids (B, T) int, attention_mask (B, T) int/bool (1 = real token) -> (B, T, hidden) f32.

        Padding rows get values too (as in transformers); callers mask them. Concrete ids on this host are
        checked against the vocabulary; traced ones cannot be (an out-of-range id then gathers a clamped
        row).
        """
        check_token_ids(token_ids, attention_mask, self.config.vocab_size)
        with mesh_of(self.embed_tokens.embedding[...]):
            return self._forward(token_ids, attention_mask)

    def _forward(self, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        h = shard(self.embed_tokens(token_ids), _ACT)
        # Positions 0..T-1 for every row, padding or not (transformers 5, text only).
        cos, sin = rope_tables(token_ids.shape[1], cfg.head_dim, cfg.rope_theta)
        kinds = sorted(set(cfg.layer_types))
        masks = jnp.stack(
            [
                attention_mask_4d(attention_mask, cfg.sliding_window if k == "sliding_attention" else None)
                for k in kinds
            ]
        )
        kind_of = jnp.asarray([kinds.index(k) for k in cfg.layer_types], jnp.int32)
        graphdef, state = nnx.split(self.decoder)

        def body(h: jax.Array, xs: tuple) -> tuple[jax.Array, None]:
            layer_state, kind = xs
            mask = masks[kind] if len(kinds) > 1 else masks[0]
            return nnx.merge(graphdef, layer_state)(h, cos, sin, mask), None

        h, _ = jax.lax.scan(body, h, (state, kind_of))
        return self.norm(h)


# ---------------------------------------------------------------------------------------------------------
# Loading.


def resolve_folder(path: str | os.PathLike) -> Path:
    """The folder holding the Qwen2.5-VL config.json: ``path/mllm`` (an OmniGen2 folder) or ``path``."""
    return weights.resolve_folder(path, SUBFOLDER, "Qwen2.5-VL (OmniGen2 mllm)")


def read_config(folder: Path) -> Qwen2_5_VLTextConfig:
    file = folder / CONFIG_NAME
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    return config_from_dict(d, source=str(file))


def language_model_prefix(keys: Sequence[str]) -> str | None:
    """The prefix of the language model's tensors among ``keys`` (see ``_PREFIXES``), or None."""
    available = set(keys)
    for prefix in _PREFIXES:
        if (
            f"{prefix}embed_tokens.weight" in available
            or f"{prefix}layers.0.input_layernorm.weight" in available
        ):
            return prefix
    return None


def param_table(num_layers: int, prefix: str) -> dict[str, Entry]:
    """Our parameter path ("decoder.self_attn.q_proj.bias") -> its source tensors named with ``prefix``."""
    layer = [f"{prefix}layers.{i}." for i in range(num_layers)]
    table = {
        "embed_tokens.embedding": Entry((f"{prefix}embed_tokens.weight",), False, False),
        "norm.weight": Entry((f"{prefix}norm.weight",), False, False),
    }
    for m in _LAYER_LINEARS:
        table[f"decoder.{m}.kernel"] = Entry(tuple(p + m + ".weight" for p in layer), True, True)
    for m in _LAYER_BIASES:
        table[f"decoder.{m}.bias"] = Entry(tuple(p + m + ".bias" for p in layer), True, False)
    for m in _LAYER_NORMS:
        table[f"decoder.{m}.weight"] = Entry(tuple(p + m + ".weight" for p in layer), True, False)
    return table


def load_qwen2_5_vl(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, mesh: Mesh | None = None
) -> Qwen2_5_VLTextEncoder:
    """Loads the language model of a transformers ``Qwen2_5_VLForConditionalGeneration`` folder, or of an
    OmniGen2 model folder (which keeps it in ``mllm/``), into a :class:`Qwen2_5_VLTextEncoder` sharded on
    ``mesh`` (default: the first device).

    Weights are ``model.safetensors`` or the shards ``model.safetensors.index.json`` lists, with the
    language model named ``model.*`` (transformers 4, and v5's saves) or ``model.language_model.*``
    (transformers 5's module names). The vision tower (``visual.*``) and ``lm_head`` are skipped; missing or
    mis-shaped tensors raise a ValueError naming them and the folder.
    """
    folder = resolve_folder(path)
    cfg = read_config(folder)
    reader = SafetensorsReader(weights.weight_files(folder, WEIGHTS_NAME, "Qwen2.5-VL"))
    prefix = language_model_prefix(reader.keys())
    if prefix is None:
        raise ValueError(
            f"Qwen2.5-VL checkpoint {folder} has no language-model weights: none of "
            f"{[p + 'embed_tokens.weight' for p in _PREFIXES]} is in its safetensors"
        )
    mesh = mesh if mesh is not None else runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with runtime.use_mesh(mesh):
        abstract = nnx.eval_shape(lambda: Qwen2_5_VLTextEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
        graphdef, abstract_state = nnx.split(abstract)
        state = weights.fill_state(
            reader,
            abstract_state,
            mesh,
            param_table(cfg.num_hidden_layers, prefix),
            what=f"Qwen2.5-VL checkpoint {folder}",
            unused_ok=True,  # visual.*, lm_head
        )
        return nnx.merge(graphdef, state)
