"""The policy under evaluation, making deterministic (ODE) edits of benchmark examples.

Two kinds of policy:
  RunEditor    a training run of the demo's tiny model (``--workdir``, at a checkpoint or its base): edits
               at the run's resolution with the run's compiled evaluation sampler (``Programs.edit``:
               ``sampler.eval_steps`` ODE steps, its schedule and CFG), in fixed-size batches compiled
               once, and judged by the run's own shapes reward (``Programs.scores``) for the 'shapes'
               protocol. With ``sampler='sde'`` or ``'cps'`` it edits with the rollout's stochastic
               sampler instead (``Programs.sampled_edit``: the images GRPO trains on), to tell what a
               policy learned for its training sampler from what shows under the ODE one;
  FolderEditor a FLUX.2-klein or OmniGen2 folder, a run's trained model on one, and/or a LoRA file:
               ``sfgrpo.edit``'s pipeline at each source's own (prepared) size.
The initial noise of an edit depends only on (seed, example key) (``example_noise``), never on the order
or batching of the examples, so two policies evaluated with the same seeds see the same noise. A stochastic
sampler's step noise and SDE window are drawn per batch from the seed and the batch's example keys
(``batch_key``): two policies evaluated on the same batches see the same step noise too.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfgrpo import builders, runtime, trained
from sfgrpo.data.pipeline import fit_to_resolution
from sfgrpo.data.records import EditRecord, Region
from sfgrpo.evaluation.benchmarks import Example
from sfgrpo.models.tiny import images_to_uint8
from sfgrpo.rewards.base import score_rewards
from sfgrpo.rewards.reward_config import SHAPES_DEFAULTS, SHAPES_OPTIONS, shapes_reward_options
from sfgrpo.rl.step import SUCCESS_SHARE
from sfgrpo.sampling.rollout import draw_window_start

_log = logging.getLogger(__name__)


def example_noise(seed: int, key: str, shape: tuple[int, ...]) -> jax.Array:
    """(shape) float32 standard normal noise of example ``key`` under ``seed``."""
    index = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") & 0x7FFFFFFF
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), shape, jnp.float32)


class Edits:
    """Edited images of a list of examples: ``images[i]`` (H, W, 3) uint8, the ``sources[i]`` the policy
    saw (after its resizing), and with the shapes protocol the per-example ``scores`` rows."""

    def __init__(self, images: list[np.ndarray], sources: list[np.ndarray], scores: list[dict] | None):
        self.images, self.sources, self.scores = images, sources, scores


def shapes_row_scores(scores: Any, region_valid: np.ndarray, scale: float) -> list[dict[str, float]]:
    """Per-image scores of the shapes reward, the numbers the trainer's evaluation reports.

    Args:
      scores: a ``RegionScores`` of B images (host or device arrays).
      region_valid: (B, R) bool.
    Returns B dicts (an image the reward marks invalid gets None): 'reward' (R^g), 'region_reward' (mean
    Eq. 3 region reward over the edit regions), 'background_reward', 'region_success_rate' (share of edit
    regions with success >= 0.8 C), 'multi_region_success' (1 if every edit region succeeds),
    'background_preservation' (background score / C), 'quality' (min(naturalness, artifacts) / C).
    """
    rewards = jax.tree.map(np.asarray, score_rewards(scores, jnp.asarray(region_valid), scale))
    success = np.asarray(scores.success) >= SUCCESS_SHARE * scale
    rows: list[dict[str, float] | None] = []
    for i in range(region_valid.shape[0]):
        if not bool(rewards.image_valid[i]):
            rows.append(None)
            continue
        edit = region_valid[i]
        n = max(int(edit.sum()), 1)
        rows.append(
            {
                "reward": float(rewards.image[i]),
                "region_reward": float((rewards.region[i, :-1] * edit).sum() / n),
                "background_reward": float(rewards.region[i, -1]),
                "region_success_rate": float((success[i] & edit).sum() / n),
                "multi_region_success": float(bool(np.all(success[i] | ~edit))),
                "background_preservation": float(np.asarray(scores.background)[i] / scale),
                "quality": float(
                    min(np.asarray(scores.naturalness)[i], np.asarray(scores.artifacts)[i]) / scale
                ),
            }
        )
    return rows  # type: ignore[return-value]


def _record(example: Example) -> EditRecord:
    masks = example.masks if example.masks is not None else [None] * len(example.labels)
    regions = tuple(
        Region(box=tuple(float(v) for v in box), label=label, mask=mask)  # type: ignore[arg-type]
        for box, label, mask in zip(example.boxes, example.labels, masks, strict=True)
    )
    return EditRecord(example.key, example.source, example.instruction, regions, example.target)


def shapes_row_fields(scores: dict[str, float] | None) -> dict[str, Any]:
    """A row's protocol fields ('scores', 'overall', 'failure', 'judge') from ``shapes_row_scores``' entry
    (None: the reward marked the image invalid, a failed row)."""
    if scores is None:
        return {
            "scores": {},
            "overall": None,
            "failure": {"reason": "invalid", "message": "the reward marked the edited image invalid"},
            "judge": {"answers": {}},
        }
    return {"scores": scores, "overall": scores["reward"], "failure": None, "judge": {"answers": {}}}


def example_fields(example: Example, seed: int) -> dict[str, Any]:
    """The fields of a row that name what was edited (the schema's key, seed, task_type, language,
    instruction)."""
    return {
        "key": example.key,
        "seed": seed,
        "task_type": example.task_type,
        "language": example.language,
        "instruction": example.instruction,
    }


def check_scorable(examples: Sequence[Example]) -> None:
    """``ValueError`` unless every example has the target and region masks the shapes protocol needs."""
    missing = [e.key for e in examples if e.target is None or e.masks is None]
    if missing:
        raise ValueError(
            f"the shapes protocol needs each example's target and region masks; {len(missing)} "
            f"examples lack them (first: {missing[0]!r})"
        )


def region_slots(examples: Sequence[Example], r_max: int) -> int:
    """R, the region slots of a batch: the run's ``data.r_max``, or more when an example has more."""
    return max([1, int(r_max), *(len(e.labels) for e in examples)])


