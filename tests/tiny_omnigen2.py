"""A tiny, complete OmniGen2 model folder built offline, for tests and goldens (no hub downloads).

:func:`build_tiny_omnigen2` writes the layout of the released ``OmniGen2/OmniGen2`` folder at test size:

- ``model_index.json``: ``_class_name`` "OmniGen2Pipeline" and the five components;
- ``transformer/``: the weights of the transformer golden ``tests/goldens/omnigen2/gqa_no_reference``
  (upstream ``OmniGen2Transformer2DModel``: in_channels 4, text_feat_dim 24, hidden 48), with longer rotary
  tables (``axes_lens`` (320, 64, 64) instead of (64, 32, 32)) so that 256-token prompts fit. ``axes_lens``
  only sizes the position tables (each position's rotation does not depend on it), so the weights are the
  golden's unchanged;
- ``vae/``: a diffusers ``AutoencoderKL`` with 4 latent channels and 4 resolution levels (8x downsampling,
  16 px per 2x2 token), no quant convs and FLUX.1's scaling/shift factors, weights perturbed;
- ``mllm/``: a transformers ``Qwen2_5_VLForConditionalGeneration`` whose language model is 24 wide (the
  transformer's text_feat_dim), tiny vision tower, saved with ``save_pretrained``;
- ``processor/``: a Qwen2-style byte-level BPE tokenizer trained here (Qwen2.5-VL's special tokens, pad
  ``<|endoftext|>``, Qwen2.5-VL's chat template) and the Qwen2-VL image processor's config;
- ``scheduler/scheduler_config.json``: OmniGen2's own ``FlowMatchEulerDiscreteScheduler``
  (num_train_timesteps 1000, dynamic_time_shift true), written as its ``save_pretrained`` writes it.

Seeded: two builds with the same seed give identical weights and configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tiny_tokenizer import _PRETOKENIZE, _merges, sentences
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast

GOLDEN_TRANSFORMER = Path(__file__).parent / "goldens" / "omnigen2" / "gqa_no_reference" / "transformer"
AXES_LENS = [320, 64, 64]  # the golden's are [64, 32, 32]: room for 256 text tokens plus references

VAE_LATENT_CHANNELS = 4  # the golden transformer's in_channels (the real model: 16)
TEXT_HIDDEN = 24  # the golden transformer's text_feat_dim (the real model: 2048)
VOCAB_SIZE = 700

SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."

# Qwen2.5-VL's special tokens: <|endoftext|> is pad, <|im_start|>/<|im_end|> the chat markers (im_end is
# the instruct model's eos), and the vision markers the processor uses for images.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *VISION)

# Qwen2-VL / Qwen2.5-VL-Instruct's chat template (tokenizer_config.json), verbatim: a default system turn
# when the first message is not one, each turn "<|im_start|>{role}\n{content}<|im_end|>\n", images and
# videos as vision markers, and the assistant header with add_generation_prompt.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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
    scaling_factor=0.3611,  # FLUX.1's
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
    force_upcast=True,
)

SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.33.1",
    "dynamic_time_shift": True,
    "num_train_timesteps": 1000,
}

MODEL_INDEX = {
    "_class_name": "OmniGen2Pipeline",
    "_diffusers_version": "0.33.1",
    "mllm": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "processor": ["transformers", "Qwen2_5_VLProcessor"],
    "scheduler": ["scheduling_flow_match_euler_discrete", "FlowMatchEulerDiscreteScheduler"],
    "transformer": ["transformer_omnigen2", "OmniGen2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _perturb(module: torch.nn.Module, scale: float) -> None:
    """Adds scale * N(0, 1) to every parameter: zero-initialised layers and unit norms become non-trivial."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def build_processor(directory: str | os.PathLike) -> Path:
    """Writes the tiny Qwen2.5-VL tokenizer (and the image processor's config) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The system prompt is in the corpus so that it gets whole-word tokens, as in Qwen's vocabulary.
    tok.train_from_iterator([*sentences(), *[SYSTEM_PROMPT] * 20], trainer=trainer)
    tokenizer = Qwen2TokenizerFast(
        vocab=tok.get_vocab(),
        merges=[tuple(m) for m in _merges(tok)],
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END, *VISION],
        model_max_length=32768,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(directory)
    # The processor's image half (OmniGen2 never feeds images to the mllm; written for the layout).
    from transformers import Qwen2VLImageProcessorPil  # noqa: PLC0415 - no torchvision needed

    Qwen2VLImageProcessorPil().save_pretrained(directory)
    return directory


def _mllm_config(tokenizer_dir: Path) -> Qwen2_5_VLConfig:
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    vocab_size = max([*vocab["model"]["vocab"].values(), *ids.values()]) + 1
    text = dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 6: M-RoPE sections of 1 + 1 + 1 frequency pairs
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 1]},
        rope_theta=1_000_000.0,
        max_position_embeddings=1024,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        tie_word_embeddings=True,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=TEXT_HIDDEN,
        patch_size=2,
        spatial_merge_size=1,
        temporal_patch_size=1,
        fullatt_block_indexes=[0],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


# Keys that name the library version that wrote a config, not the model: a new transformers release
# rewrites them and nothing else.
VERSION_KEYS = ("transformers_version", "_diffusers_version")


def folder_digest(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file of a tiny folder, by relative path; a JSON file is hashed as its sorted dump
    without ``VERSION_KEYS``, so that the digest names the model, not the library that saved it."""
    folder = Path(folder)
    digest = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.suffix == ".json":
            parsed = json.loads(data)
            if isinstance(parsed, dict):
                parsed = {k: v for k, v in parsed.items() if k not in VERSION_KEYS}
            data = json.dumps(parsed, sort_keys=True).encode()
        digest[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return digest


def build_tiny_omnigen2(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Writes a tiny OmniGen2 model folder into ``directory`` (created if needed); returns it.

    ``seed`` draws the VAE's and the mllm's weights; the transformer is always the golden's (its weights
    are what the transformer goldens were computed with).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    transformer = directory / "transformer"
    transformer.mkdir(exist_ok=True)
    shutil.copyfile(
        GOLDEN_TRANSFORMER / "diffusion_pytorch_model.safetensors",
        transformer / "diffusion_pytorch_model.safetensors",
    )
    config = json.loads((GOLDEN_TRANSFORMER / "config.json").read_text())
    config["axes_lens"] = AXES_LENS
    (transformer / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    vae = AutoencoderKL(**VAE).eval()
    _perturb(vae, 0.02)
    vae.save_pretrained(directory / "vae")

    processor = build_processor(directory / "processor")
    mllm = Qwen2_5_VLForConditionalGeneration(_mllm_config(processor)).eval()
    _perturb(mllm, 0.1)
    mllm.save_pretrained(directory / "mllm")

    (directory / "scheduler").mkdir(exist_ok=True)
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    (directory / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return directory
