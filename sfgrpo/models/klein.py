"""Loading a diffusers FLUX.2-klein pipeline folder: transformer, VAE, Qwen3 text encoder and tokenizer.

A pipeline folder (what ``Flux2KleinPipeline.save_pretrained`` writes, or a hub snapshot) holds
``model_index.json`` and one sub-folder per component. :func:`check_folder` validates the layout before
anything is read, and :func:`load_klein` checks that the components fit together (from their configs, so
before any weight is loaded) and loads them.

The sampling schedule is not read from the folder: ``sfgrpo.sampling.schedule.flux2_sigmas`` implements
the klein scheduler (FlowMatchEulerDiscreteScheduler with dynamic, exponential time shifting), so the
folder's scheduler config is checked to be that one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from sfgrpo.models import flux2, weights
from sfgrpo.models.flux2 import Flux2Transformer
from sfgrpo.models.prompts import PromptTokenizer
from sfgrpo.models.qwen3 import Qwen3TextEncoder, load_qwen3, normalize_layers
from sfgrpo.models.vae import Flux2VAE, load_vae

log = logging.getLogger(__name__)

PIPELINE_CLASS = "Flux2KleinPipeline"
# FLUX.2-klein-*-kv: the same components, references attending only to themselves (Flux2Config.reference_kv).
KV_PIPELINE_CLASS = "Flux2KleinKVPipeline"
PIPELINE_CLASSES = (PIPELINE_CLASS, KV_PIPELINE_CLASS)
INDEX_NAME = "model_index.json"
TEXT_LAYERS = (9, 18, 27)  # the pipeline's text_encoder_out_layers: hidden states stacked as text features


class KleinFolderError(ValueError):
    """A FLUX.2-klein folder that is missing parts, or whose parts do not fit together."""


@dataclasses.dataclass(frozen=True)
class Component:
    """What a component folder must hold: a config file, and weights or other files (any one of a set)."""

    config: str
    files: tuple[str, ...]
    what: str


_COMPONENTS = {
    "transformer": Component(
        "config.json",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
        "the Flux2Transformer2DModel",
    ),
    "vae": Component(
        "config.json",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
        "the AutoencoderKLFlux2",
    ),
    "text_encoder": Component(
        "config.json", ("model.safetensors", "model.safetensors.index.json"), "the Qwen3ForCausalLM"
    ),
    "tokenizer": Component("tokenizer_config.json", ("tokenizer.json", "vocab.json"), "the Qwen2 tokenizer"),
    "scheduler": Component("scheduler_config.json", (), "the FlowMatchEulerDiscreteScheduler"),
}

# The scheduler settings flux2_sigmas implements; any other value changes the schedule.
_SCHEDULER = {
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "stochastic_sampling": False,
    "num_train_timesteps": 1000,
}


@dataclasses.dataclass
class KleinParts:
    """The loaded components of a FLUX.2-klein folder.

    text_encoder is None when loaded with ``text_encoder=False`` (text features come precomputed).
    is_distilled: the step-distilled klein (no classifier-free guidance), from model_index.json; always True
      for a Flux2KleinKVPipeline folder, which samples without guidance.
    """

    transformer: Flux2Transformer
    vae: Flux2VAE
    text_encoder: Qwen3TextEncoder | None
    tokenizer: PromptTokenizer
    is_distilled: bool
    folder: Path


def check_folder(path: str | os.PathLike) -> Path:
    """Resolves and validates a diffusers FLUX.2-klein pipeline folder; returns it as a Path.

    Checks model_index.json (a Flux2KleinPipeline) and that each component folder holds its config and
    weights. Raises ``KleinFolderError`` listing every missing part and what was expected there.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise KleinFolderError(f"FLUX.2-klein folder {str(folder)!r} does not exist or is not a directory")
    problems = []
    index_file = folder / INDEX_NAME
    if not index_file.is_file():
        problems.append(f"{INDEX_NAME} (the pipeline index: Flux2KleinPipeline.save_pretrained writes it)")
    else:
        cls = read_json(index_file).get("_class_name")
        if cls not in PIPELINE_CLASSES:
            raise KleinFolderError(
                f"{index_file}: pipeline class {cls!r}, expected one of {PIPELINE_CLASSES}"
            )
    for name, comp in _COMPONENTS.items():
        sub = folder / name
        if not sub.is_dir():
            files = ["one of " + "/".join(comp.files)] if comp.files else []
            expected = " and ".join([comp.config, *files])
            problems.append(f"{name}/ ({comp.what}: {expected})")
            continue
        if not (sub / comp.config).is_file():
            problems.append(f"{name}/{comp.config} ({comp.what}'s config)")
        if comp.files and not any((sub / f).is_file() for f in comp.files):
            problems.append(f"{name}/{' or '.join(comp.files)} ({comp.what}'s files)")
    if problems:
        raise KleinFolderError(
            f"{str(folder)!r} is not a complete FLUX.2-klein pipeline folder; missing: " + "; ".join(problems)
        )
    for name, comp in _COMPONENTS.items():
        if comp.files and comp.files[0].endswith(".safetensors"):
            _check_weight_files(folder / name, comp.files[0])
    return folder


