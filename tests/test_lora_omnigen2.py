"""OmniGen2 LoRA against upstream (goldens written by tools/make_omnigen2_lora_golden.py): our export is
the golden file tensor for tensor, and our forward with the LoRA attached, merged, or merged from the
golden file equals upstream's forward after ``OmniGen2Pipeline.load_lora_weights`` loaded that file. A
FLUX.2 LoRA is refused by an OmniGen2 model and vice versa."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from sfgrpo import runtime
from sfgrpo.models import flux2, lora, omnigen2

GOLDENS = Path(__file__).parent / "goldens"
LORA = GOLDENS / "omnigen2_lora"
SPEC = json.loads((LORA / "case.json").read_text())
CASE = GOLDENS / "omnigen2" / SPEC["case"]
META = json.loads((CASE / "case.json").read_text())
MODEL = GOLDENS / "omnigen2" / META["model"]
STACKS = ("noise_refiner", "ref_image_refiner", "context_refiner", "layers")
PROJECTIONS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out") + tuple(
    f"feed_forward.linear_{i}" for i in (1, 2, 3)
)
TARGETS = sorted(f"{s}.{p}" for s in STACKS for p in PROJECTIONS)


def fill_lora(model, seed: int, scale: float) -> None:
    """tools/make_omnigen2_lora_golden.py's fill: A (*stack, in, r) ~ N(0, 1/in), B (*stack, r, out) ~
    N(0, scale^2/r), drawn in the order of the sorted module paths."""
    rng = np.random.default_rng(seed)
    for _, lin in sorted(lora.linear_paths(model).items()):
        if lin.lora is None:
            continue
        a, b = lin.lora.a.get_value(), lin.lora.b.get_value()
        new_a = rng.standard_normal(a.shape, np.float32) / np.sqrt(a.shape[-2])
        new_b = rng.standard_normal(b.shape, np.float32) * np.float32(scale / np.sqrt(b.shape[-2]))
        lin.lora.a.set_value(jnp.asarray(new_a, a.dtype))
        lin.lora.b.set_value(jnp.asarray(new_b, b.dtype))


def _patchify(latents: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), upstream's 'c (h p1) (w p2) -> (h w) (p1 p2 c)'."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


IO = dict(np.load(CASE / "io.npz"))
WANT = {k: _patchify(v) for k, v in np.load(LORA / "io.npz").items()}  # out (with LoRA), base
ARRAYS = dict(
    hidden_states=_patchify(IO["latents"]),
    timestep=IO["timestep"],
    text=IO["text"],
    text_mask=IO["text_mask"],
    refs=np.concatenate([_patchify(IO[f"ref_{j}"]) for j in range(len(META["refs"]))], axis=1),
)
GRIDS = (tuple(n // 2 for n in META["latent_hw"]), tuple((h // 2, w // 2) for h, w in META["refs"]))


@functools.partial(jax.jit, static_argnums=(0,))
def _apply(graphdef, state, arrays):
    # One compile per model structure (LoRA attached or not), shared by every model of that structure.
    grid_hw, ref_grids = GRIDS
    return nnx.merge(graphdef, state)(**arrays, grid_hw=grid_hw, ref_grids=list(ref_grids))


def _forward(model) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_apply(graphdef, state, ARRAYS))


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _adapted():
    model = omnigen2.from_pretrained(MODEL)
    paths = lora.apply_lora(model, lora.LoRAConfig(rank=SPEC["rank"], alpha=SPEC["alpha"]), rngs=nnx.Rngs(0))
    fill_lora(model, SPEC["seed"], SPEC["scale"])
    return model, paths


def _read(path):
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_export_is_the_golden_file_that_upstreams_pipeline_loaded(tmp_path):
    model, paths = _adapted()
    assert paths == TARGETS and lora.default_patterns(model) == lora.OMNIGEN2_PATTERNS
    file = tmp_path / "adapter.safetensors"
    lora.export_lora(model, file)
    got, got_meta = _read(file)
    want, want_meta = _read(LORA / "adapter.safetensors")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert got_meta == want_meta

    # The layout OmniGen2LoraLoaderMixin reads: transformer.<upstream module>.lora_A (r, in) / lora_B (out, r)
    # for 7 blocks (2 per refiner stack, 1 main) x 7 projections; alpha / r folded into B, lora_alpha = r.
    assert len(got) == 2 * 7 * 7
    assert got["transformer.layers.0.attn.to_out.0.lora_A.weight"].shape == (4, 48)
    assert got["transformer.noise_refiner.1.feed_forward.linear_2.lora_B.weight"].shape == (48, 4)
    assert got["transformer.context_refiner.0.attn.to_k.lora_B.weight"].shape == (16, 4)  # one K/V head
    peft = json.loads(got_meta["lora_adapter_metadata"])
    assert peft["transformer.r"] == 4 and peft["transformer.lora_alpha"] == 4.0
    assert len(peft["transformer.target_modules"]) == 49
    assert json.loads(got_meta["sfgrpo_lora_scale_folded"]) == {"r": 4, "lora_alpha": 12.0}
    raw, raw_peft = lora.lora_tensors(model, fold_scale=False)
    assert raw_peft["lora_alpha"] == 12.0
    b = "transformer.layers.0.attn.to_q.lora_B.weight"
    np.testing.assert_allclose(raw[b] * 3.0, want[b], rtol=1e-6)
    assert {u.scale for u in lora.read_lora_file(file).values()} == {1.0}


def test_attached_merged_and_file_merged_lora_match_upstream():
    model, _ = _adapted()
    attached = _forward(model)
    assert _rel_err(attached, WANT["out"]) < 1e-5, _rel_err(attached, WANT["out"])
    assert _rel_err(WANT["out"], WANT["base"]) > 0.05  # the adapter matters

    assert lora.merge_lora(model) == len(TARGETS)
    merged = _forward(model)
    assert _rel_err(merged, WANT["out"]) < 1e-5, _rel_err(merged, WANT["out"])

    fresh = omnigen2.from_pretrained(MODEL)
    assert _rel_err(_forward(fresh), WANT["base"]) < 1e-5
    changed = lora.merge_lora_file(fresh, LORA / "adapter.safetensors")
    assert len(changed) == 49 and "layers.0.attn.to_out.0" in changed
    from_file = _forward(fresh)
    assert _rel_err(from_file, WANT["out"]) < 1e-5, _rel_err(from_file, WANT["out"])


def test_a_lora_for_the_other_model_is_refused(tmp_path):
    with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        flux = flux2.Flux2Transformer.from_config("tiny", rngs=nnx.Rngs(0))
    assert lora.apply_lora(flux, lora.LoRAConfig(rank=2, alpha=2.0), rngs=nnx.Rngs(1))
    assert lora.default_patterns(flux) == lora.DEFAULT_PATTERNS
    flux_file = tmp_path / "flux2.safetensors"
    lora.export_lora(flux, flux_file)
    og2 = omnigen2.from_pretrained(MODEL)
    with pytest.raises(
        lora.LoRAFileError,
        match=r"flux2.safetensors' is for FLUX.2 \(modules like 'single_transformer_blocks.0.attn.to_out'\), "
        r"not for the OmniGen2 transformer given",
    ):
        lora.merge_lora_file(og2, flux_file)
    with pytest.raises(
        lora.LoRAFileError,
        match=r"adapter.safetensors' is for OmniGen2 \(modules like 'context_refiner.0.attn.to_k'\), "
        r"not for the FLUX.2 transformer given",
    ):
        lora.merge_lora_file(flux, LORA / "adapter.safetensors")
    with pytest.raises(lora.LoRAFileError, match="modules the transformer does not have"):
        lora.merge_lora_file(flux, LORA / "adapter.safetensors")
    with pytest.raises(TypeError, match="Flux2Transformer or OmniGen2Transformer, got Linear"):
        lora.default_patterns(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
