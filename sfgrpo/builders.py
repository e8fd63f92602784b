"""From an ml-collections config to the run's parts: checked settings, the policy, the data, the optimizer.

Every check of the config happens here, on the host, before anything compiles: a bad config ends the run
with a ``ConfigError`` that names the key and the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from sfgrpo.data import pipeline, shapes
from sfgrpo.iteration import Conditioner, Programs
from sfgrpo.models import lora
from sfgrpo.models.flux2 import Flux2Transformer
from sfgrpo.models.flux2_config import ATTENTION_IMPLS, REMAT_POLICIES
from sfgrpo.models.layers import scan_unroll_problem
from sfgrpo.models.policy import EditPolicy, OmniGen2EditPolicy
from sfgrpo.models.tiny import PixelAutoencoder, WordTextEncoder
from sfgrpo.rewards import reward_config
from sfgrpo.rl.loss import CREDIT_MODES
from sfgrpo.rl.step import GRPOSettings, master_weights
from sfgrpo.sampling.rollout import window_size
from sfgrpo.sampling.schedule import SCHEDULES
from sfgrpo.sampling.sde import STEP_KINDS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The CPU demo's tiny policy; FLUX.2-klein from a diffusers folder; OmniGen2 from its model folder.
MODELS = ("tiny", "klein", "omnigen2")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {problem}")


def batch_shards(config: ml_collections.ConfigDict, devices: int | None = None) -> int:
    """How many ways the batch is split: the mesh's data x fsdp size on ``devices`` (default: this run's)."""
    sizes = mesh_sizes(config, devices)
    return sizes["data"] * sizes["fsdp"]


class MeshError(ConfigError):
    """The config's mesh cannot be made from the devices present: the run is on the wrong machine."""


def mesh_sizes(
    config: ml_collections.ConfigDict, devices: int | None = None, processes: int | None = None
) -> dict[str, int]:
    """The mesh's {'data', 'fsdp', 'tensor'} sizes on ``devices`` (default: this run's), -1 resolved.

    Raises ConfigError naming the key for a size that is neither positive nor -1, and MeshError when the
    devices cannot make the mesh (``processes``, default this run's, only words the message).
    """
    m = config.mesh
    sizes: dict[str, int] = {}
    for axis in ("data", "fsdp", "tensor"):
        size = m[axis]
        _require(
            isinstance(size, int) and not isinstance(size, bool) and (size >= 1 or size == -1),
            f"mesh.{axis}",
            f"a positive size, or -1 for the devices the other axes leave; got {size!r}",
        )
        sizes[axis] = size
    free = [axis for axis, size in sizes.items() if size == -1]
    _require(
        len(free) <= 1, f"mesh.{free[-1]}" if free else "mesh", f"at most one axis may be -1, got {free}"
    )
    n = jax.device_count() if devices is None else devices
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if (free and n % fixed) or (not free and n != fixed):
        raise MeshError(f"config.mesh: {mesh_request(config)}, but {found_devices(n, processes)}")
    if free:
        sizes[free[0]] = n // fixed
    return sizes


def mesh_request(config: ml_collections.ConfigDict, devices: int | None = None) -> str:
    """What the mesh asks for, in words: 'data=2 x fsdp=4 x tensor=1 = 8 devices'; with a -1 axis and no
    ``devices`` to resolve it, 'data=-1 x fsdp=4 x tensor=1: a multiple of 4 devices'."""
    m = config.mesh
    text = f"data={m.data} x fsdp={m.fsdp} x tensor={m.tensor}"
    fixed = math.prod(s for s in (m.data, m.fsdp, m.tensor) if s != -1)
    if -1 not in (m.data, m.fsdp, m.tensor):
        return f"{text} = {fixed} devices"
    if devices is None:
        return f"{text} (-1: the rest) needs a multiple of {fixed} devices"
    return f"{text} (-1: the rest) = {devices} devices"


def found_devices(devices: int | None = None, processes: int | None = None) -> str:
    """'found 1 cpu device in 1 process': the devices and processes of this run (or those given)."""
    n = jax.device_count() if devices is None else devices
    p = jax.process_count() if processes is None else processes
    kind = jax.devices()[0].platform
    return f"found {n} {kind} device{'s' * (n != 1)} in {p} process{'es' * (p != 1)}"


def optimizer_steps_per_iteration(rl: ml_collections.ConfigDict, processes: int) -> int:
    """Optimizer steps one GRPO iteration takes: micro-batches of the global batch per rl.grad_accum, times
    rl.inner_epochs. With one, the update is on-policy (every ratio is exactly 1) and no clip range acts."""
    micro_count = rl.batch_size * processes // rl.micro_batch
    return micro_count // rl.grad_accum * rl.inner_epochs


