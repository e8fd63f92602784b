"""Configurations of the OmniGen2 transformer: the released checkpoint, tiny test sizes, and parsing of its
``transformer/config.json`` (upstream ``OmniGen2Transformer2DModel``'s field names)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sfgrpo.models.attention import ATTENTION_IMPLS
from sfgrpo.models.layers import REMAT_POLICIES, scan_unroll_problem

MAX_REFERENCE_IMAGES = 5  # rows of the checkpoint's image_index_embedding


@dataclasses.dataclass(frozen=True)
class OmniGen2Config:
    """Architecture (upstream field names and defaults) plus the execution options ``remat``,
    ``attention`` and ``scan_unroll`` (as for FLUX.2, see ``Flux2Config``).

    The head dimension is ``hidden_size / num_attention_heads`` and must equal ``sum(axes_dim_rope)``;
    keys and values have ``num_kv_heads`` heads (grouped-query attention). The MLP width is
    ``4 * hidden_size`` (times ``ffn_dim_multiplier``) rounded up to ``multiple_of``. Timesteps arrive in
    OmniGen2's convention (0 = noise, 1 = data) and are multiplied by ``timestep_scale`` before the
    sinusoidal features.
    """

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None
    hidden_size: int = 2304
    num_layers: int = 26
    num_refiner_layers: int = 2
    num_attention_heads: int = 24
    num_kv_heads: int = 8
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    axes_dim_rope: tuple[int, ...] = (32, 32, 32)
    axes_lens: tuple[int, ...] = (300, 512, 512)
    text_feat_dim: int = 1024
    timestep_scale: float = 1.0
    remat: str = "none"
    attention: str | None = None
    scan_unroll: int = 1

    def __post_init__(self) -> None:
        for name in ("axes_dim_rope", "axes_lens"):
            object.__setattr__(self, name, tuple(int(a) for a in getattr(self, name)))
        problems = []
        if self.patch_size != 2:
            problems.append(f"patch_size={self.patch_size} (only 2: tokens are 16 px with the 8x VAE)")
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}"
            )
        elif self.head_dim != sum(self.axes_dim_rope):
            problems.append(f"head dim {self.head_dim} != sum(axes_dim_rope)={sum(self.axes_dim_rope)}")
        if self.num_kv_heads < 1 or self.num_attention_heads % self.num_kv_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if len(self.axes_dim_rope) != 3 or len(self.axes_lens) != 3:
            problems.append(f"axes_dim_rope {self.axes_dim_rope} and axes_lens {self.axes_lens} need 3 axes")
        if any(a % 2 for a in self.axes_dim_rope):
            problems.append(f"axes_dim_rope={self.axes_dim_rope} must all be even")
        if self.num_layers < 0 or self.num_refiner_layers < 0:
            problems.append("layer counts must be >= 0")
        if self.multiple_of < 1:
            problems.append(f"multiple_of={self.multiple_of} must be >= 1")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat={self.remat!r} (one of {REMAT_POLICIES})")
        if (problem := scan_unroll_problem(self.scan_unroll)) is not None:
            problems.append(problem)
        if self.attention not in ATTENTION_IMPLS:
            problems.append(f"attention={self.attention!r} (one of {ATTENTION_IMPLS})")
        if problems:
            raise ValueError("unsupported OmniGen2 config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def temb_dim(self) -> int:
        """Width of the timestep embedding and of every modulation's input (upstream caps it at 1024)."""
        return min(self.hidden_size, 1024)

    @property
    def mlp_hidden_dim(self) -> int:
        inner = 4 * self.hidden_size
        if self.ffn_dim_multiplier is not None:
            inner = int(self.ffn_dim_multiplier * inner)
        return self.multiple_of * -(-inner // self.multiple_of)

    @property
    def token_channels(self) -> int:
        """Channels of one latent token: a 2x2 patch of the VAE's latent, (p1 p2 c) packed."""
        return self.patch_size**2 * self.in_channels

    @property
    def out_dim(self) -> int:
        return self.patch_size**2 * (self.out_channels or self.in_channels)

    def replace(self, **changes: Any) -> OmniGen2Config:
        return dataclasses.replace(self, **changes)

    def architecture(self) -> OmniGen2Config:
        """The config with our execution options at their defaults: what upstream's ``config.json``
        describes."""
        return self.replace(remat="none", attention=None, scan_unroll=1)


CONFIGS: dict[str, OmniGen2Config] = {
    # The released OmniGen2 transformer (OmniGen2/OmniGen2 transformer/config.json): 32 layers of 2520
    # (21 heads x 120, 7 KV heads), conditioned on Qwen2.5-VL-3B's 2048-wide hidden states.
    "omnigen2": OmniGen2Config(
        hidden_size=2520,
        num_layers=32,
        num_refiner_layers=2,
        num_attention_heads=21,
        num_kv_heads=7,
        axes_dim_rope=(40, 40, 40),
        axes_lens=(1024, 1664, 1664),
        text_feat_dim=2048,
        timestep_scale=1000.0,
    ),
    # Test size: 4 heads x 16 (2 KV heads), RoPE axes 4/6/6.
    "tiny": OmniGen2Config(
        in_channels=4,
        hidden_size=64,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=4,
        num_kv_heads=2,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(64, 32, 32),
        text_feat_dim=24,
        timestep_scale=1000.0,
    ),
}

_FIELDS = {f.name for f in dataclasses.fields(OmniGen2Config)}
_CLASS = "OmniGen2Transformer2DModel"


def config_from_dict(d: Mapping[str, Any], *, source: str = "config") -> OmniGen2Config:
    """Parses an ``OmniGen2Transformer2DModel`` config dict; unknown fields raise ``ValueError``."""
    cls = d.get("_class_name")
    if cls is not None and cls != _CLASS:
        raise ValueError(f"{source}: unsupported model class {cls!r}; expected {_CLASS!r}")
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _FIELDS)
    if unknown:
        raise ValueError(f"{source}: unsupported OmniGen2 config fields {unknown}")
    try:
        return OmniGen2Config(**{k: v for k, v in d.items() if k in _FIELDS})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def get_config(config: str | Mapping[str, Any] | OmniGen2Config) -> OmniGen2Config:
    """A config by name (see ``CONFIGS``), from a config dict, or passed through."""
    if isinstance(config, OmniGen2Config):
        return config
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown OmniGen2 config name {config!r}; known: {sorted(CONFIGS)}")
        return CONFIGS[config]
    return config_from_dict(config)