def pad_examples(examples: Sequence[Example], size: int) -> list[Example]:
    """``examples`` repeated at the end to ``size`` (one compiled batch shape); the copies are dropped."""
    examples = list(examples)
    return examples + [examples[-1]] * (size - len(examples))


def latent_shape(programs: Any) -> tuple[int, int]:
    """(L, C): the initial noise of one edit under a run's ``Programs`` (its token grid and latent)."""
    return programs.grid[0] * programs.grid[1], int(programs.condition.autoencoder.latent_channels)


def host_batch(examples: Sequence[Example], resolution: int, r: int) -> dict[str, np.ndarray]:
    """The examples as a host batch at the run's ``resolution`` (fit as the data pipeline fits records).

    Returns {"source", "target" (the source where there is none): (B, H, W, 3) uint8, "boxes": (B, R, 4)
    float32, "region_valid": (B, R) bool, "region_masks": (B, R, H, W) bool, "instruction": (B,) object},
    ready for ``builders.device_batch``.
    """
    size = (resolution, resolution)
    b = len(examples)
    out = {
        "source": np.zeros((b, *size, 3), np.uint8),
        "target": np.zeros((b, *size, 3), np.uint8),
        "boxes": np.zeros((b, r, 4), np.float32),
        "region_valid": np.zeros((b, r), bool),
        "region_masks": np.zeros((b, r, *size), bool),
        "instruction": np.array([e.instruction for e in examples], object),
    }
    for i, example in enumerate(examples):
        source, target, boxes, valid, masks = fit_to_resolution(_record(example), size)
        k = len(boxes)
        out["source"][i] = source
        out["target"][i] = source if target is None else target
        out["boxes"][i, :k], out["region_valid"][i, :k] = boxes, valid
        if masks is not None:
            out["region_masks"][i, :k] = masks
    return out


def noise_stack(seed: int, examples: Sequence[Example], latent: tuple[int, int]) -> np.ndarray:
    """(B, L, C) float32: each example's ``example_noise`` under ``seed``, in order."""
    return np.asarray(jnp.stack([example_noise(seed, e.key, latent) for e in examples]))