def validate(config: ml_collections.ConfigDict, processes: int | None = None) -> None:
    """Checks the config against itself and the devices; raises ConfigError (MeshError: the mesh does not
    fit the devices). ``processes`` (default: this run's) multiplies rl.batch_size into the global batch."""
    # The mesh first: on the wrong machine, that is the one thing to say.
    shards = batch_shards(config)
    _validate_numbers(config)
    rl, s, d, m = config.rl, config.sampler, config.data, config.model
    _require(rl.credit in CREDIT_MODES, "rl.credit", f"must be one of {CREDIT_MODES}, got {rl.credit!r}")
    _require(rl.group_size >= 2, "rl.group_size", f"a group needs at least 2 rollouts, got {rl.group_size}")
    _require(
        rl.batch_size >= rl.group_size and rl.batch_size % rl.group_size == 0,
        "rl.batch_size",
        f"the per-host batch {rl.batch_size} must be a multiple of the group size rl.group_size="
        f"{rl.group_size}, so that every group stays whole",
    )
    global_batch = rl.batch_size * (jax.process_count() if processes is None else processes)
    _require(
        isinstance(rl.micro_batch, int) and rl.micro_batch >= 1,
        "rl.micro_batch",
        f"samples per micro-batch over all devices, >= 1; got {rl.micro_batch!r}",
    )
    _require(
        isinstance(rl.grad_accum, int) and rl.grad_accum >= 1,
        "rl.grad_accum",
        f"micro-batches per optimizer step, >= 1; got {rl.grad_accum!r}",
    )
    _require(
        rl.micro_batch >= shards and rl.micro_batch % shards == 0 and global_batch % rl.micro_batch == 0,
        "rl.micro_batch",
        f"{rl.micro_batch} must divide the global batch {global_batch} and be a multiple of the {shards} "
        "devices the batch is split over",
    )
    micro_count = global_batch // rl.micro_batch
    _require(
        rl.grad_accum >= 1 and micro_count % rl.grad_accum == 0,
        "rl.grad_accum",
        f"{rl.grad_accum} must divide the {micro_count} micro-batches of a batch",
    )
    _require(rl.inner_epochs >= 1, "rl.inner_epochs", f"must be >= 1, got {rl.inner_epochs}")
    for mode in CREDIT_MODES:
        lo, hi = getattr(rl, f"clip_range_{mode}")
        _require(
            0 < lo < 1 and hi > 0, f"rl.clip_range_{mode}", f"(lo, hi) needs 0 < lo < 1, hi > 0: {(lo, hi)}"
        )
    _require(rl.adv_std in ("group", "global"), "rl.adv_std", f"'group' or 'global', got {rl.adv_std!r}")
    _require(
        rl.kl_form in ("exact", "flow_grpo"), "rl.kl_form", f"'exact' or 'flow_grpo', got {rl.kl_form!r}"
    )
    _require(rl.kl_beta >= 0, "rl.kl_beta", f"must be >= 0, got {rl.kl_beta}")
    # Flow-GRPO's KL drops the (-dt) of an 'sde' step's variance; a 'cps' step has no such factor, so the
    # form would multiply its KL by |dt| < 1 and under-weight it.
    _require(
        not (rl.kl_form == "flow_grpo" and s.kind == "cps"),
        "rl.kl_form",
        "rl.kl_form='flow_grpo' drops the (-dt) factor of an 'sde' step's variance, which "
        "sampler.kind='cps' steps do not have; use rl.kl_form='exact' with 'cps'",
    )
    _require(0 <= rl.mix_lambda <= 1, "rl.mix_lambda", f"must lie in [0, 1], got {rl.mix_lambda}")
    # The credit study's controls: each takes something of another group.
    for key, control, role, taken in (
        ("token_map", "shuffled", "placebo", "region-to-token map"),
        ("rewards_from", "other_group", "no-signal control", "rewards"),
    ):
        value = rl.get(key, "own")
        _require(
            value in ("own", control),
            f"rl.{key}",
            f"'own' or '{control}' (the credit study's {role}), got {value!r}",
        )
        _require(
            value == "own" or global_batch >= 2 * rl.group_size,
            f"rl.{key}",
            f"'{control}' takes another group's {taken}: the global batch {global_batch} must hold at least "
            f"two groups of rl.group_size={rl.group_size}",
        )
    _require(
        s.kind in STEP_KINDS and s.kind != "ode",
        "sampler.kind",
        f"'sde' or 'cps' for training, got {s.kind!r}",
    )
    _require(s.num_steps >= 1, "sampler.num_steps", f"must be >= 1, got {s.num_steps}")
    _require(s.eval_steps >= 1, "sampler.eval_steps", f"must be >= 1, got {s.eval_steps}")
    _require(
        sampler_schedule(config) in SCHEDULES,
        "sampler.schedule",
        f"one of {SCHEDULES}, got {sampler_schedule(config)!r}",
    )
    _require(s.cfg_scale > 0, "sampler.cfg_scale", f"must be > 0 (1 = no guidance), got {s.cfg_scale}")
    _require(s.eta > 0, "sampler.eta", f"training needs noise: eta must be > 0, got {s.eta}")
    try:
        w = window_size(s.num_steps, s.window, s.window_size)
    except ValueError as err:
        raise ConfigError(f"config.sampler.window: {err}") from None
    if s.window == "random":
        _require(
            0 <= s.window_lo < s.window_hi and s.window_hi - 1 + w <= s.num_steps,
            "sampler.window_hi",
            f"a window of {w} steps starting in [{s.window_lo}, {s.window_hi}) does not fit in "
            f"{s.num_steps} steps",
        )
        # The last step lands on sigma' = 0: with noise there the judged image is noisy ('sde'), and its
        # log-prob is 0 yet it would count ('cps'). Windows end before it, as 'all_but_last' does.
        _require(
            s.window_hi - 1 + w <= s.num_steps - 1,
            "sampler.window_hi",
            f"sampler.window_hi={s.window_hi} and sampler.window_size={w} let a window starting at "
            f"{s.window_hi - 1} reach the last step ({s.num_steps - 1}, sigma' = 0); need "
            f"window_hi - 1 + window_size <= sampler.num_steps - 1 = {s.num_steps - 1}",
        )
    _require(d.source in ("shapes", "tfds"), "data.source", f"'shapes' or 'tfds', got {d.source!r}")
    _require(
        d.resolution % 16 == 0 and d.resolution > 0, "data.resolution", f"multiple of 16: {d.resolution}"
    )
    if d.source == "tfds":
        _require(bool(d.tfds_dir), "data.tfds_dir", "data.source='tfds' needs the dataset directory")
    else:
        _validate_shapes_task(config)
    _require(m.name in MODELS, "model.name", f"one of {MODELS}, got {m.name!r}")
    _require(m.dtype in DTYPES, "model.dtype", f"one of {tuple(DTYPES)}, got {m.dtype!r}")
    if m.name == "tiny":
        _validate_tiny(config)
    else:
        _validate_folder_model(config)
    _require(m.lora_rank >= 0, "model.lora_rank", f"must be >= 0, got {m.lora_rank}")
    kinds = reward_config.IN_GRAPH_KINDS + reward_config.HOST_KINDS
    _require(config.reward.kind in kinds, "reward.kind", f"one of {kinds}, got {config.reward.kind!r}")
    if config.reward.kind in reward_config.HOST_KINDS:
        try:
            reward_config.check_reward_config(config.reward)
        except ValueError as err:
            raise ConfigError(
                str(err) if str(err).startswith("config.") else f"config.reward: {err}"
            ) from None
    if config.reward.kind == "shapes":
        try:
            reward_config.shapes_reward_options(config.reward)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    _require(
        not (config.train.fuse_step and config.reward.kind in reward_config.HOST_KINDS),
        "train.fuse_step",
        f"one fused step needs an in-graph reward; reward.kind={config.reward.kind!r} is scored on the host",
    )
    _require(config.train.steps >= 1, "train.steps", f"must be >= 1, got {config.train.steps}")
    for key in ("eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
        _require(config.train[key] >= 1, f"train.{key}", f"must be >= 1, got {config.train[key]}")
    _require(
        config.train.eval_examples >= 0,
        "train.eval_examples",
        f"must be >= 0 (0: the whole test split), got {config.train.eval_examples}",
    )
    _validate_export(config)
    _validate_eval_benchmark(config)
    _require(config.warmstart.steps >= 0, "warmstart.steps", "must be >= 0")
    _require(
        config.warmstart.steps == 0 or config.warmstart.batch_size % shards == 0,
        "warmstart.batch_size",
        f"{config.warmstart.batch_size} must be a multiple of the {shards} batch devices",
    )


def _validate_export(config: ml_collections.ConfigDict) -> None:
    """train.export_format and export_every, checked at the start rather than when the run ends."""
    from sfgrpo import export  # noqa: PLC0415 - export imports this module

    t = config.train
    _require(
        t.export_format in export.TRAIN_FORMATS,
        "train.export_format",
        f"must be one of {export.TRAIN_FORMATS}, got {t.export_format!r}",
    )
    _require(
        isinstance(t.export_every, int) and not isinstance(t.export_every, bool) and t.export_every >= 0,
        "train.export_every",
        f"must be an integer >= 0 (0: only at the end), got {t.export_every!r}",
    )
    if t.export_format == "peft":
        try:
            export.check_format(config, "peft")
        except export.ExportError as err:
            raise ConfigError(f"train.export_format: {err}".replace("--format peft: ", "")) from None


def _validate_eval_benchmark(config: ml_collections.ConfigDict) -> None:
    """train.eval_benchmark's settings; the benchmark itself is read (and its judge asked) by the trainer."""
    from sfgrpo.evaluation import train_config  # noqa: PLC0415

    t = config.train
    for key in ("eval_benchmark", "eval_benchmark_judge_url", "eval_benchmark_judge_model"):
        _require(isinstance(t[key], str), f"train.{key}", f"must be a string, got {t[key]!r}")
    _require(
        t.eval_benchmark_protocol in train_config.PROTOCOLS,
        "train.eval_benchmark_protocol",
        f"must be one of {train_config.PROTOCOLS}, got {t.eval_benchmark_protocol!r}",
    )
    n = t.eval_benchmark_examples
    _require(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1,
        "train.eval_benchmark_examples",
        f"must be an integer >= 1 (the benchmark's first N examples), got {n!r}",
    )
    _require(
        t.eval_benchmark_box_format in train_config.BOX_FORMATS,
        "train.eval_benchmark_box_format",
        f"must be one of {train_config.BOX_FORMATS}, got {t.eval_benchmark_box_format!r}",
    )
    if not t.eval_benchmark:
        return
    if t.eval_benchmark_protocol == "shapes":
        _require(
            not (t.eval_benchmark_judge_url or t.eval_benchmark_judge_model),
            "train.eval_benchmark_judge_url",
            "the shapes protocol is scored by the run's reward, not a judge: leave the judge's url and "
            "model ''",
        )
        return
    _require(
        t.eval_benchmark_judge_url.startswith(("http://", "https://")),
        "train.eval_benchmark_judge_url",
        f"the {t.eval_benchmark_protocol!r} protocol asks a VLM judge: give its http(s) URL, got "
        f"{t.eval_benchmark_judge_url!r}",
    )
    _require(
        bool(t.eval_benchmark_judge_model),
        "train.eval_benchmark_judge_model",
        f"the {t.eval_benchmark_protocol!r} protocol asks a VLM judge: give its served model name",
    )


def _number(config: ml_collections.ConfigDict, key: str) -> float:
    section, _, name = key.rpartition(".")
    value = config[section][name] if section else config[name]
    _require(
        isinstance(value, int | float) and not isinstance(value, bool),
        key,
        f"must be a number, got {value!r}",
    )
    return value


def _validate_numbers(config: ml_collections.ConfigDict) -> None:
    """The numeric settings that need no other setting to be judged: rates, scales, counts. A NaN or an
    infinity here would train silently on nothing (lr=nan skips every step, scale=nan voids every reward),
    and a negative rate ascends the loss."""
    positive = ["rl.lr", "rl.max_grad_norm", "rl.adv_eps", "reward.scale", "sampler.eta", "sampler.cfg_scale"]
    non_negative = ["rl.weight_decay", "rl.kl_beta", "model.lora_alpha"]
    if config.warmstart.steps > 0:
        positive.append("warmstart.lr")
    for key in positive:
        value = _number(config, key)
        _require(math.isfinite(value) and value > 0, key, f"must be a finite number > 0, got {value}")
    for key in non_negative:
        value = _number(config, key)
        _require(math.isfinite(value) and value >= 0, key, f"must be a finite number >= 0, got {value}")
    # adv_clip = inf means no clipping.
    clip = _number(config, "rl.adv_clip")
    _require(clip > 0, "rl.adv_clip", f"must be > 0 (inf: no clipping), got {clip}")
    counts = {
        "rl.max_consecutive_skips": 1,
        "train.grid_rows": 0,
        "data.num_workers": 0,
        "data.r_max": 1,
        "seed": 0,
    }
    # -1: the run's seed.
    for key in ("data.seed", "warmstart.seed"):
        section, name = key.split(".")
        value = config[section].get(name, -1)
        _require(
            isinstance(value, int) and value >= -1,
            key,
            f"must be an integer >= 0, or -1 for the run's seed; got {value!r}",
        )
    if config.warmstart.steps > 0:
        counts["warmstart.batch_size"] = 1
        counts["warmstart.checkpoint_every"] = 1
    if config.data.source == "shapes":
        counts.update({"data.shapes_train": 1, "data.shapes_eval": 1})
    for key, least in counts.items():
        value = _number(config, key)
        _require(
            isinstance(value, int) and value >= least, key, f"must be an integer >= {least}, got {value!r}"
        )
    _require(
        config.rl.token_weights in ("boxes", "masks"),
        "rl.token_weights",
        f"'boxes' or 'masks', got {config.rl.token_weights!r}",
    )


def _validate_tiny(config: ml_collections.ConfigDict) -> None:
    m = config.model
    _require(
        m.transformer.joint_attention_dim == m.text_dim,
        "model.text_dim",
        f"{m.text_dim} must equal model.transformer.joint_attention_dim={m.transformer.joint_attention_dim}",
    )
    _require(
        m.pixel_pool >= 1 and 16 % m.pixel_pool == 0, "model.pixel_pool", f"1, 2, 4, 8 or 16: {m.pixel_pool}"
    )
    t = m.transformer
    _require(
        sum(t.axes_dims_rope) == t.attention_head_dim,
        "model.transformer.axes_dims_rope",
        f"{tuple(t.axes_dims_rope)} sums to {sum(t.axes_dims_rope)}, but RoPE rotates the whole head: "
        f"it must sum to model.transformer.attention_head_dim={t.attention_head_dim}",
    )
    _require(
        all(dim > 0 and dim % 2 == 0 for dim in t.axes_dims_rope),
        "model.transformer.axes_dims_rope",
        f"every axis needs a positive even size (RoPE rotates pairs), got {tuple(t.axes_dims_rope)}",
    )
    channels = PixelAutoencoder(pool=m.pixel_pool).latent_channels
    _require(
        m.transformer.in_channels == channels,
        "model.transformer.in_channels",
        f"{m.transformer.in_channels}, but the pixel autoencoder (pool {m.pixel_pool}) makes "
        f"{channels}-channel tokens",
    )


def _validate_folder_model(config: ml_collections.ConfigDict) -> None:
    """The settings of a model loaded from a folder (FLUX.2-klein, OmniGen2); the folder's own contents are
    checked when it is loaded."""
    m = config.model
    what = {"klein": "diffusers FLUX.2-klein", "omnigen2": "OmniGen2"}[m.name]
    _require(bool(m.folder), "model.folder", f"model.name={m.name!r} needs the {what} folder")
    _require(m.remat in REMAT_POLICIES, "model.remat", f"one of {REMAT_POLICIES}, got {m.remat!r}")
    problem = scan_unroll_problem(m.scan_unroll)
    _require(problem is None, "model.scan_unroll", str(problem))
    impls = tuple(a for a in ATTENTION_IMPLS if a is not None)
    _require(m.attention in impls, "model.attention", f"one of {impls}, got {m.attention!r}")
    if m.name == "klein":
        _require(
            len(m.text_layers) >= 1 and min(m.text_layers) >= 1,
            "model.text_layers",
            f"hidden-state indices >= 1, got {tuple(m.text_layers)}",
        )
    _require(m.max_text_tokens >= 1, "model.max_text_tokens", f"must be >= 1, got {m.max_text_tokens}")
    _require(
        m.prompt_cache_batch >= 1, "model.prompt_cache_batch", f"must be >= 1, got {m.prompt_cache_batch}"
    )
    if m.name == "omnigen2":
        # OmniGen2 was trained for its own schedule; FLUX.2's shift would sample it off its training times.
        _require(
            sampler_schedule(config) == "omnigen2",
            "sampler.schedule",
            f"model.name='omnigen2' needs its own schedule 'omnigen2', got {sampler_schedule(config)!r}",
        )


def grpo_settings(config: ml_collections.ConfigDict) -> GRPOSettings:
    """The static settings of the compiled GRPO iteration."""
    rl, s = config.rl, config.sampler
    return GRPOSettings(
        credit=rl.credit,
        clip_range=tuple(float(x) for x in rl[f"clip_range_{rl.credit}"]),
        adv_clip=float(rl.adv_clip),
        adv_std=rl.adv_std,
        adv_eps=float(rl.adv_eps),
        mix_lambda=float(rl.mix_lambda),
        kl_beta=float(rl.kl_beta),
        kl_form=rl.kl_form,
        eta=float(s.eta),
        sde_kind=s.kind,
        window_mode=s.window,
        window=window_size(s.num_steps, s.window, s.window_size),
        window_lo=int(s.window_lo),
        window_hi=int(s.window_hi),
        inner_epochs=int(rl.inner_epochs),
        micro_batch=int(rl.micro_batch),
        grad_accum=int(rl.grad_accum),
        batch_shards=batch_shards(config),
        score_scale=float(config.reward.scale),
        cfg_scale=float(s.cfg_scale),
        shapes_reward=(
            reward_config.shapes_reward_options(config.reward) if config.reward.kind == "shapes" else ()
        ),
        token_map_shift=int(rl.group_size) if rl.get("token_map", "own") == "shuffled" else 0,
        reward_shift=int(rl.group_size) if rl.get("rewards_from", "own") == "other_group" else 0,
    )


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    from sfgrpo import runtime  # noqa: PLC0415

    sizes = mesh_sizes(config)  # the config's errors, in its words, before runtime's
    try:
        return runtime.make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"])
    except ValueError as err:
        raise ConfigError(f"config.mesh: {err}") from None


# --- model --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    """The run's model: the policy, its conditioning, and the host-side text fields of a batch.

    ``text_fields(instructions (B,) str) -> dict`` of (B, ...) arrays: 'text_ids' (and 'text_mask'), or
    'text_embeds' from a prompt cache; the device batch carries them.
    """

    policy: EditPolicy | OmniGen2EditPolicy
    condition: Conditioner
    text_fields: Callable[[Sequence[str]], dict[str, np.ndarray]]


def text_length(config: ml_collections.ConfigDict) -> int:
    """Text tokens per instruction."""
    if config.model.name in ("klein", "omnigen2"):
        return int(config.model.max_text_tokens)
    return shapes.max_words(shapes_config(config))


def build_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, seed: int) -> Model:
    """The configured model on ``mesh``; call under ``runtime.use_mesh(mesh)``.

    'tiny' is randomly initialised from ``seed``; 'klein' and 'omnigen2' are loaded from ``model.folder``.
    """
    hw = (config.data.resolution, config.data.resolution)
    cfg = config.sampler.cfg_scale != 1.0
    if config.model.name == "tiny":
        policy = build_policy(config, seed)
        length = text_length(config)

        def text_fields(instructions: Sequence[str]) -> dict[str, np.ndarray]:
            return {"text_ids": tokenize(np.asarray(instructions, dtype=object), length)}

        uncond = {"text_ids": np.zeros((1, length), np.int32)} if cfg else None  # all padding
        condition = Conditioner(PixelAutoencoder(pool=config.model.pixel_pool), hw, length, uncond=uncond)
        return Model(policy, condition, text_fields)
    if config.model.name == "omnigen2":
        return _build_omnigen2(config, mesh, hw, cfg)
    return _build_klein(config, mesh, hw, cfg)


def _prompt_cache(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    tokens: Callable[[Sequence[str]], dict[str, np.ndarray]],
    text_encoder: Callable[[], nnx.Module],
    fingerprint: str,
) -> Any:
    """The prompt cache of every train and test instruction (``model.prompt_cache``), reused or built.

    Every instruction is encoded once; the text encoder is loaded only when a host lacks the cache and is
    dropped afterwards (nothing returned refers to it), so it does not stay in device memory while
    training. Each host encodes the same instructions as its rows of a global batch split over every
    device. ``tokens(instructions)`` gives 'text_ids' and 'text_mask'.
    """
    from sfgrpo import runtime  # noqa: PLC0415
    from sfgrpo.data import prompt_cache  # noqa: PLC0415

    m = config.model
    splits = ("train", "test")
    instructions = [t for s in splits for t in prompt_cache.split_instructions(data_source(config, s))]
    encoder: list[Any] = []
    per_host = -(-int(m.prompt_cache_batch) // jax.local_device_count()) * jax.local_device_count()

    def encode(texts: Sequence[str]) -> np.ndarray:
        if not encoder:
            graphdef, state = nnx.split(text_encoder())
            encoder.extend([jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask)), state])
        encode_jit, state = encoder
        arrays = runtime.host_local_to_global(tokens(texts), mesh)
        return runtime.global_to_host_local(encode_jit(state, arrays["text_ids"], arrays["text_mask"]))

    cache = prompt_cache.open_or_build(
        m.prompt_cache, instructions, encode, fingerprint=fingerprint, dtype=m.dtype, batch_size=per_host
    )
    encoder.clear()
    return cache


def _build_klein(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, hw: tuple[int, int], cfg: bool
) -> Model:
    from sfgrpo.models import flux2, klein, prompts, qwen3, vae  # noqa: PLC0415

    m = config.model
    dtype = DTYPES[m.dtype]
    layers = tuple(int(i) for i in m.text_layers)
    try:
        # Every component present, and their configs fit together, before any weights are read.
        folder = klein.check_folder(m.folder)
        klein.check_consistency(folder, layers)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config.model.folder: {err}") from None
    transformer = flux2.from_pretrained(
        folder,
        dtype=dtype,
        mesh=mesh,
        remat=m.remat,
        attention=m.attention,
        reference_kv=klein.uses_reference_kv(folder),
        scan_unroll=m.scan_unroll,
    )
    autoencoder = vae.load_vae(folder, dtype=dtype, mesh=mesh)
    tokenizer = prompts.PromptTokenizer(folder, max_length=int(m.max_text_tokens))
    length = int(m.max_text_tokens)

    def tokens(instructions: Sequence[str]) -> dict[str, np.ndarray]:
        ids, mask = tokenizer(list(instructions))
        return {"text_ids": ids, "text_mask": mask}

    def text_encoder() -> nnx.Module:
        return qwen3.load_qwen3(folder, layers=layers, dtype=dtype, mesh=mesh)

    if not m.prompt_cache:
        policy = EditPolicy(transformer, text_encoder(), autoencoder)
        uncond = tokens([""]) if cfg else None
        return Model(policy, Conditioner(autoencoder, hw, length, uncond=uncond), tokens)

    fingerprint = f"{folder}|layers={list(layers)}|tokens={length}|{m.dtype}"
    cache = _prompt_cache(config, mesh, tokens, text_encoder, fingerprint)

    def cached(instructions: Sequence[str]) -> dict[str, np.ndarray]:
        return {"text_embeds": cache.lookup(list(instructions))}

    uncond = {"text_embeds": cache.uncond} if cfg else None
    policy = EditPolicy(transformer, None, autoencoder)
    return Model(policy, Conditioner(autoencoder, hw, length, uncond=uncond), cached)


def _build_omnigen2(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, hw: tuple[int, int], cfg: bool
) -> Model:
    """OmniGen2 from ``model.folder``: its transformer, FLUX.1 VAE and Qwen2.5-VL text encoder (or the
    prompt cache of its features). Its text is masked, so every batch carries 'text_mask' (from the
    tokenizer, also with a cache: tokenizing is cheap on the host)."""
    from sfgrpo.models import omnigen2, omnigen2_folder, omnigen2_prompts, qwen2_5_vl, vae_flux1  # noqa: PLC0415

    m = config.model
    dtype = DTYPES[m.dtype]
    try:
        folder = omnigen2_folder.check_folder(m.folder)
        omnigen2_folder.check_consistency(folder)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config.model.folder: {err}") from None
    transformer = omnigen2.from_pretrained(
        folder, dtype=dtype, mesh=mesh, remat=m.remat, attention=m.attention, scan_unroll=m.scan_unroll
    )
    autoencoder = vae_flux1.load_flux1_vae(folder, dtype=dtype, mesh=mesh)
    length = int(m.max_text_tokens)
    tokenizer = omnigen2_prompts.OmniGen2PromptTokenizer(folder, max_length=length)
    condition = functools.partial(Conditioner, autoencoder, hw, length, masked_text=True)
    grid = autoencoder.grid(*hw)

    def tokens(instructions: Sequence[str]) -> dict[str, np.ndarray]:
        ids, mask = tokenizer(list(instructions))
        return {"text_ids": ids, "text_mask": mask}

    def text_encoder() -> nnx.Module:
        return qwen2_5_vl.load_qwen2_5_vl(folder, dtype=dtype, mesh=mesh)

    if not m.prompt_cache:
        policy = OmniGen2EditPolicy(transformer, text_encoder(), autoencoder, grid_hw=grid)
        return Model(policy, condition(uncond=tokens([""]) if cfg else None), tokens)

    fingerprint = f"{folder}|omnigen2|tokens={length}|{m.dtype}"
    cache = _prompt_cache(config, mesh, tokens, text_encoder, fingerprint)

    def cached(instructions: Sequence[str]) -> dict[str, np.ndarray]:
        return {
            "text_embeds": cache.lookup(list(instructions)),
            "text_mask": tokens(instructions)["text_mask"],
        }

    uncond = {"text_embeds": cache.uncond, "text_mask": tokens([""])["text_mask"]} if cfg else None
    policy = OmniGen2EditPolicy(transformer, None, autoencoder, grid_hw=grid)
    return Model(policy, condition(uncond=uncond), cached)


def build_policy(config: ml_collections.ConfigDict, seed: int) -> EditPolicy:
    """The tiny policy, randomly initialised; call under ``runtime.use_mesh`` to shard it."""
    m = config.model
    rngs = nnx.Rngs(seed)
    transformer = Flux2Transformer.from_config(dict(m.transformer), rngs=rngs, dtype=DTYPES[m.dtype])
    text = WordTextEncoder(len(shapes.VOCAB), m.text_dim, text_length(config), rngs=rngs)
    return EditPolicy(transformer, text)


def add_lora(policy: EditPolicy, config: ml_collections.ConfigDict, seed: int) -> list[str]:
    """Attaches LoRA adapters to the transformer when model.lora_rank > 0; returns the adapted paths."""
    m = config.model
    if m.lora_rank == 0:
        return []
    alpha = float(m.lora_alpha) if m.lora_alpha > 0 else 2.0 * m.lora_rank
    patterns = tuple(lora_patterns(m.lora_targets)) or lora.default_patterns(policy.transformer)
    try:
        return lora.apply_lora(
            policy.transformer, lora.LoRAConfig(m.lora_rank, alpha, patterns), rngs=nnx.Rngs(seed)
        )
    except ValueError as err:
        raise ConfigError(f"config.model.lora_targets: {err}") from None


def abstract_train_state(
    policy: Any, config: ml_collections.ConfigDict, optimizer: Any, key: jax.Array
) -> dict[str, Any]:
    """Shapes and shardings of the GRPO train state (adapters or weights, optimizer state, step, RNG), from
    the policy without changing it: the restore target of a checkpoint, known before the warm start."""

    def make(p: Any) -> dict[str, Any]:
        add_lora(p, config, config.seed + 2)
        _, params, _, _ = split_for_grpo(p, config)
        return {"params": params, "opt_state": optimizer.init(params)}

    return {**nnx.eval_shape(make, policy), "step": 0, "rng": key}


def grpo_filter(config: ml_collections.ConfigDict) -> Any:
    """What GRPO trains: the LoRA parameters, or every transformer parameter when lora_rank is 0."""
    if config.model.lora_rank > 0:
        return lora.LoRAParam
    return nnx.All(nnx.Param, nnx.PathContains("transformer"))


def split_for_grpo(
    policy: Any, config: ml_collections.ConfigDict
) -> tuple[Any, Any, Any, tuple[str, ...] | None]:
    """(graphdef, trainable params as float32 masters, frozen rest, compute dtypes or None): the policy
    split for GRPO. LoRA factors are float32 already; a full fine-tuning of a bf16 model trains float32
    copies of its weights (``step.master_weights``), and the frozen base stays in the model's dtype."""
    graphdef, params, frozen = nnx.split(policy, grpo_filter(config), ...)
    params, compute_dtypes = master_weights(params)
    return graphdef, params, frozen, compute_dtypes


def make_programs(
    config: ml_collections.ConfigDict,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    condition: Conditioner,
    compute_dtypes: tuple[str, ...] | None = None,
    shapes_reward: tuple[tuple[str, float | int], ...] | None = None,
) -> Programs:
    """The run's compiled programs for the config's settings, sampler and reward kind; ``compute_dtypes``
    as from ``step.master_weights`` when the trainable params are float32 masters of a bf16 model;
    ``shapes_reward`` replaces the settings' shapes-reward options (an evaluation's rescoring)."""
    settings = grpo_settings(config)
    if shapes_reward is not None:
        settings = dataclasses.replace(settings, shapes_reward=shapes_reward)
    return Programs(
        graphdef,
        optimizer,
        settings,
        condition,
        num_steps=config.sampler.num_steps,
        eval_steps=config.sampler.eval_steps,
        schedule=sampler_schedule(config),
        token_weights=config.rl.token_weights,
        in_graph_reward=config.reward.kind in reward_config.IN_GRAPH_KINDS,
        compute_dtypes=compute_dtypes,
    )


def sampler_schedule(config: ml_collections.ConfigDict) -> str:
    """sampler.schedule; configs from before the key sample with FLUX.2's shifted schedule."""
    return config.sampler.get("schedule", "flux2")


def make_optimizer(lr: float, weight_decay: float, max_grad_norm: float) -> optax.GradientTransformation:
    """AdamW at a constant rate after a global grad-norm clip (SPEC section 9)."""
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adamw(lr, weight_decay=weight_decay))


