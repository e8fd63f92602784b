"""Loading a FLUX.2-klein pipeline folder: components, their consistency, and clear errors."""

import json
import logging
import shutil

import jax.numpy as jnp
import pytest
from flax import nnx
from tiny_klein import QWEN_HIDDEN, VAE_LATENT_CHANNELS, build_tiny_klein

from sfgrpo import runtime
from sfgrpo.models import klein
from sfgrpo.models.flux2 import Flux2Transformer
from sfgrpo.models.prompts import PromptTokenizer
from sfgrpo.models.qwen3 import Qwen3TextEncoder
from sfgrpo.models.vae import Flux2VAE


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_klein(tmp_path_factory.mktemp("klein"))


@pytest.fixture
def copy(folder, tmp_path):
    """A writable copy of the tiny folder, to break."""
    return shutil.copytree(folder, tmp_path / "klein")


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_loads_every_component(folder):
    assert klein.check_folder(str(folder)) == folder
    parts = klein.load_klein(folder, max_text_length=32)
    assert isinstance(parts.transformer, Flux2Transformer)
    assert isinstance(parts.vae, Flux2VAE)
    assert isinstance(parts.text_encoder, Qwen3TextEncoder)
    assert isinstance(parts.tokenizer, PromptTokenizer)
    assert parts.is_distilled is True
    assert parts.folder == folder
    assert parts.transformer.config.in_channels == parts.vae.latent_channels == 4 * VAE_LATENT_CHANNELS
    assert parts.transformer.config.joint_attention_dim == parts.text_encoder.out_dim == 3 * QWEN_HIDDEN
    ids, mask = parts.tokenizer(["make it red"])
    assert ids.shape == mask.shape == (1, 32)
    assert parts.transformer.x_embedder.kernel[...].dtype == jnp.float32


def test_without_text_encoder_and_base_model(tmp_path):
    base = build_tiny_klein(tmp_path / "base", distilled=False)
    parts = klein.load_klein(base, text_encoder=False, dtype=jnp.bfloat16)
    assert parts.text_encoder is None
    assert parts.is_distilled is False
    assert parts.tokenizer.max_length == 512
    assert parts.transformer.x_embedder.kernel[...].dtype == jnp.bfloat16


def test_load_on_a_mesh(folder):
    mesh = runtime.make_mesh(2, 2, 2)
    parts = klein.load_klein(folder, mesh=mesh)
    for array in (
        parts.transformer.x_embedder.kernel[...],
        parts.vae.bn.running_mean[...],
        nnx.state(parts.text_encoder, nnx.Param).flat_state()[0][1][...],
    ):
        assert array.sharding.mesh.devices.size == 8, array.sharding


def test_missing_index_flag_warns(copy, caplog):
    index = copy / "model_index.json"
    data = json.loads(index.read_text())
    del data["is_distilled"]
    index.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="sfgrpo.models.klein"):
        parts = klein.load_klein(copy, text_encoder=False)
    assert parts.is_distilled is False
    assert "no is_distilled" in caplog.text


def test_a_kv_pipeline_folder_caches_its_references(copy, caplog):
    """A Flux2KleinKVPipeline folder (FLUX.2-klein-*-kv): its transformer runs with reference_kv; the
    pipeline samples without guidance and records no is_distilled, so it loads as distilled, silently. A
    trained transformer given for it takes the folder's mode."""
    index = copy / "model_index.json"
    data = json.loads(index.read_text())
    del data["is_distilled"]
    index.write_text(json.dumps(data | {"_class_name": "Flux2KleinKVPipeline"}))
    assert klein.uses_reference_kv(copy)
    with caplog.at_level(logging.WARNING, logger="sfgrpo.models.klein"):
        parts = klein.load_klein(copy, text_encoder=False)
    assert parts.transformer.config.reference_kv is True and parts.is_distilled is True
    assert "is_distilled" not in caplog.text
    given = nnx.clone(parts.transformer)
    given.config = given.config.replace(reference_kv=False, remat="dots")
    assert klein.load_klein(copy, text_encoder=False, transformer=given).transformer.config.reference_kv


def test_missing_components_are_all_listed(copy):
    shutil.rmtree(copy / "vae")
    (copy / "scheduler" / "scheduler_config.json").unlink()
    (copy / "text_encoder" / "model.safetensors").unlink()
    (copy / "model_index.json").unlink()
    with pytest.raises(klein.KleinFolderError) as err:
        klein.load_klein(copy)
    msg = str(err.value)
    assert str(copy) in msg
    for expected in (
        "model_index.json",
        "vae/ (the AutoencoderKLFlux2: config.json and one of diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/model.safetensors or model.safetensors.index.json",
    ):
        assert expected in msg
    for present in ("transformer/", "tokenizer/"):
        assert present not in msg


def test_not_a_folder(tmp_path):
    with pytest.raises(klein.KleinFolderError, match="does not exist or is not a directory"):
        klein.check_folder(tmp_path / "nowhere")


def test_other_pipeline_class(copy):
    _edit_json(copy / "model_index.json", _class_name="Flux2Pipeline")
    with pytest.raises(
        klein.KleinFolderError,
        match="pipeline class 'Flux2Pipeline', expected one of .'Flux2KleinPipeline', 'Flux2KleinKVPipe",
    ):
        klein.check_folder(copy)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"in_channels": 32}, "transformer in_channels=32 != VAE token channels 16"),
        ({"out_channels": 8}, "transformer out_channels=8 != VAE token channels 16"),
        (
            {"joint_attention_dim": 64},
            "joint_attention_dim=64 != text feature size 3 layers x hidden_size 32",
        ),
        ({"guidance_embeds": True}, "guidance_embeds=true"),
    ],
)
def test_inconsistent_transformer(copy, changes, expected):
    # Caught from the configs, before any weight (which no longer fit) is read.
    _edit_json(copy / "transformer" / "config.json", **changes)
    with pytest.raises(klein.KleinFolderError, match="components do not fit together") as err:
        klein.load_klein(copy)
    assert expected in str(err.value)


def test_inconsistent_vae(copy):
    _edit_json(copy / "vae" / "config.json", latent_channels=8)
    with pytest.raises(
        klein.KleinFolderError, match=r"in_channels=16 != VAE token channels 32 \(latent_channels=8"
    ):
        klein.load_klein(copy)


def test_unsupported_scheduler(copy):
    _edit_json(
        copy / "scheduler" / "scheduler_config.json", use_dynamic_shifting=False, use_karras_sigmas=True
    )
    with pytest.raises(klein.KleinFolderError, match="unsupported scheduler settings") as err:
        klein.load_klein(copy)
    assert "use_dynamic_shifting=False" in str(err.value) and "use_karras_sigmas=True" in str(err.value)


def test_bad_weights_name_the_component(copy):
    # A component whose config fits but whose weights do not: the component loader's error.
    (copy / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(
        (copy / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises((ValueError, FileNotFoundError), match="vae"):
        klein.load_klein(copy, text_encoder=False)
