"""The FLUX.1 VAE (diffusers' ``AutoencoderKL``, 16 latent channels) as OmniGen2 uses it: images <-> tokens.

``Flux1VAE`` implements the autoencoder interface of ``vae.KLAutoencoder`` on the shared Encoder/Decoder:
  encode(images (B, H, W, 3) uint8 or float in [0, 1]) -> (B, L, 4C) float32 tokens on the (H/16, W/16)
    grid: ``OmniGen2Pipeline.encode_vae``'s latents ``(z - shift_factor) * scaling_factor``, then the
    OmniGen2 transformer's patch embedding order ``'c (h p1) (w p2) -> (h w) (p1 p2 c)'`` (channel
    (dy * 2 + dx) * C + c: the latent channel is fastest, unlike ``Flux2VAE``'s (c p1 p2));
  decode(tokens (B, L, 4C), grid_hw) -> (B, H, W, 3) float32 images, (x + 1) / 2, not clipped: unpatchify,
    ``z / scaling_factor + shift_factor``, decode (``OmniGen2Pipeline.processing``'s last lines).

One deliberate difference: the pipeline *samples* the posterior (``latent_dist.sample()``); we take its
mean (``latent_dist.mode()``), so that encoding is deterministic and needs no random key.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sfgrpo.models import vae_weights
from sfgrpo.models.vae import CoderConfig, KLAutoencoder, TokenOrder, build_from_folder, parse_config

__all__ = ["DIFFUSERS_DEFAULTS", "Flux1VAE", "Flux1VAEConfig", "config_from_dict", "load_flux1_vae"]


@dataclasses.dataclass(frozen=True)
class Flux1VAEConfig(CoderConfig):
    """``AutoencoderKL``'s config; the defaults are the FLUX.1 VAE's (``black-forest-labs/FLUX.1-dev``
    ``vae/config.json``, also OmniGen2's VAE), not diffusers' (see ``DIFFUSERS_DEFAULTS``).

    ``scaling_factor`` / ``shift_factor`` of ``None`` are skipped, as OmniGen2's pipeline does.
    ``latents_mean`` / ``latents_std`` (per-channel statistics some SDXL-style pipelines use; OmniGen2
    does not) must be ``None``.
    """

    DIFFUSERS_CLASS: ClassVar[str] = "AutoencoderKL"

    latent_channels: int = 16
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    scaling_factor: float | None = 0.3611
    shift_factor: float | None = 0.1159
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.scaling_factor is not None and not (0 < abs(self.scaling_factor) < float("inf")):
            problems.append(f"scaling_factor={self.scaling_factor} (must be finite and non-zero)")
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                problems.append(f"{name}={getattr(self, name)} (per-channel latent statistics: only None)")
        return problems

    @property
    def scale_and_shift(self) -> tuple[float, float]:
        """(scaling_factor, shift_factor) with None as 1 and 0: tokens = (z - shift) * scale."""
        scale = 1.0 if self.scaling_factor is None else float(self.scaling_factor)
        return scale, 0.0 if self.shift_factor is None else float(self.shift_factor)


# AutoencoderKL.__init__'s defaults where they differ from Flux1VAEConfig's: what a config.json that lacks
# the field means to diffusers.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}


def config_from_dict(d: dict[str, Any], *, source: str = "config") -> Flux1VAEConfig:
    """Parses a diffusers ``AutoencoderKL`` config dict (missing fields take diffusers' defaults)."""
    return parse_config(Flux1VAEConfig, d, source=source, defaults=DIFFUSERS_DEFAULTS)


class Flux1VAE(KLAutoencoder):
    """Images <-> OmniGen2 latent tokens through the FLUX.1 VAE (see the module docstring)."""

    token_order: ClassVar[TokenOrder] = "p1 p2 c"

    def __init__(self, config: Flux1VAEConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        super().__init__(config, rngs=rngs, dtype=dtype)

    # The scale and shift are per element, so applying them to patchified tokens equals the pipeline's
    # applying them to the (B, C, 2h, 2w) latents.
    def _normalise(self, tokens: jax.Array) -> jax.Array:
        scale, shift = self.config.scale_and_shift
        return (tokens - shift) * scale

    def _denormalise(self, tokens: jax.Array) -> jax.Array:
        scale, shift = self.config.scale_and_shift
        return tokens / scale + shift


def load_flux1_vae(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, mesh: Mesh | None = None
) -> Flux1VAE:
    """Loads a diffusers ``AutoencoderKL`` folder, or a pipeline folder holding ``vae/``.

    Parameters take ``dtype``. With ``mesh`` they are placed replicated on it; without, they are
    uncommitted arrays on the default device. A missing folder, config or weights file, and missing,
    unexpected or mis-shaped tensors raise naming the path (``vae_weights``).
    """
    folder = vae_weights.resolve_vae_folder(path)
    cfg = config_from_dict(vae_weights.read_config_dict(folder), source=str(folder / vae_weights.CONFIG_NAME))
    return build_from_folder(Flux1VAE, cfg, folder, dtype=dtype, mesh=mesh)
