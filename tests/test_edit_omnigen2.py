"""``sfgrpo.edit`` with an OmniGen2 folder against upstream's ``OmniGen2Pipeline``, and the command line.

Parity, stage by stage, against ``tests/goldens/omnigen2_pipeline`` (written by
``tools/make_omnigen2_pipeline_golden.py``, which ran upstream's pipeline on the tiny folder of
``tiny_omnigen2``, the VAE posterior's sample patched to its mean, which is what we compute). Checked:
the prompt features (instruction and empty negative prompt), the reference image's tokens, the final
latent tokens and the output image, for the dual guidance (text 3, image 1.8) and the pipeline's defaults
(text 4, image 1: text-only CFG without the source). Measured in float32 on CPU (max abs): features
1.1e-6, reference tokens 9e-7, final tokens 2.3e-6 / 4.3e-6, image 1.7e-6. Tolerances are >= 20x that,
and far below what separates the two cases' images (mean 0.028) or what text-only CFG with the source
kept in its unconditional branch would give (final tokens off by 1.7, image by 0.04 mean).
"""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from tiny_omnigen2 import build_tiny_omnigen2, folder_digest

from sfgrpo import edit
from sfgrpo.models.omnigen2_folder import load_omnigen2
from sfgrpo.sampling.schedule import omnigen2_sigmas

GOLDEN = Path(__file__).parent / "goldens" / "omnigen2_pipeline"
TEXT_TOKENS = 64  # the golden prompts are 41 and 25 tokens; fewer pad tokens keep the tests fast
TOLERANCE = {"text": 3e-5, "reference": 3e-5, "final": 1e-4, "image": 5e-5}  # max abs


