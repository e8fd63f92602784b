"""``sfgrpo.edit`` against diffusers' Flux2KleinPipeline on a tiny folder, and the command line.

Parity: with the same source image, prompt and initial noise, our edit and the pipeline's
``output_type="np"`` image agree to 5e-4 per pixel value in [0, 1] (max) and 2e-5 (mean). Both run in
float32; the differences are float32 rounding in different op orders (attention, convolutions, the 28-layer
text encoder), amplified by the VAE decoder: measured 5e-5 to 1.1e-4 (max) and 4e-6 to 7e-6 (mean) over
the cases below. A different prompt, source image or guidance moves the output by 3.6e-3 to 9e-2 (mean),
asserted > 1e-3 = 50x the mean tolerance, so a conditioning error cannot hide in the tolerance.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from klein_parity import PROMPT, SENSITIVE, STEPS
from klein_parity import assert_parity as _assert_parity
from klein_parity import moved as _moved
from klein_parity import noise as _noise
from klein_parity import pipeline as _pipeline
from klein_parity import source as _source
from klein_parity import theirs as _theirs
from tiny_klein import build_tiny_klein

from sfgrpo import edit, runtime
from sfgrpo.models.klein import load_klein

H, W = 64, 80  # the source: 4 x 5 tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein")
    return build_tiny_klein(root / "distilled"), build_tiny_klein(root / "base", distilled=False)


@pytest.fixture(scope="module")
def distilled(folders):
    """(our parts, the diffusers pipeline) of the distilled folder, at the pipeline's 512 text tokens."""
    return load_klein(folders[0]), _pipeline(folders[0])


@pytest.fixture(scope="module")
def base(folders):
    """(our parts, the diffusers pipeline) of the base folder, at 64 text tokens (faster; 512 is tested
    on the distilled folder)."""
    return load_klein(folders[1], max_text_length=64), _pipeline(folders[1])


def test_parity_distilled(distilled):
    parts, pipe = distilled
    image, noise = _source(), _noise((4, 5))
    ours = edit.edit_pixels(parts, image, PROMPT, steps=STEPS, noise=noise)
    _assert_parity(ours, _theirs(pipe, image, PROMPT, noise, (4, 5), 512))
    assert 0.05 < ours.std() and 0.0 <= ours.min() and ours.max() <= 1.0
    # The conditioning matters far beyond the tolerance: another prompt, another source image.
    other_prompt = edit.edit_pixels(parts, image, "A tall tree at night.", steps=STEPS, noise=noise)
    other_image = edit.edit_pixels(parts, 255 - image, PROMPT, steps=STEPS, noise=noise)
    assert _moved(other_prompt, ours) > SENSITIVE and _moved(other_image, ours) > SENSITIVE


def test_parity_with_the_kv_pipeline(distilled, tmp_path):
    """A ``Flux2KleinKVPipeline`` folder (FLUX.2-klein-*-kv: the same components, references attending only
    to themselves, their K/V cached after the first step) edits as that pipeline does; the cached
    references give another image than the joint ones of ``Flux2KleinPipeline`` on the same weights."""
    import torch  # noqa: PLC0415
    from diffusers import Flux2KleinKVPipeline  # noqa: PLC0415

    parts, pipe = distilled
    kv_pipe = Flux2KleinKVPipeline(
        scheduler=pipe.scheduler,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        transformer=pipe.transformer,
    )
    kv_pipe.save_pretrained(tmp_path / "kv")
    kv_pipe = Flux2KleinKVPipeline.from_pretrained(tmp_path / "kv", dtype=torch.float32)
    kv_pipe.set_progress_bar_config(disable=True)
    kv_parts = edit.load_parts(str(tmp_path / "kv"))
    assert kv_parts.transformer.config.reference_kv and kv_parts.is_distilled
    image, noise = _source(), _noise((4, 5))
    ours = edit.edit_pixels(kv_parts, image, PROMPT, steps=STEPS, noise=noise)
    _assert_parity(ours, _theirs(kv_pipe, image, PROMPT, noise, (4, 5), 512))
    joint = edit.edit_pixels(parts, image, PROMPT, steps=STEPS, noise=noise)
    assert _moved(joint, ours) > SENSITIVE
    other_image = edit.edit_pixels(kv_parts, 255 - image, PROMPT, steps=STEPS, noise=noise)
    assert _moved(other_image, ours) > SENSITIVE


