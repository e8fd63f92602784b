"""diffusers' KL autoencoders in Flax NNX: the shared Encoder/Decoder, and the FLUX.2 VAE on top of it.

``KLAutoencoder`` is the encoder/decoder (plus optional 1x1 quant convs) common to diffusers'
``AutoencoderKL`` and ``AutoencoderKLFlux2``; its subclasses implement the autoencoder interface of
``tiny.PixelAutoencoder`` (ARCHITECTURE.md) and differ only in how latents become tokens:
  encode(images (B, H, W, 3) uint8 or float in [0, 1]) -> (B, L, 4C) float32 tokens on the (H/16, W/16)
    grid (for the real models): the posterior mode, 2x2 patchified, normalised, packed row-major;
  decode(tokens (B, L, 4C), grid_hw) -> (B, H, W, 3) float32 images, (x + 1) / 2, not clipped.

``Flux2VAE`` (here) is ``AutoencoderKLFlux2`` as ``Flux2KleinPipeline`` uses it: tokens normalised by the
BatchNorm running statistics, patch channels ordered (c p1 p2). ``vae_flux1.Flux1VAE`` is the FLUX.1
``AutoencoderKL`` as OmniGen2 uses it. ``load_autoencoder`` loads either, by the config's ``_class_name``.

Arrays are NHWC. Parameter paths mirror diffusers' module names (``encoder.down_blocks.0.resnets.1.conv1.
kernel`` <-> ``...conv1.weight``; see ``vae_weights``). Parameters are replicated: the VAEs are small (84M
parameters for the real models) and only the batch axis is sharded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sfgrpo.models import vae_weights

__all__ = [
    "CoderConfig",
    "Flux2VAE",
    "Flux2VAEConfig",
    "KLAutoencoder",
    "RunningStat",
    "config_from_dict",
    "load_autoencoder",
    "load_vae",
    "parse_config",
]

_DOWN, _UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
_RESNET_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code this for every GroupNorm
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() is the exact (erf) form
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu,
}
# Token channel orders of a 2x2 patch of C latent channels, in einops notation (last name fastest).
TokenOrder = Literal["c p1 p2", "p1 p2 c"]


@dataclasses.dataclass(frozen=True)
class CoderConfig:
    """The Encoder/Decoder fields shared by diffusers' KL autoencoder configs (diffusers' names).

    Subclasses set ``DIFFUSERS_CLASS``, add their own fields and override defaults. Not used here:
    ``sample_size`` (diffusers' tiling only; we never tile) and ``force_upcast`` (the caller picks the
    dtype, and GroupNorm statistics are float32 in any case).
    """

    DIFFUSERS_CLASS: ClassVar[str] = ""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN,) * 4
    up_block_types: tuple[str, ...] = (_UP,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 32
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 1024
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # JSON gives lists; keep the config hashable
            if isinstance(getattr(self, field.name), list):
                object.__setattr__(self, field.name, tuple(getattr(self, field.name)))
        problems = self._problems()
        if problems:
            raise ValueError(f"unsupported {self.DIFFUSERS_CLASS} config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        """What this implementation cannot build; subclasses extend the list."""
        problems = []
        if self.in_channels != 3 or self.out_channels != 3:
            problems.append(
                f"in_channels={self.in_channels}, out_channels={self.out_channels} (RGB: 3 and 3)"
            )
        enc, dec = self.block_out_channels, self.decoder_channels
        if not enc or min(enc) < 1 or not dec or min(dec) < 1:
            named = f"block_out_channels={enc}" + (
                f", decoder_block_out_channels={dec}" if dec != enc else ""
            )
            problems.append(f"{named} must be positive")
        if len(dec) != len(enc):
            problems.append(f"decoder_block_out_channels={dec} must have as many entries as {enc}")
        # get_down_block / get_up_block strip a "UNetRes" prefix.
        if [t.removeprefix("UNetRes") for t in self.down_block_types] != [_DOWN] * len(enc):
            problems.append(f"down_block_types={self.down_block_types} (only {len(enc)} x {_DOWN!r})")
        if [t.removeprefix("UNetRes") for t in self.up_block_types] != [_UP] * len(dec):
            problems.append(f"up_block_types={self.up_block_types} (only {len(dec)} x {_UP!r})")
        if self.layers_per_block < 1:
            problems.append(f"layers_per_block={self.layers_per_block} (must be >= 1)")
        if self.act_fn not in _ACTIVATIONS:
            problems.append(f"act_fn={self.act_fn!r} (one of {sorted(_ACTIVATIONS)})")
        if self.latent_channels < 1:
            problems.append(f"latent_channels={self.latent_channels} (must be >= 1)")
        if self.norm_num_groups < 1 or any(c % self.norm_num_groups for c in (*enc, *dec)):
            problems.append(f"norm_num_groups={self.norm_num_groups} must divide every block's channels")
        return problems

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """The decoder's block channels (in encoder order): the encoder's unless a subclass says otherwise."""
        return self.block_out_channels

    @property
    def scale(self) -> int:
        """Pixels per token side: 2**(blocks - 1) from the down blocks, times the pipelines' 2x2 patch."""
        return 2 ** (len(self.block_out_channels) - 1) * 2

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


