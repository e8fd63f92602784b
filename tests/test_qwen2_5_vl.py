"""Qwen2_5_VLTextEncoder against transformers' Qwen2_5_VLForConditionalGeneration as OmniGen2 uses it:
``model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]``, text only."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from sfgrpo import runtime
from sfgrpo.models.qwen2_5_vl import Qwen2_5_VLTextEncoder, config_from_dict, load_qwen2_5_vl

VOCAB = 96
T = 11
REL = 1e-5  # max |ours - torch| / max |torch|, float32


def tiny_model(seed=0, **text_overrides):
    """A random tiny Qwen2.5-VL (vision tower tiny too) with every weight perturbed (biases and norm scales
    are not zeros/ones)."""
    torch.manual_seed(seed)
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=1,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=2,
        spatial_merge_size=1,
        temporal_patch_size=1,
        fullatt_block_indexes=[0],
    )
    cfg = Qwen2_5_VLConfig(text_config={**text, **text_overrides}, vision_config=vision)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def reference(model, ids, mask):
    """The pipeline's call."""
    with torch.no_grad():
        out = model(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            output_hidden_states=True,
        )
    return out.hidden_states[-1].float().numpy()


def encode(encoder, ids, mask):
    """The functional call: split, then a jitted merge-and-apply."""
    graphdef, state = nnx.split(encoder)
    return jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, jnp.asarray(ids), jnp.asarray(mask))


