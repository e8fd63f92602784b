"""Loading an OmniGen2 model folder: transformer, FLUX.1 VAE, Qwen2.5-VL text encoder and tokenizer.

An OmniGen2 folder (the released ``OmniGen2/OmniGen2`` snapshot, or ``OmniGen2Pipeline.save_pretrained``'s
output) holds ``model_index.json`` (``_class_name`` "OmniGen2Pipeline") and the component folders
``transformer/``, ``vae/``, ``mllm/``, ``processor/`` and ``scheduler/``. :func:`check_folder` validates the
layout (every config readable, every safetensors header whole) before anything is loaded and names every
problem in one error; :func:`check_consistency` checks from the configs that the components fit together;
:func:`load_omnigen2` does both, then loads them.

The sampling schedule is not read from the folder: ``sfgrpo.sampling.schedule.omnigen2_sigmas`` implements
OmniGen2's own ``FlowMatchEulerDiscreteScheduler`` with ``dynamic_time_shift``, so the folder's scheduler
config is checked to be that one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from sfgrpo.models import omnigen2, omnigen2_weights, qwen2_5_vl, vae_flux1, weights
from sfgrpo.models.klein import Component, read_json
from sfgrpo.models.omnigen2 import OmniGen2Transformer
from sfgrpo.models.omnigen2_prompts import DEFAULT_MAX_LENGTH, OmniGen2PromptTokenizer
from sfgrpo.models.qwen2_5_vl import Qwen2_5_VLTextEncoder, load_qwen2_5_vl
from sfgrpo.models.vae_flux1 import Flux1VAE, load_flux1_vae

log = logging.getLogger(__name__)

PIPELINE_CLASS = "OmniGen2Pipeline"
INDEX_NAME = "model_index.json"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


class OmniGen2FolderError(ValueError):
    """An OmniGen2 folder that is missing parts, has broken files, or whose parts do not fit together."""


_COMPONENTS = {
    "transformer": Component(
        "config.json",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
        "the OmniGen2Transformer2DModel",
    ),
    "vae": Component(
        "config.json",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
        "the AutoencoderKL (FLUX.1 VAE)",
    ),
    "mllm": Component(
        "config.json",
        ("model.safetensors", "model.safetensors.index.json"),
        "the Qwen2_5_VLForConditionalGeneration",
    ),
    "processor": Component(
        "tokenizer_config.json", ("tokenizer.json", "vocab.json"), "the Qwen2.5-VL processor's tokenizer"
    ),
    "scheduler": Component("scheduler_config.json", (), "OmniGen2's FlowMatchEulerDiscreteScheduler"),
}

# OmniGen2's scheduler's only settings, and the values omnigen2_sigmas implements (a key the file omits
# takes the scheduler's default, which is this value).
_SCHEDULER = {"num_train_timesteps": 1000, "dynamic_time_shift": True}


@dataclasses.dataclass
class OmniGen2Parts:
    """The loaded components of an OmniGen2 folder.

    text_encoder is None when loaded with ``text_encoder=False`` (text features come precomputed).
    """

    transformer: OmniGen2Transformer
    vae: Flux1VAE
    text_encoder: Qwen2_5_VLTextEncoder | None
    tokenizer: OmniGen2PromptTokenizer
    folder: Path


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; raises OmniGen2FolderError naming it."""
    return read_json(file, OmniGen2FolderError)


