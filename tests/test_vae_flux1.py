"""The FLUX.1 VAE against diffusers' ``AutoencoderKL`` as OmniGen2 uses it: encode (posterior mode, then
``(z - shift) * scale``, then ``'c (h p1) (w p2) -> (h w) (p1 p2 c)'``), decode (the reverse, then
``vae.decode`` and x / 2 + 0.5), the loader (and its dispatch on ``_class_name``) and its errors."""

import dataclasses
import inspect
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from diffusers.image_processor import VaeImageProcessor
from flax import nnx
from safetensors.torch import load_file, save_file

from sfgrpo import runtime
from sfgrpo.models import vae as vae_lib
from sfgrpo.models import vae_flux1, vae_weights
from sfgrpo.models.weights import WEIGHTS_NAME

# Tiny configs. "flux1": FLUX.1's options (16 latent channels, no quant convs, mid-block attention) with
# four blocks, so the scale is 16 as for the real model. "quant": 4 latent channels with both quant convs,
# gelu, no attention, three blocks (scale 8). "mixed": only the encoder's quant conv, no shift factor.
TINY = {
    "flux1": dict(
        block_out_channels=(8, 8, 16, 16),
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ),
    "quant": dict(
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        act_fn="gelu",
        mid_block_add_attention=False,
        scaling_factor=0.5,
        shift_factor=-0.25,
    ),
    "mixed": dict(
        block_out_channels=(8, 16),
        latent_channels=6,
        use_quant_conv=True,
        use_post_quant_conv=False,
        scaling_factor=1.7,
        shift_factor=None,
    ),
}
IMAGE_HW = {"flux1": (32, 48), "quant": (24, 40), "mixed": (12, 8)}  # non-square, to catch transposed axes
SCALE = {"flux1": 16, "quant": 8, "mixed": 4}


def make_reference(name, seed=0):
    """A random diffusers ``AutoencoderKL``, weights moved away from init."""
    cfg = TINY[name]
    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    model = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        **cfg,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_flux1")
    models = {}
    for name in TINY:
        models[name] = make_reference(name)
        models[name].save_pretrained(root / name)
    return models, root


def images_for(name, batch=2, seed=1):
    h, w = IMAGE_HW[name]
    return np.random.default_rng(seed).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)


