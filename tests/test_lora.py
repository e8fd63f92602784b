"""LoRA: zero-init identity, pattern selection, the training filter, export that diffusers loads, merging,
and LoRA files read with diffusers' scales."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from flax import nnx
from helpers import entries_moved
from safetensors import safe_open
from safetensors.numpy import save_file
from tiny_flux2 import TINY_DIFFUSERS

from sfgrpo import runtime
from sfgrpo.models import flux2, lora

TINY = TINY_DIFFUSERS
DEFAULT_TARGETS = [
    "single_transformer_blocks.attn.to_out",
    "single_transformer_blocks.attn.to_qkv_mlp_proj",
    *(
        f"transformer_blocks.attn.{n}"
        for n in ("add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "to_k", "to_out", "to_q", "to_v")
    ),
    *(f"transformer_blocks.{ff}.{n}" for ff in ("ff", "ff_context") for n in ("linear_in", "linear_out")),
]


def _inputs(batch=2, seed=0):
    img_ids, txt_ids = flux2.make_position_ids(3, 2, 5, [(2, 2)])
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, img_ids.shape[0], 16), np.float32),
        rng.standard_normal((batch, 5, 24), np.float32),
        rng.uniform(size=batch).astype(np.float32),
        img_ids,
        txt_ids,
    )


def _forward(model, inputs):
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    return np.asarray(fwd(state, *(jnp.asarray(a) for a in inputs)))


@pytest.fixture(scope="module")
def tiny():
    with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        return flux2.Flux2Transformer.from_config("tiny", rngs=nnx.Rngs(0))


def test_fresh_lora_leaves_the_output_unchanged_and_only_lora_is_selected(tiny):
    model = nnx.clone(tiny)
    inputs = _inputs()
    base = _forward(model, inputs)
    paths = lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    assert paths == sorted(DEFAULT_TARGETS)
    np.testing.assert_allclose(_forward(model, inputs), base, atol=1e-6)

    adapter = nnx.to_flat_state(nnx.state(model, lora.LORA))
    names = {".".join(map(str, p)) for p, _ in adapter}
    assert names == {f"{t}.lora.{f}" for t in DEFAULT_TARGETS for f in ("a", "b")}
    q_a = nnx.state(model, lora.LORA)["transformer_blocks"]["attn"]["to_q"]["lora"]["a"].get_value()
    assert q_a.shape == (2, 32, 4)  # stacked over the 2 double blocks
    base_names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, lora.BASE))}
    assert not base_names & names and len(base_names) == len(nnx.to_flat_state(nnx.state(tiny)))

    # Gradients through the LoRA filter: only adapter leaves, B gets signal (A does not while B = 0).
    graphdef, params, rest = nnx.split(model, lora.LORA, ...)
    x, e, t, img_ids, txt_ids = (jnp.asarray(a) for a in inputs)

    def loss(p):
        return jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(x, e, t, img_ids, txt_ids)))

    grads = jax.jit(jax.grad(loss))(params)
    g = grads["transformer_blocks"]["attn"]["to_q"]["lora"]
    assert float(jnp.abs(g["b"].get_value()).max()) > 0
    assert float(jnp.abs(g["a"].get_value()).max()) == 0


def test_patterns_select_layers_and_bad_input_is_rejected(tiny):
    model = nnx.clone(tiny)
    got = lora.apply_lora(
        model, lora.LoRAConfig(rank=2, alpha=2.0, patterns=(r"attn\.to_(q|v)$",)), rngs=nnx.Rngs(0)
    )
    assert got == ["transformer_blocks.attn.to_q", "transformer_blocks.attn.to_v"]
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.apply_lora(nnx.clone(tiny), lora.LoRAConfig(patterns=("to_qq",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no LoRA attached"):
        lora.export_lora(nnx.clone(tiny), "/nonexistent/never_written.safetensors")
    with pytest.raises(ValueError, match="rank"):
        lora.LoRAConfig(rank=0)


def test_exported_adapter_loads_in_diffusers_with_the_same_output(tmp_path):
    torch.manual_seed(0)
    reference = Flux2Transformer2DModel(**TINY).eval()
    reference.save_pretrained(tmp_path / "model")
    model = flux2.from_pretrained(tmp_path / "model")
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=12.0), rngs=nnx.Rngs(1))
    # Train-like, non-zero adapter: random A and B.
    adapter = nnx.state(model, lora.LORA)
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(
        model,
        jax.tree.unflatten(
            treedef, [0.1 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves, strict=True)]
        ),
    )
    inputs = _inputs()
    ours = _forward(model, inputs)

    file = tmp_path / "adapter.safetensors"
    lora.export_lora(model, file)
    with safe_open(file, "np") as f:
        assert "transformer.transformer_blocks.1.attn.to_out.0.lora_A.weight" in f.keys()
        assert f.get_tensor(
            "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight"
        ).shape == (
            3 * 32 + 2 * 96,
            4,
        )
    # The pipeline's own path: load_lora_weights = lora_state_dict + load_lora_into_transformer.
    state_dict, metadata = Flux2KleinPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 12.0
    Flux2KleinPipeline.load_lora_into_transformer(state_dict, transformer=reference, metadata=metadata)
    x, e, t, img_ids, txt_ids = inputs
    with torch.no_grad():
        want = reference(
            hidden_states=torch.tensor(x),
            encoder_hidden_states=torch.tensor(e),
            timestep=torch.tensor(t),
            img_ids=torch.tensor(img_ids),
            txt_ids=torch.tensor(txt_ids),
            return_dict=False,
        )[0].numpy()
        reference.disable_lora()
        base = reference(
            hidden_states=torch.tensor(x),
            encoder_hidden_states=torch.tensor(e),
            timestep=torch.tensor(t),
            img_ids=torch.tensor(img_ids),
            txt_ids=torch.tensor(txt_ids),
            return_dict=False,
        )[0].numpy()
    assert np.abs(want - base).max() > 0.05  # the adapter matters
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def _lora_a_moves(dtype: str, steps: int = 4):
    """Which LoRA-A entries a rank-4 LoRA's last of ``steps`` steps changed (see ``entries_moved``). (A has
    no gradient while B is still zero: it starts moving from the second step.)"""
    s, params, opt_state, moved = entries_moved(dtype, 4, steps)
    moved = {p: m for p, m in moved.items() if "'a'" in p}
    assert moved
    return s, params, opt_state, moved


def test_bf16_model_trains_float32_adapters_that_move_like_float32_ones():
    """Issue 12 item 1: the frozen base is bf16, the LoRA factors, Adam's moments and the accumulated
    gradients are float32, and a bf16 model's step moves every LoRA-A entry a float32 model's step moves
    (bf16 factors rounded a 4th-step Adam update of lr size to zero for ~40% of them)."""
    s, params, opt_state, moved_bf16 = _lora_a_moves("bfloat16")
    base = [
        x for p, x in jax.tree_util.tree_leaves_with_path(s.frozen) if "kernel" in jax.tree_util.keystr(p)
    ]
    assert base and all(x.dtype == jnp.bfloat16 for x in base)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    floats = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    _, _, _, moved_f32 = _lora_a_moves("float32")
    assert moved_f32.keys() == moved_bf16.keys()
    f32_frac = np.mean(np.concatenate([m.ravel() for m in moved_f32.values()]))
    bf16_frac = np.mean(np.concatenate([m.ravel() for m in moved_bf16.values()]))
    assert f32_frac > 0.9, f32_frac
    for path, m32 in moved_f32.items():
        missed = m32 & ~moved_bf16[path]
        assert not missed.any(), (
            f"{path}: {missed.mean():.1%} moved in float32 only (bf16 moved {bf16_frac:.1%})"
        )


def _random_adapters(model, seed=7, scale=0.1):
    adapter = nnx.state(model, lora.LORA)
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [scale * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))


def test_merging_adapters_or_their_file_computes_what_the_attached_adapters_compute(tiny, tmp_path):
    model = nnx.clone(tiny)
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=6.0), rngs=nnx.Rngs(1))
    _random_adapters(model)
    inputs = _inputs()
    attached = _forward(model, inputs)
    assert np.abs(attached - _forward(tiny, inputs)).max() > 0.05
    file = tmp_path / "adapter.safetensors"
    lora.export_lora(model, file)

    from_file = nnx.clone(tiny)
    changed = lora.merge_lora_file(from_file, file)
    assert len(changed) == 2 * 12 + 2 * 2  # every adapted module of the 2 double and 2 single blocks
    np.testing.assert_allclose(_forward(from_file, inputs), attached, atol=1e-5)
    assert lora.merge_lora(model) == len(DEFAULT_TARGETS)
    assert all(lin.lora is None for lin in lora.linear_paths(model).values())
    np.testing.assert_allclose(_forward(model, inputs), attached, atol=1e-5)


def _lora_file(path, tensors, peft=None):
    metadata = {"format": "pt"}
    if peft is not None:
        metadata["lora_adapter_metadata"] = json.dumps(peft)
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_lora_files_get_diffusers_scales_and_bad_ones_are_refused(tiny, tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 32)).astype(np.float32), rng.standard_normal((32, 2)).astype(np.float32)
    q, k = "transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_k"
    pairs = {f"transformer.{m}.lora_{x}.weight": v for m in (q, k) for x, v in (("A", a), ("B", b))}
    no_meta = lora.read_lora_file(_lora_file(tmp_path / "plain.safetensors", pairs))
    assert {m: u.scale for m, u in no_meta.items()} == {q: 1.0, k: 1.0}  # diffusers: lora_alpha = r
    peft = {"transformer.r": 2, "transformer.lora_alpha": 6, "transformer.alpha_pattern": {"to_k": 1}}
    scaled = lora.read_lora_file(_lora_file(tmp_path / "meta.safetensors", pairs, peft))
    assert scaled[q].scale == 3.0 and scaled[k].scale == 0.5
    rslora = lora.read_lora_file(
        _lora_file(tmp_path / "rs.safetensors", pairs, {"r": 2, "lora_alpha": 4, "use_rslora": True})
    )
    assert rslora[q].scale == pytest.approx(4 / np.sqrt(2))

    bad = {
        "DoRA": (pairs, {"use_dora": True}, "DoRA"),
        "half": ({f"transformer.{q}.lora_A.weight": a}, None, "need lora_A and lora_B"),
        "other": ({"transformer.x.alpha": a}, None, "not LoRA factors"),
        "shape": ({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b.T.copy()}, None, r"are not \(r, in\)"),
    }
    for name, (tensors, meta, message) in bad.items():
        with pytest.raises(lora.LoRAFileError, match=message):
            lora.read_lora_file(_lora_file(tmp_path / f"{name}.safetensors", tensors, meta))
    wrong = {
        f"transformer.transformer_blocks.5.attn.to_q.lora_{x}.weight": v for x, v in (("A", a), ("B", b))
    }
    with pytest.raises(lora.LoRAFileError, match="modules the transformer does not have"):
        lora.merge_lora_file(nnx.clone(tiny), _lora_file(tmp_path / "wrong.safetensors", wrong))
    narrow = {
        f"transformer.{q}.lora_{x}.weight": v[..., :16] if x == "A" else v for x, v in (("A", a), ("B", b))
    }
    with pytest.raises(lora.LoRAFileError, match="takes 32 -> 32 features"):
        lora.merge_lora_file(nnx.clone(tiny), _lora_file(tmp_path / "narrow.safetensors", narrow))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(lora.LoRAFileError, match="cannot read LoRA file"):
        lora.read_lora_file(garbage)