def rel_error(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def batch(lengths, side, seed=0):
    """Random ids (B, T) and a mask with the given real lengths, padded on ``side`` (pads hold id 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, size=(len(lengths), T)).astype(np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        real = slice(0, n) if side == "right" else slice(T - n, T)
        mask[row, real] = 1
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The torch model; a plain folder (transformers' save: ``model.layers.*``, one file) and an OmniGen2
    folder with the model in ``mllm/`` as sharded safetensors."""
    root = tmp_path_factory.mktemp("qwen2_5_vl")
    model = tiny_model()
    model.save_pretrained(root / "plain")
    model.save_pretrained(root / "omnigen2" / "mllm", max_shard_size="50KB")
    assert (root / "omnigen2" / "mllm" / "model.safetensors.index.json").is_file()
    keys = load_file(root / "plain" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.bias" in keys and any(k.startswith("visual.") for k in keys)
    return dict(root=root, model=model, encoder=load_qwen2_5_vl(root / "plain"))


CASES = {
    "no padding": ([T, T], "right"),
    "right padding": ([T, 6], "right"),
    "left padding": ([T, 6], "left"),
    "batch of different lengths": ([4, 9, T], "right"),
    "single row, left-padded": ([7], "left"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity(setup, case):
    lengths, side = CASES[case]
    ids, mask = batch(lengths, side)
    ref = reference(setup["model"], ids, mask)
    out = np.asarray(encode(setup["encoder"], ids, mask))
    assert out.shape == ref.shape == (len(lengths), T, 32) and out.dtype == np.float32
    err = rel_error(out, ref)
    print(f"{case}: max abs {np.abs(out - ref).max():.2e}, rel {err:.2e}")
    assert err <= REL, err
    assert np.abs(ref).max() > 1.0  # not a comparison between near-zeros


def test_positions_ignore_padding(setup):
    """Positions are 0..T-1 whatever the mask: a right-padded row's real tokens match the unpadded row, and
    a left-padded row is the same sequence shifted (same values, RoPE being relative)."""
    ids, _ = batch([T], "right")
    n = 6
    full = np.asarray(setup["encoder"](jnp.asarray(ids[:, :n]), jnp.ones((1, n), jnp.int32)))[0]
    right = np.zeros((1, T), np.int32)
    right[0, :n] = ids[0, :n]
    mask = (np.arange(T) < n).astype(np.int32)[None]
    out = np.asarray(setup["encoder"](jnp.asarray(right), jnp.asarray(mask, bool)))[0]  # a bool mask
    np.testing.assert_allclose(out[:n], full, atol=1e-5 * np.abs(full).max())
    left = np.roll(right, T - n, axis=1)
    out = np.asarray(setup["encoder"](jnp.asarray(left), jnp.asarray(np.roll(mask, T - n, axis=1))))[0]
    np.testing.assert_allclose(out[T - n :], full, atol=1e-5 * np.abs(full).max())


def test_sharded_omnigen2_folder_and_mesh(setup):
    """An OmniGen2 folder (mllm/, sharded safetensors), on a 2 x 2 (data x tensor) mesh: same result, the
    output stays batch-sharded."""
    ids, mask = batch([T, 5, 8, 2], "right")
    ref = reference(setup["model"], ids, mask)
    mesh = runtime.make_mesh(2, 1, 2, devices=jax.devices()[:4])
    encoder = load_qwen2_5_vl(setup["root"] / "omnigen2", mesh=mesh)
    assert encoder.decoder.self_attn.q_proj.bias[...].sharding.spec[-1] == "tensor"
    with runtime.use_mesh(mesh):
        arrays = runtime.host_local_to_global({"ids": ids, "mask": mask}, mesh)
        out = encode(encoder, arrays["ids"], arrays["mask"])
    assert tuple(out.sharding.spec)[0] in ("data", ("data",), ("data", "fsdp"))
    assert rel_error(np.asarray(out), ref) <= REL


def test_transformers5_names_and_bf16(setup, tmp_path):
    """Tensors named as transformers 5 modules name them (``model.language_model.*``) load too; bf16
    weights give float32 outputs within bf16 accuracy."""
    tensors = load_file(setup["root"] / "plain" / "model.safetensors")
    renamed = {
        k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
        for k, v in tensors.items()
    }
    save_file(renamed, tmp_path / "model.safetensors")
    shutil.copy(setup["root"] / "plain" / "config.json", tmp_path / "config.json")
    ids, mask = batch([T, 6], "left")
    ref = reference(setup["model"], ids, mask)
    out = np.asarray(load_qwen2_5_vl(tmp_path)(jnp.asarray(ids), jnp.asarray(mask)))
    assert rel_error(out, ref) <= REL
    encoder = load_qwen2_5_vl(tmp_path, dtype=jnp.bfloat16)
    assert encoder.decoder.self_attn.k_proj.bias[...].dtype == jnp.bfloat16
    out = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.dtype == np.float32 and rel_error(out, ref) < 0.05


def test_sliding_window_layers(tmp_path):
    """Layers from max_window_layers on slide when use_sliding_window is set (transformers' SDPA mask)."""
    model = tiny_model(seed=1, use_sliding_window=True, sliding_window=3, max_window_layers=1)
    model.save_pretrained(tmp_path)
    cfg = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert cfg.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    ids, mask = batch([T, 7], "right", seed=1)
    ref = reference(model, ids, mask)
    out = np.asarray(load_qwen2_5_vl(tmp_path)(jnp.asarray(ids), jnp.asarray(mask)))
    assert rel_error(out, ref) <= REL
    # The window matters here: with full attention everywhere the outputs differ.
    full = json.loads((tmp_path / "config.json").read_text())
    full["text_config"].pop("layer_types")
    full["text_config"]["use_sliding_window"] = False
    (tmp_path / "config.json").write_text(json.dumps(full))
    out_full = np.asarray(load_qwen2_5_vl(tmp_path)(jnp.asarray(ids), jnp.asarray(mask)))
    assert rel_error(out_full, ref) > 1e-3


# A flat transformers 4.x config as OmniGen2's mllm/ has it (Qwen2.5-VL-3B's sizes).
REAL_FLAT = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
    "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 2048},
}


def test_real_size_config():
    """The flat 4.x layout and the v5 ``text_config`` layout parse alike; the real-size model traces."""
    cfg = config_from_dict(REAL_FLAT)
    assert (cfg.hidden_size, cfg.head_dim, cfg.groups, cfg.rope_theta) == (2048, 128, 8, 1e6)
    assert set(cfg.layer_types) == {"full_attention"} and cfg.sliding_window is None
    nested = Qwen2_5_VLConfig(**{k: v for k, v in REAL_FLAT.items() if k != "vision_config"}).to_dict()
    assert "text_config" in nested
    assert config_from_dict(nested) == cfg
    with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        encoder = nnx.eval_shape(lambda: Qwen2_5_VLTextEncoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
        assert encoder.out_dim == 2048
        assert encoder.decoder.self_attn.k_proj.bias.shape == (36, 256)
        graphdef, state = nnx.split(encoder)
        ids = jax.ShapeDtypeStruct((2, 40), jnp.int32)
        out = jax.eval_shape(lambda s, i, m: nnx.merge(graphdef, s)(i, m), state, ids, ids)
    assert out.shape == (2, 40, 2048) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": None}, "missing 'hidden_size'"),
        ({"num_hidden_layers": "36"}, "num_hidden_layers='36' must be an integer"),
        ({"rms_norm_eps": "small"}, "rms_norm_eps='small' must be a number"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "llama"}, "model_type"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"head_dim": 64}, "head_dim=64"),
        ({"use_sliding_window": True, "sliding_window": 0, "max_window_layers": 0}, "sliding_window"),
    ],
)
def test_bad_config(change, message):
    with pytest.raises(ValueError, match=message) as err:
        config_from_dict({**REAL_FLAT, **change}, source="here/config.json")
    assert str(err.value).startswith("here/config.json: ")
    # In a v5 nested config the field is named with its text_config prefix.
    if "hidden_size" in change:
        with pytest.raises(ValueError, match=r"missing 'text_config\.hidden_size'"):
            config_from_dict({"model_type": "qwen2_5_vl", "text_config": {**REAL_FLAT, **change}})


def test_bad_folder(setup, tmp_path):
    plain = setup["root"] / "plain"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_qwen2_5_vl(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"mllm/config\.json"):
        load_qwen2_5_vl(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_qwen2_5_vl(tmp_path)
    (tmp_path / "config.json").write_text((plain / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_qwen2_5_vl(tmp_path)
    tensors = load_file(plain / "model.safetensors")
    drop = ("model.layers.2.self_attn.v_proj.bias", "model.norm.weight")
    save_file({k: v for k, v in tensors.items() if k not in drop}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \(2\).*v_proj\.bias.*model\.norm\.weight") as err:
        load_qwen2_5_vl(tmp_path)
    assert str(tmp_path) in str(err.value)
    save_file({k: v for k, v in tensors.items() if k.startswith("visual.")}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no language-model weights") as err:
        load_qwen2_5_vl(tmp_path)
    assert str(tmp_path) in str(err.value)
    wrong = dict(tensors, **{"model.layers.1.self_attn.q_proj.bias": np.zeros(4, np.float32)})
    save_file(wrong, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"wrong shape.*layers\.1\.self_attn\.q_proj\.bias"):
        load_qwen2_5_vl(tmp_path)
    encoder = setup["encoder"]
    with pytest.raises(ValueError, match="vocabulary"):
        encoder(jnp.full((1, 4), VOCAB, jnp.int32), jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        encoder(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))