def test_parity_other_output_size(distilled):
    # --height/--width: the target grid (5 x 4) differs from the reference grid (4 x 5).
    parts, pipe = distilled
    image, noise = _source(), _noise((5, 4))
    ours = edit.edit_pixels(parts, image, PROMPT, steps=STEPS, noise=noise, height=80, width=64)
    assert ours.shape == (80, 64, 3)
    _assert_parity(ours, _theirs(pipe, image, PROMPT, noise, (5, 4), 512, height=80, width=64))


def test_parity_cfg(base):
    parts, pipe = base
    image, noise = _source(), _noise((4, 5))
    ours = edit.edit_pixels(parts, image, PROMPT, steps=STEPS, noise=noise, guidance_scale=4.0)
    _assert_parity(ours, _theirs(pipe, image, PROMPT, noise, (4, 5), 64, guidance_scale=4.0))
    # Guidance changes the image: the pipeline without CFG is far from ours with it.
    assert _moved(_theirs(pipe, image, PROMPT, noise, (4, 5), 64, guidance_scale=1.0), ours) > SENSITIVE


def test_long_prompt_is_truncated_as_the_pipeline(base, caplog):
    parts, pipe = base
    image, noise = _source(), _noise((4, 5))
    prompt = " ".join(["make the old house stand behind the window"] * 12)  # > 64 tokens
    with caplog.at_level(logging.WARNING):
        ours = edit.edit_pixels(parts, image, prompt, steps=STEPS, noise=noise, guidance_scale=4.0)
    assert "max_length=64" in caplog.text
    _assert_parity(ours, _theirs(pipe, image, prompt, noise, (4, 5), 64, guidance_scale=4.0))


def test_seeds_and_uint8(distilled):
    parts, _ = distilled
    image = _source()
    a = edit.edit_image(parts, image, PROMPT, steps=STEPS, seed=3)
    compiled = edit._denoise._cache_size()
    b = edit.edit_image(parts, PIL.Image.fromarray(image), PROMPT, steps=STEPS, seed=3)
    c = edit.edit_image(parts, image, "Another prompt.", steps=STEPS, seed=4)
    assert edit._denoise._cache_size() == compiled  # the sampler loop is compiled once per shape
    assert a.shape == (H, W, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


def test_prepare_image_as_the_pipeline(distilled):
    _, pipe = distilled
    rng = np.random.default_rng(0)
    for h, w in ((70, 90), (1100, 1000), (64, 500)):
        image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = edit.prepare_image(image)
        # The pipeline's steps: the 1 MP resize, the floor to multiples of 16, a centre crop, [-1, 1].
        if w * h > 1024 * 1024:
            image = pipe.image_processor._resize_to_target_area(image, 1024 * 1024)
        hh, ww = image.height // 16 * 16, image.width // 16 * 16
        theirs = pipe.image_processor.preprocess(image, height=hh, width=ww, resize_mode="crop")
        assert ours.shape == (hh, ww, 3) and ours.dtype == np.uint8
        np.testing.assert_allclose(ours / 127.5 - 1.0, theirs[0].permute(1, 2, 0).numpy(), atol=1e-6)
    grey = edit.prepare_image(PIL.Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)))
    assert grey.shape == (64, 64, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=70), "height=70 must be a positive multiple of 16"),
        (dict(width=0), "width=0 must be a positive multiple of 16"),
        (dict(image=np.zeros((48, 80, 3), np.uint8)), "image of 80x48 pixels is too small"),
        (dict(image=np.zeros((64, 600, 3), np.uint8)), "aspect ratio above 8:1"),
        (dict(image=np.zeros((64, 80), np.uint8)), r"image array must be \(H, W, 3\) uint8"),
        (dict(noise=np.zeros((1, 21, 16), np.float32)), r"noise must be \(1, 20, 16\)"),
        (dict(steps=0), "steps must be a positive integer"),
    ],
)
def test_bad_input(distilled, kwargs, message):
    parts, _ = distilled
    kwargs = {"image": _source(), **kwargs}
    with pytest.raises(edit.EditInputError, match=message):
        edit.edit_pixels(parts, kwargs.pop("image"), PROMPT, **kwargs)


