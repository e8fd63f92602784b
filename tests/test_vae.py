"""The FLUX.2 VAE against diffusers' ``AutoencoderKLFlux2`` as ``Flux2KleinPipeline`` uses it: encode
(posterior mode, 2x2 patchify, BatchNorm normalisation, packing) and decode (the reverse, then
``vae.decode`` and x / 2 + 0.5), sharded batches, bf16 weights, and loader/input errors."""

import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from flax import nnx
from safetensors.torch import load_file, save_file

from sfgrpo import runtime
from sfgrpo.models import vae as vae_lib
from sfgrpo.models import vae_weights
from sfgrpo.models.weights import WEIGHTS_NAME

# Two tiny configs. "main": the real model's options (quant convs, mid-block attention, silu), scale
# 2 * 2 = 4. "variant": every option the other way (three blocks with a different decoder, gelu, no
# quant convs, no attention), scale 4 * 2 = 8.
TINY = {
    "main": dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ),
    "variant": dict(
        block_out_channels=(8, 8, 16),
        decoder_block_out_channels=(4, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        act_fn="gelu",
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        sample_size=32,
    ),
}
IMAGE_HW = {"main": (16, 24), "variant": (16, 32)}  # non-square, to catch transposed axes


def make_reference(name, seed=0):
    """A random diffusers VAE, weights moved away from init and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(**TINY[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        c = model.bn.running_mean.shape[0]
        model.bn.running_mean.copy_(0.5 * torch.randn(c))
        model.bn.running_var.copy_(0.5 + torch.rand(c))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    models = {}
    for name in TINY:
        models[name] = make_reference(name)
        models[name].save_pretrained(root / name)
    models["main"].save_pretrained(root / "sharded", max_shard_size="8KB")
    bf16 = make_reference("main").to(torch.bfloat16)
    bf16.save_pretrained(root / "pipeline" / "vae")  # pipeline layout, bf16 on disk
    return models, root


def images_for(name, batch=2, seed=1):
    h, w = IMAGE_HW[name]
    return np.random.default_rng(seed).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)


def torch_encode(model, images_u8, scale):
    """Flux2KleinPipeline: image_processor.preprocess, _encode_vae_image, _pack_latents."""
    processor = Flux2ImageProcessor(vae_scale_factor=scale)
    x = processor.preprocess(images_u8.astype(np.float32) / 255.0)
    assert tuple(x.shape[2:]) == images_u8.shape[1:3]  # no resizing happened
    pipe = types.SimpleNamespace(vae=model, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    with torch.no_grad():
        latents = Flux2KleinPipeline._encode_vae_image(pipe, image=x, generator=None)
    return Flux2KleinPipeline._pack_latents(latents).numpy()


def torch_decode(model, tokens, h, w):
    """The end of Flux2KleinPipeline.__call__: unpack, un-normalise, unpatchify, vae.decode; unclipped."""
    t = torch.from_numpy(tokens)
    ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(t.shape[0], t.shape[2], h, w))
    latents = Flux2KleinPipeline._unpack_latents_with_ids(t, ids, h, w)
    mean = model.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
    latents = Flux2KleinPipeline._unpatchify_latents(latents * std + mean)
    with torch.no_grad():
        sample = model.decode(latents, return_dict=False)[0]
    return sample


@pytest.mark.parametrize("name", list(TINY))
def test_encode_and_decode_match_the_pipeline(saved, name):
    models, root = saved
    ours = vae_lib.load_vae(root / name)
    scale = ours.config.scale
    assert scale == {"main": 4, "variant": 8}[name]
    images = images_for(name)
    h, w = ours.grid(*images.shape[1:3])
    assert (h, w) == (images.shape[1] // scale, images.shape[2] // scale)
    assert ours.latent_channels == 4 * TINY[name]["latent_channels"]

    want = torch_encode(models[name], images, scale)
    got = ours.encode(jnp.asarray(images))
    assert got.dtype == jnp.float32 and got.shape == want.shape == (2, h * w, ours.latent_channels)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    # Float images in [0, 1] are the same input as their uint8 counterparts.
    np.testing.assert_allclose(ours.encode(jnp.asarray(images / 255.0, jnp.float32)), got, atol=1e-5)

    tokens = np.random.default_rng(2).standard_normal(want.shape).astype(np.float32)
    sample = torch_decode(models[name], tokens, h, w)
    image = np.asarray(ours.decode(jnp.asarray(tokens), (h, w)))
    assert image.dtype == np.float32 and image.shape == (2, *images.shape[1:3], 3)
    np.testing.assert_allclose(image, (sample / 2 + 0.5).permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)
    # Not clipped (random weights overshoot), and clipping gives the pipeline's postprocess output.
    assert image.min() < 0.0 or image.max() > 1.0
    post = Flux2ImageProcessor(vae_scale_factor=scale).postprocess(sample, output_type="pt")
    np.testing.assert_allclose(np.clip(image, 0, 1), post.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)


def test_parameters_and_statistics(saved):
    models, root = saved
    ours = vae_lib.load_vae(root / "main")
    sd = models["main"].state_dict()
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(ours))}
    # Every diffusers tensor but the BatchNorm counter is one of ours.
    assert {vae_weights.diffusers_name(tuple(k.split("."))) for k in flat} == set(sd) - {
        "bn.num_batches_tracked"
    }
    conv = flat["encoder.down_blocks.0.resnets.0.conv1.kernel"].get_value()
    np.testing.assert_array_equal(
        conv, sd["encoder.down_blocks.0.resnets.0.conv1.weight"].numpy().transpose(2, 3, 1, 0)
    )
    q = flat["decoder.mid_block.attentions.0.to_q.kernel"].get_value()
    np.testing.assert_array_equal(q, sd["decoder.mid_block.attentions.0.to_q.weight"].numpy().T)
    # The BatchNorm statistics are buffers, not parameters: a trainer filtering nnx.Param skips them.
    params = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert "bn.running_mean" not in params and "bn.running_var" not in params
    assert len(params) == len(flat) - 2
    assert isinstance(flat["bn.running_var"], vae_lib.RunningStat)
    np.testing.assert_array_equal(flat["bn.running_var"].get_value(), sd["bn.running_var"].numpy())


def test_sharded_checkpoint_loads_the_same_weights(saved):
    _, root = saved
    assert (root / "sharded" / (WEIGHTS_NAME + ".index.json")).is_file()
    assert len(list((root / "sharded").glob("*.safetensors"))) > 2
    a, b = nnx.state(vae_lib.load_vae(root / "main")), nnx.state(vae_lib.load_vae(root / "sharded"))
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(va.get_value(), vb.get_value(), err_msg=str(pa))


def test_batch_sharded_over_eight_devices(saved):
    _, root = saved
    ours = vae_lib.load_vae(root / "main")
    images = images_for("main", batch=8, seed=3)
    grid = ours.grid(*images.shape[1:3])
    want_tokens = np.asarray(ours.encode(jnp.asarray(images)))
    want_images = np.asarray(ours.decode(jnp.asarray(want_tokens), grid))
    graphdef, state = nnx.split(ours)
    mesh = runtime.make_mesh(-1, 1, 1)
    assert mesh.shape["data"] == 8

    @jax.jit
    def round_trip(state, images):
        model = nnx.merge(graphdef, state)
        tokens = model.encode(images)
        return tokens, model.decode(tokens, grid)

    with runtime.use_mesh(mesh):
        sharded = jax.device_put(jnp.asarray(images), runtime.batch_sharding(mesh, 4))
        tokens, decoded = round_trip(state, sharded)
    for out in (tokens, decoded):
        assert out.sharding.spec[0] == ("data", "fsdp")
        assert len(out.addressable_shards) == 8 and out.addressable_shards[0].data.shape[0] == 1
    np.testing.assert_allclose(np.asarray(tokens), want_tokens, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(decoded), want_images, atol=1e-5, rtol=0)
    # Loading onto the mesh places every variable replicated on its eight devices; a batch over both
    # ("data", "fsdp") with the module closed over (as the trainer's programs do) works the same.
    mesh = runtime.make_mesh(2, 4, 1)
    placed = vae_lib.load_vae(root / "main", mesh=mesh)
    for _, var in nnx.to_flat_state(nnx.state(placed)):
        assert var.get_value().sharding.is_fully_replicated and len(var.get_value().sharding.device_set) == 8
    with runtime.use_mesh(mesh):
        sharded = jax.device_put(jnp.asarray(images), runtime.batch_sharding(mesh, 4))
        tokens = jax.jit(placed.encode)(sharded)
    assert tokens.sharding.spec[0] == ("data", "fsdp") and tokens.addressable_shards[0].data.shape[0] == 1
    np.testing.assert_allclose(np.asarray(tokens), want_tokens, atol=1e-5, rtol=0)


def test_bfloat16_weights_from_a_pipeline_folder(saved):
    _, root = saved
    bf16 = vae_lib.load_vae(root / "pipeline", dtype=jnp.bfloat16)  # finds pipeline/vae
    f32 = vae_lib.load_vae(root / "pipeline", dtype=jnp.float32)
    file = load_file(root / "pipeline" / "vae" / WEIGHTS_NAME)
    for path, var in nnx.to_flat_state(nnx.state(bf16)):
        want_dtype = jnp.float32 if isinstance(var, vae_lib.RunningStat) else jnp.bfloat16
        assert var.get_value().dtype == want_dtype, path
    running_mean = bf16.bn.running_mean.get_value()
    np.testing.assert_array_equal(running_mean, file["bn.running_mean"].float().numpy())
    images = jnp.asarray(images_for("main"))
    grid = bf16.grid(*images.shape[1:3])
    tokens, tokens32 = bf16.encode(images), f32.encode(images)
    assert tokens.dtype == jnp.float32
    # Same weights (bf16 on disk), bf16 activations: close to the float32 run, not equal.
    assert 0 < float(jnp.max(jnp.abs(tokens - tokens32))) < 0.1 * float(jnp.max(jnp.abs(tokens32)))
    image, image32 = bf16.decode(tokens32, grid), f32.decode(tokens32, grid)
    assert image.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(image - image32))) < 0.1 * float(jnp.max(jnp.abs(image32)))


def _copy(root, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(root / name, dst)
    return dst


def test_missing_folder_config_and_weights(saved, tmp_path):
    _, root = saved
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        vae_lib.load_vae(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a diffusers VAE folder") as err:
        vae_lib.load_vae(tmp_path / "empty")
    assert str(tmp_path / "empty" / "vae" / "config.json") in str(err.value)
    folder = _copy(root, "main", tmp_path)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder} has no {WEIGHTS_NAME}"):
        vae_lib.load_vae(folder)


def test_missing_misshaped_and_unexpected_tensors(saved, tmp_path):
    _, root = saved
    folder = _copy(root, "main", tmp_path)
    tensors = load_file(folder / WEIGHTS_NAME)
    del tensors["decoder.up_blocks.0.upsamplers.0.conv.bias"]
    tensors["encoder.conv_in.weight"] = tensors["encoder.conv_in.weight"][:, :, :2, :2].contiguous()
    tensors["encoder.extra.weight"] = torch.zeros(3)
    save_file(tensors, folder / WEIGHTS_NAME)
    with pytest.raises(ValueError) as err:
        vae_lib.load_vae(folder)
    msg = str(err.value)
    assert str(folder) in msg and "does not match its config" in msg
    assert "missing (1): ['decoder.up_blocks.0.upsamplers.0.conv.bias']" in msg
    assert "unexpected (1): ['encoder.extra.weight']" in msg
    assert "encoder.conv_in.weight: file (8, 3, 2, 2), expected (8, 3, 3, 3)" in msg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"patch_size": [1, 1]}, "patch_size=(1, 1)"),
        ({"down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]}, "down_block_types"),
        ({"decoder_block_out_channels": [8, 16, 16]}, "decoder_block_out_channels"),
        ({"act_fn": "tanh"}, "act_fn='tanh'"),
        ({"norm_num_groups": 3}, "norm_num_groups=3"),
        ({"in_channels": 4}, "in_channels=4"),
        ({"scaling_factor": 0.3}, "unsupported AutoencoderKLFlux2 config fields ['scaling_factor']"),
        ({"_class_name": "AutoencoderKL"}, "unsupported VAE class 'AutoencoderKL'"),
    ],
)
def test_unsupported_config_values(saved, tmp_path, change, message):
    _, root = saved
    folder = _copy(root, "main", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match="config") as err:
        vae_lib.load_vae(folder)
    assert message in str(err.value) and str(folder / "config.json") in str(err.value)


def test_real_config_parses():
    real = {
        "_class_name": "AutoencoderKLFlux2",
        "_diffusers_version": "0.37.0.dev0",
        "act_fn": "silu",
        "batch_norm_eps": 0.0001,
        "batch_norm_momentum": 0.1,
        "block_out_channels": [128, 256, 512, 512],
        "decoder_block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 32,
        "layers_per_block": 2,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": 3,
        "patch_size": [2, 2],
        "sample_size": 1024,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": True,
        "use_quant_conv": True,
    }
    cfg = vae_lib.config_from_dict(real)
    assert cfg == vae_lib.Flux2VAEConfig(decoder_block_out_channels=(128, 256, 512, 512))
    vae = nnx.eval_shape(lambda: vae_lib.Flux2VAE(cfg, rngs=nnx.Rngs(0)))
    assert vae.latent_channels == 128 and vae.grid(1024, 768) == (64, 48)
    # Names and shapes agree with diffusers' model for this config, tensor by tensor.
    with torch.device("meta"):
        # force_upcast is a config entry AutoencoderKLFlux2.__init__ does not take (diffusers drops it).
        reference = AutoencoderKLFlux2(
            **{k: v for k, v in real.items() if k[0] != "_" and k != "force_upcast"}
        )
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k != "bn.num_batches_tracked"}
    flat = nnx.to_flat_state(nnx.state(vae))
    ours = {
        vae_weights.diffusers_name(p): vae_weights.torch_shape(v.get_value().shape, p[-1] == "kernel")
        for p, v in flat
    }
    assert ours == theirs and len(ours) == 250
    n = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(vae, nnx.Param)))
    assert n == 84_046_115  # the published parameter count of the FLUX.2 VAE


def test_bad_inputs(saved):
    _, root = saved
    ours = vae_lib.load_vae(root / "main")
    with pytest.raises(ValueError, match="image of 18x24 pixels: both sides must be positive multiples of 4"):
        ours.grid(18, 24)
    with pytest.raises(ValueError, match="image of 16x10 pixels"):
        ours.encode(jnp.zeros((1, 16, 10, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\)"):
        ours.encode(jnp.zeros((1, 16, 16, 4), jnp.uint8))
    with pytest.raises(ValueError, match=r"tokens must be \(B, 24, 16\) for grid \(4, 6\)"):
        ours.decode(jnp.zeros((1, 20, 16)), (4, 6))
