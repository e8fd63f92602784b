"""Edit an image with a FLUX.2-klein folder: ``python -m sfgrpo.edit --model DIR --image in.png --prompt "..."
--out out.png [--steps N --seed S --guidance G --height H --width W --dtype float32|bfloat16]``.

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
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from flax import nnx

from sfgrpo import checkpoint, runtime, trained
from sfgrpo.models import lora
from sfgrpo.models.flux2 import make_position_ids
from sfgrpo.models.klein import KleinParts, load_klein
from sfgrpo.models.policy import Conditioning, EditPolicy
from sfgrpo.rl.step import velocity_fn
from sfgrpo.sampling.rollout import rollout
from sfgrpo.sampling.schedule import flux2_sigmas

log = logging.getLogger(__name__)

# The pipeline's limits on a source image (Flux2ImageProcessor.check_image_input, the 1 MP resize).
MIN_SIDE = 64
MAX_ASPECT = 8.0
MAX_AREA = 1024 * 1024
# The pipeline's defaults when a call does not set them.
BASE_STEPS, DISTILLED_STEPS = 50, 4
BASE_GUIDANCE = 4.0


class EditInputError(ValueError):
    """An input the edit cannot use: the message names it and says what is wrong."""


def _multiple(vae: Any) -> int:
    """Pixels per token side (16 for klein): what image sides must be multiples of."""
    return int(vae.config.scale)


def prepare_image(image: np.ndarray | PIL.Image.Image, multiple: int = 16) -> np.ndarray:
    """The pipeline's preprocessing of a source image, up to the [-1, 1] scaling (the VAE does that).

    Args:
      image: a PIL image (any mode) or an (H, W, 3) uint8 array.
      multiple: sides are floored to a multiple of this (16 for klein) by a centre crop.

    Returns:
      (h, w, 3) uint8 RGB.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise EditInputError(f"image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        image = PIL.Image.fromarray(image)
    if not isinstance(image, PIL.Image.Image):
        raise EditInputError(f"image must be a PIL image or an (H, W, 3) uint8 array, got {type(image)}")
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
    max_text_length: int = 512,
) -> KleinParts:
    """The FLUX.2-klein parts to edit with: the folder ``model`` as it is; or a training run's model
    (``workdir`` at checkpoint ``step``, default the newest, on its base folder: ``model`` when given, else
    the run's ``config.model.folder``); and with ``lora_file``, a diffusers-format LoRA folded in.

    Raises ``EditInputError`` for a combination that names nothing to load, and the loaders' errors
    (``trained.TrainedRunError``, ``lora.LoRAFileError``, ``klein.KleinFolderError``, ``FileNotFoundError``,
    ``checkpoint.CheckpointError``).
    """
    if model is None and workdir is None:
        raise EditInputError("give the model: --model DIR (a FLUX.2-klein folder) or --workdir W (a run)")
    if step is not None and workdir is None:
        raise EditInputError(f"--step {step} needs --workdir (the run whose checkpoint it is)")
    jdtype = jnp.dtype(dtype)
    if workdir is None:
        parts = load_klein(model, dtype=jdtype, max_text_length=max_text_length)
    else:
        config = trained.read_config(workdir)
        if config.model.name != "klein":
            raise EditInputError(
                f"--workdir {workdir!r} trained the demo's {config.model.name!r} model, which this command "
                "does not edit with (its held-out edits are the run's eval_grid_step<N>.png); export it with "
                "python -m sfgrpo.export"
            )
        run = trained.load_trained(workdir, step=step, base=model, dtype=dtype)
        merged = lora.merge_lora(run.policy.transformer)
        log.info("editing with %s at step %d (%d adapted layers merged)", workdir, run.step, merged)
        parts = load_klein(
            run.base.folder, dtype=jdtype, max_text_length=max_text_length, transformer=run.policy.transformer
        )
    if lora_file is not None:
        modules = lora.merge_lora_file(parts.transformer, lora_file)
        log.info("merged the LoRA %s into %d modules", lora_file, len(modules))
    return parts


def _run(module: nnx.Module, fn: Any, *args: Any) -> jax.Array:
    graphdef, state = nnx.split(module)
    return fn(graphdef, state, *args)


def edit_pixels(
    parts: KleinParts,
    image: np.ndarray | PIL.Image.Image,
    prompt: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    noise: np.ndarray | jax.Array | None = None,
) -> np.ndarray:
    """Edits ``image`` as instructed by ``prompt``; returns (H, W, 3) float32 in [0, 1] (the pipeline's
    ``output_type="np"``).

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
    """
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
    parts: KleinParts, image: np.ndarray | PIL.Image.Image, prompt: str, **options: Any
) -> np.ndarray:
    """``edit_pixels`` (the same arguments) as an (H, W, 3) uint8 image (the pipeline's PIL output)."""
    return to_uint8(edit_pixels(parts, image, prompt, **options))


# --- the command ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sfgrpo.edit", description="Edit an image with FLUX.2-klein.")
    p.add_argument("--model", default=None, help="a FLUX.2-klein pipeline folder (with --workdir: its base)")
    p.add_argument("--workdir", default=None, help="edit with this training run's trained model")
    p.add_argument("--step", type=int, default=None, help="with --workdir: the checkpoint (default: newest)")
    p.add_argument("--lora", default=None, help="a diffusers-format FLUX.2 LoRA file to fold in")
    p.add_argument("--image", required=True, help="the source image (any format PIL reads)")
    p.add_argument("--prompt", required=True, help="the edit instruction")
    p.add_argument("--out", required=True, help="where to write the edited image (PNG)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 4 distilled, 50 base)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (jax.random: not diffusers' torch seeds)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale of a base model (default 4.0)")
    p.add_argument("--height", type=int, default=None, help="output height, multiple of 16 (default: source)")
    p.add_argument("--width", type=int, default=None, help="output width, multiple of 16 (default: source)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    p.add_argument("--max_text_length", type=int, default=512, help="tokens per prompt (the pipeline's 512)")
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
    if args.max_text_length < 1:
        _fail(f"--max_text_length={args.max_text_length} must be >= 1")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 1.0):
        _fail(f"--guidance={args.guidance} must be a finite number >= 1 (1 = no guidance)")
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
    except (FileNotFoundError, ValueError) as err:  # klein.KleinFolderError is a ValueError
        _fail(f"--model {args.model!r}: {err}")
    try:
        pixels = edit_image(
            parts,
            image,
            args.prompt,
            steps=args.steps,
            seed=args.seed,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
        )
    except EditInputError as err:
        _fail(str(err))
    PIL.Image.fromarray(pixels).save(out)
    log.info("wrote %s (%dx%d)", out, pixels.shape[1], pixels.shape[0])


if __name__ == "__main__":
    main()