def test_needs_a_text_encoder(folders):
    parts = load_klein(folders[0], text_encoder=False)
    with pytest.raises(edit.EditInputError, match="without a text encoder"):
        edit.edit_pixels(parts, _source(), PROMPT)


def test_sharded_matches_one_device(folders, base):
    # The same edit with the components spread over 8 devices (data x fsdp x tensor = 2 x 2 x 2).
    one, pipe = base
    mesh = runtime.make_mesh(2, 2, 2)
    parts = load_klein(folders[1], max_text_length=64, mesh=mesh)
    image, noise = _source(), _noise((4, 5))
    ours = edit.edit_pixels(parts, image, PROMPT, steps=STEPS, noise=noise, guidance_scale=4.0)
    _assert_parity(ours, _theirs(pipe, image, PROMPT, noise, (4, 5), 64, guidance_scale=4.0))


# --- the command ------------------------------------------------------------------------------------------


def _run_cli(args, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "sfgrpo.edit", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def test_cli_end_to_end(folders, tmp_path):
    src = tmp_path / "in.png"
    PIL.Image.fromarray(_source()).save(src)
    out = tmp_path / "out.png"
    args = ["--model", folders[1], "--image", src, "--prompt", PROMPT, "--out", out]
    proc = _run_cli([*args, "--steps", 2, "--height", 48, "--width", 96, "--dtype", "bfloat16"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    with PIL.Image.open(out) as image:
        assert image.size == (96, 48) and image.mode == "RGB"
        assert np.asarray(image).std() > 5  # an image, not a constant
    assert "CFG 4" in proc.stderr  # a base model: guidance 4 by default


def test_cli_missing_component(folders, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    src = tmp_path / "in.png"
    PIL.Image.fromarray(_source()).save(src)
    proc = _run_cli(
        ["--model", broken, "--image", src, "--prompt", "x", "--out", tmp_path / "o.png"], tmp_path
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for component in ("transformer/", "vae/", "text_encoder/", "tokenizer/", "scheduler/"):
        assert component in proc.stderr


def _main(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        edit.main([str(a) for a in args])
    return exit_.value.code, capsys.readouterr().err


def test_cli_bad_inputs(folders, tmp_path, capsys):
    src = tmp_path / "in.png"
    PIL.Image.fromarray(_source()).save(src)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    good = ["--model", folders[0], "--prompt", PROMPT, "--out", tmp_path / "o.png"]

    code, err = _main([*good, "--image", garbage], capsys)
    assert code == 2 and "cannot read --image" in err and "garbage.png" in err
    code, err = _main([*good, "--image", tmp_path / "missing.png"], capsys)
    assert code == 2 and "cannot read --image" in err and "missing.png" in err
    code, err = _main([*good, "--image", src, "--height", 50], capsys)
    assert code == 2 and "--height=50 must be a positive multiple of 16" in err
    small = tmp_path / "small.png"
    PIL.Image.fromarray(_source(h=32, w=32)).save(small)
    code, err = _main([*good, "--image", small], capsys)
    assert code == 2 and "too small" in err
    code, err = _main([*good[2:], "--model", tmp_path / "nowhere", "--image", src], capsys)
    assert code == 2 and "does not exist" in err
    code, err = _main([*good[:4], "--image", src, "--out", tmp_path / "o.xyz"], capsys)
    assert code == 2 and "unknown image file extension '.xyz'" in err
    assert not (tmp_path / "o.png").exists()


def test_cli_long_prompt_runs(folders, tmp_path, caplog):
    # Over 512 tokens: truncated with a warning, as the pipeline does, and the edit is written. Same shapes
    # as test_parity_distilled, so the compiled programs are reused.
    src = tmp_path / "in.png"
    PIL.Image.fromarray(_source()).save(src)
    out = tmp_path / "o.png"
    prompt = " ".join(["make the old house stand behind the window"] * 80)
    with caplog.at_level(logging.WARNING):
        edit.main(["--model", str(folders[0]), "--image", str(src), "--prompt", prompt, "--out", str(out)])
    assert "max_length=512" in caplog.text
    with PIL.Image.open(out) as image:
        assert image.size == (W, H)
