"""The GRPO iteration as pure functions: rollout, reward, credit and the clipped update (SPEC sections 7-9).

Every function here is traced inside ``jax.jit``. The policy travels as (graphdef, trainable params, frozen
state) and is rebuilt with ``nnx.merge`` inside the trace. With a JAX reward the four stages compose into
one compiled step (``iteration``); the trainer may also compile them separately to time each stage.

Batch arrays are sharded along their leading (batch) axis over the mesh axes ("data", "fsdp"). Micro-batches
are cut from each shard locally, so a micro-batch is spread over every device and no sample crosses one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sfgrpo.models.policy import Conditioning, EditPolicy, OmniGen2EditPolicy
from sfgrpo.rewards.base import RegionScores, Rewards, score_rewards
from sfgrpo.rl.advantages import (
    group_advantages,
    group_statistics,
    mix_global,
    token_advantages,
    token_validity,
)
from sfgrpo.rl.loss import entry_count, policy_loss, sample_validity
from sfgrpo.sampling.rollout import Trajectory, draw_window_start, guided, rollout
from sfgrpo.sampling.sde import gaussian_kl, sde_step

BATCH_AXES = ("data", "fsdp")  # the mesh axes the batch is split over (runtime.LOGICAL_AXIS_RULES)
# Update metrics that are shares of the full-batch value: summed over micro-batches and window steps.
ADDITIVE_METRICS = ("loss", "kl", "total_loss")
SUCCESS_SHARE = 0.8  # a region succeeds with a success score of at least 0.8 C (issue 13's criterion)


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """Static settings of one GRPO iteration (hashable: they select what is compiled)."""

    credit: str  # 'spatial', 'region' or 'scalar'
    clip_range: tuple[float, float]
    adv_clip: float
    adv_std: str  # 'group' or 'global'
    adv_eps: float
    mix_lambda: float
    kl_beta: float
    kl_form: str  # 'exact' or 'flow_grpo'
    eta: float
    sde_kind: str  # 'sde' or 'cps'
    window_mode: str
    window: int  # W, the number of trained steps
    window_lo: int
    window_hi: int
    inner_epochs: int
    micro_batch: int  # samples per micro-batch, over all devices
    grad_accum: int  # micro-batches per optimizer step
    batch_shards: int  # devices the batch is split over: mesh data x fsdp
    score_scale: float = 25.0
    cfg_scale: float = 1.0
    # Keyword options of the in-graph shapes reward (sfgrpo.rewards.synthetic.shapes_scores), as
    # (name, value) pairs so the settings stay hashable; () keeps its defaults.
    shapes_reward: tuple[tuple[str, float | int], ...] = ()
    # The credit study's placebo (rl.token_map = 'shuffled'): > 0 gives every sample, in 'spatial' and
    # 'region' credit, the token weights of the sample this many rows later (cyclically; a multiple of G,
    # so another input's region-to-token map). 0: each sample's own map.
    token_map_shift: int = 0
    # The credit study's no-signal control (rl.rewards_from = 'other_group'): > 0 gives every sample the
    # rewards (and their validity) of the sample this many rows later, cyclically; a multiple of G, so each
    # group is credited with another group's outcomes: advantages of the usual size that say nothing about
    # its own rollouts. 0: each sample's own rewards.
    reward_shift: int = 0


class Credit(NamedTuple):
    """Advantages in the shape the credit mode needs, with the loss mask and the token weights.

    adv: 'spatial' (B, L), 'region' (B, R+1), 'scalar' (B,).  mask: the same shape, float in [0, 1].
    weights: (B, R+1, L) token weights (background last).
    """

    adv: jax.Array
    mask: jax.Array
    weights: jax.Array


class PolicyParts(NamedTuple):
    """The policy split for a functional update: the graph, its trainable params and everything else.

    ``compute_dtypes`` (static) is set when ``params`` are float32 master weights of a lower-precision
    model (full fine-tuning of a bf16 model): the dtype each trainable leaf is computed in, in leaf order.
    """

    graphdef: Any
    params: Any
    frozen: Any
    compute_dtypes: tuple[str, ...] | None = None


def master_weights(params: Any) -> tuple[Any, tuple[str, ...] | None]:
    """(float32 master copy of ``params``, their compute dtypes in leaf order, or None when all are float32).

    Adam's steps of about lr are far below a bf16 weight's resolution (2^-8 relative) and would round to
    zero, so what trains is a float32 copy; the model computes with a cast of it (``compute_copy``).
    """
    leaves = jax.tree.leaves(params)
    dtypes = tuple(str(x.dtype) for x in leaves)
    if all(not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.float32 for x in leaves):
        return params, None
    master = jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )
    return master, dtypes


def compute_copy(params: Any, compute_dtypes: tuple[str, ...] | None) -> Any:
    """``params`` cast leaf by leaf to ``compute_dtypes`` (from ``master_weights``); unchanged for None.
    Differentiable: the gradient with respect to the master weights comes back in float32."""
    if compute_dtypes is None:
        return params
    leaves, treedef = jax.tree.flatten(params)
    if len(leaves) != len(compute_dtypes):
        raise ValueError(f"{len(leaves)} trainable leaves but {len(compute_dtypes)} compute dtypes")
    return jax.tree.unflatten(treedef, [x.astype(d) for x, d in zip(leaves, compute_dtypes, strict=True)])


def merge(parts: PolicyParts, params: Any = None) -> EditPolicy:
    """The policy with ``params`` (default: its own) as its trainable part, in its compute dtypes."""
    params = parts.params if params is None else params
    return nnx.merge(parts.graphdef, compute_copy(params, parts.compute_dtypes), parts.frozen)


def velocity_fn(
    policy: Any, cond: Conditioning, cfg_scale: float = 1.0, image_scale: float = 1.0
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The policy's velocity as a function of (x (B, L, C), sigma (B,)), its conditioning closed over.

    With cfg_scale != 1 it is true classifier-free guidance against the empty instruction
    (``cond.unconditional()``), as each model's pipeline does it:
    - FLUX.2: the unconditional forward keeps the source (``Flux2KleinPipeline``); ``image_scale`` must be 1.
    - OmniGen2 (``OmniGen2Pipeline.processing``): text guidance alone drops the source too,
      v = v(∅, ∅) + cfg (v(text, src) - v(∅, ∅)); with image_scale > 1 as well it is the dual guidance
      v = v(∅, ∅) + image (v(∅, src) - v(∅, ∅)) + cfg (v(text, src) - v(∅, src)), three forwards per
      step; with cfg_scale 1 there is no guidance at all, whatever image_scale (the pipeline's rule).
    The guided velocity is then the policy, in the rollout and in the update alike. What does not change
    across steps is computed here, once (``policy.prepare``: a K/V-caching model's reference keys and
    values, shared by the conditional and unconditional forwards, both of which keep the source).
    """
    cond = policy.prepare(cond)

    def conditional(x: jax.Array, sigma: jax.Array) -> jax.Array:
        return policy.velocity(x, sigma, cond)

    def with_cond(c: Conditioning) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return lambda x, sigma: policy.velocity(x, sigma, c)

    if not isinstance(policy, OmniGen2EditPolicy):
        if image_scale != 1.0:
            raise ValueError(f"image guidance ({image_scale}) is OmniGen2's; this policy has none")
        return (
            guided(conditional, with_cond(cond.unconditional()), cfg_scale)
            if cfg_scale != 1.0
            else conditional
        )
    if cfg_scale == 1.0:
        return conditional
    uncond = cond.unconditional()
    neither = with_cond(uncond._replace(reference=None))
    if image_scale == 1.0:
        return guided(conditional, neither, cfg_scale)
    source_only = with_cond(uncond)

    def dual(x: jax.Array, sigma: jax.Array) -> jax.Array:
        v_ref, v_none = source_only(x, sigma), neither(x, sigma)
        return v_none + image_scale * (v_ref - v_none) + cfg_scale * (conditional(x, sigma) - v_ref)

    return dual


