"""The supervised warm start: flow matching on (source, target) pairs, so that RL post-trains a model that
can already edit. The result is cached in the workdir; a rerun loads it instead of training again.

Loss: with x0 the target's tokens, eps ~ N(0, I) and sigma ~ logit-normal (as FLUX and SD3 are trained),
x_sigma = (1 - sigma) x0 + sigma eps and the policy regresses the velocity eps - x0, conditioned on the
instruction and the source's reference tokens.

The cache holds a fingerprint of what it was trained from (``fingerprint``: the model, data and warm-start
settings and the seed); a cache whose fingerprint differs from the run's is not loaded, and the warm start
trains again and replaces it.

While it trains, the warm start saves its progress (parameters, optimizer state, data position) every
``warmstart.checkpoint_every`` steps and when stopped by SIGTERM (``Progress``, in
``workdir/warmstart_progress``): rerunning the command resumes it from there, to the same result as an
uninterrupted one. The progress is removed once the cache is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sfgrpo import builders, checkpoint, compile_cache
from sfgrpo.checkpoint import Checkpointer
from sfgrpo.models.policy import EditPolicy
from sfgrpo.preemption import Preempted
from sfgrpo.rl.step import PolicyParts, merge

_log = logging.getLogger(__name__)


def flow_matching_loss(
    params: Any,
    parts: PolicyParts,
    condition: Any,
    batch: dict[str, jax.Array],
    key: jax.Array,
) -> jax.Array:
    """Mean squared velocity error of the policy on a batch of (source, instruction, target) examples."""
    policy = merge(parts, params)
    cond = condition(policy, batch)
    x0 = condition.autoencoder_of(policy).encode(batch["target"])
    sigma_key, noise_key = jax.random.split(key)
    batch_spec = jax.typeof(x0).sharding.spec
    sigma = jax.nn.sigmoid(jax.random.normal(sigma_key, (x0.shape[0],), out_sharding=jax.P(*batch_spec[:1])))
    noise = jax.random.normal(noise_key, x0.shape, out_sharding=batch_spec)
    x = (1.0 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    v = policy.velocity(x, sigma, cond)
    return jnp.mean((v - (noise - x0)) ** 2)


def _split(policy: EditPolicy) -> tuple[Any, Any, Any]:
    # The autoencoder (the FLUX.2 VAE, when the policy carries one) is not what the warm start trains.
    return nnx.split(policy, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("autoencoder"))), ...)


FINGERPRINT_FILE = "sfgrpo_fingerprint.json"  # inside the cache directory, written with it
PROGRESS_DIR = "warmstart_progress"  # in the workdir, beside the cache: the checkpoints of a warm start
# Settings that change neither the warm start's data nor its result: changing them keeps the cache. LoRA is
# attached after the warm start, to the base it trained.
_NOT_FINGERPRINTED = {
    "data": ("num_workers",),
    "warmstart": ("checkpoint_every",),
    "model": (
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "prompt_cache",
        "prompt_cache_batch",
        "remat",
        "scan_unroll",
    ),
}


def fingerprint(config: Any) -> dict[str, Any]:
    """What the warm start depends on: config.model, config.data, config.warmstart (less
    ``_NOT_FINGERPRINTED``) and the seeds they resolve to, as JSON-able values plus their sha256 under
    'sha256'. 'seed' is the warm start's seed (warmstart.seed, or config.seed for -1), and data.seed is
    resolved the same way: runs of several seeds that fix both share one cache."""
    parts: dict[str, Any] = {"seed": builders.warmstart_seed(config)}
    for section in ("model", "data", "warmstart"):
        values = json.loads(config[section].to_json_best_effort(sort_keys=True))
        parts[section] = {k: v for k, v in values.items() if k not in _NOT_FINGERPRINTED.get(section, ())}
    parts["data"]["seed"] = builders.data_seed(config)
    parts["warmstart"].pop("seed", None)
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, **parts}


def _stored_fingerprint(cache_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache_dir / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return None


def load_cached(policy: EditPolicy, cache_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """Loads the cached warm start into ``policy`` if ``cache_dir`` holds one made from ``fingerprint``;
    returns whether it did.

    Reads only: a cache with another fingerprint (or none, from an older sfgrpo) is left in place with a
    warning naming what differs, and False is returned, so that ``run`` trains again and replaces it.
    Raises checkpoint.CheckpointMismatchError when a matching cache was written for another model.
    """
    if not cache_dir.exists():
        return False
    stored = _stored_fingerprint(cache_dir)
    if stored is None or stored.get("sha256") != fingerprint["sha256"]:
        changed = (
            ["its fingerprint is missing or unreadable"]
            if stored is None
            else [k for k in fingerprint if k != "sha256" and stored.get(k) != fingerprint[k]] or ["sha256"]
        )
        _log.warning(
            "warm start: the cache at %s was made from other settings (%s differ); it is not used, and the "
            "warm start trains again and replaces it",
            cache_dir,
            ", ".join(changed),
        )
        return False
    _, params, _ = _split(policy)
    nnx.update(policy, checkpoint.load_params(cache_dir, params))
    _log.info("warm start: loaded the cached parameters from %s", cache_dir)
    return True


class Progress:
    """The checkpoints of a warm start in progress: (parameters, optimizer state) with the data position,
    every ``save_every`` steps and at a SIGTERM, in ``directory`` (the newest one kept).

    Opening it finds where to resume: ``step`` is the newest saved step made from ``fingerprint``, or 0,
    and ``elapsed_s`` the warm start's seconds until then (0 for progress saved without them).
    Progress made from other settings, or unreadable, is of no use to this run: it is removed with a
    warning naming why, and the warm start starts from step 0. Opening is a collective.
    """

    def __init__(self, directory: Path, fingerprint: dict[str, Any], *, save_every: int) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.save_every = save_every
        self.step = 0
        self.elapsed_s = 0.0
        self._ckpt = self._open()
        latest = self._ckpt.latest_step()
        if latest is None:
            return
        why = self._unusable(latest)
        if why is None:
            self.step = latest
            self.elapsed_s = float(self._ckpt.read_meta(latest).get("elapsed_s", 0.0))
            return
        _log.warning(
            "warm start: the progress at %s (step %d) %s; it is removed, and the warm start starts afresh",
            self.directory,
            latest,
            why,
        )
        self._ckpt.close()
        _remove(self.directory, "warmstart-progress-stale")
        self._ckpt = self._open()

    def _open(self) -> Checkpointer:
        return Checkpointer(self.directory, save_every=self.save_every, keep=1)

    def _unusable(self, step: int) -> str | None:
        try:
            stored = self._ckpt.read_meta(step).get("fingerprint", {})
        except checkpoint.CheckpointCorruptError as err:
            return f"cannot be read ({err.reason or err})"
        if stored.get("sha256") == self.fingerprint["sha256"]:
            return None
        changed = [k for k in self.fingerprint if k != "sha256" and stored.get(k) != self.fingerprint[k]]
        return f"was made from other settings ({', '.join(changed) or 'sha256'} differ)"

    def restore(self, abstract: Any) -> tuple[Any, Any]:
        """(train state, data position) of ``step``, placed like ``abstract`` (concrete arrays will do)."""
        state, data_state, _ = self._ckpt.restore(self.step, abstract_train_state=abstract)
        return state, data_state

    def save(self, step: int, state: Any, data_state: Any, elapsed_s: float, *, force: bool = False) -> bool:
        """Saves ``step`` (``elapsed_s``: the warm start's seconds so far) when it is due (or ``force``) and
        not on disk yet; returns whether it did."""
        meta = {"fingerprint": self.fingerprint, "step": int(step), "elapsed_s": float(elapsed_s)}
        return self._ckpt.save(step, state, data_state, meta, force=force)

    def close(self) -> None:
        """Waits for pending saves; the progress stays on disk."""
        self._ckpt.close()

    def discard(self) -> None:
        """Waits for pending saves and removes the progress (once the cache holds the result)."""
        self._ckpt.close()
        _remove(self.directory, "warmstart-progress-done")


def remove_progress(directory: Path) -> None:
    """Removes the progress of a warm start whose cache is complete (a collective)."""
    _log.info("warm start: the cache is complete; removing its leftover progress at %s", directory)
    _remove(directory, "warmstart-progress-leftover")


def _remove(directory: Path, name: str) -> None:
    if jax.process_index() == 0:
        shutil.rmtree(directory, ignore_errors=True)
    _sync(name)


def run(
    policy: EditPolicy,
    condition: Any,
    batches: Callable[[Any], tuple[Iterator[dict[str, jax.Array]], Callable[[], Any]]],
    *,
    steps: int,
    lr: float,
    seed: int,
    cache_dir: Path,
    fingerprint: dict[str, Any],
    progress: Progress,
    log_metrics: Callable[[int, dict[str, float]], None],
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Trains every parameter of ``policy`` but the autoencoder's for ``steps`` steps and caches them.

    Args:
      policy: updated in place.
      condition: the run's ``iteration.Conditioner`` (conditioning and the autoencoder).
      batches: given a data position (None: the start), (device batches with 'source', 'target',
        'text_ids' from there, a function giving the position after the last batch drawn).
      cache_dir: where the trained parameters are cached (see ``load_cached``); a stale cache there is
        replaced, only once the new one is complete.
      steps: >= 1 (train skips the warm start at 0).
      fingerprint: the run's ``fingerprint(config)``, stored with the cache.
      progress: the warm start's checkpoints: it resumes after ``progress.step``, saves as it goes, and
        the progress is removed once the cache is written.
      log_metrics: called with (step, scalars) every few steps.
      should_stop: asked before every step (a collective on several processes); True saves the progress
        and raises Preempted.
    """
    graphdef, params, rest = _split(policy)
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(lr, steps))
    )
    state = {"params": params, "opt_state": optimizer.init(params)}
    data_state = None
    done = progress.step
    if done:
        state, data_state = progress.restore(state)
        _log.info("warm start: resuming after step %d of %d from %s", done, steps, progress.directory)
    device_batches, position = batches(data_state)
    parts = PolicyParts(graphdef, params, rest)

    def train_step(params: Any, opt_state: Any, batch: dict[str, jax.Array], key: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(flow_matching_loss)(params, parts, condition, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step_fn = None
    key = jax.random.key(seed)
    losses: list[jax.Array] = []
    start = time.perf_counter() - progress.elapsed_s  # time/elapsed_s goes on from the saved progress
    for step in range(done + 1, steps + 1):
        if should_stop():
            saved = step - 1 > 0
            if saved:
                # A no-op if the step is on disk already.
                progress.save(step - 1, state, data_state, time.perf_counter() - start, force=True)
            progress.close()
            raise Preempted(
                f"stopped on SIGTERM during the warm start, after step {step - 1} of {steps}: "
                + (
                    f"its progress is saved in {progress.directory}; rerun the same command to resume it"
                    if saved
                    else "nothing to save; rerun the same command to start it"
                )
            )
        batch = next(device_batches)
        step_key = jax.random.fold_in(key, step)
        if step_fn is None:
            t0, hits = time.perf_counter(), compile_cache.hits()
            step_fn = (
                jax.jit(train_step).lower(state["params"], state["opt_state"], batch, step_key).compile()
            )
            _log.info(
                "compiled warm-start step in %.1f s (once; %s)",
                time.perf_counter() - t0,
                compile_cache.origin(hits),
            )
        new_params, new_opt_state, loss = step_fn(state["params"], state["opt_state"], batch, step_key)
        state, data_state = {"params": new_params, "opt_state": new_opt_state}, position()
        losses.append(loss)
        if step % 50 == 0 or step == steps:
            mean = float(np.mean(jax.device_get(losses)))
            losses.clear()
            log_metrics(step, {"loss": mean, "time/elapsed_s": time.perf_counter() - start})
            _log.info("warm start %d/%d: flow-matching loss %.4f", step, steps, mean)
        if step < steps:
            progress.save(step, state, data_state, time.perf_counter() - start)
    _replace_cache(cache_dir, state["params"], fingerprint)
    progress.discard()
    nnx.update(policy, state["params"])


def _replace_cache(cache_dir: Path, params: Any, fingerprint: dict[str, Any]) -> None:
    """Saves ``params`` with ``fingerprint`` next to ``cache_dir`` and renames them over it: an interrupted
    save leaves the old cache (or none) in place, never a half-written or mismatched one."""
    fresh = cache_dir.with_name(cache_dir.name + ".new")
    stale = cache_dir.with_name(cache_dir.name + ".stale")
    if jax.process_index() == 0:
        for leftover in (fresh, stale):
            shutil.rmtree(leftover, ignore_errors=True)
    _sync("warmstart-cache-clean")
    checkpoint.save_params(fresh, params)  # collective
    if jax.process_index() == 0:
        (fresh / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
        if cache_dir.exists():
            os.replace(cache_dir, stale)
        os.replace(fresh, cache_dir)
        shutil.rmtree(stale, ignore_errors=True)
    _sync("warmstart-cache-replaced")


def _sync(name: str) -> None:
    """Every process waits here (the cache is written by process 0 on a shared disk)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)