_C = TypeVar("_C", bound=CoderConfig)


def parse_config(
    cls: type[_C], d: Mapping[str, Any], *, source: str = "config", defaults: Mapping[str, Any] | None = None
) -> _C:
    """A diffusers config dict -> ``cls``; another ``_class_name`` or an unknown field raises.

    ``defaults``: values for fields the dict lacks, where diffusers' defaults differ from ``cls``'s.
    """
    name = cls.DIFFUSERS_CLASS
    found = d.get("_class_name")
    if found is not None and found != name:
        raise ValueError(f"{source}: unsupported VAE class {found!r}; expected {name!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if not k.startswith("_") and k not in fields)
    if unknown:
        raise ValueError(f"{source}: unsupported {name} config fields {unknown}")
    try:
        return cls(**{**(defaults or {}), **{k: v for k, v in d.items() if k in fields}})
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


@dataclasses.dataclass(frozen=True)
class Flux2VAEConfig(CoderConfig):
    """``AutoencoderKLFlux2``'s config (diffusers' field names and defaults = the real FLUX.2 VAE).

    Not used here besides ``CoderConfig``'s: ``batch_norm_momentum`` (training of the statistics; they are
    frozen); ``force_upcast`` is ignored by ``Flux2KleinPipeline`` too.
    """

    DIFFUSERS_CLASS: ClassVar[str] = "AutoencoderKLFlux2"

    decoder_block_out_channels: tuple[int, ...] | None = None
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, ...] = (2, 2)

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.patch_size != (2, 2):
            problems.append(f"patch_size={self.patch_size} (the FLUX.2 pipelines patchify 2x2 only)")
        if self.batch_norm_eps < 0:
            problems.append(f"batch_norm_eps={self.batch_norm_eps} (must be >= 0)")
        return problems

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels


def config_from_dict(d: Mapping[str, Any], *, source: str = "config") -> Flux2VAEConfig:
    """Parses a diffusers ``AutoencoderKLFlux2`` config dict; other classes and unknown fields raise."""
    return parse_config(Flux2VAEConfig, d, source=source)


class RunningStat(nnx.Variable):
    """A frozen buffer (BatchNorm running statistics): not an ``nnx.Param``, so never trained."""


# ---------------------------------------------------------------------------------------------------------
# Layers. x is (B, H, W, C); the batch axis may be sharded over the mesh, everything else is replicated.


def _batch_reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Reshapes the non-batch axes, keeping the batch axis's sharding (explicit meshes ask for it)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x.reshape(shape)
    batch_spec = tuple(jax.typeof(x).sharding.spec)[:1] or (None,)
    return jnp.reshape(x, shape, out_sharding=jax.P(*batch_spec, *([None] * (len(shape) - 1))))


class Conv2d(nnx.Module):
    """A 2D convolution with bias; ``kernel`` is (k, k, in, out) (torch's OIHW transposed)."""

    def __init__(
        self, cin: int, cout: int, k: int, *, stride: int = 1, padding: Any, rngs: nnx.Rngs, dtype: Any
    ) -> None:
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1)
        self.kernel = nnx.Param(init(rngs.params(), (k, k, cin, cout), dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))
        self.stride, self.padding = stride, padding

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        y = jax.lax.conv_general_dilated(
            x.astype(kernel.dtype),
            kernel,
            (self.stride, self.stride),
            self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...]