SAMPLERS = ("ode", "sde", "cps")
"""RunEditor's samplers: the evaluation's Euler steps, or the rollout's with 'sde' or 'cps' window noise."""


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags that choose ``RunEditor``'s sampler: --sampler and --eta."""
    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="ode",
        help="tiny-model runs: 'ode' (default), or the rollout's sampler with 'sde' or 'cps' window noise",
    )
    parser.add_argument("--eta", type=float, help="with --sampler sde|cps: noise level (default: the run's)")


def sampler_arguments_error(sampler: str, eta: float | None) -> str | None:
    """What is wrong with --sampler / --eta, or None."""
    if eta is not None and (sampler == "ode" or not (math.isfinite(eta) and eta > 0)):
        return f"--eta {eta} must be a finite noise level > 0, with --sampler sde or cps"
    return None


def batch_key(seed: int, examples: Sequence[Example]) -> jax.Array:
    """The PRNG key of a stochastic sampler's step noise and window for one batch: from ``seed`` and the
    batch's example keys in order (padding included), so the same batch draws the same noise under any
    policy."""
    digest = hashlib.sha256("\n".join(e.key for e in examples).encode()).digest()[:4]
    return jax.random.fold_in(jax.random.key(seed), int.from_bytes(digest, "little") & 0x7FFFFFFF)


class RewardOptionsError(ValueError):
    """Shapes-reward options that a run cannot be scored with (unknown or invalid)."""


def parse_options(text: str) -> dict[str, str]:
    """ "KEY=VALUE,KEY=VALUE" as a dict; ``ValueError`` for a malformed one or a key given twice (the values
    are checked by whoever takes them)."""
    pairs = [part.split("=", 1) for part in text.split(",") if part]
    if not pairs or any(len(pair) != 2 or not pair[0] or not pair[1] for pair in pairs):
        raise ValueError(f"expected KEY=VALUE,KEY=VALUE, got {text!r}")
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError(f"a key given twice in {text!r}")
    return dict(pairs)


