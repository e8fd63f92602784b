"""Edit an image with a FLUX.2-klein or an OmniGen2 folder: ``python -m sfgrpo.edit --model DIR --image in.png
--prompt "..." --out out.png [--steps N --seed S --dtype float32|bfloat16]``, plus for klein ``[--guidance G
--height H --width W]`` and for OmniGen2 ``[--text-guidance T --image-guidance I]``. The folder's
model_index.json says which model it is.

With trained weights: ``--workdir W [--step N]`` edits with a training run's model (its base is the run's
``config.model.folder``, or ``--model`` when given, checked against the fingerprint the run recorded; the
adapters are folded into the base weights), and ``--lora FILE`` folds in a diffusers-format FLUX.2 LoRA
(``sfgrpo.export``'s, or another trainer's) with the scale diffusers' ``load_lora_weights`` gives it.

It does what diffusers' ``Flux2KleinPipeline(image=..., prompt=...)`` does, with sfgrpo's models:
  1. the source image is checked (each side >= 64 px, aspect ratio <= 8), shrunk (Lanczos) to at most
     1024 x 1024 pixels of area, floored to a multiple of 16 per side by a centre crop, and converted to RGB;
  2. the prompt is tokenised with the chat template (512 tokens, longer prompts truncated with a warning)
     and encoded by Qwen3 (hidden states of layers 9, 18, 27); with classifier-free guidance (a base,
     non-distilled model and guidance > 1) the empty prompt is encoded too;
  3. the source is VAE-encoded into reference tokens, which follow the target tokens in the transformer's
     sequence with time-offset position ids;
  4. from Gaussian noise, ``steps`` Euler steps over the klein schedule (resolution-dependent shift) run as
     one jitted ``lax.scan`` (``sfgrpo.sampling.rollout`` with kind='ode'), compiled once;
  5. the final tokens are VAE-decoded and mapped to [0, 1], then to uint8 as the pipeline's PIL output.
The output has the source's (cropped) size unless --height/--width say otherwise (multiples of 16).

Seeds: the initial noise is ``jax.random.normal(jax.random.key(seed), (1, L, C))``, drawn directly in token
layout. It is not torch's generator, so the same seed gives a different image than diffusers; pass the
same noise (``edit_image(..., noise=...)``, and diffusers ``latents=`` in (1, C, h, w) layout) to compare.

With an OmniGen2 folder (``OmniGen2Pipeline(input_images=[image], prompt=...)``'s edit, ``edit_omnigen2``):
  1. the source is converted to RGB and resized (Lanczos, aspect ratio not kept exactly) as
     ``OmniGen2ImageProcessor.preprocess`` does: scaled down (never up) to at most 1024 x 1024 pixels of
     area and 1024 pixels on its longer side, each side then floored to a multiple of 16;
  2. the instruction is rendered with the chat template under OmniGen2's system message
     (``omnigen2_prompts``), right-padded to --max_text_length (default 256) tokens and encoded by
     Qwen2.5-VL (last hidden state); with text guidance > 1 the empty instruction is encoded too;
  3. the source is VAE-encoded (FLUX.1 VAE, posterior mean: the pipeline samples the posterior, see
     ``vae_flux1``) into the reference image's tokens;
  4. from Gaussian noise, ``steps`` (default 28) Euler steps over OmniGen2's schedule (``omnigen2_sigmas``,
     resolution-dependent time shift) as one jitted ``lax.scan``, with the pipeline's guidance: both
     scales > 1, its dual guidance (three forwards per step, ``rl.step.velocity_fn``); text guidance > 1
     only (the default: text 4, image 1), CFG against the empty instruction WITHOUT the source; text
     guidance 1, no guidance (the image scale is then ignored, as by the pipeline);
  5. the final tokens are VAE-decoded; the output has the prepared source's size (the pipeline aligns it
     to a single input image, so there is no --height/--width), [0, 1], then uint8 as the PIL output.
The klein-only options (--guidance, --height, --width) are refused for an OmniGen2 model, and
--text-guidance/--image-guidance for a klein one. --workdir and --lora work for both (a run's adapters
or a LoRA file for that model are folded into its transformer).

Bad input (a folder missing a component, an unreadable image, a size that is not a multiple of 16, an
image too small) ends with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from flax import nnx

from sfgrpo import checkpoint, runtime, trained
from sfgrpo.models import lora
from sfgrpo.models.flux2 import make_position_ids
from sfgrpo.models.klein import KleinParts, load_klein
from sfgrpo.models.omnigen2_folder import OmniGen2Parts, is_omnigen2_folder, load_omnigen2
from sfgrpo.models.omnigen2_prompts import DEFAULT_MAX_LENGTH
from sfgrpo.models.policy import Conditioning, EditPolicy, OmniGen2EditPolicy
from sfgrpo.rl.step import velocity_fn
from sfgrpo.sampling.rollout import rollout
from sfgrpo.sampling.schedule import flux2_sigmas, omnigen2_sigmas

log = logging.getLogger(__name__)

# The pipeline's limits on a source image (Flux2ImageProcessor.check_image_input, the 1 MP resize).
MIN_SIDE = 64
MAX_ASPECT = 8.0
MAX_AREA = 1024 * 1024
# The pipeline's defaults when a call does not set them.
BASE_STEPS, DISTILLED_STEPS = 50, 4
BASE_GUIDANCE = 4.0
KLEIN_TEXT_TOKENS = 512  # Flux2KleinPipeline's max_sequence_length
OMNIGEN2_TEXT_TOKENS = DEFAULT_MAX_LENGTH  # OmniGen2Pipeline's
# OmniGen2Pipeline's preprocessing limits and its __call__'s defaults.
OMNIGEN2_MAX_PIXELS = 1024 * 1024
OMNIGEN2_MAX_SIDE = 1024
OMNIGEN2_STEPS = 28
OMNIGEN2_TEXT_GUIDANCE = 4.0
OMNIGEN2_IMAGE_GUIDANCE = 1.0


class EditInputError(ValueError):
    """An input the edit cannot use: the message names it and says what is wrong."""


def _multiple(vae: Any) -> int:
    """Pixels per token side (16 for klein): what image sides must be multiples of."""
    return int(vae.config.scale)


def _as_pil(image: np.ndarray | PIL.Image.Image) -> PIL.Image.Image:
    """A source image as PIL, from a PIL image or an (H, W, 3) uint8 array; anything else is refused."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise EditInputError(f"image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return PIL.Image.fromarray(image)
    if not isinstance(image, PIL.Image.Image):
        raise EditInputError(f"image must be a PIL image or an (H, W, 3) uint8 array, got {type(image)}")
    return image


