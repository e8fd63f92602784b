"""The reward stage of a GRPO iteration: in-graph, or a host/remote judge that overlaps the next rollout.

With the in-graph shapes reward the scores are a JAX function of the rollout and the stage is one compiled
program. With a host judge (``reward.kind`` 'host', 'server' or 'vlm') the edited images go to the host, a
``RewardWorker`` scores them in background threads, and the trainer rolls out the next batch meanwhile;
``result`` waits for the scores and turns them into credit on the device. The loss stays correct under
this lag because the update's old log-probabilities are the rollout policy's, recorded in the trajectory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np

from sfgrpo import runtime
from sfgrpo.iteration import Programs, RolloutOut
from sfgrpo.models.tiny import images_to_uint8
from sfgrpo.rewards.base import RegionScores
from sfgrpo.rewards.reward_config import HOST_KINDS
from sfgrpo.rl.step import Credit

if TYPE_CHECKING:
    from sfgrpo.rewards.base import HostReward, HostScores, ScoreRequest


@dataclasses.dataclass
class Pending:
    """A rolled-out batch whose rewards are on their way.

    ``version``: how many updates the rollout policy had seen (for the policy lag); ``started``: when the
    rollout began (perf_counter seconds). ``scored``: the finished (credit, metrics) of an in-graph reward;
    ``future``: a remote judge's answer; ``updated``: the fused iteration's (params, opt_state, metrics).
    """

    step: int
    batch: dict[str, jax.Array] | None
    out: RolloutOut | None
    version: int
    started: float
    rollout_s: float
    submitted: float = 0.0
    scored: tuple[Credit, dict[str, Any]] | None = None
    updated: tuple[Any, Any, dict[str, jax.Array]] | None = None
    data_state: Any = None  # the input pipeline's state just after this batch (what its checkpoint saves)
    future: concurrent.futures.Future[HostScores] | None = None
    completed: float | None = None  # when the judge's answer arrived (perf_counter)


def connect(reward: ml_collections.ConfigDict) -> HostReward | None:
    """The host-side judge of a host reward kind (a remote one checked to answer, with retries); None when
    the reward is in-graph. A judge that cannot be made raises ``RewardError``."""
    if reward.kind not in HOST_KINDS:
        return None
    from sfgrpo.rewards.base import RewardError  # noqa: PLC0415
    from sfgrpo.rewards.remote import make_host_reward  # noqa: PLC0415

    try:
        return make_host_reward(reward)
    except ValueError as err:
        raise RewardError(str(err)) from None


class RewardStage:
    """Starts and finishes the reward of rolled-out batches.

    Args:
      reward: ``config.reward``.
      programs: the run's compiled programs ('reward' for in-graph kinds, 'credit' for remote ones).
      mesh: the device mesh, for the host -> device transfer of remote scores.
      judge: ``connect(reward)``'s host-side judge for the remote kinds.
    """

    def __init__(
        self,
        reward: ml_collections.ConfigDict,
        programs: Programs,
        mesh: jax.sharding.Mesh,
        judge: HostReward | None,
    ) -> None:
        self.kind = reward.kind
        self.programs = programs
        self.mesh = mesh
        self.worker = None
        if self.on_host:
            if judge is None:
                raise ValueError(f"reward.kind={self.kind!r} needs a judge: pass connect(config.reward)")
            from sfgrpo.rewards.remote import RewardWorker  # noqa: PLC0415

            self.worker = RewardWorker(judge, max_pending=int(reward.max_pending))

    @property
    def on_host(self) -> bool:
        return self.kind in HOST_KINDS

    def start(
        self,
        step: int,
        out: RolloutOut,
        batch: dict[str, jax.Array],
        host_batch: dict[str, np.ndarray],
        version: int,
        started: float,
        rollout_s: float,
        policy: tuple[Any, Any],
    ) -> Pending:
        """Starts scoring a rollout; for a remote judge this fetches this host's edited images.

        ``policy``: (params, frozen) of the rollout, for an in-graph reward that uses the autoencoder.
        """
        pending = Pending(step, batch, out, version, started, rollout_s)
        if not self.on_host:
            t0 = time.perf_counter()
            scored = self.programs("reward", *policy, out.edited, batch, out.weights)
            credit_, metrics = jax.block_until_ready(scored)
            pending.scored = (credit_, {**metrics, "time/reward_s": time.perf_counter() - t0})
            return pending
        request = self._request(out.edited, host_batch)
        pending.submitted = time.perf_counter()
        pending.rollout_s = pending.submitted - started  # fetching the images waited for the rollout
        pending.future = self.worker.submit(request)
        pending.future.add_done_callback(lambda _: setattr(pending, "completed", time.perf_counter()))
        return pending

    def result(self, pending: Pending) -> tuple[Credit, dict[str, Any]]:
        """Waits for a batch's scores; returns its credit and reward metrics (device arrays, floats)."""
        if pending.scored is not None:
            return pending.scored
        wait_start = time.perf_counter()
        host = pending.future.result()  # RewardError propagates: the judge is gone and on_failure='fail'
        done = time.perf_counter()
        completed = pending.completed or done
        credit_, metrics = self.programs("credit", self._to_device(host), pending.batch, pending.out.weights)
        metrics = dict(metrics) | _counts(host, "reward")
        # This host's figures: how long the judge took, and how much of that the host spent waiting (the
        # rest was hidden behind the next rollout).
        metrics["time/reward_s"] = completed - pending.submitted
        metrics["time/reward_wait_s"] = max(0.0, completed - wait_start)
        return credit_, metrics

    def evaluate(
        self, edited: jax.Array, batch: dict[str, jax.Array], host_batch: dict[str, np.ndarray]
    ) -> dict[str, Any]:
        """Evaluation metrics of remotely judged images (in-graph kinds score inside 'evaluate')."""
        host = self.worker.submit(self._request(edited, host_batch)).result()
        metrics = dict(self.programs("judge_metrics", self._to_device(host), batch))
        return metrics | {k: v for k, v in _counts(host, "eval/reward").items() if "failures" in k}

    def _request(self, edited: jax.Array, host_batch: dict[str, np.ndarray]) -> ScoreRequest:
        """This host's rows: its edited images (fetched from the device) with their batch fields."""
        from sfgrpo.rewards.base import ScoreRequest  # noqa: PLC0415

        return ScoreRequest(
            source=host_batch["source"],
            edited=images_to_uint8(runtime.global_to_host_local(edited)),
            instructions=[str(t) for t in host_batch["instruction"]],
            boxes=host_batch["boxes"],
            region_valid=host_batch["region_valid"],
            region_labels=host_batch["region_labels"],
            target=host_batch["target"],
            region_masks=host_batch.get("region_masks"),
        )

    def _to_device(self, host: HostScores) -> RegionScores:
        """Every host's scores as one global RegionScores, sharded along the batch."""
        scores = {f: np.asarray(getattr(host, f)) for f in RegionScores._fields}
        return RegionScores(**runtime.host_local_to_global(scores, self.mesh))

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _counts(host: HostScores, prefix: str) -> dict[str, float]:
    """The judge's failure counts by reason and the valid images, summed over every process (each judges
    its own rows); a collective."""
    counts = {f"{prefix}/failures_{reason}": float(n) for reason, n in host.failures.items()}
    counts[f"{prefix}/valid_images"] = float(np.sum(host.valid))
    return runtime.sum_over_processes(counts)