class RunEditor:
    """A tiny-model training run's policy (``step``: a checkpoint, None for the newest, 'base' for the model
    GRPO started from), editing ``batch_size`` examples per compiled call.

    Args:
      eval_steps: sampler steps instead of the run's (``sampler.eval_steps`` for 'ode', ``num_steps``
        otherwise).
      sampler: 'ode' (the evaluation's sampler), or 'sde' / 'cps': the rollout's sampler with that kind of
        window noise (the run's window, schedule and CFG).
      eta: the stochastic sampler's noise level instead of the run's ``sampler.eta``.
    """

    def __init__(
        self,
        workdir: str | Path,
        step: int | str | None,
        *,
        batch_size: int = 8,
        eval_steps: int | None = None,
        sampler: str = "ode",
        eta: float | None = None,
        shapes_reward: Mapping[str, str] | None = None,
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if (error := sampler_arguments_error(sampler, eta)) is not None:
            raise ValueError(error)
        run = trained.load_trained(workdir, step=step)
        config = run.config
        if config.model.name != "tiny":
            raise trained.TrainedRunError(
                f"{workdir} trained the {config.model.name!r} model: evaluate it as a klein policy"
            )
        if sampler == "ode":
            if eval_steps is not None:
                config.sampler.eval_steps = int(eval_steps)
        else:
            config.sampler.kind = sampler
            if eval_steps is not None:
                config.sampler.num_steps = int(eval_steps)
            if eta is not None:
                config.sampler.eta = float(eta)
            s = config.sampler
            # The window's bounds are checked when the sampler is traced; check them before any edit.
            bounds = (s.window_lo, s.window_hi, s.num_steps, s.window_size)
            draw_window_start(jax.random.key(0), s.window, *bounds)
        # Options of the shapes reward changed for scoring only (the policy is the run's): e.g. a term the
        # run's reward did not have, to rescore its edits as a fixed reward would.
        self.reward_override = None
        if shapes_reward:
            unknown = sorted(set(shapes_reward) - set(SHAPES_OPTIONS))
            if unknown:
                raise RewardOptionsError(f"unknown options {unknown}; known: {list(SHAPES_OPTIONS)}")
            # What the plain evaluation scores with: the run's options, or shapes_scores' defaults for a run
            # judged by another reward.
            merged = dict(builders.grpo_settings(config).shapes_reward) or dict(SHAPES_DEFAULTS)
            merged |= dict(shapes_reward)
            try:
                self.reward_override = dict(shapes_reward_options(merged, where=""))
            except ValueError as err:
                raise RewardOptionsError(str(err)) from None
        self.sampler = sampler
        self.config, self.step, self.batch_size = config, run.step, int(batch_size)
        self.workdir = Path(workdir).absolute()
        self.resolution = int(config.data.resolution)
        self.mesh = runtime.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
        with runtime.use_mesh(self.mesh):
            # The conditioner and text fields of the run's model (the tiny model's are weightless).
            model = builders.build_model(config, self.mesh, builders.warmstart_seed(config))
            graphdef, self.params, self.frozen, dtypes = builders.split_for_grpo(run.policy, config)
            optimizer = builders.make_optimizer(config.rl.lr, config.rl.weight_decay, config.rl.max_grad_norm)
            override = None if self.reward_override is None else tuple(self.reward_override.items())
            self.programs = builders.make_programs(
                config, graphdef, optimizer, model.condition, dtypes, shapes_reward=override
            )
        self.text_fields = model.text_fields
        self.latent = latent_shape(self.programs)
        self.scale = float(builders.grpo_settings(config).score_scale)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "run",
            "model": "tiny",
            "workdir": str(self.workdir),
            "step": "base" if self.step == 0 else self.step,
            "resolution": self.resolution,
            "sampler": self._sampler_fields(),
            **({"shapes_reward": self.reward_override} if self.reward_override else {}),
        }

    def _sampler_fields(self) -> dict[str, Any]:
        s = self.config.sampler
        common = {"schedule": builders.sampler_schedule(self.config), "cfg_scale": float(s.cfg_scale)}
        if self.sampler == "ode":
            return {"kind": "ode", "steps": int(s.eval_steps), **common}
        window: dict[str, Any] = {"window": s.window}
        if s.window == "random":
            window |= {"window_size": int(s.window_size), "window_lo": int(s.window_lo),
                       "window_hi": int(s.window_hi)}  # fmt: skip
        step_noise = "per batch: the seed and the batch's example keys"
        return {"kind": s.kind, "steps": int(s.num_steps), "eta": float(s.eta), **window, **common,
                "step_noise": step_noise}  # fmt: skip

    def check(self, examples: Sequence[Example]) -> None:
        """``ValueError`` naming the first example this model cannot read: the tiny model's word encoder
        holds a fixed number of words (unknown words are its unknown-word id)."""
        for example in examples:
            try:
                self.text_fields([example.instruction])
            except ValueError as err:
                raise ValueError(f"example {example.key!r}: {err}") from None

    def edit(self, examples: Sequence[Example], seed: int, *, score: bool) -> Edits:
        """Edits ``examples`` (any number; batches are padded to ``batch_size``) from their seeded noise."""
        if score:
            check_scorable(examples)
        r = region_slots(examples, self.config.data.r_max)
        images, sources, rows = [], [], []
        for start in range(0, len(examples), self.batch_size):
            chunk = list(examples[start : start + self.batch_size])
            padded = pad_examples(chunk, self.batch_size)  # one compiled shape
            host = host_batch(padded, self.resolution, r)
            noise = noise_stack(seed, padded, self.latent)
            with runtime.use_mesh(self.mesh):
                batch = builders.device_batch(host, self.mesh, self.text_fields)
                noise = runtime.host_local_to_global({"noise": noise}, self.mesh)["noise"]
                if self.sampler == "ode":
                    edited = self.programs("edit", self.params, self.frozen, batch, noise)
                else:
                    key = batch_key(seed, padded)
                    edited = self.programs("sampled_edit", self.params, self.frozen, batch, noise, key)
                scores = self.programs("scores", self.params, self.frozen, edited, batch) if score else None
            pixels = images_to_uint8(runtime.to_host(edited))
            images.extend(pixels[: len(chunk)])
            sources.extend(host["source"][: len(chunk)])
            if scores is not None:
                host_scores = jax.tree.map(lambda x: np.asarray(runtime.to_host(x)), scores)
                rows.extend(shapes_row_scores(host_scores, host["region_valid"], self.scale)[: len(chunk)])
        return Edits(images, sources, rows if score else None)