# --- rollout ------------------------------------------------------------------------------------------


def sample(
    parts: PolicyParts,
    cond: Conditioning,
    noise: jax.Array,
    key: jax.Array,
    sigmas: np.ndarray,
    settings: GRPOSettings,
) -> Trajectory:
    """Rolls the policy out from ``noise`` (B, L, C) with the settings' SDE window; see ``rollout``."""
    window_key, step_key = jax.random.split(key)
    num_steps = len(sigmas) - 1
    start = draw_window_start(
        window_key, settings.window_mode, settings.window_lo, settings.window_hi, num_steps, settings.window
    )
    policy = merge(parts)
    return rollout(
        velocity_fn(policy, cond, settings.cfg_scale),
        noise,
        sigmas,
        step_key,
        eta=settings.eta,
        kind=settings.sde_kind,
        window_start=start,
        window=settings.window,
    )


# --- credit -------------------------------------------------------------------------------------------


def credit(
    rewards: Rewards, weights: jax.Array, group_ids: jax.Array, settings: GRPOSettings
) -> tuple[Credit, dict[str, jax.Array]]:
    """Group advantages for the credit mode (SPEC section 7) and their statistics.

    Args:
      rewards: region rewards (B, R+1) and global rewards (B,) with validity.
      weights: (B, R+1, L) token weights.
      group_ids: (B,) int group of each sample.
    """
    if settings.reward_shift:
        rewards = Rewards(*(_rolled_rows(x, settings.reward_shift) for x in rewards))
    if settings.token_map_shift and settings.credit != "scalar":
        # Spatial but wrong credit: each region's advantage lands on another input's region tokens.
        weights = _rolled_rows(weights, settings.token_map_shift)
    kw = dict(std=settings.adv_std, clip=settings.adv_clip, eps=settings.adv_eps)
    region_adv = group_advantages(rewards.region, rewards.region_valid, group_ids, **kw)
    image_adv = group_advantages(rewards.image, rewards.image_valid, group_ids, **kw)
    if settings.credit == "spatial":
        adv = token_advantages(region_adv, weights)
        if settings.mix_lambda != 1.0:
            adv = mix_global(adv, image_adv, settings.mix_lambda)
        mask = token_validity(rewards.region_valid, weights)
        stats_rewards, stats_valid = rewards.region, rewards.region_valid
    elif settings.credit == "region":
        adv, mask = region_adv, rewards.region_valid.astype(jnp.float32)
        stats_rewards, stats_valid = rewards.region, rewards.region_valid
    else:
        adv, mask = image_adv, rewards.image_valid.astype(jnp.float32)
        stats_rewards, stats_valid = rewards.image, rewards.image_valid
    _, spread, zero = group_statistics(stats_rewards, stats_valid, group_ids, std=settings.adv_std)
    valid_f = stats_valid.astype(jnp.float32)
    n_valid = jnp.maximum(valid_f.sum(), 1.0)
    metrics = {
        "adv/abs_mean": jnp.abs(adv * mask).sum() / jnp.maximum(mask.sum(), 1.0),
        "adv/spread_mean": (spread * valid_f).sum() / n_valid,
        "adv/zero_spread_frac": (zero * valid_f).sum() / n_valid,
    }
    return Credit(adv, mask, weights), metrics