def to_tokens(z):
    """einops ``'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'`` with p1 = p2 = 2, in torch."""
    b, c, hh, ww = z.shape
    x = z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 3, 5, 1)  # b h w p1 p2 c
    return x.reshape(b, (hh // 2) * (ww // 2), 4 * c)


def from_tokens(t, h, w):
    """einops ``'b (h w) (p1 p2 c) -> b c (h p1) (w p2)'``, in torch."""
    b, _, c4 = t.shape
    return t.reshape(b, h, w, 2, 2, c4 // 4).permute(0, 5, 1, 3, 2, 4).reshape(b, c4 // 4, 2 * h, 2 * w)


def torch_encode(model, images_u8, scale):
    """OmniGen2Pipeline.encode_vae with the posterior mode, then the transformer's patch embedding order."""
    x = VaeImageProcessor(vae_scale_factor=scale).preprocess(images_u8.astype(np.float32) / 255.0)
    assert tuple(x.shape[2:]) == images_u8.shape[1:3]  # no resizing happened
    cfg = model.config
    with torch.no_grad():
        z = model.encode(x).latent_dist.mode()
    if cfg.shift_factor is not None:
        z = z - cfg.shift_factor
    z = z * cfg.scaling_factor
    return to_tokens(z).numpy()


def torch_decode(model, tokens, h, w):
    """The end of OmniGen2Pipeline.processing (from tokens): unscale, unshift, vae.decode; unclipped."""
    cfg = model.config
    z = from_tokens(torch.from_numpy(tokens), h, w) / cfg.scaling_factor
    if cfg.shift_factor is not None:
        z = z + cfg.shift_factor
    with torch.no_grad():
        sample = model.decode(z, return_dict=False)[0]
    return (sample / 2 + 0.5).permute(0, 2, 3, 1).numpy()


def assert_close(got, want, what):
    """Max abs error relative to the reference's largest magnitude, at most 1e-5 (float32)."""
    got = np.asarray(got)
    assert got.shape == want.shape, what
    err = float(np.max(np.abs(got - want)))
    rel = err / float(np.max(np.abs(want)))
    print(f"{what}: max abs err {err:.3g}, relative {rel:.3g}")
    assert rel <= 1e-5, f"{what}: max abs err {err}, relative {rel}"


@pytest.mark.parametrize("name", list(TINY))
def test_encode_and_decode_match_diffusers(saved, name):
    models, root = saved
    ours = vae_lib.load_autoencoder(root / name)  # dispatches on _class_name "AutoencoderKL"
    assert type(ours) is vae_flux1.Flux1VAE
    assert ours.config.scale == SCALE[name] and ours.latent_channels == 4 * TINY[name]["latent_channels"]
    assert (ours.quant_conv is None, ours.post_quant_conv is None) == (
        not TINY[name].get("use_quant_conv", True),
        not TINY[name].get("use_post_quant_conv", True),
    )
    images = images_for(name)
    h, w = ours.grid(*images.shape[1:3])
    assert (h, w) == (images.shape[1] // SCALE[name], images.shape[2] // SCALE[name])

    want = torch_encode(models[name], images, SCALE[name])
    got = jax.jit(ours.encode)(jnp.asarray(images))
    assert got.dtype == jnp.float32 and got.shape == (2, h * w, ours.latent_channels)
    assert_close(got, want, f"{name} encode")
    if name == "mixed":  # float images in [0, 1] are the same input as their uint8 counterparts
        np.testing.assert_allclose(ours.encode(jnp.asarray(images / 255.0, jnp.float32)), got, atol=1e-5)

    tokens = np.random.default_rng(2).standard_normal(want.shape).astype(np.float32)
    image = jax.jit(ours.decode, static_argnums=1)(jnp.asarray(tokens), (h, w))
    assert image.dtype == jnp.float32 and image.shape == (2, *images.shape[1:3], 3)
    reference = torch_decode(models[name], tokens, h, w)
    assert_close(image, reference, f"{name} decode")
    assert float(image.min()) < 0.0 or float(image.max()) > 1.0  # not clipped


def test_token_order_is_omnigen2s():
    """Latent (c, y, x) goes to token (y // 2) * w + x // 2, channel ((y % 2) * 2 + x % 2) * C + c, which is
    einops' ``'c (h p1) (w p2) -> (h w) (p1 p2 c)'``; FLUX.2's order is (c p1 p2)."""
    einops = pytest.importorskip("einops")
    z = np.random.default_rng(0).standard_normal((2, 3, 4, 6)).astype(np.float32)  # (B, C, 2h, 2w)
    want = einops.rearrange(z, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=2, p2=2)
    np.testing.assert_array_equal(to_tokens(torch.from_numpy(z)).numpy(), want)
    nhwc = jnp.asarray(z.transpose(0, 2, 3, 1))
    tokens = np.asarray(vae_lib.patchify(nhwc, vae_flux1.Flux1VAE.token_order))
    np.testing.assert_array_equal(tokens, want)
    assert tokens[1, 1 * 3 + 2, (1 * 2 + 0) * 3 + 2] == z[1, 2, 3, 4]  # c=2, y=3, x=4; grid (2, 3)
    np.testing.assert_array_equal(vae_lib.unpatchify(jnp.asarray(tokens), (2, 3), "p1 p2 c"), nhwc)
    flux2 = einops.rearrange(z, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=2, p2=2)
    np.testing.assert_array_equal(vae_lib.patchify(nhwc, vae_lib.Flux2VAE.token_order), flux2)
    np.testing.assert_array_equal(vae_lib.unpatchify(jnp.asarray(flux2), (2, 3), "c p1 p2"), nhwc)


def test_round_trip_shapes_and_replicated_loading(saved):
    _, root = saved
    mesh = runtime.make_mesh(-1, 1, 1)
    ours = vae_flux1.load_flux1_vae(root / "mixed", mesh=mesh)
    for _, var in nnx.to_flat_state(nnx.state(ours)):
        assert var.get_value().sharding.is_fully_replicated and len(var.get_value().sharding.device_set) == 8
    images = images_for("mixed", batch=8, seed=3)
    grid = ours.grid(*images.shape[1:3])
    round_trip = jax.jit(lambda model, x: model.decode(model.encode(x), grid))
    with runtime.use_mesh(mesh):
        decoded = round_trip(ours, jax.device_put(jnp.asarray(images), runtime.batch_sharding(mesh, 4)))
    assert decoded.shape == images.shape and decoded.dtype == jnp.float32
    assert decoded.sharding.spec[0] == ("data", "fsdp") and decoded.addressable_shards[0].data.shape[0] == 1
    # bfloat16 parameters: float32 images all the same, close to the float32 model's.
    bf16 = vae_flux1.load_flux1_vae(root / "mixed", dtype=jnp.bfloat16)
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(bf16))} == {jnp.dtype(jnp.bfloat16)}
    want = np.asarray(decoded)[:2]
    got = round_trip(bf16, jnp.asarray(images[:2]))
    assert got.dtype == jnp.float32 and 0 < float(jnp.max(jnp.abs(got - want))) < 0.1 * np.abs(want).max()


def test_dispatch_and_flux2_folders(tmp_path):
    torch.manual_seed(0)
    AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    ).save_pretrained(tmp_path / "pipeline" / "vae")
    assert type(vae_lib.load_autoencoder(tmp_path / "pipeline")) is vae_lib.Flux2VAE
    # Each class's own loader refuses the other class.
    with pytest.raises(
        ValueError, match="unsupported VAE class 'AutoencoderKLFlux2'; expected 'AutoencoderKL'"
    ):
        vae_flux1.load_flux1_vae(tmp_path / "pipeline")
    config = tmp_path / "pipeline" / "vae" / "config.json"
    for cls in ("AutoencoderKLWan", None):
        d = {k: v for k, v in json.loads(config.read_text()).items() if k != "_class_name"}
        config.write_text(json.dumps(d if cls is None else {**d, "_class_name": cls}))
        with pytest.raises(ValueError, match=f"unsupported VAE class {cls!r}; expected one of") as err:
            vae_lib.load_autoencoder(tmp_path / "pipeline")
        assert str(config) in str(err.value) and "'AutoencoderKL', 'AutoencoderKLFlux2'" in str(err.value)


def _copy(root, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(root / name, dst)
    return dst


def test_missing_folder_config_and_weights(saved, tmp_path):
    _, root = saved
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        vae_flux1.load_flux1_vae(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a diffusers VAE folder") as err:
        vae_lib.load_autoencoder(tmp_path / "empty")
    assert str(tmp_path / "empty" / "vae" / "config.json") in str(err.value)
    folder = _copy(root, "quant", tmp_path)
    tensors = load_file(folder / WEIGHTS_NAME)
    del tensors["quant_conv.weight"], tensors["encoder.mid_block.resnets.1.conv2.bias"]
    save_file(tensors, folder / WEIGHTS_NAME)
    with pytest.raises(ValueError) as err:
        vae_flux1.load_flux1_vae(folder)
    msg = str(err.value)
    assert str(folder) in msg and "does not match its config" in msg
    assert "missing (2): ['encoder.mid_block.resnets.1.conv2.bias', 'quant_conv.weight']" in msg
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder} has no {WEIGHTS_NAME}"):
        vae_flux1.load_flux1_vae(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        vae_flux1.load_flux1_vae(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"latents_mean": [0.1] * 16}, "latents_mean=(0.1,"),
        ({"latents_std": [1.0] * 16}, "latents_std=(1.0,"),
        ({"scaling_factor": 0}, "scaling_factor=0 (must be finite and non-zero)"),
        ({"down_block_types": ["AttnDownEncoderBlock2D"] + ["DownEncoderBlock2D"] * 3}, "down_block_types"),
        ({"act_fn": "tanh"}, "act_fn='tanh'"),
        ({"norm_num_groups": 3}, "norm_num_groups=3"),
        ({"out_channels": 4}, "out_channels=4"),
        ({"patch_size": [2, 2]}, "unsupported AutoencoderKL config fields ['patch_size']"),
    ],
)
def test_unsupported_config_values(saved, tmp_path, change, message):
    _, root = saved
    folder = _copy(root, "flux1", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match="config") as err:
        vae_lib.load_autoencoder(folder)
    assert message in str(err.value) and str(folder / "config.json") in str(err.value)