class FolderEditor:
    """A policy from a model folder (``sfgrpo.edit.load_parts``: a FLUX.2-klein or OmniGen2 folder, a run
    on one at a step, a LoRA file), editing each example at its source's prepared size with ``steps`` ODE
    steps and the model's pipeline's guidance: klein's ``guidance``, OmniGen2's ``text_guidance`` and
    ``image_guidance`` (defaults: each pipeline's)."""

    def __init__(
        self,
        *,
        model: str | None,
        workdir: str | None,
        step: int | None,
        lora_file: str | None,
        steps: int | None,
        guidance: float | None,
        dtype: str = "float32",
        text_guidance: float | None = None,
        image_guidance: float | None = None,
    ) -> None:
        from sfgrpo import edit  # noqa: PLC0415
        from sfgrpo.models.omnigen2_folder import OmniGen2Parts  # noqa: PLC0415

        self._edit = edit
        self.parts = edit.load_parts(model, workdir=workdir, step=step, lora_file=lora_file, dtype=dtype)
        self.omnigen2 = isinstance(self.parts, OmniGen2Parts)
        if self.omnigen2:
            if guidance is not None:
                raise ValueError(
                    "--guidance is FLUX.2-klein's; OmniGen2 takes --text-guidance/--image-guidance"
                )
            self.steps = steps if steps is not None else edit.OMNIGEN2_STEPS
            text = edit.OMNIGEN2_TEXT_GUIDANCE if text_guidance is None else float(text_guidance)
            image = edit.OMNIGEN2_IMAGE_GUIDANCE if image_guidance is None else float(image_guidance)
            self.options: dict[str, Any] = dict(text_guidance_scale=text, image_guidance_scale=image)
            sampler = {"text_guidance": text, "image_guidance": image, "schedule": "omnigen2"}
        else:
            if text_guidance is not None or image_guidance is not None:
                raise ValueError("--text-guidance/--image-guidance are OmniGen2's; klein takes --guidance")
            default = edit.DISTILLED_STEPS if self.parts.is_distilled else edit.BASE_STEPS
            self.steps = steps if steps is not None else default
            self.options = dict(guidance_scale=guidance)
            sampler = {"guidance": guidance, "schedule": "flux2"}
        self.identity = {
            "kind": "omnigen2" if self.omnigen2 else "klein",
            "model": model,
            "workdir": workdir,
            "step": step,
            "lora": lora_file,
            "dtype": dtype,
            "sampler": {"kind": "ode", "steps": self.steps, **sampler},
        }

    def describe(self) -> dict[str, Any]:
        return dict(self.identity)

    def check(self, examples: Sequence[Example]) -> None:
        """Nothing to check before editing: a prompt over the token limit is truncated with a warning."""

    def edit(self, examples: Sequence[Example], seed: int, *, score: bool) -> Edits:
        if score:
            raise ValueError(
                "the shapes protocol scores a tiny-model training run (--workdir) with the run's own reward; "
                "score a klein or OmniGen2 policy with --protocol regions, viescore or imgedit"
            )
        images, sources = [], []
        for example in examples:
            if self.omnigen2:
                source = self._edit.prepare_image_omnigen2(example.source)
                channels = self.parts.transformer.config.token_channels
            else:
                source = self._edit.prepare_image(example.source, int(self.parts.vae.config.scale))
                channels = self.parts.transformer.config.in_channels
            grid = self.parts.vae.grid(*source.shape[:2])
            shape = (1, grid[0] * grid[1], channels)
            images.append(
                self._edit.edit_image(
                    self.parts,
                    source,
                    example.instruction,
                    steps=self.steps,
                    noise=example_noise(seed, example.key, shape),
                    **self.options,
                )
            )
            sources.append(source)
        return Edits(images, sources, None)
