"""Qwen3TextEncoder against transformers' Qwen3ForCausalLM as Flux2KleinPipeline uses it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from flax import nnx
from safetensors.numpy import load_file, save_file
from tiny_tokenizer import build_tokenizer
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from sfgrpo import runtime
from sfgrpo.models.prompts import PromptTokenizer
from sfgrpo.models.qwen3 import config_from_dict, load_qwen3

N_LAYERS = 28  # so the pipeline's layer choice (9, 18, 27) is exercised
PROMPTS = [
    "Move the red cube to the left of the table.",
    "A dog",
    "Make the old house stand behind the window at night, 3 times; keep everything else unchanged!",
]
TOL = 1e-4


def tiny_qwen3(vocab, seed=0, **overrides):
    """A random tiny Qwen3ForCausalLM with every weight perturbed (norm scales are not all ones)."""
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(Qwen3Config(**{**kw, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tokenizer, torch model, a plain model folder and a pipeline folder with sharded weights."""
    root = tmp_path_factory.mktemp("qwen3")
    build_tokenizer(root / "klein" / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(root / "klein" / "tokenizer")
    model = tiny_qwen3(len(tokenizer))
    model.save_pretrained(root / "plain")
    model.model.save_pretrained(root / "bare")  # a Qwen3Model: tensor names without "model."
    model.save_pretrained(root / "klein" / "text_encoder", max_shard_size="100KB")
    assert (root / "klein" / "text_encoder" / "model.safetensors.index.json").is_file()
    return dict(root=root, tokenizer=tokenizer, model=model)


def reference(setup, prompts, max_length, layers=(9, 18, 27)):
    with torch.no_grad():
        out = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            setup["model"],
            setup["tokenizer"],
            prompts,
            max_sequence_length=max_length,
            hidden_states_layers=layers,
        )
    return out.float().numpy()


def encode(encoder, ids, mask):
    """The functional call: split, then a jitted merge-and-apply."""
    graphdef, state = nnx.split(encoder)
    return jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, ids, mask)


def test_parity_with_pipeline(setup):
    tok = PromptTokenizer(setup["root"] / "klein", max_length=40)
    ids, mask = tok(PROMPTS)
    assert len(set(mask.sum(1).tolist())) == len(PROMPTS)  # padding differs per prompt
    ref = reference(setup, PROMPTS, 40)
    # One file; a bare Qwen3Model; a pipeline folder with sharded weights.
    for path in (setup["root"] / "plain", setup["root"] / "bare", setup["root"] / "klein"):
        encoder = load_qwen3(path)
        assert encoder.out_dim == 3 * 32 and encoder.num_layers == 27
        out = np.asarray(encode(encoder, jnp.asarray(ids), jnp.asarray(mask)))
        assert out.shape == ref.shape == (3, 40, 96) and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zeros


def test_parity_at_pipeline_default_length(setup):
    tok = PromptTokenizer(setup["root"] / "klein")
    ids, mask = tok(PROMPTS[:2])
    assert ids.shape == (2, 512)
    out = np.asarray(load_qwen3(setup["root"] / "plain")(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out, reference(setup, PROMPTS[:2], 512), atol=TOL, rtol=0)


def test_edge_layers_embeddings_and_final_norm(setup):
    """hidden_states[0] is the embedding, [N] the last layer after the final norm, negatives count back."""
    tok = PromptTokenizer(setup["root"] / "klein", max_length=24)
    ids, mask = tok(PROMPTS)
    layers = (N_LAYERS, 0, 1, -2)
    encoder = load_qwen3(setup["root"] / "plain", layers=layers)
    assert encoder.norm is not None and encoder.num_layers == N_LAYERS
    out = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)))
    ref = reference(setup, PROMPTS, 24, layers=layers)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    # Without the last index the final norm is not built (its tensor is skipped).
    assert load_qwen3(setup["root"] / "plain", layers=(2,)).norm is None