def test_bad_inputs(saved):
    _, root = saved
    ours = vae_flux1.load_flux1_vae(root / "flux1")
    with pytest.raises(
        ValueError, match="image of 40x48 pixels: both sides must be positive multiples of 16"
    ):
        ours.grid(40, 48)
    with pytest.raises(ValueError, match="image of 32x40 pixels"):
        ours.encode(jnp.zeros((1, 32, 40, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\)"):
        ours.encode(jnp.zeros((32, 48, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\)"):
        ours.encode(jnp.zeros((1, 32, 48, 1), jnp.uint8))
    with pytest.raises(ValueError, match=r"tokens must be \(B, 6, 64\) for grid \(2, 3\)"):
        ours.decode(jnp.zeros((1, 6, 16)), (2, 3))


def test_real_config_and_diffusers_defaults():
    real = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0.dev0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 2,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }
    cfg = vae_flux1.config_from_dict(real)
    assert cfg == vae_flux1.Flux1VAEConfig() and cfg.scale == 16
    # A field the file lacks means what it means to diffusers (AutoencoderKL.__init__'s default).
    signature = inspect.signature(AutoencoderKL.__init__).parameters
    fields = {f.name for f in dataclasses.fields(vae_flux1.Flux1VAEConfig)}
    assert fields == set(signature) - {"self"}
    for name in fields:
        ours = vae_flux1.DIFFUSERS_DEFAULTS.get(name, getattr(vae_flux1.Flux1VAEConfig(), name))
        assert ours == signature[name].default, name
    assert vae_flux1.config_from_dict({"_class_name": "AutoencoderKL"}).latent_channels == 4
    vae = nnx.eval_shape(lambda: vae_flux1.Flux1VAE(cfg, rngs=nnx.Rngs(0)))
    assert vae.latent_channels == 64 and vae.grid(1024, 768) == (64, 48)
    # Names and shapes agree with diffusers' model for this config, tensor by tensor.
    with torch.device("meta"):
        reference = AutoencoderKL(**{k: v for k, v in real.items() if k[0] != "_"})
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = {
        vae_weights.diffusers_name(p): vae_weights.torch_shape(v.get_value().shape, p[-1] == "kernel")
        for p, v in nnx.to_flat_state(nnx.state(vae))
    }
    assert ours == theirs
    n = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(vae, nnx.Param)))
    assert n == sum(p.numel() for p in reference.parameters()) == 83_819_683  # the FLUX.1 VAE's count
