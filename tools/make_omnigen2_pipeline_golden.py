"""Writes the OmniGen2 edit pipeline goldens from the upstream PyTorch pipeline (test oracles only).

    PYTHONPATH=../shared/reference/omnigen2 python tools/make_omnigen2_pipeline_golden.py \
        --reference ../shared/reference/omnigen2 --out tests/goldens/omnigen2_pipeline

The upstream ``omnigen2`` package has no installable release, so the tests cannot import it: this script
builds the tiny OmniGen2 folder of ``tests/tiny_omnigen2.py`` (seed 0), runs upstream's
``OmniGen2Pipeline`` on it once per case and commits what it computed. Written under ``--out``:

- ``source.png``: the source image, 100x70 pixels, which the pipeline's processor resizes to 96x64 (sides
  floored to multiples of 16, a Lanczos resize), so the resize rule is exercised;
- ``settings.json``: the processor's preprocessing of a few sources of other sizes (``pattern``; shape and
  sha256 of the uint8 pixels), the prompt, steps, each case's guidance scales, the rendered chat template
  and its token ids, the sha256 of the tiny folder's files (the test rebuilds the folder and checks it is
  the same one), and what was patched;
- ``io.npz``: the initial ``latents`` (1, C, H/8, W/8) and, per case ``<case>/...``: the prompt embeddings
  and masks (instruction and empty negative prompt, as ``encode_prompt`` returns them), the reference
  image's latents (C, H/8, W/8), the scheduler's timesteps, the final latents (before the VAE's
  scale/shift and decoder) and the output image (1, H, W, 3) of ``output_type="np"``.

Cases: ``dual`` (text guidance 3, image guidance 1.8: the three-forward dual guidance) and ``default``
(the pipeline call's defaults, text 4 and image 1: text-only CFG, whose unconditional branch also drops the
reference image).

One patch makes the pipeline deterministic: ``encode_vae`` draws ``latent_dist.sample()`` from the VAE
posterior; here ``DiagonalGaussianDistribution.sample`` returns the posterior mean (``mode()``), which is
what sfgrpo's ``Flux1VAE.encode`` computes. Nothing else is changed. The processor is a stand-in holding
the tokenizer (``processor.tokenizer`` is all the pipeline uses; transformers' ``Qwen2_5_VLProcessor``
needs torchvision for its video half).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

PROMPT = "Make the red cube sit on top of the box; keep everything else unchanged."
STEPS = 3
SOURCE_HW = (70, 100)  # (height, width): the processor resizes it to 64 x 96
LATENT_SEED = 1234
CASES = {
    "dual": dict(text_guidance_scale=3.0, image_guidance_scale=1.8),
    "default": dict(),  # the pipeline's text_guidance_scale=4.0, image_guidance_scale=1.0
}
TESTS = Path(__file__).resolve().parent.parent / "tests"
# Sources of other sizes for the preprocessing check (height, width): under every limit, over the 1 MP area,
# over the 1024 px side (landscape and portrait), and one that is floored hard.
PREPROCESS_SIZES = [(70, 100), (1100, 1000), (300, 1500), (1500, 300), (40, 1500)]


def pattern(height: int, width: int) -> np.ndarray:
    """A deterministic (height, width, 3) uint8 image with detail at every scale (no RNG)."""
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 7 + y * 13 + (x * y) // 97)[..., None] + np.array([0, 85, 170])
    return (base % 256).astype(np.uint8)


def source_image() -> np.ndarray:
    """A deterministic (70, 100, 3) uint8 image: smooth gradients and a block, with mild noise."""
    h, w = SOURCE_HW
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 7.0) * np.cos(y / 5.0)], axis=-1)
    img[20:45, 30:60] = (220, 40, 40)
    img += np.random.default_rng(7).normal(0, 8, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _load_tiny_builder():
    sys.path.insert(0, str(TESTS))  # tiny_omnigen2 imports tiny_tokenizer
    spec = importlib.util.spec_from_file_location("tiny_omnigen2", TESTS / "tiny_omnigen2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", required=True, help="the folder holding the upstream omnigen2 package")
    parser.add_argument("--out", required=True, help="where to write the goldens")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.reference).resolve()))
    import PIL.Image  # noqa: PLC0415
    import torch  # noqa: PLC0415 - test extra only
    from diffusers import AutoencoderKL  # noqa: PLC0415
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: PLC0415
    from omnigen2.models.transformers.transformer_omnigen2 import OmniGen2Transformer2DModel  # noqa: PLC0415
    from omnigen2.pipelines.omnigen2.pipeline_omnigen2 import OmniGen2Pipeline  # noqa: PLC0415
    from omnigen2.schedulers.scheduling_flow_match_euler_discrete import (  # noqa: PLC0415
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

    # The one patch: the posterior's mean instead of a sample (see the module docstring).
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = _load_tiny_builder()
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny.build_tiny_omnigen2(Path(tmp) / "omnigen2", seed=0)
        digest = tiny.folder_digest(folder)

        class Processor:  # a stand-in: the pipeline only uses processor.tokenizer
            def __init__(self, tokenizer: object) -> None:
                self.tokenizer = tokenizer

        pipe = OmniGen2Pipeline(
            transformer=OmniGen2Transformer2DModel.from_pretrained(folder / "transformer").eval(),
            vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
            mllm=Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "mllm").eval(),
            processor=Processor(AutoTokenizer.from_pretrained(folder / "processor")),
        )
        pipe.set_progress_bar_config(disable=True)

    source = source_image()
    PIL.Image.fromarray(source).save(out / "source.png")
    gen = torch.Generator().manual_seed(LATENT_SEED)
    latents = torch.randn(1, 4, 64 // 8, 96 // 8, generator=gen)
    rendered = pipe._apply_chat_template(PROMPT)
    rendered_negative = pipe._apply_chat_template("")
    arrays = {"latents": latents.numpy()}

    # Stage captures: encode_prompt's outputs, the reference latents, the scheduler's last step.
    captured: dict[str, object] = {}
    encode_prompt, prepare_image, step = pipe.encode_prompt, pipe.prepare_image, pipe.scheduler.step

    def encode_prompt_hook(*a, **k):
        captured["prompt"] = encode_prompt(*a, **k)
        return captured["prompt"]

    def prepare_image_hook(*a, **k):
        captured["refs"] = prepare_image(*a, **k)
        return captured["refs"]

    def step_hook(*a, **k):
        captured["last"] = step(*a, **k)
        captured["timesteps"] = pipe.scheduler._timesteps.clone()
        return captured["last"]

    pipe.encode_prompt, pipe.prepare_image, pipe.scheduler.step = (
        encode_prompt_hook,
        prepare_image_hook,
        step_hook,
    )
    settings_cases = {}
    for case, scales in CASES.items():
        captured.clear()
        with torch.no_grad():
            image = pipe(
                prompt=PROMPT,
                input_images=[PIL.Image.fromarray(source)],
                num_inference_steps=STEPS,
                latents=latents.clone(),
                output_type="np",
                **scales,
            ).images
        embeds, mask, neg_embeds, neg_mask = captured["prompt"]
        arrays[f"{case}/image"] = np.asarray(image, np.float32)
        arrays[f"{case}/prompt_embeds"] = embeds.float().numpy()
        arrays[f"{case}/prompt_mask"] = mask.numpy()
        if neg_embeds is not None:
            arrays[f"{case}/negative_embeds"] = neg_embeds.float().numpy()
            arrays[f"{case}/negative_mask"] = neg_mask.numpy()
        arrays[f"{case}/ref_latents"] = captured["refs"][0][0].float().numpy()
        arrays[f"{case}/timesteps"] = captured["timesteps"].numpy()
        arrays[f"{case}/final_latents"] = captured["last"][0].float().numpy()
        settings_cases[case] = {
            "text_guidance_scale": pipe.text_guidance_scale,
            "image_guidance_scale": pipe.image_guidance_scale,
            "passed": scales,
        }
        print(f"{case}: image {image.shape}, mean {image.mean():.4f}, std {image.std():.4f}")
    # The processor's preprocessing, as uint8 (its [-1, 1] values are exactly 2 k / 255 - 1).
    preprocessed = {}
    for h, w in PREPROCESS_SIZES:
        pixels = pipe.image_processor.preprocess(
            PIL.Image.fromarray(pattern(h, w)), max_pixels=1024 * 1024, max_side_length=1024
        )
        unit = ((pixels[0].permute(1, 2, 0).double().numpy() + 1.0) / 2.0 * 255.0).round().astype(np.uint8)
        preprocessed[f"{h}x{w}"] = {
            "shape": list(unit.shape),
            "sha256": hashlib.sha256(unit.tobytes()).hexdigest(),
        }
    tok = pipe.processor.tokenizer
    settings = {
        "preprocess": preprocessed,
        "prompt": PROMPT,
        "steps": STEPS,
        "source_hw": list(SOURCE_HW),
        "latent_seed": LATENT_SEED,
        "cases": settings_cases,
        "rendered": rendered,
        "rendered_negative": rendered_negative,
        "ids": tok(rendered).input_ids,
        "negative_ids": tok(rendered_negative).input_ids,
        "tiny_folder_seed": 0,
        "tiny_folder_sha256": digest,
        "patched": "DiagonalGaussianDistribution.sample -> mode() (the posterior mean), so encode_vae is "
        "deterministic; processor = a stand-in holding the tokenizer",
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    np.savez_compressed(out / "io.npz", **arrays)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