def is_omnigen2_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder whose model_index.json names the OmniGen2 pipeline (for dispatch;
    nothing else is checked, see ``check_folder``)."""
    index = Path(path).expanduser() / INDEX_NAME
    if not index.is_file():
        return False
    try:
        return _read_json(index).get("_class_name") == PIPELINE_CLASS
    except OmniGen2FolderError:
        return False


def check_folder(path: str | os.PathLike) -> Path:
    """Resolves and validates an OmniGen2 folder; returns it as a Path.

    Checks model_index.json (an OmniGen2Pipeline), that each component folder holds its config and weights,
    that the configs are JSON objects and that every safetensors file is whole (headers only; nothing is
    loaded). Raises ``OmniGen2FolderError`` listing every problem and what was expected there.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise OmniGen2FolderError(f"OmniGen2 folder {str(folder)!r} does not exist or is not a directory")
    missing, broken = [], []
    index_file = folder / INDEX_NAME
    if not index_file.is_file():
        missing.append(f"{INDEX_NAME} (the pipeline index: OmniGen2Pipeline.save_pretrained writes it)")
    else:
        try:
            cls = _read_json(index_file).get("_class_name")
            if cls != PIPELINE_CLASS:
                broken.append(f"{INDEX_NAME}: pipeline class {cls!r}, expected {PIPELINE_CLASS!r}")
        except OmniGen2FolderError as err:
            broken.append(str(err))
    for name, comp in _COMPONENTS.items():
        sub = folder / name
        if not sub.is_dir():
            files = ["one of " + "/".join(comp.files)] if comp.files else []
            missing.append(f"{name}/ ({comp.what}: {' and '.join([comp.config, *files])})")
            continue
        if not (sub / comp.config).is_file():
            missing.append(f"{name}/{comp.config} ({comp.what}'s config)")
        else:
            try:
                _read_json(sub / comp.config)
            except OmniGen2FolderError as err:
                broken.append(str(err))
        if comp.files and not any((sub / f).is_file() for f in comp.files):
            missing.append(f"{name}/{' or '.join(comp.files)} ({comp.what}'s files)")
        elif comp.files and comp.files[0].endswith(".safetensors"):
            try:
                for file in weights.weight_files(sub, comp.files[0]):
                    weights.read_safetensors_header(file)
            except (OSError, ValueError, KeyError) as err:
                broken.append(str(err))
    if missing or broken:
        parts = []
        if missing:
            parts.append("missing: " + "; ".join(missing))
        if broken:
            parts.append("broken: " + "; ".join(broken))
        raise OmniGen2FolderError(f"{str(folder)!r} is not a complete OmniGen2 folder; " + "; ".join(parts))
    return folder


def check_consistency(folder: Path) -> None:
    """Checks from the configs alone that the components fit together; raises ``OmniGen2FolderError``
    naming every problem.

    The transformer's in_channels (and out_channels) == the VAE's latent_channels (the transformer packs
    2x2 latent patches itself); its text_feat_dim == the mllm's text hidden size (the features are the
    last hidden state); the scheduler is OmniGen2's dynamic-time-shift flow-match Euler scheduler.
    """
    problems = []
    configs = {}
    parsers = {
        "transformer": lambda: omnigen2_weights.read_config(folder / "transformer"),
        "vae": lambda: vae_flux1.config_from_dict(
            _read_json(folder / "vae" / "config.json"), source=str(folder / "vae" / "config.json")
        ),
        "mllm": lambda: qwen2_5_vl.read_config(folder / "mllm"),
    }
    for name, parse in parsers.items():
        try:
            configs[name] = parse()
        except (OSError, ValueError) as err:
            problems.append(str(err))
    tcfg, vcfg, qcfg = (configs.get(k) for k in ("transformer", "vae", "mllm"))
    if tcfg is not None and vcfg is not None:
        for field, value in (("in_channels", tcfg.in_channels), ("out_channels", tcfg.out_channels)):
            if value is not None and value != vcfg.latent_channels:
                problems.append(f"transformer {field}={value} != VAE latent_channels={vcfg.latent_channels}")
    if tcfg is not None and qcfg is not None and tcfg.text_feat_dim != qcfg.hidden_size:
        problems.append(
            f"transformer text_feat_dim={tcfg.text_feat_dim} != mllm text hidden_size={qcfg.hidden_size}"
        )
    file = folder / "scheduler" / _COMPONENTS["scheduler"].config
    try:
        cfg = _read_json(file)
        if cfg.get("_class_name") != SCHEDULER_CLASS:
            problems.append(f"{file}: scheduler {cfg.get('_class_name')!r}, expected {SCHEDULER_CLASS!r}")
        else:
            wrong = [
                f"{k}={cfg[k]!r} (need {v!r})" for k, v in _SCHEDULER.items() if k in cfg and cfg[k] != v
            ]
            # Another key is another scheduler's setting (diffusers' FlowMatchEulerDiscreteScheduler has
            # shift, use_dynamic_shifting, ...): not the schedule omnigen2_sigmas implements.
            wrong += [
                f"{k} (not a setting of OmniGen2's scheduler)"
                for k in cfg
                if k[0] != "_" and k not in _SCHEDULER
            ]
            if wrong:
                problems.append(
                    f"{file}: unsupported scheduler settings (sfgrpo samples OmniGen2's): {wrong}"
                )
    except OmniGen2FolderError as err:
        problems.append(str(err))
    if problems:
        raise OmniGen2FolderError(f"{str(folder)!r}: components do not fit together: " + "; ".join(problems))