def _check_weight_files(folder: Path, weights_name: str) -> None:
    """Every safetensors file of a component readable and whole (headers only; nothing is loaded)."""
    try:
        for file in weights.weight_files(folder, weights_name):
            weights.read_safetensors_header(file)
    except (OSError, ValueError, KeyError) as err:
        raise KleinFolderError(str(err)) from None


def read_json(file: Path, error: type[ValueError] = KleinFolderError) -> dict[str, Any]:
    """A JSON object from ``file``; raises ``error`` naming the file (a model folder's error class)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{file}: cannot read JSON ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_scheduler(folder: Path) -> None:
    file = folder / "scheduler" / _COMPONENTS["scheduler"].config
    cfg = read_json(file)
    if cfg.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise KleinFolderError(
            f"{file}: scheduler {cfg.get('_class_name')!r}, expected 'FlowMatchEulerDiscreteScheduler'"
        )
    # A key the file omits takes the scheduler class's default, which is the value listed here.
    wrong = [f"{k}={cfg[k]!r} (need {v!r})" for k, v in _SCHEDULER.items() if k in cfg and cfg[k] != v]
    if "use_dynamic_shifting" not in cfg:
        wrong.append("use_dynamic_shifting is absent (need true)")
    if wrong:
        raise KleinFolderError(f"{file}: unsupported scheduler settings (sfgrpo samples klein's): {wrong}")


def check_consistency(folder: Path, text_layers: tuple[int, ...] = TEXT_LAYERS) -> None:
    """Checks from the configs alone that the components fit together; raises ``KleinFolderError``.

    transformer in_channels (and out_channels) == 4 x VAE latent channels (2x2 packed latent patches);
    transformer joint_attention_dim == len(text_layers) x text encoder hidden size; no guidance embedding
    (klein has none; the pipeline passes guidance=None); the scheduler is klein's.
    """
    try:
        tcfg = weights.read_config(folder / "transformer")
    except ValueError as err:
        raise KleinFolderError(str(err)) from None
    vcfg = read_json(folder / "vae" / "config.json")
    qcfg = read_json(folder / "text_encoder" / "config.json")
    problems = []
    patch = vcfg.get("patch_size", (2, 2))
    if "latent_channels" not in vcfg or not isinstance(patch, list | tuple) or len(patch) != 2:
        problems.append(f"vae/config.json needs latent_channels and a 2-d patch_size, got {vcfg}")
    else:
        token_channels = int(vcfg["latent_channels"]) * int(patch[0]) * int(patch[1])
        for field, value in (("in_channels", tcfg.in_channels), ("out_channels", tcfg.out_dim)):
            if value != token_channels:
                problems.append(
                    f"transformer {field}={value} != VAE token channels {token_channels} "
                    f"(latent_channels={vcfg['latent_channels']} x patch {patch[0]}x{patch[1]})"
                )
    try:
        normalize_layers(text_layers, int(qcfg.get("num_hidden_layers", 0)))
    except ValueError as err:
        problems.append(f"config.model.text_layers {tuple(text_layers)}: {err}")
    if "hidden_size" not in qcfg:
        problems.append("text_encoder/config.json has no hidden_size")
    elif tcfg.joint_attention_dim != len(text_layers) * int(qcfg["hidden_size"]):
        problems.append(
            f"transformer joint_attention_dim={tcfg.joint_attention_dim} != text feature size "
            f"{len(text_layers)} layers x hidden_size {qcfg['hidden_size']} = "
            f"{len(text_layers) * int(qcfg['hidden_size'])}"
        )
    if tcfg.guidance_embeds:
        problems.append("transformer has guidance_embeds=true (a FLUX.2-dev transformer; klein has none)")
    if problems:
        raise KleinFolderError(f"{str(folder)!r}: components do not fit together: " + "; ".join(problems))
    _check_scheduler(folder)


def uses_reference_kv(folder: str | os.PathLike) -> bool:
    """Whether a checked klein folder is a ``Flux2KleinKVPipeline`` (its transformer's references attend
    only to themselves and are cached: ``Flux2Config.reference_kv``), by its model_index.json."""
    return read_json(Path(folder) / INDEX_NAME).get("_class_name") == KV_PIPELINE_CLASS


def load_klein(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    text_encoder: bool = True,
    max_text_length: int = 512,
    transformer: Flux2Transformer | None = None,
) -> KleinParts:
    """Loads a diffusers FLUX.2-klein pipeline folder.

    Args:
      path: the pipeline folder (see ``check_folder``).
      dtype: parameter dtype of the transformer, VAE and text encoder (float32 or bfloat16).
      mesh: the components are placed on it (the transformer and text encoder sharded by their logical
        axes, the VAE replicated). Default: one device.
      text_encoder: False skips the Qwen3 weights (text features come precomputed); the tokenizer is
        loaded either way.
      max_text_length: tokens per prompt (the pipeline's max_sequence_length, 512).
      transformer: a transformer to use instead of the folder's (trained weights on this base, from
        ``sfgrpo.trained``); it must have the folder's architecture.

    Raises:
      KleinFolderError: a missing component or components that do not fit together (checked before any
        weights are read). The component loaders raise ``FileNotFoundError``/``ValueError`` for missing or
        mis-shaped tensors.
    """
    folder = check_folder(path)
    check_consistency(folder)
    index = read_json(folder / INDEX_NAME)
    kv = uses_reference_kv(folder)
    if kv:
        # Flux2KleinKVPipeline samples without guidance (4 steps by default) and records no is_distilled.
        is_distilled = True
    else:
        if "is_distilled" not in index:
            log.warning(
                "%s has no is_distilled; as Flux2KleinPipeline, treating it as the base model", folder
            )
        is_distilled = bool(index.get("is_distilled", False))

    if transformer is None:
        transformer = flux2.from_pretrained(folder / "transformer", dtype=dtype, mesh=mesh, reference_kv=kv)
    else:
        expected = weights.read_config(folder / "transformer")
        if transformer.config.architecture() != expected.architecture():
            raise KleinFolderError(f"the transformer given is not {folder}'s: {transformer.config}")
        transformer.config = transformer.config.replace(reference_kv=kv)
    vae = load_vae(folder / "vae", dtype=dtype, mesh=mesh)
    encoder = None
    if text_encoder:
        encoder = load_qwen3(folder / "text_encoder", layers=TEXT_LAYERS, dtype=dtype, mesh=mesh)
    tokenizer = PromptTokenizer(folder / "tokenizer", max_length=max_text_length)

    # The loaded modules must agree with what their configs promised (check_consistency).
    cfg = transformer.config
    if vae.latent_channels != cfg.in_channels:
        raise KleinFolderError(f"VAE latent_channels {vae.latent_channels} != transformer {cfg.in_channels}")
    if encoder is not None and encoder.out_dim != cfg.joint_attention_dim:
        raise KleinFolderError(
            f"text encoder out_dim {encoder.out_dim} != transformer joint_attention_dim "
            f"{cfg.joint_attention_dim}"
        )
    return KleinParts(transformer, vae, encoder, tokenizer, is_distilled, folder)
