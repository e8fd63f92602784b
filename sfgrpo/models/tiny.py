"""The demo's tiny parts (ARCHITECTURE.md, "the tiny path"): a pixel autoencoder and a word text encoder.

They sit behind the interfaces the real FLUX.2-klein parts implement:
  autoencoder.encode(images (B, H, W, 3) uint8) -> (B, L, C) float32 tokens on the (H/16, W/16) grid;
  autoencoder.decode(tokens (B, L, C), grid_hw) -> (B, H, W, 3) float32 images, nominally in [0, 1];
  text_encoder(token_ids (B, T) int32, attention_mask (B, T)) -> (B, T, D) float32 text tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TOKEN_PIXELS = 16  # one token covers a 16x16 pixel cell, as in FLUX.2 (SPEC section 2)


class PixelAutoencoder:
    """Pixels to tokens with no weights: token p is the 16x16 pixel cell at grid position p, in [-1, 1].

    ``pool`` averages pool x pool pixel blocks first, so a token has 3 (16 / pool)^2 channels: 768 at
    pool 1 (lossless patchify), 48 at pool 4. A small policy's residual stream cannot carry 768 channels
    per token, so the CPU demo pools; ``decode`` repeats each pooled value over its block.
    """

    def __init__(self, patch: int = TOKEN_PIXELS, pool: int = 1) -> None:
        if patch < 1 or pool < 1 or patch % pool:
            raise ValueError(f"patch ({patch}) and pool ({pool}) must be positive, with pool dividing patch")
        self.patch, self.pool = patch, pool

    @property
    def latent_channels(self) -> int:
        return 3 * (self.patch // self.pool) ** 2

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (h, w) of an image; the sides must be multiples of the patch."""
        if height % self.patch or width % self.patch:
            raise ValueError(
                f"image of {height}x{width} pixels: both sides must be multiples of {self.patch}"
            )
        return height // self.patch, width // self.patch

    def encode(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) uint8 (or float in [0, 1]) -> (B, L, C) float32 in [-1, 1], row-major tokens."""
        self.grid(images.shape[1], images.shape[2])
        unit = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
        b, height, width, c = unit.shape
        q = self.pool
        if q > 1:
            unit = _batch_reshape(unit, (b, height // q, q, width // q, q, c)).mean(axis=(2, 4))
        p = self.patch // q
        h, w = height // self.patch, width // self.patch
        x = _batch_reshape(unit * 2.0 - 1.0, (b, h, p, w, p, c))
        return _batch_reshape(x.transpose(0, 1, 3, 2, 4, 5), (b, h * w, p * p * c))

    def decode(self, tokens: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
        """(B, L, C) -> (B, H, W, 3) float32, (x + 1) / 2, not clipped (overshoot is for the reward)."""
        h, w = (int(n) for n in grid_hw)
        p, q = self.patch // self.pool, self.pool
        b = tokens.shape[0]
        x = _batch_reshape(tokens.astype(jnp.float32), (b, h, w, p, p, 3))
        image = _batch_reshape(x.transpose(0, 1, 3, 2, 4, 5), (b, h * p, w * p, 3))
        if q > 1:
            image = jnp.repeat(jnp.repeat(image, q, axis=1), q, axis=2)
        return (image + 1.0) / 2.0


class WordTextEncoder(nnx.Module):
    """A learned embedding per word plus a learned position embedding: (B, T) ids -> (B, T, D)."""

    def __init__(self, vocab_size: int, dim: int, max_len: int, *, rngs: nnx.Rngs) -> None:
        if min(vocab_size, dim, max_len) < 1:
            raise ValueError(f"vocab_size, dim and max_len must be >= 1, got {vocab_size}, {dim}, {max_len}")
        self.max_len = max_len
        self.words = nnx.Param(jax.random.normal(rngs.params(), (vocab_size, dim)))
        self.positions = nnx.Param(jax.random.normal(rngs.params(), (max_len, dim)) * 0.1)

    def __call__(self, token_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """(B, T) int32 -> (B, T, D); the mask is unused: padding (word 0) has its own embedding."""
        del attention_mask
        if token_ids.shape[-1] != self.max_len:
            raise ValueError(f"token_ids must have length {self.max_len}, got {token_ids.shape}")
        # A one-hot product rather than a gather: it keeps the batch sharding of the ids without collectives.
        one_hot = jax.nn.one_hot(token_ids, self.words.shape[0], dtype=jnp.float32)
        return one_hot @ self.words[...] + self.positions[...]


def _batch_reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Reshapes the non-batch axes, keeping the batch axis's sharding (explicit meshes ask for it)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x.reshape(shape)
    batch_spec = tuple(jax.typeof(x).sharding.spec)[:1] or (None,)
    return jnp.reshape(x, shape, out_sharding=jax.P(*batch_spec, *([None] * (len(shape) - 1))))


def images_to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """(..., 3) float images in [0, 1] to uint8 (host side, for grids and files)."""
    return np.asarray(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