class Dense(nnx.Module):
    """A linear layer with bias over the last axis; ``kernel`` is (in, out)."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (cin, cout), dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        return jnp.einsum("...i,io->...o", x.astype(kernel.dtype), kernel) + self.bias[...]


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, C / groups) with affine ``weight``/``bias``; statistics in float32."""

    def __init__(self, groups: int, channels: int, *, dtype: Any) -> None:
        self.weight = nnx.Param(jnp.ones((channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype))
        self.groups = groups

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xf = _batch_reshape(x.astype(jnp.float32), (b, h, w, self.groups, c // self.groups))
        mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
        y = _batch_reshape((xf - mean) * jax.lax.rsqrt(var + _RESNET_EPS), (b, h, w, c))
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResnetBlock(nnx.Module):
    """norm -> act -> conv3x3 -> norm -> act -> conv3x3, plus a (1x1-projected if cin != cout) skip."""

    def __init__(self, cin: int, cout: int, cfg: CoderConfig, *, rngs: nnx.Rngs, dtype: Any) -> None:
        g = cfg.norm_num_groups
        self.act = _ACTIVATIONS[cfg.act_fn]
        self.norm1 = GroupNorm(g, cin, dtype=dtype)
        self.conv1 = Conv2d(cin, cout, 3, padding=((1, 1), (1, 1)), rngs=rngs, dtype=dtype)
        self.norm2 = GroupNorm(g, cout, dtype=dtype)
        self.conv2 = Conv2d(cout, cout, 3, padding=((1, 1), (1, 1)), rngs=rngs, dtype=dtype)
        self.conv_shortcut = (
            Conv2d(cin, cout, 1, padding=((0, 0), (0, 0)), rngs=rngs, dtype=dtype) if cin != cout else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Downsample(nnx.Module):
    """Halves H and W: a stride-2 3x3 conv after padding one zero row/column at the bottom/right."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Doubles H and W: nearest-neighbour repeat, then a 3x3 conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.conv = Conv2d(channels, channels, 3, padding=((1, 1), (1, 1)), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return self.conv(_batch_reshape(x, (b, 2 * h, 2 * w, c)))


class Attention(nnx.Module):
    """Single-head self-attention over the H*W positions, with GroupNorm in front and a residual.

    Plain softmax attention: the (H*W)^2 logits are materialised in float32. At 1024 px the mid block
    runs at 128x128 = 16384 positions, i.e. 1 GiB of logits per image (more during the softmax); batch
    the decode accordingly, or swap in a flash kernel (``jax.nn.dot_product_attention``) on GPU.
    """

    def __init__(self, channels: int, cfg: CoderConfig, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.group_norm = GroupNorm(cfg.norm_num_groups, channels, dtype=dtype)
        self.to_q = Dense(channels, channels, rngs=rngs, dtype=dtype)
        self.to_k = Dense(channels, channels, rngs=rngs, dtype=dtype)
        self.to_v = Dense(channels, channels, rngs=rngs, dtype=dtype)
        self.to_out = Dense(channels, channels, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = _batch_reshape(self.group_norm(x), (b, h * w, c))
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out(jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + _batch_reshape(out, (b, h, w, c)).astype(x.dtype)


class MidBlock(nnx.Module):
    """resnet -> (attention) -> resnet at constant channels."""

    def __init__(self, channels: int, cfg: CoderConfig, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.resnets = nnx.List(
            [ResnetBlock(channels, channels, cfg, rngs=rngs, dtype=dtype) for _ in range(2)]
        )
        self.attentions = nnx.List(
            [Attention(channels, cfg, rngs=rngs, dtype=dtype)] if cfg.mid_block_add_attention else []
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Block(nnx.Module):
    """``layers`` resnets (cin -> cout, then cout -> cout), then an optional down- or upsampler."""

    def __init__(
        self,
        cin: int,
        cout: int,
        layers: int,
        resample: str | None,
        cfg: CoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any,
    ) -> None:
        self.resnets = nnx.List(
            [ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs=rngs, dtype=dtype) for i in range(layers)]
        )
        self.downsample = Downsample(cout, rngs=rngs, dtype=dtype) if resample == "down" else None
        self.upsample = Upsample(cout, rngs=rngs, dtype=dtype) if resample == "up" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nnx.Module):
    """(B, H, W, 3) in [-1, 1] -> (B, H/2^(n-1), W/2^(n-1), 2 * latent_channels) posterior moments."""

    def __init__(self, cfg: CoderConfig, *, rngs: nnx.Rngs, dtype: Any) -> None:
        ch = cfg.block_out_channels
        pad = ((1, 1), (1, 1))
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=pad, rngs=rngs, dtype=dtype)
        n, last = cfg.layers_per_block, len(ch) - 1
        self.down_blocks = nnx.List(
            [
                Block(ch[max(i - 1, 0)], c, n, "down" if i < last else None, cfg, rngs=rngs, dtype=dtype)
                for i, c in enumerate(ch)
            ]
        )
        self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs, dtype=dtype)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], dtype=dtype)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=pad, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # SiLU whatever act_fn is, as diffusers


class Decoder(nnx.Module):
    """(B, h, w, latent_channels) -> (B, h 2^(n-1), w 2^(n-1), 3) in about [-1, 1]."""

    def __init__(self, cfg: CoderConfig, *, rngs: nnx.Rngs, dtype: Any) -> None:
        ch = tuple(reversed(cfg.decoder_channels))
        pad = ((1, 1), (1, 1))
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=pad, rngs=rngs, dtype=dtype)
        self.mid_block = MidBlock(ch[0], cfg, rngs=rngs, dtype=dtype)
        n, last = cfg.layers_per_block + 1, len(ch) - 1
        self.up_blocks = nnx.List(
            [
                Block(ch[max(i - 1, 0)], c, n, "up" if i < last else None, cfg, rngs=rngs, dtype=dtype)
                for i, c in enumerate(ch)
            ]
        )
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], dtype=dtype)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=pad, rngs=rngs, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # SiLU whatever act_fn is, as diffusers


# ---------------------------------------------------------------------------------------------------------
# Latents <-> tokens. z is (B, 2h, 2w, C) float32 latents; tokens are (B, h w, 4C), row-major over (h, w).


def patchify(z: jax.Array, order: TokenOrder) -> jax.Array:
    """(B, 2h, 2w, C) -> (B, h w, 4C): each token a 2x2 patch, channels in ``order`` (last fastest)."""
    b, hh, ww, c = z.shape
    h, w = hh // 2, ww // 2
    x = _batch_reshape(z, (b, h, 2, w, 2, c))  # (b, h, p1, w, p2, c)
    x = x.transpose(0, 1, 3, 5, 2, 4) if order == "c p1 p2" else x.transpose(0, 1, 3, 2, 4, 5)
    return _batch_reshape(x, (b, h * w, 4 * c))


def unpatchify(tokens: jax.Array, grid_hw: tuple[int, int], order: TokenOrder) -> jax.Array:
    """The inverse of :func:`patchify`: (B, h w, 4C) on grid (h, w) -> (B, 2h, 2w, C)."""
    (b, _, c4), (h, w) = tokens.shape, grid_hw
    c = c4 // 4
    if order == "c p1 p2":
        x = _batch_reshape(tokens, (b, h, w, c, 2, 2)).transpose(0, 1, 4, 2, 5, 3)
    else:
        x = _batch_reshape(tokens, (b, h, w, 2, 2, c)).transpose(0, 1, 3, 2, 4, 5)
    return _batch_reshape(x, (b, 2 * h, 2 * w, c))


class KLAutoencoder(nnx.Module):
    """Images <-> latent tokens through a diffusers KL autoencoder (the ``PixelAutoencoder`` interface).

    Subclasses set ``token_order`` and the token normalisation (``_normalise`` / ``_denormalise``);
    encode/decode, the grid and the input checks are shared.
    """

    token_order: ClassVar[TokenOrder] = "c p1 p2"

    def __init__(self, config: CoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        c = config.latent_channels
        self.config = config
        self.encoder = Encoder(config, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(config, rngs=rngs, dtype=dtype)
        one = ((0, 0), (0, 0))
        self.quant_conv = (
            Conv2d(2 * c, 2 * c, 1, padding=one, rngs=rngs, dtype=dtype) if config.use_quant_conv else None
        )
        self.post_quant_conv = (
            Conv2d(c, c, 1, padding=one, rngs=rngs, dtype=dtype) if config.use_post_quant_conv else None
        )

    @property
    def latent_channels(self) -> int:
        """Channels of a token: the 2x2 patch of latent pixels, 4 * config.latent_channels."""
        return 4 * self.config.latent_channels

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (H / scale, W / scale) of an image; both sides must be multiples of the scale."""
        s = self.config.scale
        if height % s or width % s or height < 1 or width < 1:
            raise ValueError(
                f"image of {height}x{width} pixels: both sides must be positive multiples of {s} "
                f"(the VAE downsamples {s // 2}x, then latents are patchified 2x2)"
            )
        return height // s, width // s

    def _normalise(self, tokens: jax.Array) -> jax.Array:
        """Raw patchified latents (B, L, 4C) float32 -> the tokens the transformer sees."""
        raise NotImplementedError

    def _denormalise(self, tokens: jax.Array) -> jax.Array:
        """The inverse of ``_normalise``."""
        raise NotImplementedError

    def encode(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) uint8 (or float in [0, 1]) -> (B, L, 4C) float32 tokens, row-major over the grid."""
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise ValueError(f"images must be (B, H, W, {self.config.in_channels}), got {images.shape}")
        self.grid(images.shape[1], images.shape[2])
        unit = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
        moments = self.encoder(unit * 2.0 - 1.0)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mode = moments[..., : self.config.latent_channels].astype(jnp.float32)  # the rest is the log-var
        return self._normalise(patchify(mode, self.token_order))

    def decode(self, tokens: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
        """(B, L, 4C) tokens on grid (h, w) -> (B, s h, s w, 3) float32 images, s = config.scale.

        The images are (x + 1) / 2, not clipped: the caller clips (overshoot is for the reward)."""
        h, w = (int(n) for n in grid_hw)
        c = self.config.latent_channels
        if tokens.ndim != 3 or tokens.shape[1:] != (h * w, 4 * c):
            raise ValueError(f"tokens must be (B, {h * w}, {4 * c}) for grid {(h, w)}, got {tokens.shape}")
        z = unpatchify(self._denormalise(tokens.astype(jnp.float32)), (h, w), self.token_order)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        image = self.decoder(z).astype(jnp.float32)
        return (image + 1.0) / 2.0


class BatchStats(nnx.Module):
    """BatchNorm2d's running statistics (frozen buffers), diffusers' ``bn.running_mean/var``."""

    def __init__(self, channels: int) -> None:
        self.running_mean = RunningStat(jnp.zeros((channels,), jnp.float32))
        self.running_var = RunningStat(jnp.ones((channels,), jnp.float32))


class Flux2VAE(KLAutoencoder):
    """Images <-> FLUX.2 latent tokens: ``Flux2KleinPipeline``'s image latents (posterior mode, 2x2
    patchified with channel c * 4 + dy * 2 + dx, normalised by the BatchNorm running statistics)."""

    token_order: ClassVar[TokenOrder] = "c p1 p2"

    def __init__(self, config: Flux2VAEConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        super().__init__(config, rngs=rngs, dtype=dtype)
        # The token normalisation statistics (BatchNorm2d(4C, affine=False)), always float32.
        self.bn = BatchStats(4 * config.latent_channels)

    def _stats(self) -> tuple[jax.Array, jax.Array]:
        mean = self.bn.running_mean[...].astype(jnp.float32)
        std = jnp.sqrt(self.bn.running_var[...].astype(jnp.float32) + self.config.batch_norm_eps)
        return mean, std

    def _normalise(self, tokens: jax.Array) -> jax.Array:
        mean, std = self._stats()
        return (tokens - mean) / std

    def _denormalise(self, tokens: jax.Array) -> jax.Array:
        mean, std = self._stats()
        return tokens * std + mean


# ---------------------------------------------------------------------------------------------------------
# Loading.

_M = TypeVar("_M", bound=KLAutoencoder)


def build_from_folder(
    model_cls: type[_M], config: CoderConfig, folder: Path, *, dtype: Any, mesh: Mesh | None
) -> _M:
    """``model_cls(config)`` with its variables read from ``folder``'s safetensors (no random init)."""
    abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, vae_weights.load_state(folder, state, mesh))


def load_vae(path: str | os.PathLike, *, dtype: Any = jnp.float32, mesh: Mesh | None = None) -> Flux2VAE:
    """Loads a diffusers ``AutoencoderKLFlux2`` folder, or a pipeline folder holding ``vae/``.

    Parameters take ``dtype`` (the BatchNorm statistics stay float32). With ``mesh`` they are placed
    replicated on it; without, they are uncommitted arrays on the default device, which jax moves to
    whatever mesh a computation runs on.
    """
    folder = vae_weights.resolve_vae_folder(path)
    cfg = config_from_dict(vae_weights.read_config_dict(folder), source=str(folder / vae_weights.CONFIG_NAME))
    return build_from_folder(Flux2VAE, cfg, folder, dtype=dtype, mesh=mesh)


def load_autoencoder(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, mesh: Mesh | None = None
) -> KLAutoencoder:
    """Loads a diffusers VAE folder (or a pipeline folder holding ``vae/``) by its config's ``_class_name``:
    ``AutoencoderKLFlux2`` -> ``Flux2VAE`` (:func:`load_vae`), ``AutoencoderKL`` -> ``vae_flux1.Flux1VAE``."""
    from sfgrpo.models import vae_flux1  # noqa: PLC0415 -- vae_flux1 imports this module

    loaders = {
        Flux2VAEConfig.DIFFUSERS_CLASS: load_vae,
        vae_flux1.Flux1VAEConfig.DIFFUSERS_CLASS: vae_flux1.load_flux1_vae,
    }
    folder = vae_weights.resolve_vae_folder(path)
    cls = vae_weights.read_config_dict(folder).get("_class_name")
    if cls not in loaders:
        source = folder / vae_weights.CONFIG_NAME
        raise ValueError(f"{source}: unsupported VAE class {cls!r}; expected one of {sorted(loaders)}")
    return loaders[cls](folder, dtype=dtype, mesh=mesh)