def _rolled_rows(x: jax.Array, shift: int) -> jax.Array:
    """``x`` with its rows (batch axis) rolled by ``shift``, keeping its sharding. A roll crosses devices,
    so it runs on a replicated copy (the token weights are small: B x (R+1) x L)."""
    if jax.sharding.get_abstract_mesh().empty:
        return jnp.roll(x, shift, axis=0)
    spec = jax.typeof(x).sharding.spec
    return jax.sharding.reshard(jnp.roll(jax.sharding.reshard(x, jax.P()), shift, axis=0), spec)


def reward_metrics(scores: RegionScores, rewards: Rewards, scale: float) -> dict[str, jax.Array]:
    """Means of the rewards over valid entries, split into edit regions and background, and failures.

    Plus what a person would check: 'region_success_rate', the share of valid edit regions whose success
    score is at least SUCCESS_SHARE of the scale; 'multi_region_success', the share of images all of whose
    regions succeed; 'background_preservation', the mean background score as a fraction of the scale.
    """
    valid = rewards.region_valid.astype(jnp.float32)

    def mean(x: jax.Array, w: jax.Array) -> jax.Array:
        return (x * w).sum() / jnp.maximum(w.sum(), 1.0)

    edit_valid = rewards.region_valid[:, :-1]
    succeeded = scores.success >= SUCCESS_SHARE * scale
    image_ok = rewards.image_valid & jnp.any(edit_valid, axis=1)
    all_succeeded = jnp.all(succeeded | ~edit_valid, axis=1)
    return {
        "reward/region_success_rate": mean(succeeded.astype(jnp.float32), edit_valid.astype(jnp.float32)),
        "reward/multi_region_success": mean(all_succeeded.astype(jnp.float32), image_ok.astype(jnp.float32)),
        "reward/background_preservation": mean(scores.background, valid[:, -1]) / scale,
        "reward/mean": mean(rewards.image, rewards.image_valid.astype(jnp.float32)),
        "reward/region_mean": mean(rewards.region[:, :-1], valid[:, :-1]),
        "reward/background_mean": mean(rewards.region[:, -1], valid[:, -1]),
        "reward/aes_mean": mean(jnp.minimum(scores.naturalness, scores.artifacts), valid[:, -1]) / scale,
        "reward/failures": (~scores.valid).sum().astype(jnp.float32),
    }


