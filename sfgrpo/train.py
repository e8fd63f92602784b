"""The training loop: a supervised warm start, then SpatialFlow-GRPO (SPEC section 9), read top to bottom.

Outputs in the workdir: ``metrics.jsonl`` and TensorBoard events (``tb/``), ``warmstart/`` (the cached warm
start; ``warmstart_progress/`` while it trains), ``checkpoints/`` (Orbax: trainable params, optimizer,
step, RNG, data position), evaluation grids ``eval_grid_step<N>.png``, the reward plot ``rewards.png``,
``export/step_<N>/`` (the trained model for diffusers, ``sfgrpo.export``) and, for a FLUX.2-klein run,
``base_model.json`` (its base folder's fingerprint). Rerunning with the same workdir resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from sfgrpo import (
    builders,
    checkpoint,
    export,
    metrics,
    preemption,
    resume,
    reward_stage,
    run_config,
    runtime,
    trained,
    warmstart,
)
from sfgrpo.data import pipeline
from sfgrpo.evaluation import in_training
from sfgrpo.iteration import host_numpy
from sfgrpo.models.tiny import images_to_uint8
from sfgrpo.rl.step import compute_copy

_log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (for example, repeated non-finite updates); the message says why."""


def _signature(tree: Any) -> str:
    """A short hash of a pytree's paths, shapes and dtypes: names the model shape in checkpoint metadata."""
    layout = checkpoint.tree_layout(tree)
    return hashlib.sha1(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Runs the configured training in ``workdir`` (resuming if it holds a checkpoint).

    ``on_step(step, metrics)`` is called after each GRPO iteration (for tools and tests).
    Returns the final evaluation metrics. Raises ``preemption.Preempted`` after a SIGTERM (its checkpoint
    saved), and the errors of ``builders``, ``checkpoint``, ``resume`` and the judges for a run that
    cannot start, before anything in the workdir is written.
    """
    with preemption.PreemptionGuard() as guard:
        return _train(config, Path(workdir).absolute(), on_step, guard)


def _train(
    config: ml_collections.ConfigDict,
    workdir: Path,
    on_step: Callable[[int, dict[str, float]], None] | None,
    guard: preemption.PreemptionGuard,
) -> dict[str, float]:
    # --- Checks: nothing in the workdir is written until the run is known to be able to start ----------
    builders.validate(config)
    settings = builders.grpo_settings(config)
    mesh = builders.make_mesh(config)
    _check_workdir(workdir)
    snapshot = run_config.snapshot(config, jax.process_count())
    resume_point = resume.find(workdir / "checkpoints", snapshot, config)
    train_source = builders.data_source(config, "train")
    eval_source = builders.data_source(config, "test")
    n_eval = _eval_rows(config, len(eval_source))
    # A remote judge must answer before hours of set-up and warm start are spent.
    judge = reward_stage.connect(config.reward)
    # The benchmark subset scored at every evaluation (train.eval_benchmark): read, and its judge checked.
    bench = in_training.open_benchmark(config, workdir)
    _log.info("mesh %s on %d devices (%s)", dict(mesh.shape), jax.device_count(), jax.default_backend())

    with runtime.use_mesh(mesh):
        warm_seed = builders.warmstart_seed(config)
        model = builders.build_model(config, mesh, warm_seed)
        policy, condition = model.policy, model.condition
        try:
            base = trained.run_base(workdir, config)
        except trained.TrainedRunError as err:
            raise TrainingError(str(err)) from None
        warm_cache = workdir / "warmstart"
        warm_fingerprint = warmstart.fingerprint(config)
        warm_cached = warmstart.load_cached(policy, warm_cache, warm_fingerprint)
        optimizer = builders.make_optimizer(config.rl.lr, config.rl.weight_decay, config.rl.max_grad_norm)
        base_key = jax.random.key(config.seed)
        restored = None
        if resume_point is not None:
            if not warm_cached and config.warmstart.steps > 0:
                raise TrainingError(
                    f"{workdir} holds GRPO checkpoints but no usable warm-start cache ({warm_cache}: "
                    "missing, or built for another model, data or seed): the adapters were trained on a base "
                    "that is gone; use a fresh workdir"
                )
            # Raises CheckpointMismatchError, listing the paths, when the workdir holds another model shape.
            abstract = builders.abstract_train_state(policy, config, optimizer, base_key)
            restored = resume_point.restore(abstract)

        # --- Outputs: from here on the run writes in the workdir ------------------------------------------
        workdir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        trained.write_base(workdir, base)
        writer = metrics.MetricsWriter(workdir)
        if resume_point is None:
            dropped = writer.truncate_after(-1, stage=("grpo", "eval", "compile", "resume"))
            if dropped:
                _log.info("no GRPO checkpoint yet: dropped %d metric lines of an earlier attempt", dropped)
        else:
            dropped = writer.truncate_after(resume_point.step, stage=("grpo", "eval", "compile", "resume"))
            _log.info(
                "resuming from step %d (dropped %d metric lines written after it)", resume_point.step, dropped
            )
            if resume_point.changes:
                writer.write_event(resume_point.step, "resume", {"config_changes": resume_point.changes})
            resume_point.set_aside()
        ckpt = checkpoint.Checkpointer(
            workdir / "checkpoints",
            save_every=config.train.checkpoint_every,
            keep=config.train.keep_checkpoints,
        )

        def batches(
            source: Any, batch_size: int, group_size: int, seed: int, state: Any = None, **kw: Any
        ) -> Any:
            pcfg = builders.pipeline_config(
                config, batch_size=batch_size, group_size=group_size, seed=seed, **kw
            )
            it = pipeline.make_iterator(source, pcfg, state=state)
            # (this host's numpy batch, the global device batch): a remote judge needs the host fields.
            return it, ((b, builders.device_batch(b, mesh, model.text_fields)) for b in it)

        # --- The supervised warm start (cached) ----------------------------------------------------------
        warm_progress_dir = workdir / warmstart.PROGRESS_DIR
        if warm_cached:
            if warm_progress_dir.exists():
                # A kill between writing the cache and removing the progress leaves progress of no use.
                warmstart.remove_progress(warm_progress_dir)
        elif config.warmstart.steps == 0:
            _log.info("warm start: skipped (warmstart.steps = 0)")
        else:
            progress = warmstart.Progress(
                warm_progress_dir, warm_fingerprint, save_every=config.warmstart.checkpoint_every
            )
            # Lines logged after the step it resumes from (all of them, starting afresh) are dropped.
            dropped = writer.truncate_after(progress.step, stage="warmstart")
            if dropped:
                _log.info(
                    "warm start: %s; dropped %d metric lines of an interrupted one",
                    f"resuming after step {progress.step}" if progress.step else "restarting",
                    dropped,
                )
            per_host = config.warmstart.batch_size // jax.process_count()

            def warm_batches(data_state: Any) -> Any:
                it, device = batches(train_source, per_host, 1, warm_seed + 1, data_state)
                return (d for _, d in device), it.get_state

            warmstart.run(
                policy,
                condition,
                warm_batches,
                steps=config.warmstart.steps,
                lr=config.warmstart.lr,
                seed=warm_seed,
                cache_dir=warm_cache,
                fingerprint=warm_fingerprint,
                progress=progress,
                log_metrics=lambda step, m: writer.write(step, "warmstart", m),
                should_stop=guard.should_stop,
            )

        # --- GRPO state: what trains, the reference, the optimizer --------------------------------------
        adapted = builders.add_lora(policy, config, config.seed + 2)
        graphdef, params, frozen, compute_dtypes = builders.split_for_grpo(policy, config)
        n_train = sum(x.size for x in jax.tree.leaves(params))
        _log.info(
            "GRPO trains %d parameters (%s)", n_train, f"LoRA on {len(adapted)} layers" if adapted else "full"
        )
        opt_steps = builders.optimizer_steps_per_iteration(config.rl, jax.process_count())
        _log.info(
            "GRPO takes %d optimizer steps per iteration%s",
            opt_steps,
            ": on-policy, every ratio is 1 and rl.clip_range_* never acts" if opt_steps == 1 else "",
        )
        if config.rl.kl_beta > 0:
            # The reference is the base model: LoRA off (zero adapters) or a frozen copy of the weights.
            # A full fine-tuning's reference is kept in the compute dtype: no need for float32 masters.
            ref_params = (
                jax.tree.map(lambda x: x * 0, params) if adapted else compute_copy(params, compute_dtypes)
            )
        else:
            ref_params = {}
        state = {"params": params, "opt_state": optimizer.init(params), "step": 0, "rng": base_key}
        data_state = None
        if restored is not None:
            state, data_state = restored
        programs = builders.make_programs(config, graphdef, optimizer, condition, compute_dtypes)
        rewards = reward_stage.RewardStage(config.reward, programs, mesh, judge)
        meta = {"model": _signature(params), "credit": settings.credit, "config": snapshot}

        # --- Data ----------------------------------------------------------------------------------------
        train_iter, train_batches = batches(
            train_source, config.rl.batch_size, config.rl.group_size, config.seed, data_state
        )
        _, eval_batches = batches(eval_source, n_eval, 1, config.seed, shuffle=False)
        eval_host, eval_batch = next(eval_batches)  # fixed held-out inputs, evaluated with ODE sampling
        eval_key = jax.random.key(config.seed + 10_000)
        if bench is not None:
            bench.place(programs, mesh, model.text_fields)

        def evaluate(step: int, grid_name: str | None) -> dict[str, float]:
            """Held-out metrics (the same on every process); the grid is drawn by process 0. Collective."""
            edited, m = programs("evaluate", state["params"], frozen, eval_batch, eval_key)
            if rewards.on_host:
                m = rewards.evaluate(edited, eval_batch, eval_host)
            m = {k: float(v) for k, v in host_numpy(m).items()}
            if bench is not None:
                m |= bench.evaluate(step, programs, state["params"], frozen)
            if grid_name is not None:
                rows = min(config.train.grid_rows, edited.shape[0])
                fields = ("source", "target", "boxes", "region_valid")
                # Every process takes part in the gather of the grid's rows; process 0 draws and writes.
                b = host_numpy(
                    runtime.first_rows({**{k: eval_batch[k] for k in fields}, "edited": edited}, rows)
                )
                if jax.process_index() == 0:
                    grid = metrics.eval_grid(
                        b["source"], images_to_uint8(b["edited"]), b["target"], b["boxes"], b["region_valid"]
                    )
                    metrics.save_png(workdir / grid_name, grid)
                    writer.write_images(step, "eval", "grid", grid)
            _log.info("eval at step %d: %s", step, _held_out_summary(m))
            return m

        # --- The GRPO loop ---------------------------------------------------------------------------------
        # With a remote judge, batch k's rewards are computed while batch k+1 rolls out (a lag of one
        # update). The pipeline drains before every evaluation and checkpoint, so a resumed run starts from
        # exactly the state the original had there.
        overlap = rewards.on_host and config.reward.overlap
        pending: reward_stage.Pending | None = None
        position = data_state  # the data position right after the last finished step
        skipped_in_a_row = 0
        last_eval: dict[str, float] = {}

        def finish(p: reward_stage.Pending) -> None:
            """Waits for a batch's rewards, updates the policy on it, and does the step's bookkeeping."""
            nonlocal state, skipped_in_a_row, last_eval, position
            step = p.step
            t0 = time.perf_counter()
            if p.updated is not None:
                params, opt_state, m = p.updated  # the fused iteration has updated already
                times = {"time/iteration_s": p.rollout_s}
            else:
                credit, m_reward = rewards.result(p)
                t1 = time.perf_counter()
                _, update_key = jax.random.split(jax.random.fold_in(state["rng"], step))
                params, opt_state, m_update = programs(
                    "update",
                    state["params"],
                    frozen,
                    state["opt_state"],
                    ref_params,
                    p.out,
                    credit,
                    update_key,
                )
                jax.block_until_ready(params)
                t2 = time.perf_counter()
                m = {**m_reward, **m_update}
                times = {
                    "time/rollout_s": p.rollout_s,
                    "time/credit_s": t1 - t0,
                    "time/update_s": t2 - t1,
                    "time/iteration_s": time.perf_counter() - p.started,
                    # Updates between the rollout's policy and the one being updated (0 without overlap).
                    "policy_lag": float(int(state["step"]) - p.version),
                }
            state = {**state, "params": params, "opt_state": opt_state, "step": step}
            m = {k: float(v) for k, v in host_numpy(m).items()} | times

            # Non-finite updates were skipped inside the step; stop if they keep coming.
            skipped_in_a_row = skipped_in_a_row + 1 if m["skipped_updates"] > 0 else 0
            if skipped_in_a_row >= config.rl.max_consecutive_skips:
                raise TrainingError(
                    f"step {step}: non-finite loss or gradient in {skipped_in_a_row} iterations in a row "
                    f"(rl.max_consecutive_skips={config.rl.max_consecutive_skips}); the last checkpoint is "
                    f"at step {ckpt.latest_step()}"
                )
            if step % config.train.eval_every == 0 or step == config.train.steps:
                grid = f"eval_grid_step{step}.png" if step == config.train.steps else None
                last_eval = evaluate(step, grid)
                m |= last_eval
            if step % config.train.log_every == 0 or step == config.train.steps:
                writer.write(step, "grpo", m)
            # The data position right after this batch: with the overlap, the next batch is already drawn.
            position = p.data_state
            ckpt.save(step, state, position, meta, force=step == config.train.steps)
            every = config.train.export_every
            if every > 0 and step % every == 0 and step != config.train.steps:
                export_model(step, params)
            if on_step is not None:
                on_step(step, m)

        def export_model(step: int, params: Any) -> None:
            """The model at ``step`` for diffusers, in workdir/export/step_<step> (a collective)."""
            trained_policy = nnx.merge(graphdef, compute_copy(params, compute_dtypes), frozen)
            export.export_in_training(trained_policy, config, base, step, workdir)

        def drains(step: int) -> bool:
            """Whether the step must finish before the next batch rolls out (evaluation, checkpoint, end)."""
            return (
                not overlap
                or step % config.train.eval_every == 0
                or ckpt.should_save(step)
                or step == config.train.steps
            )

        def stop_on_sigterm() -> None:
            """After a SIGTERM on any process: finish the batch in flight, save its step, and stop."""
            nonlocal pending
            if pending is not None:
                finish(pending)
                pending = None
            step = int(state["step"])
            if step > 0:  # a step already on disk (a scheduled save, the resume point) is not rewritten
                ckpt.save(step, state, position, meta, force=True)
            ckpt.wait()
            ckpt.close()
            writer.close()
            if step == 0:
                raise preemption.Preempted(
                    "stopped on SIGTERM before the first GRPO iteration: nothing to save (the warm start is "
                    "cached); rerun the same command to start GRPO"
                )
            raise preemption.Preempted(
                f"stopped on SIGTERM after GRPO iteration {step}; checkpoint {ckpt.directory / str(step)} is "
                "saved; rerun the same command to resume from it"
            )

        start = int(state["step"])
        if resume_point is None:
            writer.write(0, "eval", evaluate(0, "eval_grid_step0.png"))
        try:
            for step in tqdm.trange(
                start + 1,
                config.train.steps + 1,
                desc="GRPO",
                initial=start,
                total=config.train.steps,
                disable=jax.process_index() != 0,
            ):
                if guard.should_stop():  # agreed by every process, so all stop after the same iteration
                    stop_on_sigterm()
                host_batch, batch = next(train_batches)
                data_state = train_iter.get_state()
                key = jax.random.fold_in(state["rng"], step)
                version = int(state["step"])  # updates the rollout policy has seen
                t0 = time.perf_counter()
                if config.train.fuse_step and not rewards.on_host:
                    fused = programs(
                        "iteration", state["params"], frozen, state["opt_state"], ref_params, batch, key
                    )
                    jax.block_until_ready(fused[0])
                    p = reward_stage.Pending(step, batch, None, version, t0, time.perf_counter() - t0)
                    p.updated = fused
                else:
                    rollout_key, _ = jax.random.split(key)
                    out = programs("rollout", state["params"], frozen, batch, rollout_key)
                    if not rewards.on_host:
                        jax.block_until_ready(out)  # to time the stages apart
                    rollout_s = time.perf_counter() - t0
                    policy_args = (state["params"], frozen)
                    p = rewards.start(step, out, batch, host_batch, version, t0, rollout_s, policy_args)
                p.data_state = data_state
                if pending is not None:
                    finish(pending)  # the previous batch: its rewards came in while this one rolled out
                    pending = None
                if drains(step):
                    finish(p)
                else:
                    pending = p
            if pending is not None:
                finish(pending)
        finally:
            rewards.close()

        # --- Wrap-up --------------------------------------------------------------------------------------
        ckpt.wait()
        ckpt.close()
        export_model(int(state["step"]), state["params"])  # after the loop: its compiles are not the loop's
        compile_times = {f"time/compile_{k}_s": v for k, v in programs.compile_seconds.items()}
        if compile_times:
            writer.write(config.train.steps, "compile", compile_times)
        if not last_eval:
            last_eval = evaluate(int(state["step"]), None)
        if bench is not None:
            bench.close()
        writer.close()
        before = _first_evaluation(workdir)
        if before is not None:
            _log.info(
                "held-out (ODE) before GRPO: %s; after %d iterations: %s",
                _held_out_summary(before),
                int(state["step"]),
                _held_out_summary(last_eval),
            )
        if jax.process_index() == 0:
            metrics.plot_rewards(workdir / metrics.METRICS_FILE, workdir / "rewards.png")
        return last_eval


# The held-out figures a person checks, as (metric, label, format).
_HELD_OUT = (
    ("eval/reward/mean", "reward", "{:.4f}"),
    ("eval/reward/region_success_rate", "regions edited right", "{:.0%}"),
    ("eval/reward/multi_region_success", "images with every region right", "{:.0%}"),
    ("eval/reward/background_preservation", "background preserved", "{:.1%}"),
)


def _held_out_summary(m: dict[str, float]) -> str:
    """'reward 0.4300, regions edited right 62%, ...' of the evaluation metrics present in ``m``."""
    return ", ".join(f"{label} {fmt.format(m[key])}" for key, label, fmt in _HELD_OUT if key in m)


def _first_evaluation(workdir: Path) -> dict[str, float] | None:
    """The step-0 evaluation in the workdir's metrics.jsonl (written before GRPO began; kept on resume)."""
    try:
        records = metrics.read_metrics(workdir / metrics.METRICS_FILE)
    except OSError:
        return None
    return next((r for r in records if r.get("stage") == "eval" and r.get("step") == 0), None)


def _check_workdir(workdir: Path) -> None:
    """Refuses a workdir that is a file or cannot be written, before anything is written in it."""
    if workdir.exists() and not workdir.is_dir():
        raise TrainingError(f"--workdir {workdir} is a file, not a directory")
    existing = next((p for p in (workdir, *workdir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise TrainingError(f"--workdir {workdir}: {existing} is a file, not a directory")
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingError(f"--workdir {workdir}: {existing} is not writable")


def _eval_rows(config: ml_collections.ConfigDict, available: int) -> int:
    """This host's rows of the evaluation batch: the examples asked for, a multiple of the batch devices."""
    wanted = min(config.train.eval_examples or available, available)  # 0: the whole test split
    shards = builders.batch_shards(config)
    n_eval = wanted // jax.process_count()
    while n_eval and (n_eval * jax.process_count()) % shards:
        n_eval -= 1  # the evaluation batch is split over the batch devices too
    if n_eval == 0:
        raise builders.ConfigError(
            f"config.train.eval_examples: the test split has {available} examples, fewer than the {shards} "
            "batch devices"
        )
    if n_eval * jax.process_count() < wanted:
        _log.warning(
            "evaluating %d of the %d test examples asked for (a multiple of the %d batch devices)",
            n_eval * jax.process_count(),
            wanted,
            shards,
        )
    return n_eval


def final_params(workdir: str | Path) -> dict[str, np.ndarray]:
    """The trainable parameters of the newest checkpoint in ``workdir``, as numpy (for comparisons).

    Reads onto this process's first device, whatever mesh or number of processes wrote the checkpoint.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    directory = Path(workdir).absolute() / "checkpoints"
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        restore = ocp.args.StandardRestore(fallback_sharding=one_device)
        restored = manager.restore(step, args=ocp.args.Composite(train_state=restore))
    return jax.tree.map(np.asarray, restored["train_state"]["params"])
