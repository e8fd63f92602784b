"""The OmniGen2 transformer port against upstream's PyTorch forward (goldens written by
tools/make_omnigen2_golden.py: three cases, two architectures, 0/1/2 reference images, non-square latents,
text of several lengths), with every attention implementation, on a mesh, under remat; and its errors."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfgrpo import runtime
from sfgrpo.models import omnigen2, omnigen2_config, omnigen2_weights

GOLDENS = Path(__file__).parent / "goldens" / "omnigen2"
CASES = sorted(p.name for p in GOLDENS.iterdir() if (p / "io.npz").is_file())


def _patchify(latents: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), upstream's 'c (h p1) (w p2) -> (h w) (p1 p2 c)'."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def _case(name: str) -> tuple[Path, dict, dict]:
    meta = json.loads((GOLDENS / name / "case.json").read_text())
    io = dict(np.load(GOLDENS / name / "io.npz"))
    return GOLDENS / meta["model"], meta, io


def _inputs(meta: dict, io: dict) -> dict:
    refs = [_patchify(io[f"ref_{j}"]) for j in range(len(meta["refs"]))]
    h, w = (n // 2 for n in meta["latent_hw"])
    return dict(
        hidden_states=jnp.asarray(_patchify(io["latents"])),
        grid_hw=(h, w),
        timestep=jnp.asarray(io["timestep"]),
        text=jnp.asarray(io["text"]),
        text_mask=jnp.asarray(io["text_mask"]),
        refs=jnp.asarray(np.concatenate(refs, axis=1)) if refs else None,
        ref_grids=[(rh // 2, rw // 2) for rh, rw in meta["refs"]],
    )


def _rel_err(got: jax.Array, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("impl", [None, "blockwise"])
@pytest.mark.parametrize("name", CASES)
def test_matches_upstream(name, impl):
    folder, meta, io = _case(name)
    model = omnigen2.from_pretrained(folder, attention=impl)
    got = jax.jit(lambda x: model(**{**_inputs(meta, io), "hidden_states": x}))(
        _inputs(meta, io)["hidden_states"]
    )
    want = _patchify(io["out"])
    assert got.shape == want.shape
    assert _rel_err(got, want) < 1e-5, (name, impl, _rel_err(got, want))
    assert float(np.abs(want).mean()) > 0.1  # the golden is not a degenerate zero output


def test_splash_in_interpret_mode_matches_upstream():
    folder, meta, io = _case("mqa_two_references")
    model = omnigen2.from_pretrained(folder, attention="splash")
    assert _rel_err(model(**_inputs(meta, io)), _patchify(io["out"])) < 1e-5


def test_a_mesh_remat_and_unrolling_change_nothing():
    """Loaded straight onto a 2x2x2 mesh (batch over data x fsdp, heads over tensor, fsdp-sharded
    weights), the forward equals upstream; with remat 'dots' and 'full', or the layer loops unrolled, the
    gradient equals remat 'none'."""
    folder, meta, io = _case("gqa_one_reference")
    inputs = _inputs(meta, io)
    mesh = runtime.make_mesh(2, 2, 2)
    sharded = omnigen2.from_pretrained(folder, mesh=mesh, attention="blockwise")
    with runtime.use_mesh(mesh):
        got = jax.jit(lambda m, x: m(**{**inputs, "hidden_states": x}))(sharded, inputs["hidden_states"])
    assert _rel_err(got, _patchify(io["out"])) < 1e-5
    kernel = sharded.layers.feed_forward.linear_1.kernel[...]
    assert "fsdp" in str(kernel.sharding.spec)

    def grad_of(remat: str, scan_unroll: int = 1) -> jax.Array:
        model = omnigen2.from_pretrained(folder, remat=remat, scan_unroll=scan_unroll)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p: nnx.State) -> jax.Array:
            return jnp.sum(nnx.merge(graphdef, p)(**inputs) ** 2)

        return jax.jit(jax.grad(loss))(params)["layers"]["attn"]["to_q"]["kernel"][...]

    want = grad_of("none")
    assert float(jnp.abs(want).max()) > 0
    for remat in ("dots", "full"):
        np.testing.assert_allclose(np.asarray(grad_of(remat)), np.asarray(want), rtol=1e-5, atol=1e-6)
    unrolled = grad_of("none", scan_unroll=8)
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scan_unroll=0"):
        omnigen2.from_pretrained(folder, scan_unroll=0)


def test_name_table_covers_every_upstream_tensor():
    folder, _, _ = _case("mqa_two_references")
    cfg = omnigen2_weights.read_config(folder / "transformer")
    with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        abstract = nnx.eval_shape(lambda: omnigen2.OmniGen2Transformer(cfg, rngs=nnx.Rngs(0)))
    table = omnigen2_weights.param_table(nnx.state(abstract), cfg)
    ours = {n for e in table.values() for n in e.names}
    from safetensors import safe_open

    with safe_open(folder / "transformer" / "diffusion_pytorch_model.safetensors", "np") as f:
        assert ours == set(f.keys())
    linears = omnigen2_weights.linear_modules(cfg)
    assert linears["layers.attn.to_out"] == "layers.{i}.attn.to_out.0"
    assert linears["time_caption_embed.caption_embedder.linear"] == "time_caption_embed.caption_embedder.1"


def test_position_ids_follow_upstream():
    """Text l -> (l, l, l); reference j -> (T_b + sum of earlier max(h, w), row, col); target after all
    references. Sample 1 has 2 text tokens of 4."""
    ids = np.asarray(omnigen2.position_ids(jnp.asarray([4, 2]), 4, (2, 3), [(1, 2), (3, 1)]))
    assert ids.shape == (2, 2 + 3 + 6 + 4, 3)
    np.testing.assert_array_equal(ids[1, :2], [[2, 0, 0], [2, 0, 1]])  # ref 0: shift 0
    np.testing.assert_array_equal(ids[1, 2:5, 0], [4, 4, 4])  # ref 1: after max(1, 2) = 2
    np.testing.assert_array_equal(ids[1, 2:5, 1], [0, 1, 2])
    np.testing.assert_array_equal(
        ids[0, 5:11], [[9, 0, 0], [9, 0, 1], [9, 0, 2], [9, 1, 0], [9, 1, 1], [9, 1, 2]]
    )
    np.testing.assert_array_equal(ids[1, 11:], [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]])


def _tiny() -> omnigen2.OmniGen2Transformer:
    with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        return omnigen2.OmniGen2Transformer.from_config("tiny", rngs=nnx.Rngs(0))


def test_bad_inputs_are_named():
    model = _tiny()
    x, text, mask = jnp.zeros((2, 6, 16)), jnp.zeros((2, 5, 24)), jnp.ones((2, 5))
    with pytest.raises(ValueError, match=r"hidden_states \(2, 6, 16\) must be \(B, 3\*3, 16\)"):
        model(x, (3, 3), 0.5, text, mask)
    with pytest.raises(ValueError, match=r"text \(2, 5, 7\) must be \(2, T, 24\)"):
        model(x, (2, 3), 0.5, jnp.zeros((2, 5, 7)), mask)
    with pytest.raises(ValueError, match="text_mask"):
        model(x, (2, 3), 0.5, text, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="refs None disagree with ref_grids"):
        model(x, (2, 3), 0.5, text, mask, None, [(1, 1)])
    with pytest.raises(ValueError, match=r"refs \(2, 3, 16\) must be \(2, 2, 16\)"):
        model(x, (2, 3), 0.5, text, mask, jnp.zeros((2, 3, 16)), [(1, 2)])
    with pytest.raises(ValueError, match="exceed the rotary tables' axes_lens"):
        model(jnp.zeros((2, 40, 16)), (1, 40), 0.5, text, mask)
    with pytest.raises(ValueError, match="6 reference images"):
        model(x, (2, 3), 0.5, text, mask, jnp.zeros((2, 6, 16)), [(1, 1)] * 6)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="num_kv_heads=5"):
        omnigen2_config.OmniGen2Config(num_attention_heads=24, num_kv_heads=5)
    with pytest.raises(ValueError, match=r"head dim 96 != sum\(axes_dim_rope\)=90"):
        omnigen2_config.OmniGen2Config(axes_dim_rope=(30, 30, 30))
    with pytest.raises(ValueError, match="cfg.json: unsupported OmniGen2 config fields \\['qk_norm'\\]"):
        omnigen2_config.config_from_dict({"qk_norm": True}, source="cfg.json")
    with pytest.raises(ValueError, match="'Flux2Transformer2DModel'"):
        omnigen2_config.config_from_dict({"_class_name": "Flux2Transformer2DModel"})
    with pytest.raises(ValueError, match="attention='flash'"):
        omnigen2_config.config_from_dict({"attention": "flash"})
    assert omnigen2_config.CONFIGS["omnigen2"].mlp_hidden_dim == 10240  # 4 * 2520 rounded up to 256


def test_a_checkpoint_that_does_not_match_is_named(tmp_path):
    folder, _, _ = _case("mqa_two_references")
    shutil.copytree(folder / "transformer", tmp_path / "transformer")
    cfg_file = tmp_path / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["num_layers"] = 2
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"missing \(15\): \['layers.1.attn.norm_k.weight'.*'layers.1.norm2.weight'\]"
    ):
        omnigen2.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="OmniGen2 transformer folder"):
        omnigen2.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors"):
        omnigen2.from_pretrained(tmp_path)
