"""OmniGen2 folders (``omnigen2_folder``: layout check, config consistency, loading) and the prompt tokenizer
(``omnigen2_prompts``: the pipeline's chat template, right padding, truncation)."""

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_omnigen2 import build_tiny_omnigen2

from sfgrpo import runtime
from sfgrpo.models.omnigen2 import CONFIGS, OmniGen2Transformer
from sfgrpo.models.omnigen2_folder import (
    OmniGen2FolderError,
    check_consistency,
    check_folder,
    is_omnigen2_folder,
    load_omnigen2,
)
from sfgrpo.models.omnigen2_prompts import SYSTEM_PROMPT, OmniGen2PromptTokenizer

GOLDEN = Path(__file__).parent / "goldens" / "omnigen2_pipeline" / "settings.json"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_omnigen2(tmp_path_factory.mktemp("omnigen2") / "model")


@pytest.fixture
def copy(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit_json(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def test_complete_folder(folder, tmp_path):
    assert check_folder(folder) == folder
    check_consistency(folder)
    assert is_omnigen2_folder(folder) and is_omnigen2_folder(str(folder))
    assert not is_omnigen2_folder(tmp_path / "nowhere")
    klein = tmp_path / "klein"
    klein.mkdir()
    (klein / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    assert not is_omnigen2_folder(klein)
    (klein / "model_index.json").write_text("{not json")
    assert not is_omnigen2_folder(klein)


def test_names_every_missing_and_broken_part(copy):
    shutil.rmtree(copy / "transformer")
    shutil.rmtree(copy / "scheduler")
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (copy / "mllm" / "config.json").unlink()
    (copy / "processor" / "tokenizer.json").unlink()
    with pytest.raises(OmniGen2FolderError) as err:
        check_folder(copy)
    message = str(err.value)
    for part in (
        "transformer/ (the OmniGen2Transformer2DModel",
        "scheduler/ (OmniGen2's FlowMatchEulerDiscreteScheduler",
        "vae/diffusion_pytorch_model.safetensors or",
        "mllm/config.json",
        "processor/tokenizer.json or vocab.json",
    ):
        assert part in message, part
    assert "\n" not in message


def test_names_broken_files(copy):
    weights = copy / "mllm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted download
    (copy / "vae" / "config.json").write_text("{broken")
    (copy / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    with pytest.raises(OmniGen2FolderError) as err:
        check_folder(copy)
    message = str(err.value)
    assert "broken:" in message and "missing:" not in message
    assert "mllm/model.safetensors: header of" in message and "(truncated?)" in message
    assert "vae/config.json: cannot read JSON" in message
    assert "pipeline class 'Flux2KleinPipeline', expected 'OmniGen2Pipeline'" in message
    with pytest.raises(OmniGen2FolderError, match="does not exist"):
        check_folder(copy / "nowhere")


def test_consistency_names_every_mismatch(copy):
    _edit_json(copy / "transformer" / "config.json", text_feat_dim=32, in_channels=8)
    _edit_json(copy / "scheduler" / "scheduler_config.json", dynamic_time_shift=False, shift=3.0)
    with pytest.raises(OmniGen2FolderError) as err:
        check_consistency(copy)
    message = str(err.value)
    for part in (
        "transformer text_feat_dim=32 != mllm text hidden_size=24",
        "transformer in_channels=8 != VAE latent_channels=4",
        "dynamic_time_shift=False (need True)",
        "shift (not a setting of OmniGen2's scheduler)",
    ):
        assert part in message, part
    _edit_json(copy / "scheduler" / "scheduler_config.json", _class_name="EulerDiscreteScheduler")
    _edit_json(copy / "vae" / "config.json", _class_name="AutoencoderKLFlux2")
    with pytest.raises(OmniGen2FolderError) as err:
        check_consistency(copy)
    assert "scheduler 'EulerDiscreteScheduler'" in str(err.value)
    assert "unsupported VAE class 'AutoencoderKLFlux2'" in str(err.value)
    with pytest.raises(OmniGen2FolderError, match="components do not fit together"):
        load_omnigen2(copy)  # checked before any weight is read


def test_load(folder):
    parts = load_omnigen2(folder, text_encoder=False, max_text_length=32)
    assert parts.text_encoder is None and parts.folder == folder
    assert parts.transformer.config.text_feat_dim == 24 and parts.vae.config.latent_channels == 4
    assert parts.tokenizer.max_length == 32 and parts.vae.config.scale == 16
    with pytest.raises(OmniGen2FolderError, match="max_text_length=320 leaves no room"):
        load_omnigen2(folder, text_encoder=False, max_text_length=320)
    with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        # Abstract (no weights): only its config is compared.
        other = nnx.eval_shape(lambda: OmniGen2Transformer(CONFIGS["tiny"], rngs=nnx.Rngs(0)))
    with pytest.raises(OmniGen2FolderError, match="the transformer given is not"):
        load_omnigen2(folder, text_encoder=False, transformer=other)
    # The folder's own architecture under other execution options is the folder's transformer.
    own = nnx.clone(parts.transformer)
    own.config = own.config.replace(remat="dots", attention="blockwise", scan_unroll=4)
    assert load_omnigen2(folder, text_encoder=False, transformer=own).transformer is own


# --- the tokenizer ----------------------------------------------------------------------------------------


def test_chat_template_as_the_pipeline(folder):
    tok = OmniGen2PromptTokenizer(folder, max_length=64)
    golden = json.loads(GOLDEN.read_text())
    prompt = golden["prompt"]
    expected = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
    assert tok.render(prompt) == expected == golden["rendered"]  # no generation prompt
    assert tok.render("") == golden["rendered_negative"]
    ids, mask = tok([prompt, ""])
    assert ids.shape == mask.shape == (2, 64) and ids.dtype == mask.dtype == np.int32
    for row, key in enumerate(("ids", "negative_ids")):
        n = len(golden[key])
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding: valid tokens first
        assert ids[row, :n].tolist() == golden[key]
        assert (ids[row, n:] == tok.tokenizer.pad_token_id).all()


def test_truncation_warns(folder, caplog):
    tok = OmniGen2PromptTokenizer(folder / "processor", max_length=20)
    with caplog.at_level(logging.WARNING):
        ids, mask = tok(["Make the red cube blue."])
    assert ids.shape == (1, 20) and mask.all()
    assert "over max_length=20" in caplog.text and "Make the red cube blue." in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        OmniGen2PromptTokenizer(folder, max_length=64)(["Make the red cube blue."])
    assert not caplog.text


def test_tokenizer_bad_input(folder, tmp_path):
    tok = OmniGen2PromptTokenizer(folder, max_length=8)
    with pytest.raises(TypeError, match="sequence of strings"):
        tok("a bare string")
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        OmniGen2PromptTokenizer(folder, max_length=0)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        OmniGen2PromptTokenizer(tmp_path)