def test_left_padding_and_masked_rows(setup):
    """Arbitrary masks (left padding gives query rows with no visible key) against the torch model."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(setup["tokenizer"]), size=(3, 12)).astype(np.int32)
    mask = np.ones((3, 12), np.int32)
    mask[0, :5] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    mask[2, [2, 6]] = 0  # holes
    layers = (1, 9, N_LAYERS)
    with torch.no_grad():
        hs = setup["model"](
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states
    ref = torch.cat([hs[k] for k in layers], dim=-1).numpy()
    out = np.asarray(load_qwen3(setup["root"] / "plain", layers=layers)(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_sliding_window_config(tmp_path):
    vocab = 50
    kinds = ["full_attention", "sliding_attention"] * 2
    model = tiny_qwen3(
        vocab, seed=1, num_hidden_layers=4, use_sliding_window=True, sliding_window=3, layer_types=kinds
    )
    model.save_pretrained(tmp_path)
    cfg = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert cfg.layer_types[1] == "sliding_attention" and cfg.sliding_window == 3
    ids = np.random.default_rng(1).integers(0, vocab, size=(2, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        hs = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            output_hidden_states=True,
        ).hidden_states
    layers = (2, 4)
    ref = torch.cat([hs[k] for k in layers], dim=-1).numpy()
    out = np.asarray(load_qwen3(tmp_path, layers=layers)(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    # The window matters here: with full attention everywhere the outputs differ.
    full = json.loads((tmp_path / "config.json").read_text())
    full.pop("layer_types")
    full["use_sliding_window"] = False
    (tmp_path / "config.json").write_text(json.dumps(full))
    out_full = np.asarray(load_qwen3(tmp_path, layers=layers)(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(out_full - ref).max() > 1e-2


def test_sharded_batch(setup):
    """Batch sharded over 8 simulated devices (data axis): same result, output stays batch-sharded."""
    tok = PromptTokenizer(setup["root"] / "klein", max_length=24)
    prompts = [PROMPTS[i % 3] + " " * (i // 3) for i in range(8)]
    ids, mask = tok(prompts)
    single = np.asarray(load_qwen3(setup["root"] / "plain")(jnp.asarray(ids), jnp.asarray(mask)))
    mesh = runtime.make_mesh(-1, 1, 1)
    assert mesh.shape["data"] == 8
    encoder = load_qwen3(setup["root"] / "plain", mesh=mesh)
    with runtime.use_mesh(mesh):
        batch = runtime.host_local_to_global({"ids": ids, "mask": mask}, mesh)
        out = encode(encoder, batch["ids"], batch["mask"])
    assert out.shape == (8, 24, 96)
    assert tuple(out.sharding.spec)[0] in ("data", ("data", "fsdp"), ("data",))
    np.testing.assert_allclose(np.asarray(out), single, atol=TOL, rtol=0)


def test_bf16_load(setup):
    tok = PromptTokenizer(setup["root"] / "klein", max_length=24)
    ids, mask = tok(PROMPTS)
    encoder = load_qwen3(setup["root"] / "klein", dtype=jnp.bfloat16)
    assert encoder.decoder.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    out = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)))
    ref = reference(setup, PROMPTS, 24)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    # bf16 weights (8 mantissa bits) through 27 layers: a few percent of the activation scale.
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 0.05, err


def test_bad_input(setup, tmp_path):
    plain = setup["root"] / "plain"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_qwen3(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_qwen3(tmp_path)
    (tmp_path / "config.json").write_text((plain / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_qwen3(tmp_path)
    tensors = load_file(plain / "model.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "model.layers.3.mlp.up_proj.weight"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \(1\).*model\.layers\.3\.mlp\.up_proj\.weight") as err:
        load_qwen3(tmp_path)
    assert str(tmp_path) in str(err.value)
    wrong = dict(tensors, **{"model.layers.5.self_attn.k_norm.weight": np.ones(4, np.float32)})
    save_file(wrong, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"wrong shape.*layers\.5\.self_attn\.k_norm\.weight: file \(4,\)"):
        load_qwen3(tmp_path)
    for layers in ((9, 29), (-30,), ()):
        with pytest.raises(ValueError, match="layers|at least one"):
            load_qwen3(plain, layers=layers)
    with pytest.raises(ValueError, match="out of range.*0..28"):
        load_qwen3(plain, layers=(29,))
    cfg = json.loads((plain / "config.json").read_text())
    for change, message in (
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type .linear."),
        ({"attention_bias": True}, "attention_bias"),
        ({"head_dim": None}, "missing 'head_dim'"),
        ({"model_type": "llama"}, "model_type"),
    ):
        with pytest.raises(ValueError, match=message):
            config_from_dict({**cfg, **change})
    encoder = load_qwen3(plain, layers=(1,))
    with pytest.raises(ValueError, match="vocabulary"):
        encoder(jnp.full((1, 4), 10_000, jnp.int32), jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        encoder(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))
