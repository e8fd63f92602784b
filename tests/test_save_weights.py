"""Writing a transformer as a diffusers-format folder: FLUX.2 loads back in sfgrpo and in diffusers
unchanged, sharded as asked, in the dtype asked; OmniGen2 writes exactly upstream's tensor names and
config and loads back unchanged; and the folder fingerprint tells weights apart."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from diffusers import Flux2Transformer2DModel
from flax import nnx
from safetensors import safe_open

from sfgrpo import runtime
from sfgrpo.models import flux2, lora, save_weights, weights


@pytest.fixture(scope="module")
def model():
    with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        return flux2.Flux2Transformer.from_config("tiny", rngs=nnx.Rngs(3))


def _params(m):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m))}


def test_a_saved_folder_loads_back_unchanged_in_sfgrpo_and_diffusers(model, tmp_path):
    index = save_weights.save_transformer(model, tmp_path / "t", dtype=np.float32, max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "t").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    loaded = flux2.from_pretrained(tmp_path / "t")
    ours, back = _params(model), _params(loaded)
    assert ours.keys() == back.keys()
    for key, value in ours.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    theirs, info = Flux2Transformer2DModel.from_pretrained(tmp_path / "t", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    kernel = ours["transformer_blocks.attn.to_q.kernel"][1]  # block 1, (in, out)
    np.testing.assert_array_equal(theirs.transformer_blocks[1].attn.to_q.weight.detach().numpy(), kernel.T)
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["_class_name"] == "Flux2Transformer2DModel"
    assert not {"remat", "attention", "reference_kv", "scan_unroll"} & set(config)


def test_dtype_is_as_asked_and_attached_adapters_are_refused(model, tmp_path):
    save_weights.save_transformer(model, tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    (file,) = (tmp_path / "bf16").glob("*.safetensors")
    with safe_open(str(file), framework="numpy") as f:
        assert str(f.get_tensor("proj_out.weight").dtype) == "bfloat16"
    adapted = nnx.clone(model)
    lora.apply_lora(adapted, lora.LoRAConfig(rank=2, alpha=2.0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="merge the LoRA adapters first"):
        save_weights.save_transformer(adapted, tmp_path / "x", dtype=np.float32)
    nothing = save_weights.save_transformer(model, tmp_path / "y", dtype=np.float32, write=False)
    assert nothing["weight_map"] and not (tmp_path / "y").exists()


def test_fingerprint_is_the_weights_not_the_place(model, tmp_path):
    save_weights.save_transformer(model, tmp_path / "a", dtype=np.float32)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    other = nnx.clone(model)
    kernel = other.proj_out.kernel
    kernel.set_value(kernel.get_value() + 1e-3)
    save_weights.save_transformer(other, tmp_path / "b", dtype=np.float32)
    fingerprint = weights.folder_fingerprint(tmp_path / "a")
    assert weights.folder_fingerprint(tmp_path / "copy") == fingerprint
    assert weights.folder_fingerprint(tmp_path / "b") != fingerprint
    with pytest.raises(FileNotFoundError):
        weights.folder_fingerprint(tmp_path / "nowhere")


def test_an_omnigen2_transformer_is_written_as_upstream_writes_it(tmp_path):
    """The golden folder (written by upstream's save_pretrained) loaded, saved and loaded again: the same
    tensor names, shapes and values, the same architecture in config.json."""
    from pathlib import Path

    from sfgrpo.models import omnigen2

    golden = Path(__file__).parent / "goldens" / "omnigen2" / "mqa_two_references" / "transformer"
    model = omnigen2.from_pretrained(golden)
    save_weights.save_transformer(model, tmp_path / "transformer", dtype=np.float32, max_shard_bytes=200_000)
    with safe_open(golden / "diffusion_pytorch_model.safetensors", "np") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    ours = {}
    for file in sorted((tmp_path / "transformer").glob("*.safetensors")):
        with safe_open(file, "np") as f:
            ours.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)
    written = json.loads((tmp_path / "transformer" / "config.json").read_text())
    upstream = json.loads((golden / "config.json").read_text())
    assert written["_class_name"] == "OmniGen2Transformer2DModel"
    assert {k: written[k] for k in upstream if not k.startswith("_")} == {
        k: v for k, v in upstream.items() if not k.startswith("_")
    }
    again = omnigen2.from_pretrained(tmp_path)
    for (path, a), (_, b) in zip(_params(model).items(), _params(again).items(), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=path)
