"""The editing policy: a FLUX.2 transformer, a text encoder, and how an edit is conditioned (SPEC section 9).

The source image's tokens follow the target tokens in the transformer's sequence, with reference position
ids (T = 10), so the model sees the source; its output is sliced back to the target tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sfgrpo.models.flux2 import Flux2Transformer


class Conditioning(NamedTuple):
    """Everything but the noisy target that the transformer sees.

    text:       (B, T, D) text features.
    reference:  (B, Lr, C) the source image's tokens.
    img_ids:    (L + Lr, 4) int32 position ids of target then reference tokens.
    txt_ids:    (T, 4) int32 position ids of the text tokens.
    text_uncond: (B, T, D) text features of the empty instruction, for true CFG; None without CFG.
    """

    text: jax.Array
    reference: jax.Array
    img_ids: jax.Array
    txt_ids: jax.Array
    text_uncond: jax.Array | None = None


class EditPolicy(nnx.Module):
    """A FLUX.2 transformer with the text encoder it is conditioned on.

    ``text_encoder(token_ids (B, T) int32, attention_mask (B, T) int32) -> (B, T, D)`` features; it is None
    when text features come precomputed (a prompt-embedding cache). ``autoencoder`` is the FLUX.2 VAE, or
    None for the demo's weightless pixel autoencoder (which the run's ``Conditioner`` holds).
    """

    def __init__(
        self,
        transformer: Flux2Transformer,
        text_encoder: nnx.Module | None = None,
        autoencoder: nnx.Module | None = None,
    ) -> None:
        self.transformer = transformer
        self.text_encoder = nnx.data(text_encoder)
        # An autoencoder with weights (the FLUX.2 VAE) lives here so that its weights are program arguments.
        self.autoencoder = nnx.data(autoencoder)

    def encode_text(self, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """(B, T) int32 ids and (B, T) int32 mask -> (B, T, D) text features."""
        if self.text_encoder is None:
            raise ValueError("this policy has no text encoder: pass precomputed text features")
        return self.text_encoder(token_ids, attention_mask)

    def velocity(
        self, x: jax.Array, sigma: jax.Array, cond: Conditioning, guidance: jax.Array | None = None
    ) -> jax.Array:
        """(B, L, C) float32 velocity for target tokens x at flow time sigma (B,)."""
        length = x.shape[1]
        dtype = self.transformer.dtype
        hidden = jnp.concatenate([x, cond.reference.astype(x.dtype)], axis=1).astype(dtype)
        out = self.transformer(hidden, cond.text.astype(dtype), sigma, cond.img_ids, cond.txt_ids, guidance)
        return out[:, :length].astype(jnp.float32)