# --- data ---------------------------------------------------------------------------------------------


def shapes_config(config: ml_collections.ConfigDict) -> shapes.ShapesConfig:
    """The shapes task of ``config.data``. data.edits = 0 (or absent): the demo's mix of 1 to 3 edits;
    K > 0: exactly K edits per example among data.num_shapes shapes of data.shape_size (fractions of the
    side) kept data.shape_gap pixels apart."""
    d = config.data
    edits = int(d.get("edits", 0))
    if edits == 0:
        return shapes.ShapesConfig(image_size=d.resolution, max_edits=min(3, d.r_max))
    low, high = (float(x) for x in d.get("shape_size", (0.2, 0.36)))
    return shapes.ShapesConfig(
        image_size=d.resolution,
        min_shapes=edits,
        max_shapes=max(edits, int(d.get("num_shapes", edits))),
        min_edits=edits,
        max_edits=edits,
        min_size=low,
        max_size=high,
        min_gap=int(d.get("shape_gap", 2)),
    )


def _validate_shapes_task(config: ml_collections.ConfigDict) -> None:
    """data.edits and the multi-edit task's keys: K in range, region slots for K, shapes that fit."""
    d = config.data
    edits = d.get("edits", 0)
    _require(
        isinstance(edits, int) and 0 <= edits <= shapes.MAX_EDITS,
        "data.edits",
        f"0 (the demo's 1 to 3 edits) or a count of edits 1..{shapes.MAX_EDITS}, got {edits!r}",
    )
    _require(
        edits <= d.r_max,
        "data.r_max",
        f"data.edits={edits} needs at least {edits} region slots, got {d.r_max}",
    )
    if edits == 0:
        return
    try:
        task = shapes_config(config)
        shapes.generate(0, config=task)  # a layout that cannot fit K shapes fails here, by name
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.data (edits={edits}): {err}") from None


