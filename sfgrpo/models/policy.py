"""The editing policies: a transformer, a text encoder, and how an edit is conditioned (SPEC section 9).

- ``EditPolicy`` (FLUX.2): the source image's tokens follow the target tokens in the transformer's sequence,
  with reference position ids (T = 10), so the model sees the source; its output is sliced back to the
  target tokens. A ``Flux2KleinKVPipeline`` model (``config.reference_kv``) instead attends to the source's
  keys and values, computed once per conditioning by ``prepare`` and reused at every step.
- ``OmniGen2EditPolicy``: the source's tokens are OmniGen2's reference image; its text is masked (right
  padding) and its transformer runs in OmniGen2's time (t = 1 - sigma) and predicts data - noise, so the
  velocity here is the negated prediction.

Both give ``velocity(x (B, L, C), sigma (B,), cond) -> (B, L, C) float32`` in SPEC's convention (x = (1 -
sigma) data + sigma noise, v = noise - data), which is all the sampler, the log-probabilities and the loss
see.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sfgrpo.models.flux2 import Flux2Transformer, ReferenceKV
from sfgrpo.models.omnigen2 import OmniGen2Transformer


class Conditioning(NamedTuple):
    """Everything but the noisy target that the transformer sees.

    text:       (B, T, D) text features.
    reference:  (B, Lr, C) the source image's tokens.
    img_ids:    (L + Lr, 4) int32 position ids of target then reference tokens.
    txt_ids:    (T, 4) int32 position ids of the text tokens.
    text_uncond: (B, T, D) text features of the empty instruction, for true CFG; None without CFG.
    text_mask: (B, T) int32, 1 for the valid (leading) text tokens; the models that mask their text
      (OmniGen2) need it, FLUX.2 attends to its padding as its pipeline does and takes None.
    text_mask_uncond: (B, T) the empty instruction's mask, with ``text_uncond``.
    reference_kv: the source's per-block keys and values for a model that caches them
      (``EditPolicy.prepare``); None until prepared, and for the other models.
    reference may be None for a policy that can run without the source (OmniGen2's image guidance).
    """

    text: jax.Array
    reference: jax.Array | None
    img_ids: jax.Array
    txt_ids: jax.Array
    text_uncond: jax.Array | None = None
    text_mask: jax.Array | None = None
    text_mask_uncond: jax.Array | None = None
    reference_kv: ReferenceKV | None = None

    def unconditional(self) -> Conditioning:
        """The same conditioning with the empty instruction's text (for classifier-free guidance)."""
        if self.text_uncond is None:
            raise ValueError("guidance needs the unconditional text features (Conditioning.text_uncond)")
        return self._replace(text=self.text_uncond, text_mask=self.text_mask_uncond)


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

    def prepare(self, cond: Conditioning) -> Conditioning:
        """``cond`` with the source's per-block keys and values (``Conditioning.reference_kv``) for a
        ``Flux2KleinKVPipeline`` model, whose references do not depend on the step: computed here once,
        they serve every step of a rollout or an update (and their gradient flows back from each step).
        Unchanged for the other models, or when already prepared."""
        if not self.transformer.config.reference_kv or cond.reference_kv is not None:
            return cond
        ref_ids = cond.img_ids[..., -cond.reference.shape[1] :, :]
        kv = self.transformer.reference_kv(cond.reference.astype(self.transformer.dtype), ref_ids)
        return cond._replace(reference_kv=kv)

    def velocity(
        self, x: jax.Array, sigma: jax.Array, cond: Conditioning, guidance: jax.Array | None = None
    ) -> jax.Array:
        """(B, L, C) float32 velocity for target tokens x at flow time sigma (B,). An unprepared ``cond``
        of a K/V-caching model is prepared here, for this call only (``prepare`` it once to reuse it)."""
        length = x.shape[1]
        dtype = self.transformer.dtype
        text = cond.text.astype(dtype)
        if self.transformer.config.reference_kv:
            cond = self.prepare(cond)
            target_ids = cond.img_ids[..., :length, :]
            out = self.transformer(
                x.astype(dtype), text, sigma, target_ids, cond.txt_ids, guidance, cond.reference_kv
            )
            return out.astype(jnp.float32)
        hidden = jnp.concatenate([x, cond.reference.astype(x.dtype)], axis=1).astype(dtype)
        out = self.transformer(hidden, text, sigma, cond.img_ids, cond.txt_ids, guidance)
        return out[:, :length].astype(jnp.float32)


class OmniGen2EditPolicy(nnx.Module):
    """An OmniGen2 transformer with its text encoder (Qwen2.5-VL's language model) and VAE (FLUX.1's).

    ``grid_hw`` is the (h, w) token grid of the images it edits; the source has the same grid (OmniGen2's
    pipeline aligns the output to a single input image). Both are static, part of the module's graph, so
    a run (one resolution) compiles once; ``with_grid`` gives the policy for another size.
    """

    def __init__(
        self,
        transformer: OmniGen2Transformer,
        text_encoder: nnx.Module | None = None,
        autoencoder: nnx.Module | None = None,
        *,
        grid_hw: tuple[int, int],
    ) -> None:
        self.transformer = transformer
        self.text_encoder = nnx.data(text_encoder)
        self.autoencoder = nnx.data(autoencoder)
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))

    def with_grid(self, grid_hw: tuple[int, int]) -> OmniGen2EditPolicy:
        """The same modules for images on another token grid."""
        return OmniGen2EditPolicy(self.transformer, self.text_encoder, self.autoencoder, grid_hw=grid_hw)

    def prepare(self, cond: Conditioning) -> Conditioning:
        """``cond`` unchanged: OmniGen2's references are tokens of its joint sequence (nothing to cache)."""
        return cond

    def encode_text(self, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """(B, T) int32 ids and (B, T) int32 mask -> (B, T, D) text features (the last hidden state)."""
        if self.text_encoder is None:
            raise ValueError("this policy has no text encoder: pass precomputed text features")
        return self.text_encoder(token_ids, attention_mask)

    def velocity(
        self, x: jax.Array, sigma: jax.Array, cond: Conditioning, guidance: jax.Array | None = None
    ) -> jax.Array:
        """(B, L, C) float32 velocity for target tokens x at flow time sigma (B,); ``guidance`` must be None
        (OmniGen2 has no guidance embedding: guidance is classifier-free, see ``rl.step.velocity_fn``)."""
        if guidance is not None:
            raise ValueError("OmniGen2 has no guidance embedding; use text/image guidance scales")
        if cond.text_mask is None:
            raise ValueError("OmniGen2 needs the text mask (Conditioning.text_mask)")
        dtype = self.transformer.dtype
        refs, ref_grids = None, ()
        if cond.reference is not None:
            refs, ref_grids = cond.reference.astype(dtype), (self.grid_hw,)
        t = 1.0 - jnp.asarray(sigma, jnp.float32)
        pred = self.transformer(
            x.astype(dtype), self.grid_hw, t, cond.text.astype(dtype), cond.text_mask, refs, ref_grids
        )
        return -pred.astype(jnp.float32)