def prepare_image(image: np.ndarray | PIL.Image.Image, multiple: int = 16) -> np.ndarray:
    """The pipeline's preprocessing of a source image, up to the [-1, 1] scaling (the VAE does that).

    Args:
      image: a PIL image (any mode) or an (H, W, 3) uint8 array.
      multiple: sides are floored to a multiple of this (16 for klein) by a centre crop.

    Returns:
      (h, w, 3) uint8 RGB.
    """
    image = _as_pil(image)
    width, height = image.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise EditInputError(f"image of {width}x{height} pixels is too small: sides must be >= {MIN_SIDE}")
    if max(width / height, height / width) > MAX_ASPECT:
        raise EditInputError(f"image of {width}x{height} pixels: aspect ratio above {MAX_ASPECT:g}:1")
    if width * height > MAX_AREA:
        scale = math.sqrt(MAX_AREA / (width * height))
        image = image.resize((int(width * scale), int(height * scale)), PIL.Image.Resampling.LANCZOS)
        width, height = image.size
    w, h = width // multiple * multiple, height // multiple * multiple
    left, top = (width - w) // 2, (height - h) // 2
    image = image.crop((left, top, left + w, top + h)).convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, clipped and rounded as the pipeline's PIL output."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


# --- the compiled stages: each is jitted on its module's graph (static) and state -----------------------


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(ids, mask)


