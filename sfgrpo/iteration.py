"""The compiled programs of a run: rollout, reward + credit, update, their fusion, and evaluation.

Each program is a pure function of device arrays, compiled once ahead of time (``compile_all``) for the
run's fixed shapes and logged with its compile time; calling a compiled program with other shapes is an
error rather than a silent recompilation. With the in-graph shapes reward, ``iteration`` fuses rollout,
reward, credit and update into one sharded step; ``train.fuse_step=False`` runs the three stages as
separate programs instead, so that each can be timed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfgrpo import compile_cache
from sfgrpo.models.flux2 import make_position_ids
from sfgrpo.models.policy import Conditioning
from sfgrpo.rewards.base import RegionScores, score_rewards
from sfgrpo.rewards.synthetic import shapes_scores
from sfgrpo.rl import regions
from sfgrpo.rl.step import (
    Credit,
    GRPOSettings,
    PolicyParts,
    merge,
    reward_metrics,
    sample,
    score_and_credit,
    update,
    velocity_fn,
)
from sfgrpo.sampling.rollout import Trajectory, rollout
from sfgrpo.sampling.schedule import schedule_sigmas

_log = logging.getLogger(__name__)


class RolloutOut(NamedTuple):
    """The rollout stage's results: the trajectory, its conditioning, decoded images (B, H, W, 3) float32
    and the token weights (B, R+1, L)."""

    traj: Trajectory
    cond: Conditioning
    edited: jax.Array
    weights: jax.Array


class Conditioner:
    """Turns a batch into the policy's conditioning: text features, the source's reference tokens and the
    position ids, for images of ``image_hw`` pixels and instructions of ``text_len`` tokens.

    Args:
      autoencoder: the run's autoencoder; its static facts (grid, channels) are read here. A weightless
        one (the demo's pixel autoencoder) is used as is; one with weights (the FLUX.2 VAE) is part of the
        policy, so its weights are arguments of the compiled programs rather than constants in them, and
        ``autoencoder_of`` returns the policy's copy.
      uncond: the empty instruction's text fields, each (1, ...) — 'text_ids' and 'text_mask', or
        'text_embeds' (and 'text_mask') with a prompt cache — for true CFG; None without CFG.
      masked_text: the policy masks its text padding (OmniGen2): the batch's 'text_mask' goes into the
        conditioning, next to the features.
    """

    def __init__(
        self,
        autoencoder: Any,
        image_hw: tuple[int, int],
        text_len: int,
        *,
        uncond: Mapping[str, np.ndarray] | None = None,
        masked_text: bool = False,
    ) -> None:
        self.autoencoder = autoencoder
        self.uncond = None if uncond is None else {k: np.asarray(v) for k, v in uncond.items()}
        self.grid = self.autoencoder.grid(*image_hw)
        self.text_len = text_len
        self.masked_text = masked_text

    def autoencoder_of(self, policy: Any) -> Any:
        """The autoencoder to call inside a program: the policy's when it carries one."""
        return policy.autoencoder if getattr(policy, "autoencoder", None) is not None else self.autoencoder

    def text(self, policy: Any, fields: Mapping[str, jax.Array]) -> jax.Array:
        """(B, T, D) text features: precomputed ('text_embeds') or encoded from 'text_ids'/'text_mask'."""
        if "text_embeds" in fields:
            return fields["text_embeds"]
        ids = fields["text_ids"]
        mask = fields["text_mask"] if "text_mask" in fields else jnp.ones_like(ids)
        return policy.encode_text(ids, mask)

    def __call__(self, policy: Any, batch: dict[str, jax.Array]) -> Conditioning:
        h, w = self.grid
        img_ids, txt_ids = make_position_ids(h, w, self.text_len, refs=[(h, w)])
        text = self.text(policy, batch)
        text_uncond = mask = mask_uncond = None
        if self.masked_text:
            mask = batch["text_mask"]
        if self.uncond is not None:
            # Broadcast the (1, ...) empty instruction to the batch, keeping the batch's sharding.
            like = {
                "text_embeds": text,
                "text_ids": batch.get("text_ids"),
                "text_mask": batch.get("text_mask"),
            }
            if like["text_mask"] is None:
                like["text_mask"] = like["text_ids"]
            fields = {k: jnp.zeros_like(like[k]) + v.astype(like[k].dtype) for k, v in self.uncond.items()}
            text_uncond = self.text(policy, fields)
            if self.masked_text:
                mask_uncond = fields["text_mask"]
        reference = self.autoencoder_of(policy).encode(batch["source"])
        return Conditioning(
            text, reference, img_ids, txt_ids, text_uncond, text_mask=mask, text_mask_uncond=mask_uncond
        )


class Programs:
    """The run's jitted functions, closed over the static policy graph, settings and shapes.

    Args:
      graphdef: the policy's nnx graph.
      optimizer: the GRPO optimizer.
      settings: static GRPO settings.
      condition: the batch -> conditioning map (it holds the autoencoder and the token grid).
      num_steps / eval_steps: sampler steps for training and evaluation.
      schedule: the sigma schedule, 'flux2' (shifted), 'linear' or 'omnigen2' (``schedule.schedule_sigmas``).
      token_weights: 'boxes' (exact box-cell overlap) or 'masks' (average-pooled region masks where an
        example has them, its boxes otherwise).
      in_graph_reward: the shapes reward runs inside 'reward', 'iteration' and 'evaluate'; False when a
        remote judge scores the images ('credit' and 'judge_metrics' take its scores).
      compute_dtypes: the trainable leaves' compute dtypes when the params passed in are float32 master
        weights of a lower-precision model (``step.master_weights``); None otherwise.
    """

    def __init__(
        self,
        graphdef: Any,
        optimizer: optax.GradientTransformation,
        settings: GRPOSettings,
        condition: Conditioner,
        *,
        num_steps: int,
        eval_steps: int,
        schedule: str = "flux2",
        token_weights: str = "boxes",
        in_graph_reward: bool = True,
        compute_dtypes: tuple[str, ...] | None = None,
    ) -> None:
        if token_weights not in ("boxes", "masks"):
            raise ValueError(f"token_weights must be 'boxes' or 'masks', got {token_weights!r}")
        self.graphdef, self.optimizer, self.settings = graphdef, optimizer, settings
        self.condition = condition
        self.grid = self.condition.grid
        self.token_weights = token_weights
        self.in_graph_reward = in_graph_reward
        self.compute_dtypes = compute_dtypes
        seq = self.grid[0] * self.grid[1]
        self.sigmas = schedule_sigmas(num_steps, seq, schedule)
        self.eval_sigmas = schedule_sigmas(eval_steps, seq, schedule)
        self.compiled: dict[str, Any] = {}
        self.compile_seconds: dict[str, float] = {}
        on_cpu = jax.default_backend() == "cpu"  # CPU buffers cannot be donated; don't ask
        self._jit = {
            "rollout": jax.jit(self.rollout),
            "reward": jax.jit(self.reward),
            "credit": jax.jit(self.credit),
            "update": jax.jit(self.update, donate_argnums=() if on_cpu else (0, 2)),
            "iteration": jax.jit(self.iteration, donate_argnums=() if on_cpu else (0, 2)),
            "evaluate": jax.jit(self.evaluate),
            "edit": jax.jit(self.edit),
            "sampled_edit": jax.jit(self.sampled_edit),
            "scores": jax.jit(self.scores),
            "judge_metrics": jax.jit(self.judge_metrics),
        }

    # --- the stages, traced -------------------------------------------------------------------------

    def _parts(self, params: Any, frozen: Any) -> PolicyParts:
        return PolicyParts(self.graphdef, params, frozen, self.compute_dtypes)

    def conditioning(self, params: Any, frozen: Any, batch: dict[str, jax.Array]) -> Conditioning:
        return self.condition(merge(self._parts(params, frozen)), batch)

    def weights(self, batch: dict[str, jax.Array]) -> jax.Array:
        """(B, R+1, L) token weights of the batch's regions (SPEC section 6)."""
        if self.token_weights == "masks":
            return regions.region_token_weights(
                batch["boxes"], batch["region_masks"], batch["has_masks"], batch["region_valid"], self.grid
            )
        return regions.token_weights(batch["boxes"], batch["region_valid"], self.grid)

    def _noise(self, key: jax.Array, batch: dict[str, jax.Array], ref: jax.Array) -> jax.Array:
        b = batch["source"].shape[0]
        shape = (b, self.grid[0] * self.grid[1], self.condition.autoencoder.latent_channels)
        return jax.random.normal(key, shape, jnp.float32, out_sharding=jax.typeof(ref).sharding.spec)

    def rollout(self, params: Any, frozen: Any, batch: dict[str, jax.Array], key: jax.Array) -> RolloutOut:
        cond = self.conditioning(params, frozen, batch)
        noise_key, sample_key = jax.random.split(key)
        noise = self._noise(noise_key, batch, cond.reference)
        parts = self._parts(params, frozen)
        traj = sample(parts, cond, noise, sample_key, self.sigmas, self.settings)
        edited = self._autoencoder(params, frozen).decode(traj.final, self.grid)
        return RolloutOut(traj, cond, edited, self.weights(batch))

    def _autoencoder(self, params: Any, frozen: Any) -> Any:
        return self.condition.autoencoder_of(merge(self._parts(params, frozen)))

    def reward(
        self, params: Any, frozen: Any, edited: jax.Array, batch: dict[str, jax.Array], weights: jax.Array
    ) -> tuple[Credit, dict[str, jax.Array]]:
        """The in-graph reward: scores of the edited images, then their credit."""
        return self.credit(self._scores(params, frozen, edited, batch), batch, weights)

    def credit(
        self, scores: RegionScores, batch: dict[str, jax.Array], weights: jax.Array
    ) -> tuple[Credit, dict[str, jax.Array]]:
        """Credit from a judge's scores (SPEC sections 5-7)."""
        _, credit_, metrics = score_and_credit(
            scores, batch["region_valid"], weights, batch["group_id"], self.settings
        )
        return credit_, metrics

    def _scores(self, params: Any, frozen: Any, edited: jax.Array, batch: dict[str, jax.Array]) -> Any:
        # Judge against what the autoencoder can express: a lossy (pooled) autoencoder cannot reproduce
        # fine texture, and the policy should not be scored on it.
        ae, grid = self._autoencoder(params, frozen), self.grid
        source = ae.decode(ae.encode(batch["source"]), grid)
        target = ae.decode(ae.encode(batch["target"]), grid)
        return shapes_scores(
            edited,
            source,
            target,
            batch["region_masks"],
            batch["boxes"],
            batch["region_valid"],
            scale=self.settings.score_scale,
            **dict(self.settings.shapes_reward),
        )

    def update(
        self,
        params: Any,
        frozen: Any,
        opt_state: Any,
        ref_params: Any,
        out: RolloutOut,
        credit_: Credit,
        key: jax.Array,
    ) -> tuple[Any, Any, dict[str, jax.Array]]:
        parts = self._parts(params, frozen)
        sigma_max = jnp.asarray(self.sigmas[1])
        return update(
            parts,
            opt_state,
            self.optimizer,
            ref_params,
            out.traj,
            out.cond,
            credit_,
            key,
            sigma_max,
            self.settings,
        )

    def iteration(
        self,
        params: Any,
        frozen: Any,
        opt_state: Any,
        ref_params: Any,
        batch: dict[str, jax.Array],
        key: jax.Array,
    ) -> tuple[Any, Any, dict[str, jax.Array]]:
        """Rollout, reward, credit and update as one program."""
        rollout_key, update_key = jax.random.split(key)
        out = self.rollout(params, frozen, batch, rollout_key)
        credit_, metrics = self.reward(params, frozen, out.edited, batch, out.weights)
        params, opt_state, update_metrics = self.update(
            params, frozen, opt_state, ref_params, out, credit_, update_key
        )
        return params, opt_state, {**metrics, **update_metrics}

    def edit(self, params: Any, frozen: Any, batch: dict[str, jax.Array], noise: jax.Array) -> jax.Array:
        """Deterministic (ODE) edits of a batch from the given (B, L, C) initial noise: the decoded images
        (B, H, W, 3) float32, not clipped (what evaluation and ``sfgrpo.evaluate`` judge)."""
        return self._ode_edit(params, frozen, self.conditioning(params, frozen, batch), noise)

    def sampled_edit(
        self, params: Any, frozen: Any, batch: dict[str, jax.Array], noise: jax.Array, key: jax.Array
    ) -> jax.Array:
        """Edits of a batch with the rollout's sampler (``num_steps`` steps, noise of the settings' kind and
        eta on the SDE window, window and step noise drawn from ``key``) from the given (B, L, C) initial
        noise: the decoded images (B, H, W, 3) float32, not clipped. These are the images GRPO optimises;
        ``edit`` gives the deterministic ones evaluation judges."""
        cond = self.conditioning(params, frozen, batch)
        traj = sample(self._parts(params, frozen), cond, noise, key, self.sigmas, self.settings)
        return self._autoencoder(params, frozen).decode(traj.final, self.grid)

    def _ode_edit(self, params: Any, frozen: Any, cond: Conditioning, noise: jax.Array) -> jax.Array:
        policy = merge(self._parts(params, frozen))
        traj = rollout(
            velocity_fn(policy, cond, self.settings.cfg_scale),
            noise,
            self.eval_sigmas,
            jax.random.key(0),  # unused: ODE steps draw no noise
            eta=0.0,
            kind="ode",
            window_start=jnp.zeros((), jnp.int32),
            window=1,
        )
        return self._autoencoder(params, frozen).decode(traj.final, self.grid)

    def scores(
        self, params: Any, frozen: Any, edited: jax.Array, batch: dict[str, jax.Array]
    ) -> RegionScores:
        """The in-graph (shapes) reward's scores of edited images, judged as in training."""
        return self._scores(params, frozen, edited, batch)

    def evaluate(
        self, params: Any, frozen: Any, batch: dict[str, jax.Array], key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Deterministic (ODE) edits of a fixed batch and their rewards; returns (edited, metrics)."""
        cond = self.conditioning(params, frozen, batch)  # once: the noise takes its reference's sharding
        edited = self._ode_edit(params, frozen, cond, self._noise(key, batch, cond.reference))
        if not self.in_graph_reward:
            return edited, {}  # the judge is remote: RewardStage.evaluate scores these images
        return edited, self.judge_metrics(self._scores(params, frozen, edited, batch), batch)

    def judge_metrics(self, scores: RegionScores, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Evaluation metrics ('eval/...') of a judge's scores."""
        rewards = score_rewards(scores, batch["region_valid"], self.settings.score_scale)
        metrics = reward_metrics(scores, rewards, self.settings.score_scale)
        return {f"eval/{k}": v for k, v in metrics.items()}

    # --- compilation --------------------------------------------------------------------------------

    def compile(self, name: str, *args: Any) -> Callable[..., Any]:
        """Compiles program ``name`` for ``args``' shapes once and logs the time it took."""
        if name not in self.compiled:
            start, hits = time.perf_counter(), compile_cache.hits()
            self.compiled[name] = self._jit[name].lower(*args).compile()
            self.compile_seconds[name] = time.perf_counter() - start
            _log.info(
                "compiled %s in %.1f s (once: its shapes are fixed for the run; %s)",
                name,
                self.compile_seconds[name],
                compile_cache.origin(hits),
            )
        return self.compiled[name]

    def __call__(self, name: str, *args: Any) -> Any:
        return self.compile(name, *args)(*args)


def host_numpy(tree: Any) -> Any:
    """Fetches a pytree of (global) arrays to the host as numpy."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