# --- update -------------------------------------------------------------------------------------------


def _per_sample(traj: Trajectory, cond: Conditioning, credit_: Credit) -> dict[str, jax.Array]:
    """Everything the update slices by sample, batch axis first."""
    optional = ("text_uncond", "text_mask", "text_mask_uncond")
    extra = {k: getattr(cond, k) for k in optional if getattr(cond, k) is not None}
    return extra | {
        "x": jnp.moveaxis(traj.x, 0, 1),  # (B, W, L, C)
        "x_next": jnp.moveaxis(traj.x_next, 0, 1),
        "logp_old": jnp.moveaxis(traj.logp, 0, 1),  # (B, W, L)
        "text": cond.text,
        "reference": cond.reference,
        "adv": credit_.adv,
        "mask": credit_.mask,
        "weights": credit_.weights,
    }


def _micro_batches(
    tree: dict[str, jax.Array], key: jax.Array, settings: GRPOSettings
) -> dict[str, jax.Array]:
    """Shuffles each device's samples and cuts (M, micro_batch, ...) micro-batches, each spread over all
    devices: on every device, row m holds local samples m*b..(m+1)*b-1 of its shuffled order."""
    shards = settings.batch_shards
    local = next(iter(tree.values())).shape[0] // shards
    micro_local = settings.micro_batch // shards
    count = local // micro_local

    def cut_local(block: dict[str, jax.Array], key: jax.Array, index: jax.Array) -> dict[str, jax.Array]:
        perm = jax.random.permutation(jax.random.fold_in(key, index), local)
        return {
            k: jnp.take(v, perm, axis=0).reshape(count, micro_local, *v.shape[1:]) for k, v in block.items()
        }

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return cut_local(tree, key, jnp.zeros((), jnp.int32))
    # The shuffle stays on each device: a shard_map body sees only its own samples.
    tree = {k: jax.sharding.reshard(v, jax.P(BATCH_AXES)) for k, v in tree.items()}
    return jax.shard_map(
        lambda block, k: cut_local(block, k, jax.lax.axis_index(BATCH_AXES)),
        in_specs=(jax.P(BATCH_AXES), jax.P()),
        out_specs=jax.P(None, BATCH_AXES),
    )(tree, key)


