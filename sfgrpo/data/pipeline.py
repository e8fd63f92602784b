"""The grain input pipeline: shuffled epochs of whole GRPO groups, sharded by host, as numpy batches.

Each host yields, per step, ``B = groups_per_host * G`` rows: ``groups_per_host`` distinct examples, each
repeated G times in consecutive rows. Per step the global batch is the concatenation of the hosts' batches
in process order (what ``sfgrpo.runtime.host_local_to_global`` builds), so row ``b`` of the global batch
belongs to group ``b // G`` and a group never straddles hosts.

Batch contract (every array has leading axis B; H, W = ``config.resolution``; R = ``config.r_max``):

==================  ==================  =======  ==========================================================
key                 shape               dtype    meaning
==================  ==================  =======  ==========================================================
``source``          (B, H, W, 3)        uint8    source image
``target``          (B, H, W, 3)        uint8    ground-truth target; zeros where ``has_target`` is False
``has_target``      (B,)                bool
``boxes``           (B, R, 4)           float32  (x1, y1, x2, y2) in [0, 1]; zeros in padded slots
``region_valid``    (B, R)              bool     real regions; padded (or cropped-away) slots are False
``region_masks``    (B, R, H, W)        bool     per-region pixel masks (only with ``with_masks``); all
                                                 False where ``has_masks`` is False
``has_masks``       (B,)                bool
``example_index``   (B,)                int64    index of the example in its split (for text embeddings)
``group_id``        (B,)                int32    group within the global batch: global row // G
``id``              (B,)                object   record id (str)
``instruction``     (B,)                object   instruction (str)
``region_labels``   (B, R)              object   region labels (str); "" in padded slots
==================  ==================  =======  ==========================================================

With ``repeat_groups=False`` each group is one row instead (B = groups_per_host); nothing else changes.

The object (string) fields cannot become jax arrays: ``numeric_fields(batch)`` drops them before
``host_local_to_global``.

Order: epoch ``e`` is a permutation of the split drawn from (seed, e) (index order with ``shuffle=False``),
the same on every host. An epoch is ``steps_per_epoch = N // (P * g)`` global steps (P hosts, g groups per
host); global step ``s`` of the epoch takes permutation positions ``[s*P*g, (s+1)*P*g)``, and host ``p`` the
``p``-th run of ``g`` of them. The ``N mod (P*g)`` leftover examples of each epoch are skipped (different
ones each epoch). So an example is in at most one group per epoch, hosts are disjoint, and for a given
global batch size the global batches depend neither on the number of hosts nor on worker processes.

The iterator is a ``grain.DatasetIterator``: ``get_state()`` is a small JSON-serialisable dict and
``set_state(state)`` resumes at exactly the next batch (orbax can store it with
``grain.checkpoint.CheckpointHandler``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
import PIL.Image
from absl import flags

from sfgrpo.data.records import EditRecord, RecordError
from sfgrpo.data.tfds_builder import example_to_record

STRING_FIELDS: tuple[str, ...] = ("id", "instruction", "region_labels")
RESIZE_MODES: tuple[str, ...] = ("resize", "center_crop")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Pipeline knobs. ``batch_size`` is per host, in rows, and must be a multiple of ``group_size`` (G).

    ``resize_mode``: "resize" stretches to the resolution (boxes keep their [0, 1] coordinates);
    "center_crop" scales to cover the resolution, then crops the centre (boxes shift and are clipped; a
    region cropped away entirely gets ``region_valid`` False).
    """

    resolution: int | tuple[int, int] = 64
    group_size: int = 4
    batch_size: int = 16
    r_max: int = 8
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever
    shuffle: bool = True  # False: every epoch in index order (fixed evaluation inputs)
    resize_mode: str = "resize"
    with_masks: bool = True
    # False: one row per group (B = groups_per_host), for a trainer that repeats on device and so moves
    # G times fewer bytes from host to device.
    repeat_groups: bool = True
    num_workers: int = 0  # grain worker processes; 0 runs in this process
    num_threads: int = 2  # threads per process, each assembling whole batches
    prefetch: int = 4  # batches buffered per process

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        res = self.resolution
        return (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))

    @property
    def groups_per_host(self) -> int:
        return self.batch_size // self.group_size

    def validate(self) -> PipelineConfig:
        h, w = self.size
        if h <= 0 or w <= 0 or h % 16 or w % 16:
            raise ValueError(f"resolution must be positive multiples of 16 (one token = 16 px), got {(h, w)}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.batch_size < self.group_size or self.batch_size % self.group_size:
            raise ValueError(
                f"per-host batch_size {self.batch_size} must be a positive multiple of group_size "
                f"{self.group_size}, so groups stay whole on each host"
            )
        if self.r_max < 1:
            raise ValueError(f"r_max must be >= 1, got {self.r_max}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if min(self.num_workers, self.num_threads) < 0 or self.prefetch < 1:
            raise ValueError("num_workers and num_threads must be >= 0 and prefetch >= 1")
        return self


def _resize(image: np.ndarray, hw: tuple[int, int], resample: PIL.Image.Resampling) -> np.ndarray:
    if image.shape[:2] == hw:
        return image
    return np.asarray(PIL.Image.fromarray(image).resize((hw[1], hw[0]), resample=resample))


def fit_to_resolution(
    record: EditRecord, size: tuple[int, int], mode: str = "resize"
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, np.ndarray | None]:
    """Resizes (or scales and centre-crops) a record's images, boxes and masks consistently.

    Returns ``(source (H, W, 3) uint8, target or None, boxes (K, 4) float32, valid (K,) bool,
    masks (K, H, W) bool or None)``. Images are resampled bicubically, masks by nearest neighbour, so a
    mask pixel stays inside its (transformed) box up to a pixel of rounding.
    """
    h0, w0 = record.source.shape[:2]
    boxes = np.asarray([r.box for r in record.regions], np.float32).reshape(-1, 4)
    masks = np.stack([r.mask for r in record.regions]) if record.has_masks else None
    if mode == "resize":
        scaled, offset = size, (0, 0)
    else:
        scale = max(size[0] / h0, size[1] / w0)
        scaled = (max(size[0], round(h0 * scale)), max(size[1], round(w0 * scale)))
        offset = ((scaled[0] - size[0]) // 2, (scaled[1] - size[1]) // 2)
    crop = (slice(offset[0], offset[0] + size[0]), slice(offset[1], offset[1] + size[1]))
    source = _resize(record.source, scaled, PIL.Image.Resampling.BICUBIC)[crop]
    target = (
        None if record.target is None else _resize(record.target, scaled, PIL.Image.Resampling.BICUBIC)[crop]
    )
    if masks is not None:
        masks = np.stack(
            [_resize(m.astype(np.uint8), scaled, PIL.Image.Resampling.NEAREST)[crop] > 0 for m in masks]
        )
    # Box coordinates: from [0, 1] of the scaled image to [0, 1] of the crop window.
    sy, sx = scaled[0] / size[0], scaled[1] / size[1]
    oy, ox = offset[0] / size[0], offset[1] / size[1]
    boxes = boxes * np.float32([sx, sy, sx, sy]) - np.float32([ox, oy, ox, oy])
    boxes = np.clip(boxes, 0.0, 1.0)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return source, target, boxes, valid, masks


def _prepare(record: EditRecord, config: PipelineConfig) -> tuple[dict[str, Any], np.ndarray | None]:
    """The record's fixed-shape fields (all but ``region_masks``) and its (K, H, W) masks or None."""
    size, r_max = config.size, config.r_max
    if len(record.regions) > r_max:
        raise RecordError(record.id, "regions", f"has {len(record.regions)} regions, more than R_max={r_max}")
    source, target, boxes, valid, masks = fit_to_resolution(record, size, config.resize_mode)
    k = len(record.regions)
    out: dict[str, Any] = {
        "source": source,
        "target": np.zeros_like(source) if target is None else target,
        "has_target": np.bool_(target is not None),
        "boxes": np.zeros((r_max, 4), np.float32),
        "region_valid": np.zeros((r_max,), bool),
        "has_masks": np.bool_(masks is not None),
        "id": record.id,
        "instruction": record.instruction,
        "region_labels": np.array([r.label for r in record.regions] + [""] * (r_max - k), dtype=object),
    }
    out["boxes"][:k] = boxes
    out["region_valid"][:k] = valid
    return out, masks


def prepare_example(record: EditRecord, config: PipelineConfig) -> dict[str, Any]:
    """One record as fixed-shape arrays (the batch contract without the leading axis)."""
    out, masks = _prepare(record, config)
    if config.with_masks:
        out["region_masks"] = np.zeros((config.r_max, *config.size), bool)
        if masks is not None:
            out["region_masks"][: len(masks)] = masks
    return out


def _stack(values: Sequence[Any]) -> np.ndarray:
    if isinstance(values[0], str):
        return np.array(values, dtype=object)
    return np.stack(values)


class _MakeBatch(grain.transforms.Map):
    """Host-local step -> that step's groups, one row each; a class so worker processes can unpickle it."""

    def __init__(self, source: Any, config: PipelineConfig, process_index: int, process_count: int) -> None:
        self.source = source
        self.config = config
        self.process_index = process_index
        self.process_count = process_count
        self.num_examples = len(source)
        self.steps_per_epoch = steps_per_epoch(self.num_examples, config, process_count)
        self._cache: tuple[int, np.ndarray] = (-1, np.zeros((0,), np.int64))

    def _permutation(self, epoch: int) -> np.ndarray:
        # One permutation per epoch, from (seed, epoch) alone: every host and worker draws the same one.
        # The cache is one attribute, swapped whole, because reader threads share this object.
        cached_epoch, order = self._cache
        if cached_epoch != epoch:
            if self.config.shuffle:
                order = np.random.default_rng([self.config.seed, epoch]).permutation(self.num_examples)
            else:
                order = np.arange(self.num_examples)
            self._cache = (epoch, order)
        return order

    def map(self, step: int) -> dict[str, np.ndarray]:
        cfg, gph = self.config, self.config.groups_per_host
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        first = step_in_epoch * self.process_count * gph + self.process_index * gph
        indices = self._permutation(epoch)[first : first + gph].tolist()
        rows, masks = [], []
        for slot, index in enumerate(indices):
            raw = self.source[index]
            record = raw if isinstance(raw, EditRecord) else example_to_record(raw)
            example, mask = _prepare(record, cfg)
            example["example_index"] = np.int64(index)
            example["group_id"] = np.int32(self.process_index * gph + slot)
            rows.append(example)
            masks.append(mask)
        out = {k: _stack([r[k] for r in rows]) for k in rows[0]}
        if cfg.with_masks:
            # Written in place: the masks are the biggest field, and most slots stay zero (padding).
            out["region_masks"] = np.zeros((gph, cfg.r_max, *cfg.size), bool)
            for slot, mask in enumerate(masks):
                if mask is not None:
                    out["region_masks"][slot, : len(mask)] = mask
        return out


class _RepeatGroups(grain.transforms.Map):
    """(groups, ...) -> (groups * G, ...): each group's G rows consecutive. Runs in the consuming process,
    after any worker processes, so workers decode and ship each example once rather than G times."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def map(self, groups: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.repeat(v, self.group_size, axis=0) for k, v in groups.items()}


def steps_per_epoch(num_examples: int, config: PipelineConfig, process_count: int = 1) -> int:
    """Global steps per epoch: N // (process_count * groups_per_host). Raises if that is zero."""
    per_step = process_count * config.groups_per_host
    if num_examples < per_step:
        raise ValueError(
            f"the split has {num_examples} examples, fewer than one global step needs "
            f"({process_count} hosts x {config.groups_per_host} groups)"
        )
    return num_examples // per_step


def make_dataset(
    source: Sequence[Any],
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The host's pipeline over a random-access ``source`` (a ``tfds.data_source`` split, a
    ``shapes.ShapesSource``, or any sequence of ``EditRecord``). Host defaults to jax's process."""
    config.validate()
    if process_index is None or process_count is None:
        import jax  # only here: explicit hosts (tests, tools) need no jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    per_epoch = steps_per_epoch(len(source), config, process_count)
    total = sys.maxsize if config.num_epochs is None else per_epoch * config.num_epochs
    ds = grain.MapDataset.range(total).map(_MakeBatch(source, config, process_index, process_count))
    read = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch)
    ids = ds.to_iter_dataset(read)
    if config.num_workers > 0:
        # grain reads absl flags in its workers; outside an absl app nobody has parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return ids.map(_RepeatGroups(config.group_size)) if config.repeat_groups else ids


def make_iterator(
    source: Sequence[Any],
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    state: Mapping[str, Any] | None = None,
) -> grain.DatasetIterator:
    """An iterator of host batches (dicts of numpy arrays, see the module docstring), optionally resumed
    from a ``get_state()`` dict."""
    it = iter(make_dataset(source, config, process_index=process_index, process_count=process_count))
    if state is not None:
        it.set_state(dict(state))
    return it


def numeric_fields(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch without its string fields, ready for ``sfgrpo.runtime.host_local_to_global``."""
    return {k: v for k, v in batch.items() if k not in STRING_FIELDS}