def _section_seed(config: ml_collections.ConfigDict, section: str) -> int:
    """config.<section>.seed, or the run's seed where it is -1 (or absent, in older configs)."""
    value = config[section].get("seed", -1)
    return config.seed if value == -1 else value


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The seed the shapes task's examples are generated from (data.seed)."""
    return _section_seed(config, "data")


def warmstart_seed(config: ml_collections.ConfigDict) -> int:
    """The seed of the model's random initialisation and the warm start's batch order (warmstart.seed). A
    fixed one lets runs of several seeds share one warm-started base model."""
    return _section_seed(config, "warmstart")


def data_source(config: ml_collections.ConfigDict, split: str) -> Sequence[Any]:
    """A random-access source of records for 'train' or the held-out 'test' split."""
    d = config.data
    if d.source == "shapes":
        n = d.shapes_train if split == "train" else d.shapes_eval
        return shapes.ShapesSource(n, split=split, seed=data_seed(config), config=shapes_config(config))
    from sfgrpo.data.tfds_builder import DatasetNotFound, load_split  # noqa: PLC0415

    try:
        return load_split(d.tfds_dir, split)
    except DatasetNotFound as err:
        raise ConfigError(f"config.data.tfds_dir: {err}") from None


def pipeline_config(
    config: ml_collections.ConfigDict, *, batch_size: int, group_size: int, seed: int, shuffle: bool = True
) -> pipeline.PipelineConfig:
    """The pipeline's settings; ``shuffle=False`` keeps the split's order (fixed evaluation inputs)."""
    d = config.data
    return pipeline.PipelineConfig(
        resolution=d.resolution,
        group_size=group_size,
        batch_size=batch_size,
        r_max=d.r_max,
        seed=seed,
        shuffle=shuffle,
        num_workers=d.num_workers,
    )


