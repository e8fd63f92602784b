"""Configurations of the FLUX.2 transformer: the real checkpoints (SPEC §10), tiny test sizes, and parsing
of diffusers' ``transformer/config.json``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sfgrpo.models.attention import ATTENTION_IMPLS
from sfgrpo.models.layers import REMAT_POLICIES, scan_unroll_problem


@dataclasses.dataclass(frozen=True)
class Flux2Config:
    """Architecture (diffusers' field names) plus options of ours that no diffusers config holds.

    remat: 'none', 'full' (recompute each block in the backward pass) or 'dots' (save the weight
    matmuls, recompute the rest). attention: None/'xla', 'cudnn', 'blockwise' or 'splash'
    (``models.attention``). reference_kv: how reference (source image) tokens are attended, a property of
    the pipeline the weights were trained for: False is ``Flux2KleinPipeline`` (references are tokens of
    the joint sequence), True is ``Flux2KleinKVPipeline`` (FLUX.2-klein-*-kv: references attend only to
    themselves, modulated at timestep 0, so their per-layer keys and values do not depend on the step and
    are computed once per image, ``Flux2Transformer.reference_kv``). scan_unroll: blocks per iteration of
    the loops over the double and the single blocks (``layers.scan_layers``): 1 compiles one body per
    loop; a value >= the block count compiles straight-line code, without the loop's stacked per-layer
    buffers, for a compile time that grows with the depth.
    """

    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = True
    patch_size: int = 1
    remat: str = "none"
    attention: str | None = None
    reference_kv: bool = False
    scan_unroll: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        problems = []
        if self.patch_size != 1:
            problems.append(f"patch_size={self.patch_size} (only 1 is supported)")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            problems.append(
                f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} "
                f"!= attention_head_dim={self.attention_head_dim}"
            )
        if any(a % 2 for a in self.axes_dims_rope):
            problems.append(f"axes_dims_rope={self.axes_dims_rope} must all be even")
        if self.num_layers < 0 or self.num_single_layers < 0:
            problems.append("block counts must be >= 0")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat={self.remat!r} (one of {REMAT_POLICIES})")
        if (problem := scan_unroll_problem(self.scan_unroll)) is not None:
            problems.append(problem)
        if self.attention not in ATTENTION_IMPLS:
            problems.append(f"attention={self.attention!r} (one of {ATTENTION_IMPLS})")
        if problems:
            raise ValueError("unsupported Flux2 config: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    def replace(self, **changes: Any) -> Flux2Config:
        return dataclasses.replace(self, **changes)

    def architecture(self) -> Flux2Config:
        """The config with our options at their defaults: what a diffusers ``config.json`` describes."""
        return self.replace(remat="none", attention=None, reference_kv=False, scan_unroll=1)


CONFIGS: dict[str, Flux2Config] = {
    # FLUX.2-klein-4B: Qwen3-4B text features (3 layers x 2560 = 7680), no guidance embedding.
    "klein-4b": Flux2Config(
        num_layers=5,
        num_single_layers=20,
        num_attention_heads=24,
        joint_attention_dim=7680,
        guidance_embeds=False,
    ),
    # FLUX.2-klein-9B: Qwen3-8B text features (3 x 4096 = 12288).
    "klein-9b": Flux2Config(
        num_layers=8,
        num_single_layers=24,
        num_attention_heads=32,
        joint_attention_dim=12288,
        guidance_embeds=False,
    ),
    # FLUX.2-dev: guidance-distilled, Mistral text features (15360).
    "dev": Flux2Config(),
    # Test sizes: 2 heads x 16 (RoPE axes 4 x 4), a few blocks.
    "tiny": Flux2Config(
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ),
}
CONFIGS["flux2-dev"] = CONFIGS["dev"]
CONFIGS["tiny-guidance"] = CONFIGS["tiny"].replace(num_layers=1, guidance_embeds=True)

_FIELDS = {f.name for f in dataclasses.fields(Flux2Config)}


def config_from_dict(d: Mapping[str, Any], *, source: str = "config") -> Flux2Config:
    """Parses a diffusers ``Flux2Transformer2DModel`` config dict; unknown fields raise ``ValueError``."""
    cls = d.get("_class_name")
    if cls is not None and cls != "Flux2Transformer2DModel":
        raise ValueError(f"{source}: unsupported model class {cls!r}; expected 'Flux2Transformer2DModel'")
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _FIELDS)
    if unknown:
        raise ValueError(f"{source}: unsupported Flux2 config fields {unknown}")
    kwargs = {k: v for k, v in d.items() if k in _FIELDS}
    try:
        return Flux2Config(**kwargs)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def get_config(config: str | Mapping[str, Any] | Flux2Config) -> Flux2Config:
    """A config by name (see ``CONFIGS``), from a diffusers config dict, or passed through."""
    if isinstance(config, Flux2Config):
        return config
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown Flux2 config name {config!r}; known: {sorted(CONFIGS)}")
        return CONFIGS[config]
    return config_from_dict(config)