@pytest.fixture(scope="module")
def golden():
    settings = json.loads((GOLDEN / "settings.json").read_text())
    with np.load(GOLDEN / "io.npz") as data:
        arrays = dict(data)
    return settings, arrays, np.asarray(PIL.Image.open(GOLDEN / "source.png").convert("RGB"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, golden):
    """The tiny folder, rebuilt; it must be the one the goldens were computed with."""
    built = build_tiny_omnigen2(tmp_path_factory.mktemp("omnigen2") / "model", seed=0)
    digest = folder_digest(built)
    differ = sorted(
        k for k in golden[0]["tiny_folder_sha256"] if digest.get(k) != golden[0]["tiny_folder_sha256"][k]
    )
    assert not differ, f"tiny folder files differ from the goldens' (torch/transformers version?): {differ}"
    return built


@pytest.fixture(scope="module")
def parts(folder):
    return load_omnigen2(folder, max_text_length=TEXT_TOKENS)


def tokens(latents):
    """Upstream (B, C, 2h, 2w) latents -> our (B, h w, 4C) tokens: '(c (h p1) (w p2) -> (h w) (p1 p2 c)'."""
    b, c, hh, ww = latents.shape
    h, w = hh // 2, ww // 2
    return latents.reshape(b, c, h, 2, w, 2).transpose(0, 2, 4, 3, 5, 1).reshape(b, h * w, 4 * c)


def errors(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = np.abs(ours - theirs).max()
    return diff, diff / np.abs(theirs).max()


def _edit(parts, golden, case, **overrides):
    settings, arrays, source = golden
    options = dict(
        steps=settings["steps"], noise=tokens(arrays["latents"]), **settings["cases"][case]["passed"]
    )
    return edit.edit_omnigen2(parts, source, settings["prompt"], **{**options, **overrides})


@pytest.mark.parametrize("case", ["dual", "default"])
def test_parity_stage_by_stage(parts, golden, case):
    settings, arrays, _ = golden
    ours = _edit(parts, golden, case)
    got = {}
    n = int(arrays[f"{case}/prompt_mask"].sum())
    assert ours.text_mask.sum() == n and ours.text_mask[0, :n].all()  # valid tokens first
    got["text"] = errors(ours.text[:, :n], arrays[f"{case}/prompt_embeds"][:, :n])
    m = int(arrays[f"{case}/negative_mask"].sum())
    assert ours.text_mask_uncond.sum() == m
    got["text (negative)"] = errors(ours.text_uncond[:, :m], arrays[f"{case}/negative_embeds"][:, :m])
    got["reference"] = errors(ours.reference, tokens(arrays[f"{case}/ref_latents"][None]))
    got["final"] = errors(ours.final, tokens(arrays[f"{case}/final_latents"]))
    got["image"] = errors(ours.pixels, arrays[f"{case}/image"][0])
    print(case, {k: f"max {a:.1e}, rel {r:.1e}" for k, (a, r) in got.items()})
    for stage, (max_abs, _) in got.items():
        assert max_abs < TOLERANCE[stage.split(" ")[0]], (stage, max_abs)
    assert ours.pixels.shape == (64, 96, 3) and 0.0 <= ours.pixels.min() and ours.pixels.max() <= 1.0
    # The schedule: the scheduler's times (with the final 1) are 1 - our sigmas.
    np.testing.assert_allclose(
        1.0 - omnigen2_sigmas(settings["steps"], 8 * 12), arrays[f"{case}/timesteps"], atol=1e-7
    )


def test_cases_are_far_apart(golden):
    # What the tolerances must be small against: the two guidance settings' images.
    _, arrays, _ = golden
    assert np.abs(arrays["dual/image"] - arrays["default/image"]).mean() > 0.01


def test_preprocessing_as_the_processor(golden):
    for size, expected in golden[0]["preprocess"].items():
        h, w = map(int, size.split("x"))
        y, x = np.mgrid[0:h, 0:w]
        image = (((x * 7 + y * 13 + (x * y) // 97)[..., None] + np.array([0, 85, 170])) % 256).astype(
            np.uint8
        )
        ours = edit.prepare_image_omnigen2(PIL.Image.fromarray(image))
        assert list(ours.shape) == expected["shape"], size
        assert hashlib.sha256(ours.tobytes()).hexdigest() == expected["sha256"], size


def test_seeds_and_uint8(parts, golden):
    settings, _, source = golden
    a = edit.edit_image(parts, source, settings["prompt"], steps=settings["steps"], seed=3)
    compiled = edit._denoise_omnigen2._cache_size()
    b = edit.edit_image(
        parts, PIL.Image.fromarray(source), settings["prompt"], steps=settings["steps"], seed=3
    )
    c = edit.edit_image(parts, source, settings["prompt"], steps=settings["steps"], seed=4)
    assert edit._denoise_omnigen2._cache_size() == compiled  # the sampler loop compiles once per shape
    assert a.shape == (64, 96, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be a positive integer"),
        (dict(text_guidance_scale=0.5), "text_guidance_scale=0.5 must be a finite number >= 1"),
        (dict(image_guidance_scale=float("nan")), "image_guidance_scale=nan must be a finite number >= 1"),
        (dict(image=np.zeros((10, 10, 3), np.uint8)), "too small or too elongated"),
        (dict(image=np.zeros((64, 96), np.uint8)), r"image array must be \(H, W, 3\) uint8"),
        (dict(noise=np.zeros((1, 23, 16), np.float32)), r"noise must be \(1, 24, 16\)"),
        (dict(height=64), "height: FLUX.2-klein options"),
        (dict(guidance_scale=2.0), "guidance_scale: FLUX.2-klein options"),
    ],
)
def test_bad_input(parts, golden, kwargs, message):
    kwargs = {"image": golden[2], **kwargs}
    with pytest.raises(edit.EditInputError, match=message):
        edit.edit_pixels(parts, kwargs.pop("image"), "x", **kwargs)


def test_needs_a_text_encoder_and_room_for_the_text(folder, golden):
    with pytest.raises(edit.EditInputError, match="without a text encoder"):
        edit.edit_pixels(load_omnigen2(folder, text_encoder=False), golden[2], "x")
    # 316 text tokens + the reference's 6 columns exceed the tiny transformer's 320 rotary positions.
    with pytest.raises(edit.EditInputError, match="exceeds the transformer's rotary tables"):
        edit.edit_pixels(load_omnigen2(folder, max_text_length=316), golden[2], "x")


# --- the command ------------------------------------------------------------------------------------------


def _main(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        edit.main([str(a) for a in args])
    return exit_.value.code, capsys.readouterr().err


def test_cli_end_to_end(folder, golden, tmp_path, caplog):
    # The defaults' guidance, 3 steps and 64 text tokens: the programs of the parity test, reused.
    settings, _, source = golden
    src = tmp_path / "in.png"
    PIL.Image.fromarray(source).save(src)
    out = tmp_path / "out.png"
    args = ["--model", folder, "--image", src, "--prompt", settings["prompt"], "--out", out]
    with caplog.at_level(logging.INFO):
        edit.main([str(a) for a in [*args, "--steps", 3, "--max_text_length", TEXT_TOKENS]])
    with PIL.Image.open(out) as image:
        assert image.size == (96, 64) and image.mode == "RGB"
        assert np.asarray(image).std() > 5  # an image, not a constant
    assert "text guidance 4, image guidance 1" in caplog.text  # the pipeline's defaults


def test_cli_bad_inputs(folder, golden, tmp_path, capsys):
    src = tmp_path / "in.png"
    PIL.Image.fromarray(golden[2]).save(src)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    good = ["--model", folder, "--prompt", "x", "--out", tmp_path / "o.png"]
    cases = [
        ([*good, "--image", garbage], ["cannot read --image", "garbage.png"]),
        (
            [*good, "--image", src, "--text-guidance", 0.5],
            ["--text-guidance=0.5 must be a finite number >= 1"],
        ),
        (
            [*good, "--image", src, "--image-guidance", "inf"],
            ["--image-guidance=inf must be a finite number"],
        ),
        ([*good, "--image", src, "--guidance", 2], ["--guidance: FLUX.2-klein options", "is OmniGen2"]),
        ([*good, "--image", src, "--height", 64], ["--height: FLUX.2-klein options"]),
        ([*good, "--image", src, "--lora", garbage], ["garbage.png"]),
        ([*good, "--image", src, "--workdir", tmp_path], [str(tmp_path)]),
    ]
    for args, expected in cases:
        code, err = _main(args, capsys)
        assert code == 2 and all(e in err for e in expected), (args, err)
        assert "Traceback" not in err
    klein = tmp_path / "klein"
    klein.mkdir()
    (klein / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    code, err = _main([*good[2:], "--model", klein, "--image", src, "--text-guidance", 2], capsys)
    assert code == 2 and "--text-guidance/--image-guidance are OmniGen2 options" in err
    assert not (tmp_path / "o.png").exists()


def test_cli_missing_components(tmp_path, golden, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "OmniGen2Pipeline"}))
    src = tmp_path / "in.png"
    PIL.Image.fromarray(golden[2]).save(src)
    code, err = _main(
        ["--model", broken, "--image", src, "--prompt", "x", "--out", tmp_path / "o.png"], capsys
    )
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "not a complete OmniGen2 folder" in err
    for component in ("transformer/", "vae/", "mllm/", "processor/", "scheduler/"):
        assert component in err
