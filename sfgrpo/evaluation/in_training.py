"""``train.eval_benchmark``: the trainer scores a fixed subset of a benchmark at every evaluation.

The subset is the benchmark's first ``train.eval_benchmark_examples`` examples, edited with the current
parameters by the run's compiled ``Programs.edit`` from noise seed 0, scored by the protocol ('shapes': the
run's shapes reward, ``Programs.scores``; the judged ones: a ``BenchmarkJudge``) and summarised by
``aggregate.summarize``: the figures ``python -m sfgrpo.evaluate --benchmark B --workdir W --step N
--limit E --seeds 1`` reports for the checkpoint of step N. Metrics: ``bench/overall`` (the macro mean
over task types), ``bench/type/<task_type>``, ``bench/score/<score>`` (each score's macro mean) and
``bench/failures``.

On N processes the padded subset is split over the processes (each builds its own rows), the edits and
scores are gathered to every process; a judge asks its endpoint from process 0 only (its answer cache is
one file), which shares the figures with the others.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sfgrpo import builders, runtime
from sfgrpo.evaluation import aggregate, editing
from sfgrpo.evaluation.benchmarks import Example
from sfgrpo.models.tiny import images_to_uint8

_log = logging.getLogger(__name__)

JUDGE_CACHE = "benchmark_judge_cache"
# The CLI's judge defaults (sfgrpo.evaluate): the same answers, so the same cache keys.
_JUDGE_SETTINGS = dict(
    temperature=0.0, max_tokens=1024, timeout_s=120.0, retries=3, backoff_s=1.0, max_concurrency=8
)


def _error(key: str, message: str) -> builders.ConfigError:
    return builders.ConfigError(f"config.train.{key}: {message}")


def read_examples(config: ml_collections.ConfigDict) -> tuple[Example, ...]:
    """The first ``eval_benchmark_examples`` examples of ``train.eval_benchmark``; ConfigError if unreadable
    or unscorable by the protocol."""
    from sfgrpo.data.records import RecordError  # noqa: PLC0415
    from sfgrpo.evaluation import benchmarks  # noqa: PLC0415

    t = config.train
    try:
        examples = benchmarks.read_benchmark(
            t.eval_benchmark,
            box_format=t.eval_benchmark_box_format or None,
            run_config=config,
            limit=int(t.eval_benchmark_examples),
        ).examples
        if t.eval_benchmark_protocol == "shapes":
            editing.check_scorable(examples)
    except (ValueError, RecordError, FileNotFoundError) as err:  # BenchmarkError is a ValueError
        raise _error("eval_benchmark", str(err).replace("--benchmark ", "")) from None
    return examples


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _make_judge(config: ml_collections.ConfigDict, workdir: Path, examples: Sequence[Example]) -> Any:
    """The protocol's judge, its examples and endpoint checked; on failure it leaves no cache folder."""
    from sfgrpo.data.annotate_vlm import EndpointDown  # noqa: PLC0415
    from sfgrpo.evaluation import judges  # noqa: PLC0415

    t = config.train
    cache = workdir / JUDGE_CACHE
    created = _first_missing(cache)
    try:
        judge = judges.BenchmarkJudge(
            t.eval_benchmark_protocol,
            t.eval_benchmark_judge_url,
            t.eval_benchmark_judge_model,
            cache_dir=str(cache),
            **_JUDGE_SETTINGS,
        )
        for e in examples:
            judge.check_example(e.key, e.task_type, len(e.labels))
        judge.check()
    except (ValueError, EndpointDown) as err:
        if created is not None:  # a run that cannot start writes nothing
            shutil.rmtree(created, ignore_errors=True)
        raise _error("eval_benchmark_judge_url", str(err)) from None
    return judge


