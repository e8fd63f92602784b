"""Loading diffusers FLUX.2 folders: layouts, sharded checkpoints, dtypes, target shardings, clear errors."""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from flax import nnx
from safetensors.torch import load_file, save_file
from tiny_flux2 import TINY_DIFFUSERS

from sfgrpo import runtime
from sfgrpo.models import flux2, weights

TINY = {**TINY_DIFFUSERS, "num_single_layers": 1, "guidance_embeds": True}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random diffusers model saved three ways: one file, sharded with an index, bfloat16."""
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("weights")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(root / "bf16" / "transformer")  # pipeline layout
    return model, root


def flat_params(model):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def expected_params(state_dict, cfg):
    """Our parameters built directly from a torch state dict through the name table."""
    out = {}
    for path, entry in weights.param_table(cfg).items():
        ts = [state_dict[n].float().numpy() for n in entry.names]
        ts = [t.T if entry.transpose else t for t in ts]
        out[path] = np.stack(ts) if entry.stacked else ts[0]
    return out


def test_single_file_and_sharded_index_load_the_same_weights(reference):
    model, root = reference
    assert (root / "sharded" / weights.INDEX_NAME).is_file()
    assert len(list((root / "sharded").glob("*.safetensors"))) > 2
    single, sharded = flux2.from_pretrained(root / "single"), flux2.from_pretrained(root / "sharded")
    want = expected_params(model.state_dict(), single.config)
    got_single, got_sharded = flat_params(single), flat_params(sharded)
    assert set(got_single) == set(want) == set(got_sharded)
    for k in want:
        np.testing.assert_array_equal(got_single[k], want[k], err_msg=k)
        np.testing.assert_array_equal(got_sharded[k], want[k], err_msg=k)
    # Stacked per-kind parameters: one leading entry per block.
    assert got_single["transformer_blocks.attn.to_q.kernel"].shape == (2, 32, 32)
    assert got_single["single_transformer_blocks.attn.to_qkv_mlp_proj.kernel"].shape == (
        1,
        32,
        3 * 32 + 2 * 96,
    )


def test_bfloat16_checkpoint_from_a_pipeline_folder(reference):
    model, root = reference
    bf16 = flux2.from_pretrained(root / "bf16", dtype=jnp.bfloat16)  # finds bf16/transformer
    as_f32 = flux2.from_pretrained(root / "bf16", dtype=jnp.float32)
    want = expected_params(load_file(root / "bf16" / "transformer" / weights.WEIGHTS_NAME), bf16.config)
    for k, v in flat_params(bf16).items():
        assert v.dtype == jnp.bfloat16, k
        np.testing.assert_array_equal(v.astype(np.float32), want[k], err_msg=k)
    for k, v in flat_params(as_f32).items():
        assert v.dtype == np.float32, k
        np.testing.assert_array_equal(v, want[k], err_msg=k)

    # A bfloat16 forward runs in bfloat16 and stays close to the float32 reference.
    img_ids, txt_ids = flux2.make_position_ids(2, 3, 4, [(2, 2)])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, img_ids.shape[0], 16), np.float32)
    e = rng.standard_normal((2, 4, 24), np.float32)
    t, g = np.array([0.2, 0.7], np.float32), np.array([2.0, 4.0], np.float32)
    with torch.no_grad():
        want_out = model(
            hidden_states=torch.tensor(x),
            encoder_hidden_states=torch.tensor(e),
            timestep=torch.tensor(t),
            img_ids=torch.tensor(img_ids),
            txt_ids=torch.tensor(txt_ids),
            guidance=torch.tensor(g),
            return_dict=False,
        )[0].numpy()
    graphdef, state = nnx.split(bf16)
    fwd = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    out = fwd(state, jnp.asarray(x), jnp.asarray(e), jnp.asarray(t), img_ids, txt_ids, jnp.asarray(g))
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - want_out).max()
    assert err < 0.05 * np.abs(want_out).max(), err


def test_weights_land_in_their_target_shardings(reference):
    model, root = reference
    mesh = runtime.make_mesh(2, 2, 2)
    ours = flux2.from_pretrained(root / "single", mesh=mesh)
    q = ours.transformer_blocks.attn.to_q.kernel.get_value()  # (layers, embed, heads)
    assert q.sharding.mesh == mesh and q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 16)}
    x = ours.x_embedder.kernel.get_value()
    assert {s.data.shape for s in x.addressable_shards} == {(16, 16)}
    want = expected_params(model.state_dict(), ours.config)
    for k, v in flat_params(ours).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


def _corrupt(src, dst):
    shutil.copytree(src, dst)
    file = dst / weights.WEIGHTS_NAME
    sd = load_file(file)
    del sd["transformer_blocks.1.attn.to_k.weight"]
    sd["transformer_blocks.0.attn.extra_proj.weight"] = torch.zeros(2, 2)
    sd["proj_out.weight"] = torch.zeros(16, 31)
    save_file(sd, file)


def test_mismatched_checkpoint_lists_every_offending_tensor(reference, tmp_path):
    _, root = reference
    _corrupt(root / "single", tmp_path / "bad")
    with pytest.raises(ValueError) as err:
        flux2.from_pretrained(tmp_path / "bad")
    msg = str(err.value)
    assert "missing (1): ['transformer_blocks.1.attn.to_k.weight']" in msg
    assert "unexpected (1): ['transformer_blocks.0.attn.extra_proj.weight']" in msg
    assert "proj_out.weight: file (16, 31), expected (16, 32)" in msg


def test_bad_folders_and_configs_raise_clear_errors(reference, tmp_path):
    _, root = reference
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*not a diffusers transformer folder"):
        flux2.from_pretrained(tmp_path / "empty")

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(root / "single" / weights.CONFIG_NAME, no_weights)
    with pytest.raises(FileNotFoundError, match="no_weights has no diffusion_pytorch_model.safetensors"):
        flux2.from_pretrained(no_weights)

    lost_shard = tmp_path / "lost_shard"
    shutil.copytree(root / "sharded", lost_shard)
    next(lost_shard.glob("*-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shards that do not exist"):
        flux2.from_pretrained(lost_shard)

    unsupported = tmp_path / "unsupported"
    shutil.copytree(root / "single", unsupported)
    cfg = json.loads((unsupported / weights.CONFIG_NAME).read_text())
    (unsupported / weights.CONFIG_NAME).write_text(json.dumps({**cfg, "patch_size": 2}))
    with pytest.raises(ValueError, match=r"unsupported.*config.json.*patch_size=2"):
        flux2.from_pretrained(unsupported)