def _conditioning(mb: dict[str, jax.Array], ids: tuple[jax.Array, jax.Array]) -> Conditioning:
    """A micro-batch's conditioning (``_per_sample``'s fields, cut by ``_micro_batches``)."""
    return Conditioning(
        mb["text"],
        mb["reference"],
        *ids,
        mb.get("text_uncond"),
        text_mask=mb.get("text_mask"),
        text_mask_uncond=mb.get("text_mask_uncond"),
    )


def _reference_kv(
    parts: PolicyParts, params: Any, mb: dict[str, jax.Array], ids: tuple[jax.Array, jax.Array]
) -> Any:
    """The micro-batch's reference keys and values under ``params`` for a K/V-caching model, else None."""
    return merge(parts, params).prepare(_conditioning(mb, ids)).reference_kv


def _step_loss(
    params: Any,
    kv: Any,
    parts: PolicyParts,
    ref_params: Any,
    ref_kv: Any,
    mb: dict[str, jax.Array],
    t: jax.Array,
    sigma: jax.Array,
    sigma_next: jax.Array,
    sigma_max: jax.Array,
    ids: tuple[jax.Array, jax.Array],
    counts: tuple[jax.Array, jax.Array],
    settings: GRPOSettings,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One micro-batch's and window step's share of the loss: the clipped objective plus beta * KL, each
    divided by the whole optimizer step's count of valid entries, ``counts`` = (policy-loss entries, KL
    (sample, token) entries), both over all its micro-batches and window steps, so that the shares sum to
    the full-batch mean (SPEC section 8). ``kv`` / ``ref_kv``: the policy's and the reference model's
    cached reference keys and values (``_reference_kv``), or None; the loss is differentiable in ``kv``."""
    cond = _conditioning(mb, ids)
    # A sample without credit (its reward failed) is selected away before the model sees it: a NaN in its
    # trajectory would otherwise reach the weight gradient as 0 * NaN through the backward pass.
    valid = sample_validity(mb["mask"])  # (b,)
    x, x_next, logp_old = (
        jnp.where(valid.reshape((-1,) + (1,) * (v.ndim - 2)), v[:, t], 0.0)
        for v in (mb["x"], mb["x_next"], mb["logp_old"])
    )

    def step(p: Any, kv: Any) -> Any:
        c = cond._replace(reference_kv=kv)
        v = velocity_fn(merge(parts, p), c, settings.cfg_scale)(x, jnp.full((x.shape[0],), sigma))
        return sde_step(
            v,
            x,
            sigma,
            sigma_next,
            settings.eta,
            x_next,
            kind=settings.sde_kind,
            sigma_max=sigma_max,
            next_sample=x_next,
        )

    out = step(params, kv)
    loss, metrics = policy_loss(
        out.token_logp,
        logp_old,
        mb["adv"],
        mode=settings.credit,
        clip_range=settings.clip_range,
        weights=mb["weights"],
        mask=mb["mask"],
        count=counts[0],
    )
    if settings.kl_beta > 0:
        ref = step(jax.lax.stop_gradient(ref_params), jax.lax.stop_gradient(ref_kv))
        token_kl = gaussian_kl(
            out.mean, jax.lax.stop_gradient(ref.mean), out.std, dt=sigma_next - sigma, form=settings.kl_form
        )
        # The KL is a mean over the valid samples' tokens too (SPEC section 8).
        token_kl = jnp.where(valid[:, None], token_kl, 0.0)
        kl = token_kl.sum() / jnp.maximum(counts[1], 1.0)
        loss = loss + settings.kl_beta * kl
        weights = jnp.where(valid[:, None, None], mb["weights"], 0.0)
        metrics["kl/edit"] = (token_kl * weights[:, :-1].sum(1)).sum() / jnp.maximum(
            weights[:, :-1].sum(), 1.0
        )
        metrics["kl/background"] = (token_kl * weights[:, -1]).sum() / jnp.maximum(weights[:, -1].sum(), 1.0)
    else:
        kl = jnp.zeros((), jnp.float32)
    metrics["kl"] = kl
    metrics["total_loss"] = loss
    return loss, metrics


def _f32_zeros(x: jax.Array) -> jax.Array:
    """A float32 gradient accumulator for ``x``: sums of many small bf16 terms lose their low bits."""
    return jnp.zeros_like(x, dtype=jnp.float32)


def update(
    parts: PolicyParts,
    opt_state: Any,
    optimizer: optax.GradientTransformation,
    ref_params: Any,
    traj: Trajectory,
    cond: Conditioning,
    credit_: Credit,
    key: jax.Array,
    sigma_max: jax.Array,
    settings: GRPOSettings,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """Inner epochs of clipped-GRPO updates on one rollout batch (SPEC section 9, step 5).

    Each epoch shuffles the samples, cuts micro-batches, and for each micro-batch averages the gradient over
    the W window steps; every ``grad_accum`` micro-batches make one optimizer step (AdamW after a global
    grad-norm clip, in ``optimizer``). A step whose loss or gradient is not finite is skipped and counted
    ('skipped_updates'); so is a step none of whose samples has credit ('empty_updates': every reward of
    its micro-batches failed).

    Every mean runs over the valid entries of the whole optimizer step (its ``grad_accum`` micro-batches
    and W window steps): each micro-batch's loss is divided by that count, known before the loop, so the
    accumulated gradient equals the full-batch gradient whatever the micro-batching (SPEC section 8).

    Returns:
      (params, opt_state, metrics): 'loss', 'kl' and 'total_loss' are the optimizer steps' full-batch
      values, averaged over the steps; the others are means over all (micro-batch, window step) pairs;
      plus 'skipped_updates', 'empty_updates' and 'grad_norm'.
    """
    ids = (cond.img_ids, cond.txt_ids)
    window = traj.sigma.shape[0]
    length = traj.logp.shape[-1]
    per_sample = _per_sample(traj, cond, credit_)
    grad_fn = jax.grad(_step_loss, argnums=(0, 1), has_aux=True)

    def reduce(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
        # Shares of the full-batch loss add up; rates and per-entry means are averaged.
        return {k: (v.sum() if k in ADDITIVE_METRICS else v.mean()) for k, v in metrics.items()}

    def micro_grad(
        params: Any, mb: dict[str, jax.Array], counts: tuple[jax.Array, jax.Array]
    ) -> tuple[Any, dict[str, jax.Array]]:
        # A K/V-caching model's reference pass runs once per micro-batch, not once per window step: each
        # step's gradient with respect to the cache is summed, then pulled back through the pass once.
        kv, kv_vjp = jax.vjp(lambda p: _reference_kv(parts, p, mb, ids), params)
        ref_kv = _reference_kv(parts, ref_params, mb, ids) if settings.kl_beta > 0 else None

        def over_steps(acc: Any, t: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
            g, m = grad_fn(
                params,
                kv,
                parts,
                ref_params,
                ref_kv,
                mb,
                t,
                traj.sigma[t],
                traj.sigma_next[t],
                sigma_max,
                ids,
                counts,
                settings,
            )
            return jax.tree.map(jnp.add, acc, g), m

        zeros = jax.tree.map(_f32_zeros, (params, kv))
        (total, kv_total), metrics = jax.lax.scan(over_steps, zeros, jnp.arange(window))
        if kv is not None:
            (through_kv,) = kv_vjp(jax.tree.map(lambda g, k: g.astype(k.dtype), kv_total, kv))
            total = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), total, through_kv)
        return total, reduce(metrics)

    def optimizer_step(carry: Any, group: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        params, opt_state = carry
        # The whole step's counts, before its micro-batch loop: (grad_accum, micro_batch, ...) masks.
        per_micro = jax.vmap(lambda m: (entry_count(m, settings.credit, length), sample_validity(m).sum()))
        entries, samples = (x.sum() for x in per_micro(group["mask"]))
        counts = (window * entries, (window * length * samples).astype(jnp.float32))

        def accumulate(acc: Any, mb: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
            g, m = micro_grad(params, mb, counts)
            return jax.tree.map(jnp.add, acc, g), m

        zeros = jax.tree.map(_f32_zeros, params)
        grads, metrics = jax.lax.scan(accumulate, zeros, group)
        # Summed in float32; handed to the optimizer in the params' dtype, which its state follows: float32
        # (LoRA factors, and the master weights of a full fine-tuning; see master_weights).
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        metrics = reduce(metrics)
        grad_norm = optax.global_norm(grads)
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = (
            jnp.isfinite(grad_norm)
            & jnp.isfinite(metrics["total_loss"])
            & jnp.isfinite(optax.global_norm(updates))
        )
        # No sample with credit (every reward failed): Adam's momentum alone would still move the weights.
        has_credit = group["mask"].sum() > 0
        apply = finite & has_credit
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
        metrics["grad_norm"] = grad_norm
        metrics["skipped_updates"] = (~finite).astype(jnp.float32)
        metrics["empty_updates"] = (finite & ~has_credit).astype(jnp.float32)
        return (keep(new_params, params), keep(new_opt, opt_state)), metrics

    params = parts.params
    all_metrics = []
    for epoch_key in jax.random.split(key, settings.inner_epochs):
        mbs = _micro_batches(per_sample, epoch_key, settings)
        steps = next(iter(mbs.values())).shape[0] // settings.grad_accum
        groups = jax.tree.map(lambda x, n=steps: x.reshape(n, settings.grad_accum, *x.shape[1:]), mbs)
        (params, opt_state), metrics = jax.lax.scan(optimizer_step, (params, opt_state), groups)
        all_metrics.append(metrics)
    stacked = jax.tree.map(lambda *m: jnp.concatenate(m), *all_metrics)
    out = jax.tree.map(jnp.mean, stacked)
    out["skipped_updates"] = stacked["skipped_updates"].sum()
    out["empty_updates"] = stacked["empty_updates"].sum()
    out["optimizer_steps"] = jnp.asarray(stacked["skipped_updates"].shape[0], jnp.float32)
    return params, opt_state, out


def rescore(
    parts: PolicyParts,
    traj: Trajectory,
    cond: Conditioning,
    sigma_max: jax.Array,
    settings: GRPOSettings,
) -> jax.Array:
    """(W, B, L) token log-probs of the recorded trajectory under the policy's current params."""
    velocity = velocity_fn(merge(parts), cond, settings.cfg_scale)  # prepared once for every step

    def one(x: jax.Array, x_next: jax.Array, s: jax.Array, s_next: jax.Array) -> jax.Array:
        v = velocity(x, jnp.full((x.shape[0],), s))
        return sde_step(
            v,
            x,
            s,
            s_next,
            settings.eta,
            x_next,
            kind=settings.sde_kind,
            sigma_max=sigma_max,
            next_sample=x_next,
        ).token_logp

    return jax.lax.map(lambda a: one(*a), (traj.x, traj.x_next, traj.sigma, traj.sigma_next))


def score_and_credit(
    scores: RegionScores,
    region_valid: jax.Array,
    weights: jax.Array,
    group_ids: jax.Array,
    settings: GRPOSettings,
) -> tuple[Rewards, Credit, dict[str, jax.Array]]:
    """Eq. 3 rewards from the judge's scores, then credit; returns (rewards, credit, metrics)."""
    rewards = score_rewards(scores, region_valid, settings.score_scale)
    credit_, metrics = credit(rewards, weights, group_ids, settings)
    metrics.update(reward_metrics(scores, rewards, settings.score_scale))
    return rewards, credit_, metrics