@functools.partial(jax.jit, static_argnums=0)
def _vae_encode(graphdef: Any, state: Any, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).encode(images)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _vae_decode(graphdef: Any, state: Any, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    return nnx.merge(graphdef, state).decode(tokens, grid)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _denoise(
    graphdef: Any, state: Any, cond: Conditioning, noise: jax.Array, sigmas: jax.Array, guidance: float
) -> jax.Array:
    """(1, L, C) noise -> (1, L, C) final tokens: the Euler steps over ``sigmas`` as one lax.scan."""
    policy = EditPolicy(nnx.merge(graphdef, state))
    traj = rollout(
        velocity_fn(policy, cond, guidance),
        noise,
        sigmas,
        jax.random.key(0),  # unused: ODE steps draw no noise that matters
        eta=0.0,
        kind="ode",
        window_start=jnp.zeros((), jnp.int32),
        window=1,
    )
    return traj.final


def load_parts(
    model: str | None = None,
    *,
    workdir: str | None = None,
    step: int | None = None,
    lora_file: str | None = None,
    dtype: str = "float32",
    max_text_length: int | None = None,
) -> KleinParts | OmniGen2Parts:
    """The parts to edit with: the folder ``model`` as it is (FLUX.2-klein or OmniGen2, by its
    model_index.json); or a training run's model (``workdir`` at checkpoint ``step``, default the newest, on
    its base folder: ``model`` when given, else the run's ``config.model.folder``); and with ``lora_file``,
    a diffusers-format LoRA for that model folded in. ``max_text_length``: tokens per prompt, default the
    model's pipeline's (klein 512, OmniGen2 256).

    Raises ``EditInputError`` for a combination that names nothing to load, and the loaders' errors
    (``trained.TrainedRunError``, ``lora.LoRAFileError``, ``klein.KleinFolderError``,
    ``omnigen2_folder.OmniGen2FolderError``, ``FileNotFoundError``, ``checkpoint.CheckpointError``).
    """
    if model is None and workdir is None:
        raise EditInputError(
            "give the model: --model DIR (a FLUX.2-klein or OmniGen2 folder) or --workdir W (a run)"
        )
    if step is not None and workdir is None:
        raise EditInputError(f"--step {step} needs --workdir (the run whose checkpoint it is)")
    jdtype = jnp.dtype(dtype)
    if workdir is None:
        if is_omnigen2_folder(model):
            length = OMNIGEN2_TEXT_TOKENS if max_text_length is None else max_text_length
            parts = load_omnigen2(model, dtype=jdtype, max_text_length=length)
        else:
            length = KLEIN_TEXT_TOKENS if max_text_length is None else max_text_length
            parts = load_klein(model, dtype=jdtype, max_text_length=length)
    else:
        config = trained.read_config(workdir)
        if config.model.name not in ("klein", "omnigen2"):
            raise EditInputError(
                f"--workdir {workdir!r} trained the demo's {config.model.name!r} model, which this command "
                "does not edit with (its held-out edits are the run's eval_grid_step<N>.png); export it with "
                "python -m sfgrpo.export"
            )
        run = trained.load_trained(workdir, step=step, base=model, dtype=dtype)
        merged = lora.merge_lora(run.policy.transformer)
        log.info("editing with %s at step %d (%d adapted layers merged)", workdir, run.step, merged)
        if config.model.name == "omnigen2":
            length = OMNIGEN2_TEXT_TOKENS if max_text_length is None else max_text_length
            parts = load_omnigen2(
                run.base.folder, dtype=jdtype, max_text_length=length, transformer=run.policy.transformer
            )
        else:
            length = KLEIN_TEXT_TOKENS if max_text_length is None else max_text_length
            parts = load_klein(
                run.base.folder, dtype=jdtype, max_text_length=length, transformer=run.policy.transformer
            )
    if lora_file is not None:
        modules = lora.merge_lora_file(parts.transformer, lora_file)
        log.info("merged the LoRA %s into %d modules", lora_file, len(modules))
    return parts


def _run(module: nnx.Module, fn: Any, *args: Any) -> jax.Array:
    graphdef, state = nnx.split(module)
    return fn(graphdef, state, *args)


def edit_pixels(
    parts: KleinParts | OmniGen2Parts,
    image: np.ndarray | PIL.Image.Image,
    prompt: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    noise: np.ndarray | jax.Array | None = None,
    text_guidance_scale: float | None = None,
    image_guidance_scale: float | None = None,
) -> np.ndarray:
    """Edits ``image`` as instructed by ``prompt``; returns (H, W, 3) float32 in [0, 1] (the pipeline's
    ``output_type="np"``).

    OmniGen2 parts are edited by ``edit_omnigen2`` (its arguments; ``guidance_scale``, ``height`` and
    ``width`` are klein's and refused); the rest of this docstring is klein's.

    Args:
      parts: the loaded folder (``sfgrpo.models.klein.load_klein``), with its text encoder.
      image: the source, a PIL image or (H, W, 3) uint8 array (see ``prepare_image``).
      prompt: the edit instruction.
      steps: sampler steps; default 4 for a distilled model, 50 for a base model (the model cards').
      seed: the noise seed (jax.random; see the module docstring).
      guidance_scale: true CFG scale for a base model (default 4.0, the pipeline's); CFG runs only when
        > 1 and the model is not distilled (a distilled model ignores it, with a warning, as the pipeline).
      height, width: output size in pixels, multiples of 16; default the prepared source's size.
      noise: (1, L, C) initial noise in token layout (L = (H/16)(W/16), C = 128 for klein), instead of
        drawing it from ``seed``.
      text_guidance_scale, image_guidance_scale: OmniGen2's; refused for klein.
    """
    if isinstance(parts, OmniGen2Parts):
        klein_only = dict(guidance_scale=guidance_scale, height=height, width=width)
        given = [k for k, v in klein_only.items() if v is not None]
        if given:
            raise EditInputError(
                f"{', '.join(given)}: FLUX.2-klein options; OmniGen2 takes text_guidance_scale and "
                "image_guidance_scale, and its output has the source's size (the pipeline aligns it)"
            )
        return edit_omnigen2(
            parts,
            image,
            prompt,
            steps=steps,
            seed=seed,
            text_guidance_scale=text_guidance_scale,
            image_guidance_scale=image_guidance_scale,
            noise=noise,
        ).pixels
    if text_guidance_scale is not None or image_guidance_scale is not None:
        raise EditInputError(
            "text_guidance_scale/image_guidance_scale are OmniGen2's; FLUX.2-klein takes guidance_scale"
        )
    if parts.text_encoder is None:
        raise EditInputError("these parts were loaded without a text encoder (text_encoder=False)")
    if not isinstance(prompt, str):
        raise EditInputError(f"prompt must be a string, got {type(prompt).__name__}")
    steps = (DISTILLED_STEPS if parts.is_distilled else BASE_STEPS) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EditInputError(f"steps must be a positive integer, got {steps!r}")
    guidance = BASE_GUIDANCE if guidance_scale is None else float(guidance_scale)
    if parts.is_distilled and guidance_scale is not None and guidance > 1.0:
        log.warning("guidance scale %g is ignored: the model is step-distilled (no CFG)", guidance)
    cfg_scale = guidance if guidance > 1.0 and not parts.is_distilled else 1.0

    multiple = _multiple(parts.vae)
    source = prepare_image(image, multiple)
    height = source.shape[0] if height is None else height
    width = source.shape[1] if width is None else width
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
            raise EditInputError(f"{name}={value!r} must be a positive multiple of {multiple}")
    grid = parts.vae.grid(height, width)
    ref_grid = parts.vae.grid(*source.shape[:2])
    shape = (1, grid[0] * grid[1], parts.transformer.config.in_channels)
    noise_given = noise is not None
    if noise is None:
        noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    elif tuple(noise.shape) != shape:
        raise EditInputError(f"noise must be {shape} for a {height}x{width} output, got {tuple(noise.shape)}")

    prompts = [prompt, ""] if cfg_scale != 1.0 else [prompt]
    ids, mask = parts.tokenizer(prompts)
    # One prompt per call, as the pipeline encodes them (the compiled program is shared by both).
    feats = [_run(parts.text_encoder, _encode_text, ids[i : i + 1], mask[i : i + 1]) for i in range(len(ids))]
    reference = _run(parts.vae, _vae_encode, jnp.asarray(source[None]))
    img_ids, txt_ids = make_position_ids(*grid, ids.shape[1], refs=[ref_grid])
    cond = Conditioning(
        text=feats[0],
        reference=reference,
        img_ids=jnp.asarray(img_ids),
        txt_ids=jnp.asarray(txt_ids),
        text_uncond=feats[1] if len(feats) > 1 else None,
    )
    log.info(
        "editing a %dx%d source into %dx%d: %d steps, %s, seed %s",
        source.shape[1],
        source.shape[0],
        width,
        height,
        steps,
        f"CFG {cfg_scale:g}" if cfg_scale != 1.0 else "no CFG",
        "(given noise)" if noise_given else seed,
    )
    sigmas = jnp.asarray(flux2_sigmas(steps, shape[1]))
    final = _run(parts.transformer, _denoise, cond, jnp.asarray(noise, jnp.float32), sigmas, cfg_scale)
    pixels = _run(parts.vae, _vae_decode, final, grid)
    return np.clip(np.asarray(pixels[0], np.float32), 0.0, 1.0)


def edit_image(
    parts: KleinParts | OmniGen2Parts, image: np.ndarray | PIL.Image.Image, prompt: str, **options: Any
) -> np.ndarray:
    """``edit_pixels`` (the same arguments) as an (H, W, 3) uint8 image (the pipeline's PIL output)."""
    return to_uint8(edit_pixels(parts, image, prompt, **options))


# --- OmniGen2 ----------------------------------------------------------------------------------------------


def prepare_image_omnigen2(
    image: np.ndarray | PIL.Image.Image,
    multiple: int = 16,
    max_pixels: int = OMNIGEN2_MAX_PIXELS,
    max_side_length: int = OMNIGEN2_MAX_SIDE,
) -> np.ndarray:
    """``OmniGen2ImageProcessor.preprocess`` (``do_resize``, Lanczos), up to the [-1, 1] scaling (the VAE
    does that): the source is scaled by ratio = min(sqrt(max_pixels / (H W)), max_side_length / max(H, W),
    1), each side becomes int(side * ratio) floored to a multiple of ``multiple``, and the image is resized
    to exactly that (a resize, not a crop: the aspect ratio may change by up to a ``multiple``'s worth).

    Args:
      image: a PIL image (any mode: converted to RGB first; the pipeline does not convert, and fails on
        non-RGB images) or an (H, W, 3) uint8 array.
      multiple: pixels per token side (16: the VAE's 8x times the 2x2 patch).

    Returns:
      (h, w, 3) uint8 RGB.
    """
    image = _as_pil(image)
    image = image.convert("RGB")
    width, height = image.size
    # get_new_height_width, operation for operation (Python floats, int() truncation).
    side_ratio = max_side_length / height if height > width else max_side_length / width
    ratio = min((max_pixels / (height * width)) ** 0.5, side_ratio, 1.0)
    new_h = int(height * ratio) // multiple * multiple
    new_w = int(width * ratio) // multiple * multiple
    if new_h < multiple or new_w < multiple:
        raise EditInputError(
            f"image of {width}x{height} pixels is too small or too elongated: resized to at most "
            f"{max_side_length} px per side it is {int(width * ratio)}x{int(height * ratio)}, and both sides "
            f"must be >= {multiple}"
        )
    image = image.resize((new_w, new_h), PIL.Image.Resampling.LANCZOS)  # the same size: a copy
    return np.asarray(image, dtype=np.uint8)


class OmniGen2Edit(NamedTuple):
    """An OmniGen2 edit and its stages (for inspection and stage-by-stage parity checks).

    pixels:    (H, W, 3) float32 in [0, 1], the pipeline's ``output_type="np"`` image.
    source:    (H, W, 3) uint8, the prepared source (``prepare_image_omnigen2``).
    text, text_mask: (1, T, D) float32 instruction features and (1, T) int32 mask (valid tokens first).
    text_uncond, text_mask_uncond: the same for the empty instruction; None without text guidance.
    reference: (1, L, 4C) float32 source tokens (posterior mean, (p1 p2 c) packed).
    final:     (1, L, 4C) float32 final tokens, before the VAE decoder.
    """

    pixels: np.ndarray
    source: np.ndarray
    text: np.ndarray
    text_mask: np.ndarray
    text_uncond: np.ndarray | None
    text_mask_uncond: np.ndarray | None
    reference: np.ndarray
    final: np.ndarray


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _denoise_omnigen2(
    graphdef: Any,
    state: Any,
    cond: Conditioning,
    noise: jax.Array,
    sigmas: jax.Array,
    grid: tuple[int, int],
    text_scale: float,
    image_scale: float,
) -> jax.Array:
    """(1, L, 4C) noise -> (1, L, 4C) final tokens: OmniGen2's Euler steps over ``sigmas``, one lax.scan."""
    policy = OmniGen2EditPolicy(nnx.merge(graphdef, state), grid_hw=grid)
    traj = rollout(
        velocity_fn(policy, cond, text_scale, image_scale),
        noise,
        sigmas,
        jax.random.key(0),  # unused: ODE steps draw no noise that matters
        eta=0.0,
        kind="ode",
        window_start=jnp.zeros((), jnp.int32),
        window=1,
    )
    return traj.final


def _scale(name: str, value: float | None, default: float) -> float:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 1:
        raise EditInputError(f"{name}={value!r} must be a finite number >= 1 (1 = no guidance)")
    return float(value)


def edit_omnigen2(
    parts: OmniGen2Parts,
    image: np.ndarray | PIL.Image.Image,
    prompt: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    text_guidance_scale: float | None = None,
    image_guidance_scale: float | None = None,
    noise: np.ndarray | jax.Array | None = None,
) -> OmniGen2Edit:
    """Edits ``image`` as instructed by ``prompt`` with an OmniGen2 model, as ``OmniGen2Pipeline(prompt=...,
    input_images=[image])`` with its defaults (see the module docstring); returns the edit and its stages.

    Args:
      parts: the loaded folder (``omnigen2_folder.load_omnigen2``), with its text encoder.
      image: the source, a PIL image or (H, W, 3) uint8 array (see ``prepare_image_omnigen2``).
      prompt: the edit instruction.
      steps: sampler steps (default 28, the pipeline's).
      seed: the noise seed (jax.random, not torch's generator).
      text_guidance_scale: the pipeline's text_guidance_scale (default 4.0); >= 1, 1 = no guidance.
      image_guidance_scale: the pipeline's image_guidance_scale (default 1.0); >= 1, used only with text
        guidance > 1.
      noise: (1, L, 4C) initial noise in token layout ((p1 p2 c) packed 2x2 patches of the pipeline's
        (1, C, H/8, W/8) ``latents``, row-major over the (H/16, W/16) grid), instead of drawing it.
    """
    if parts.text_encoder is None:
        raise EditInputError("these parts were loaded without a text encoder (text_encoder=False)")
    if not isinstance(prompt, str):
        raise EditInputError(f"prompt must be a string, got {type(prompt).__name__}")
    steps = OMNIGEN2_STEPS if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EditInputError(f"steps must be a positive integer, got {steps!r}")
    text_scale = _scale("text_guidance_scale", text_guidance_scale, OMNIGEN2_TEXT_GUIDANCE)
    image_scale = _scale("image_guidance_scale", image_guidance_scale, OMNIGEN2_IMAGE_GUIDANCE)
    if image_scale > 1.0 and text_scale == 1.0:
        log.warning("image guidance %g is ignored without text guidance > 1 (as the pipeline)", image_scale)

    multiple = _multiple(parts.vae)
    source = prepare_image_omnigen2(image, multiple)
    grid = parts.vae.grid(*source.shape[:2])
    cfg = parts.transformer.config
    text_len = parts.tokenizer.max_length
    # The rotary tables' extents (upstream would fail on the gather): text + reference rows/columns.
    if text_len + max(grid) > cfg.axes_lens[0] or grid[0] > cfg.axes_lens[1] or grid[1] > cfg.axes_lens[2]:
        raise EditInputError(
            f"a {source.shape[1]}x{source.shape[0]} source ({grid[0]}x{grid[1]} tokens) with {text_len} text "
            f"tokens exceeds the transformer's rotary tables (axes_lens {cfg.axes_lens})"
        )
    shape = (1, grid[0] * grid[1], cfg.token_channels)
    noise_given = noise is not None
    if noise is None:
        noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    elif tuple(noise.shape) != shape:
        raise EditInputError(
            f"noise must be {shape} for a {source.shape[1]}x{source.shape[0]} source, "
            f"got {tuple(noise.shape)}"
        )

    guided_text = text_scale > 1.0
    ids, mask = parts.tokenizer([prompt, ""] if guided_text else [prompt])
    # One prompt per call, as the pipeline encodes them (the compiled program is shared by both).
    feats = [_run(parts.text_encoder, _encode_text, ids[i : i + 1], mask[i : i + 1]) for i in range(len(ids))]
    reference = _run(parts.vae, _vae_encode, jnp.asarray(source[None]))
    placeholder = jnp.zeros((1, 4), jnp.int32)  # position ids: FLUX.2's, unused by OmniGen2
    cond = Conditioning(
        text=feats[0],
        reference=reference,
        img_ids=placeholder,
        txt_ids=placeholder,
        text_uncond=feats[1] if guided_text else None,
        text_mask=jnp.asarray(mask[:1]),
        text_mask_uncond=jnp.asarray(mask[1:]) if guided_text else None,
    )
    log.info(
        "editing a %dx%d source: %d steps, text guidance %g, image guidance %g, seed %s",
        source.shape[1],
        source.shape[0],
        steps,
        text_scale,
        image_scale,
        "(given noise)" if noise_given else seed,
    )
    # The scheduler's num_tokens is the latent's h * w: 4 latent pixels per 2x2 token.
    sigmas = jnp.asarray(omnigen2_sigmas(steps, 4 * grid[0] * grid[1]))
    final = _run(
        parts.transformer,
        _denoise_omnigen2,
        cond,
        jnp.asarray(noise, jnp.float32),
        sigmas,
        grid,
        text_scale,
        image_scale,
    )
    pixels = _run(parts.vae, _vae_decode, final, grid)
    return OmniGen2Edit(
        pixels=np.clip(np.asarray(pixels[0], np.float32), 0.0, 1.0),
        source=source,
        text=np.asarray(feats[0]),
        text_mask=mask[:1],
        text_uncond=np.asarray(feats[1]) if guided_text else None,
        text_mask_uncond=mask[1:] if guided_text else None,
        reference=np.asarray(reference),
        final=np.asarray(final),
    )


# --- the command ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sfgrpo.edit", description="Edit an image with FLUX.2-klein or OmniGen2."
    )
    p.add_argument(
        "--model", default=None, help="a FLUX.2-klein or OmniGen2 folder (with --workdir: the run's base)"
    )
    p.add_argument("--workdir", default=None, help="edit with this training run's trained model")
    p.add_argument("--step", type=int, default=None, help="with --workdir: the checkpoint (default: newest)")
    p.add_argument("--lora", default=None, help="a diffusers-format FLUX.2 LoRA file to fold in")
    p.add_argument("--image", required=True, help="the source image (any format PIL reads)")
    p.add_argument("--prompt", required=True, help="the edit instruction")
    p.add_argument("--out", required=True, help="where to write the edited image (PNG)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampler steps (default: klein 4 distilled, 50 base; OmniGen2 28)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (jax.random: not diffusers' torch seeds)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale of a base model (default 4.0)")
    p.add_argument("--height", type=int, default=None, help="output height, multiple of 16 (default: source)")
    p.add_argument("--width", type=int, default=None, help="output width, multiple of 16 (default: source)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    p.add_argument(
        "--text-guidance",
        dest="text_guidance",
        type=float,
        default=None,
        help=f"OmniGen2: text guidance scale (default {OMNIGEN2_TEXT_GUIDANCE:g}, the pipeline's)",
    )
    p.add_argument(
        "--image-guidance",
        dest="image_guidance",
        type=float,
        default=None,
        help=f"OmniGen2: image guidance scale (default {OMNIGEN2_IMAGE_GUIDANCE:g}, the pipeline's)",
    )
    p.add_argument(
        "--max_text_length",
        type=int,
        default=None,
        help=f"tokens per prompt (default: klein {KLEIN_TEXT_TOKENS}, OmniGen2 {OMNIGEN2_TEXT_TOKENS})",
    )
    return p


