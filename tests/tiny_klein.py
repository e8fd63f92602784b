"""A tiny, complete diffusers ``Flux2KleinPipeline`` folder built offline, for tests (no hub downloads).

:func:`build_tiny_klein` builds every component of a FLUX.2-klein pipeline at test size, with the real
architecture's wiring: the transformer's ``in_channels`` is 4 x the VAE's latent channels (the pipeline packs
2x2 latent patches), its ``joint_attention_dim`` is 3 x the Qwen3 hidden size (layers 9, 18, 27 are
stacked), the text encoder has 28 layers so that those default layers exist, and the scheduler is configured
as the real klein scheduler. Weights are perturbed away from their initialisation (and the VAE's batch-norm
statistics made non-trivial) so that a parity test against this folder tests something. Seeded: two builds
give identical files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from tiny_tokenizer import build_tokenizer
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

VAE_LATENT_CHANNELS = 4  # the real VAE has 32; tokens carry 4x as many channels (2x2 patches)
QWEN_HIDDEN = 32
QWEN_LAYERS = 28  # as Qwen3-4B, so that the pipeline's default layers (9, 18, 27) exist
TEXT_LAYERS = (9, 18, 27)

# The transformer at test size; the fields the real klein-4B config sets, with small values.
TRANSFORMER = dict(
    patch_size=1,
    in_channels=4 * VAE_LATENT_CHANNELS,
    out_channels=None,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=len(TEXT_LAYERS) * QWEN_HIDDEN,
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)

# Four resolution levels as the real VAE (8x spatial compression, 16x after 2x2 packing), few channels.
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=VAE_LATENT_CHANNELS,
    norm_num_groups=4,
    sample_size=64,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    batch_norm_eps=1e-4,
    batch_norm_momentum=0.1,
    patch_size=(2, 2),
)

# The klein scheduler: dynamic, exponential time shifting (the pipeline passes mu = compute_empirical_mu).
SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
    invert_sigmas=False,
    shift_terminal=None,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    stochastic_sampling=False,
)


def _qwen_config(vocab_size: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=QWEN_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=QWEN_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )


def _perturb(module: torch.nn.Module, scale: float) -> None:
    """Adds scale * N(0, 1) to every parameter: zero-initialised layers and unit norms become non-trivial."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def build_tiny_klein(directory: str | os.PathLike, *, distilled: bool = True, seed: int = 0) -> Path:
    """Writes a tiny ``Flux2KleinPipeline`` folder into ``directory`` (created if needed); returns it.

    ``distilled`` sets the pipeline's ``is_distilled`` (model_index.json): True is the step-distilled klein
    (no classifier-free guidance), False the base model (true CFG with the empty prompt when
    guidance_scale > 1). The weights do not depend on it; ``seed`` draws other weights of the same shapes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(directory / "tokenizer"), local_files_only=True)

    transformer = Flux2Transformer2DModel(**TRANSFORMER).eval()
    _perturb(transformer, 0.2)

    vae = AutoencoderKLFlux2(**VAE).eval()
    _perturb(vae, 0.02)
    with torch.no_grad():
        channels = vae.bn.running_mean.shape[0]
        vae.bn.running_mean.copy_(0.2 * torch.randn(channels))
        # A small variance amplifies the reference tokens, so the edit depends visibly on the source image.
        vae.bn.running_var.copy_(0.05 + 0.1 * torch.rand(channels))

    text_encoder = Qwen3ForCausalLM(_qwen_config(len(tokenizer))).eval()
    _perturb(text_encoder, 0.02)
    with torch.no_grad():  # larger text features (std ~0.8), so the edit depends visibly on the prompt
        text_encoder.model.embed_tokens.weight.mul_(30.0)

    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )
    pipeline.save_pretrained(directory)
    return directory