class TrainingBenchmark:
    """The benchmark subset of a run, its judge and, once ``place``d, its fixed device inputs.

    Args:
      config: the run's config (``train.eval_benchmark`` set).
      workdir: the run's folder (the judge's answer cache).
      shards: the batch devices; the subset is padded to a multiple of them and of the processes.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path, shards: int) -> None:
        t = config.train
        self.name, self.protocol = str(t.eval_benchmark), str(t.eval_benchmark_protocol)
        self.examples = read_examples(config)
        self.judge = None
        if self.protocol != "shapes":
            # One endpoint check, agreed by every process: a failure on process 0 stops them all.
            error = None
            if jax.process_index() == 0:
                try:
                    self.judge = _make_judge(config, workdir, self.examples)
                except builders.ConfigError as err:
                    error = err
            if runtime.any_process(error is not None):
                raise error or _error("eval_benchmark_judge_url", "the judge failed its check on process 0")
        multiple = math.lcm(shards, jax.process_count())
        self.size = -(-len(self.examples) // multiple) * multiple
        self.resolution, self.r_max = int(config.data.resolution), int(config.data.r_max)
        self.scale = float(builders.grpo_settings(config).score_scale)
        self.host: dict[str, np.ndarray] = {}  # the whole padded subset, on every process
        self.batch: dict[str, jax.Array] | None = None
        self.noise: jax.Array | None = None
        _log.info(
            "train.eval_benchmark %s: %d examples, %s protocol, edited in one compiled batch of %d (padded "
            "to a multiple of %d: the batch devices and processes)",
            self.name,
            len(self.examples),
            self.protocol,
            self.size,
            multiple,
        )

    def place(self, programs: Any, mesh: jax.sharding.Mesh, text_fields: Callable[..., Any]) -> None:
        """Builds this process's rows of the padded subset and its noise as global arrays (once)."""
        padded = editing.pad_examples(self.examples, self.size)
        self.host = editing.host_batch(padded, self.resolution, editing.region_slots(padded, self.r_max))
        per_host = self.size // jax.process_count()
        mine = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
        # Seed 0: the noise ``sfgrpo.evaluate --seeds 1`` gives each example, whatever its batch.
        noise = editing.noise_stack(0, padded[mine], editing.latent_shape(programs))
        self.batch = builders.device_batch({k: v[mine] for k, v in self.host.items()}, mesh, text_fields)
        self.noise = runtime.host_local_to_global({"noise": noise}, mesh)["noise"]

    def evaluate(self, step: int, programs: Any, params: Any, frozen: Any) -> dict[str, float]:
        """Edits and scores the subset with ``params``; the 'bench/...' metrics, the same on every process.
        A collective: every process calls it, under the run's mesh."""
        if self.batch is None:
            raise RuntimeError("TrainingBenchmark.place must run before evaluate")
        n = len(self.examples)
        edited = programs("edit", params, frozen, self.batch, self.noise)
        if self.protocol == "shapes":
            scores = programs("scores", params, frozen, edited, self.batch)
            scores = jax.tree.map(lambda x: np.asarray(runtime.to_host(x)), scores)  # every process
            found = editing.shapes_row_scores(scores, self.host["region_valid"], self.scale)[:n]
            rows = [
                {**editing.example_fields(e, 0), **editing.shapes_row_fields(s)}
                for e, s in zip(self.examples, found, strict=True)
            ]
            m = bench_metrics(aggregate.summarize(rows, protocol=self.protocol, meta={}))
        else:
            images = images_to_uint8(runtime.to_host(edited))[:n]  # a collective: on every process
            m = _from_first_process(self._judged(images) if jax.process_index() == 0 else {})
        _log.info(
            "benchmark %s at step %d: overall %.4f (%s), %d of %d failed",
            self.name,
            step,
            m["bench/overall"],
            self.protocol,
            int(m["bench/failures"]),
            n,
        )
        return m

    def _judged(self, images: np.ndarray) -> dict[str, float]:
        """The judge's metrics of the edited (N, H, W, 3) uint8 images (process 0)."""
        from sfgrpo.data.annotate_vlm import EndpointDown  # noqa: PLC0415
        from sfgrpo.evaluation import judges  # noqa: PLC0415

        items = [
            judges.JudgeItem(
                key=e.key,
                instruction=e.instruction,
                task_type=e.task_type,
                source=self.host["source"][i],
                edited=images[i],
                boxes=e.boxes,
                labels=e.labels,
            )
            for i, e in enumerate(self.examples)
        ]
        try:
            results = self.judge.score(items)
        except EndpointDown as err:  # training goes on; the evaluation says it has no figure
            _log.warning("benchmark %s: the judge is down (%s); no figures this evaluation", self.name, err)
            return {"bench/overall": math.nan, "bench/failures": float(len(items))}
        rows = [
            {**editing.example_fields(e, 0), **judges.to_row_fields(r)}
            for e, r in zip(self.examples, results, strict=True)
        ]
        return bench_metrics(aggregate.summarize(rows, protocol=self.protocol, meta={}))

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()


def bench_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """'bench/overall', 'bench/type/<task_type>', 'bench/score/<score>' (its macro overall) and
    'bench/failures' of a ``summarize`` result (types and scores in their own namespaces: a task type may
    share a score's name); a figure the summary leaves null (no scored row) is NaN."""

    def value(x: float | None) -> float:
        return math.nan if x is None else float(x)

    m = {f"bench/type/{t}": value(v) for t, v in summary["by_task_type"].items()}
    m |= {f"bench/score/{name}": value(s["overall"]) for name, s in summary["scores"].items()}
    return m | {
        "bench/overall": value(summary["overall"]),
        "bench/failures": float(summary["failures"]["total"]),
    }


def _from_first_process(values: dict[str, float]) -> dict[str, float]:
    """Process 0's ``values`` on every process (a collective; the others pass anything)."""
    if jax.process_count() == 1:
        return values
    data = np.frombuffer(json.dumps(values).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
    buffer = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buffer[:] = data
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().decode())


def open_benchmark(config: ml_collections.ConfigDict, workdir: Path) -> TrainingBenchmark | None:
    """The run's ``TrainingBenchmark``, or None when ``train.eval_benchmark`` is ''. Raises ConfigError."""
    if not config.train.eval_benchmark:
        return None
    return TrainingBenchmark(config, workdir, builders.batch_shards(config))