def _fail(message: str) -> NoReturn:
    print(f"sfgrpo.edit: {message}", file=sys.stderr)
    sys.exit(2)


MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 MP: far above any editing resolution, far below a memory blow-up


def _read_image(path: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as image:
            # The header's size, before decoding: a small file can declare a huge image.
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                _fail(
                    f"--image {path!r} is {width}x{height} = {width * height} pixels, over the "
                    f"{MAX_IMAGE_PIXELS} this command decodes; resize it first"
                )
            image.load()
            return image.copy()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:  # UnidentifiedImageError: OSError
        _fail(f"cannot read --image {path!r}: {err}")


def main(argv: list[str] | None = None) -> None:
    """The command line; bad input exits with status 2 and a one-line message."""
    args = _parser().parse_args(argv)
    runtime.log_to_stderr()
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 16 or value % 16):
            _fail(f"--{name}={value} must be a positive multiple of 16")
    if args.steps is not None and args.steps < 1:
        _fail(f"--steps={args.steps} must be >= 1")
    if args.max_text_length is not None and args.max_text_length < 1:
        _fail(f"--max_text_length={args.max_text_length} must be >= 1")
    for flag, value in (
        ("--guidance", args.guidance),
        ("--text-guidance", args.text_guidance),
        ("--image-guidance", args.image_guidance),
    ):
        if value is not None and not (math.isfinite(value) and value >= 1.0):
            _fail(f"{flag}={value} must be a finite number >= 1 (1 = no guidance)")

    def check_options(omnigen2: bool, what: str) -> None:
        if omnigen2:
            given = [f"--{k}" for k in ("guidance", "height", "width") if getattr(args, k) is not None]
            if given:
                _fail(
                    f"{', '.join(given)}: FLUX.2-klein options; {what} is OmniGen2 "
                    "(use --text-guidance/--image-guidance; its output has the source's size)"
                )
        elif args.text_guidance is not None or args.image_guidance is not None:
            _fail(
                f"--text-guidance/--image-guidance are OmniGen2 options; {what} is FLUX.2-klein (--guidance)"
            )

    if args.model is not None and args.workdir is None:
        check_options(is_omnigen2_folder(args.model), f"--model {args.model!r}")
    if args.seed < 0:
        _fail(f"--seed={args.seed} must be >= 0")
    out = Path(args.out)
    if out.is_dir():
        _fail(f"--out {str(out)!r} is a directory; give the image file to write")
    if not out.parent.is_dir():
        _fail(f"--out {str(out)!r}: directory {str(out.parent)!r} does not exist")
    if out.suffix.lower() not in PIL.Image.registered_extensions():
        _fail(f"--out {str(out)!r}: unknown image file extension {out.suffix!r} (use .png)")
    if args.step is not None and args.step < 0:
        _fail(f"--step={args.step} must be >= 0")
    if args.lora is not None and not Path(args.lora).is_file():
        _fail(f"--lora {args.lora!r} is not a file")
    image = _read_image(args.image)
    try:
        parts = load_parts(
            args.model,
            workdir=args.workdir,
            step=args.step,
            lora_file=args.lora,
            dtype=args.dtype,
            max_text_length=args.max_text_length,
        )
    except (EditInputError, trained.TrainedRunError, lora.LoRAFileError, checkpoint.CheckpointError) as err:
        _fail(str(err))
    except (FileNotFoundError, ValueError) as err:  # Klein/OmniGen2FolderError are ValueErrors
        _fail(f"--model {args.model!r}: {err}")
    omnigen2 = isinstance(parts, OmniGen2Parts)
    check_options(omnigen2, "the model" if args.workdir is None else f"the run {args.workdir!r}'s model")
    if omnigen2:
        options = dict(text_guidance_scale=args.text_guidance, image_guidance_scale=args.image_guidance)
    else:
        options = dict(guidance_scale=args.guidance, height=args.height, width=args.width)
    try:
        pixels = edit_image(parts, image, args.prompt, steps=args.steps, seed=args.seed, **options)
    except EditInputError as err:
        _fail(str(err))
    PIL.Image.fromarray(pixels).save(out)
    log.info("wrote %s (%dx%d)", out, pixels.shape[1], pixels.shape[0])


if __name__ == "__main__":
    main()