def tokenize(instructions: np.ndarray, max_len: int) -> np.ndarray:
    """(B,) instruction strings -> (B, max_len) int32 word ids of the shapes vocabulary."""
    return np.stack([shapes.tokenize(str(t), max_len) for t in instructions])


def device_batch(
    batch: dict[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    text_fields: Callable[[Sequence[str]], dict[str, np.ndarray]],
) -> dict[str, jax.Array]:
    """A host batch as global arrays: numeric fields plus its text fields, sharded along the batch."""
    from sfgrpo import runtime  # noqa: PLC0415

    arrays = pipeline.numeric_fields(batch)
    keep = ("source", "target", "boxes", "region_valid", "region_masks", "has_masks", "group_id")
    out = {k: arrays[k] for k in keep if k in arrays}
    out.update(text_fields([str(t) for t in batch["instruction"]]))
    return runtime.host_local_to_global(out, mesh)


def lora_patterns(targets: str) -> Sequence[str]:
    """The comma-separated regexes of model.lora_targets, each checked to compile."""
    out = [t.strip() for t in targets.split(",") if t.strip()]
    for t in out:
        try:
            re.compile(t)
        except re.error as err:
            raise ConfigError(f"config.model.lora_targets: bad pattern {t!r}: {err}") from None
    return out
