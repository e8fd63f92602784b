"""Comparing sfgrpo's edits with diffusers' Flux2KleinPipeline on a tiny folder: shared by the edit and
export tests. See tests/test_edit.py for the tolerances' measurement."""

import numpy as np
import PIL.Image
import torch
from diffusers import Flux2KleinPipeline
from diffusers.utils import logging as diffusers_logging

from sfgrpo import edit

MAX_TOL, MEAN_TOL = 5e-4, 2e-5
SENSITIVE = 1e-3  # mean change from a different prompt or image: far above MEAN_TOL
PROMPT = "Make the red cube blue; keep everything else unchanged."
STEPS = 4
H, W = 64, 80  # the source: 4 x 5 tokens


def pipeline(folder):
    diffusers_logging.set_verbosity_error()
    pipe = Flux2KleinPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def source(seed=0, h=H, w=W):
    """A smooth colour field with noise: an image with structure, as uint8 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    field = np.stack([np.sin(4 * xx + seed), np.cos(3 * yy), np.sin(5 * (xx + yy))], -1) * 0.4 + 0.5
    return np.clip(field * 255 + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def noise(grid, seed=1, channels=16):
    return np.random.default_rng(seed).standard_normal((1, grid[0] * grid[1], channels)).astype(np.float32)


def theirs(pipe, image, prompt, noise, grid, max_length, **kwargs):
    """The pipeline's image (h, w, 3) in [0, 1] from our token-layout noise (1, L, C)."""
    latents = torch.tensor(noise.reshape(1, *grid, -1).transpose(0, 3, 1, 2).copy())  # (1, C, h, w)
    out = pipe(
        image=PIL.Image.fromarray(image),
        prompt=prompt,
        num_inference_steps=STEPS,
        latents=latents,
        output_type="np",
        max_sequence_length=max_length,
        **kwargs,
    )
    return out.images[0]


def assert_parity(ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    diff = np.abs(ours - theirs)
    assert diff.max() < MAX_TOL and diff.mean() < MEAN_TOL, (diff.max(), diff.mean())
    # The uint8 images (the pipeline's PIL output) differ by at most one level where a value sits on a
    # rounding boundary.
    assert np.abs(edit.to_uint8(ours).astype(int) - edit.to_uint8(theirs).astype(int)).max() <= 1


def moved(a, b):
    return np.abs(a - b).mean()