def load_omnigen2(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    text_encoder: bool = True,
    max_text_length: int = DEFAULT_MAX_LENGTH,
    transformer: OmniGen2Transformer | None = None,
) -> OmniGen2Parts:
    """Loads an OmniGen2 model folder.

    Args:
      path: the model folder (see ``check_folder``).
      dtype: parameter dtype of the transformer, VAE and text encoder (float32 or bfloat16).
      mesh: the components are placed on it (the transformer and text encoder sharded by their logical
        axes, the VAE replicated). Default: one device.
      text_encoder: False skips the Qwen2.5-VL weights (text features come precomputed); the tokenizer is
        loaded either way.
      max_text_length: tokens per prompt, chat template included (prompts are right-padded to it; longer
        ones are truncated with a warning). It must leave room in the transformer's rotary tables
        (``axes_lens[0]``) for the reference image.
      transformer: a transformer to use instead of the folder's (trained weights on this base); it must
        have the folder's architecture.

    Raises:
      OmniGen2FolderError: a missing or broken component, or components that do not fit together (checked
        before any weights are read). The component loaders raise ``FileNotFoundError``/``ValueError`` for
        missing or mis-shaped tensors.
    """
    folder = check_folder(path)
    check_consistency(folder)
    expected = omnigen2_weights.read_config(folder / "transformer")
    if isinstance(max_text_length, bool) or not isinstance(max_text_length, int) or max_text_length < 1:
        raise ValueError(f"max_text_length must be a positive integer, got {max_text_length!r}")
    if max_text_length >= expected.axes_lens[0]:
        raise OmniGen2FolderError(
            f"max_text_length={max_text_length} leaves no room in the transformer's rotary table "
            f"(axes_lens[0]={expected.axes_lens[0]} positions for text plus reference images)"
        )
    if transformer is None:
        transformer = omnigen2.from_pretrained(folder / "transformer", dtype=dtype, mesh=mesh)
    elif transformer.config.architecture() != expected.architecture():
        raise OmniGen2FolderError(f"the transformer given is not {folder}'s: {transformer.config}")
    vae = load_flux1_vae(folder / "vae", dtype=dtype, mesh=mesh)
    encoder = load_qwen2_5_vl(folder / "mllm", dtype=dtype, mesh=mesh) if text_encoder else None
    tokenizer = OmniGen2PromptTokenizer(folder / "processor", max_length=max_text_length)
    # The loaded modules must agree with what their configs promised (check_consistency).
    cfg = transformer.config
    if vae.latent_channels != cfg.token_channels:
        raise OmniGen2FolderError(
            f"VAE token channels {vae.latent_channels} != the transformer's {cfg.token_channels} "
            f"(2x2 x in_channels)"
        )
    if encoder is not None and encoder.out_dim != cfg.text_feat_dim:
        raise OmniGen2FolderError(
            f"text encoder out_dim {encoder.out_dim} != transformer text_feat_dim {cfg.text_feat_dim}"
        )
    if encoder is not None and tokenizer.vocab_size > encoder.config.vocab_size:
        raise OmniGen2FolderError(
            f"the tokenizer has {tokenizer.vocab_size} ids, the mllm's embedding only "
            f"{encoder.config.vocab_size}"
        )
    return OmniGen2Parts(transformer, vae, encoder, tokenizer, folder)
