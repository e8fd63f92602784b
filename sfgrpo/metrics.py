"""Training metrics: JSONL and TensorBoard scalars, evaluation image grids, the reward plot.

``workdir/metrics.jsonl`` holds one JSON object per line: ``{"step": int, "stage": str, <key>: float, ...}``.
Non-finite values are written as the JSON strings ``"nan"``, ``"inf"`` and ``"-inf"`` (so every line is
strict JSON and nothing is lost); :func:`read_metrics` turns them back into floats. TensorBoard event
files go to ``workdir/tb/<stage>`` (one TensorBoard run per stage) with tags ``<stage>/<key>``. Neither
TensorFlow nor the ``tensorboard`` package is needed: tensorboardX writes the events, and
:func:`read_tb_scalars` reads them back.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# ----------------------------------------------------------------------------- JSONL


def _json_value(x: float) -> float | str:
    """A float as strict JSON: finite values as numbers, others as "nan" / "inf" / "-inf"."""
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _from_json(value: Any) -> Any:
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def _to_floats(scalars: Mapping[str, Any]) -> dict[str, float]:
    """Scalars (Python numbers, numpy or jax 0-d / size-1 arrays) -> Python floats, in one device fetch."""
    host = jax.device_get(dict(scalars))
    out = {}
    for key, value in host.items():
        arr = np.asarray(value)
        if arr.size != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got shape {arr.shape}")
        out[key] = float(arr.reshape(()))
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parses a metrics JSONL file; ``"nan"``/``"inf"``/``"-inf"`` strings become floats.

    Lines that are not JSON objects (e.g. a line torn by a crash) are skipped.
    """
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append({k: _from_json(v) for k, v in rec.items()})
    return records


def _stage_set(stage: str | Iterable[str] | None) -> set[str] | None:
    return None if stage is None else {stage} if isinstance(stage, str) else set(stage)


def truncate_jsonl(path: str | Path, step: int, *, stage: str | Iterable[str] | None = None) -> int:
    """Drops the records with ``step > step`` (only those of ``stage``, a name or names, if given).

    For resuming from a checkpoint at ``step``: the records the interrupted run wrote after it would
    otherwise appear twice. Every other line, unparsable ones included, is kept as is. The file is
    rewritten to a temporary file and renamed over, so a crash leaves the old or the new file.
    Returns the number of records dropped.
    """
    path, stages = Path(path), _stage_set(stage)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if (
            isinstance(rec, dict)
            and isinstance(rec.get("step"), int)
            and rec["step"] > step
            and (stages is None or rec.get("stage") in stages)
        ):
            dropped += 1
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


# ----------------------------------------------------------------------------- the writer


class MetricsWriter:
    """Appends scalars to ``workdir/metrics.jsonl`` and TensorBoard; images to TensorBoard.

    Args:
      workdir: the run directory (created if missing).
      enabled: write anything at all; default only on process 0, so hosts don't write the same files.
        A disabled writer accepts every call and does nothing.

    Each stage gets its own TensorBoard run directory ``workdir/tb/<stage>`` (tags ``<stage>/<key>``), so
    that resuming one stage can purge its events without touching another stage's, whose step counter
    may overlap. The JSONL file is opened in append mode and changed only by :meth:`truncate_after`;
    each record is flushed as written, so a crash loses at most the line being written.
    """

    def __init__(self, workdir: str | Path, *, enabled: bool | None = None) -> None:
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self.path = self.workdir / METRICS_FILE
        self._file = None
        self._tb: dict[str, Any] = {}  # stage -> tensorboardX.SummaryWriter, created on first use
        self._purge: dict[str | None, int] = {}  # stage (None: all) -> first step to purge in TensorBoard
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._open()

    def _open(self) -> None:
        # A torn last line (crash mid-write) must not swallow the next record: start on a fresh line.
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # held open: one line per write
        if needs_newline:
            self._file.write("\n")

    def _board(self, stage: str) -> Any:
        if stage not in self._tb:
            # Imported here: tensorboardX takes ~2 s to import, and non-primary hosts never need it.
            from tensorboardX import SummaryWriter

            purge = self._purge.get(stage, self._purge.get(None))
            # tensorboardX names files by the second and host; a second writer in the same second would
            # overwrite the first one's file. A nanosecond suffix keeps them apart, in order.
            self._tb[stage] = SummaryWriter(
                str(self.workdir / TB_DIR / stage),
                purge_step=purge,
                flush_secs=30,
                filename_suffix=f".{time.time_ns()}",
            )
        return self._tb[stage]

    def write(self, step: int, stage: str, scalars: Mapping[str, Any]) -> None:
        """Logs one record: ``{"step", "stage", **scalars}`` (values as Python floats, see module doc)."""
        if not self.enabled:
            return
        for reserved in ("step", "stage"):
            if reserved in scalars:
                raise ValueError(f"{reserved!r} is reserved in metrics records; rename the scalar")
        values = _to_floats(scalars)
        record = {"step": int(step), "stage": str(stage)} | {k: _json_value(v) for k, v in values.items()}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        board = self._board(str(stage))
        for key, value in values.items():
            board.add_scalar(f"{stage}/{key}", value, int(step))

    def write_event(self, step: int, stage: str, fields: Mapping[str, Any]) -> None:
        """Logs one non-scalar record ``{"step", "stage", **fields}`` (JSON values, e.g. the config keys a
        resume changed) to the JSONL file, and as text to TensorBoard."""
        if not self.enabled:
            return
        record = {"step": int(step), "stage": str(stage), **fields}
        text = json.dumps(record, default=str)
        self._file.write(text + "\n")
        self._board(str(stage)).add_text(f"{stage}/event", text, int(step))

    def write_images(self, step: int, stage: str, name: str, image: np.ndarray) -> None:
        """Logs a uint8 ``(H, W, 3)`` image to TensorBoard under ``<stage>/<name>``."""
        if not self.enabled:
            return
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        self._board(str(stage)).add_image(f"{stage}/{name}", image, int(step), dataformats="HWC")

    def truncate_after(self, step: int, *, stage: str | Iterable[str] | None = None) -> int:
        """Forgets what an interrupted run logged after ``step``, for a resume from a checkpoint at ``step``.

        Drops the JSONL records with a larger step (of ``stage`` only, a name or names, if given; see
        :func:`truncate_jsonl`) and has TensorBoard discard those stages' events from ``step + 1`` on.
        Call it before logging the resumed stages. Returns the number of JSONL records dropped.
        """
        if not self.enabled:
            return 0
        stages = _stage_set(stage)
        for name in [None] if stages is None else sorted(stages):
            self._purge[name] = int(step) + 1
        for name in list(self._tb):  # writers opened before the purge was known
            if stages is None or name in stages:
                self._tb.pop(name).close()
        # Open the purging writers now: a stage that logs nothing more must still lose its later events.
        tb_root = self.workdir / TB_DIR
        on_disk = {p.name for p in tb_root.iterdir() if p.is_dir()} if tb_root.is_dir() else set()
        for name in sorted(on_disk if stages is None else stages):
            self._board(name).flush()
        self._file.close()
        try:
            return truncate_jsonl(self.path, step, stage=stages)
        finally:
            self._open()

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            for board in self._tb.values():
                board.flush()

    def close(self) -> None:
        if self.enabled and self._file is not None:
            self._file.close()
            self._file = None
            for board in self._tb.values():
                board.close()
            self._tb.clear()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- TensorBoard reader


def _event_records(path: Path) -> Iterator[bytes]:
    """The payloads of a TFRecord file: [len u64][crc u32][payload][crc u32] per record (CRCs unchecked)."""
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        start = pos + 12
        if start + length + 4 > len(data):
            break  # a record still being written
        yield data[start : start + length]
        pos = start + length + 4


def read_tb_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] from the event files under ``logdir``, in file then write order.

    As in TensorBoard, a session-start event at step s (a resumed writer's ``purge_step``) discards the
    values read so far from the same directory (run) with step >= s.
    """
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    runs: dict[Path, list[Path]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        runs.setdefault(path.parent, []).append(path)
    for files in runs.values():
        run: dict[str, list[tuple[int, float]]] = {}
        for path in files:
            for payload in _event_records(path):
                event = event_pb2.Event.FromString(payload)
                if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                    run = {tag: [(s, v) for s, v in vals if s < event.step] for tag, vals in run.items()}
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        run.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
        for tag, vals in run.items():
            out.setdefault(tag, []).extend(vals)
    return out


# ----------------------------------------------------------------------------- image grids

GRID_PAD = 4  # pixels between panels and rows
GRID_HEADER = 24  # height of the column-title strip
GRID_LABEL = 18  # height of a row's label strip (only when labels are given)
_BG = (32, 32, 32)
_BLANK = (96, 96, 96)
_TEXT = (235, 235, 235)
_BOX_COLORS = ((255, 64, 64), (64, 220, 64), (64, 128, 255), (255, 220, 0), (255, 0, 255), (0, 230, 230))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def panel_scale(height: int, width: int, min_panel: int = 256) -> int:
    """The integer nearest-neighbour upscale that makes an image's longer side at least ``min_panel``."""
    return max(1, math.ceil(min_panel / max(height, width)))


def _box_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """A normalised (x1, y1, x2, y2) box -> inclusive pixel corners in a (height, width) panel."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left = min(max(round(x1 * width), 0), width - 1)
    top = min(max(round(y1 * height), 0), height - 1)
    right = min(max(round(x2 * width) - 1, left), width - 1)
    bottom = min(max(round(y2 * height) - 1, top), height - 1)
    return left, top, right, bottom


def eval_grid(
    source: np.ndarray,
    edited: np.ndarray,
    target: np.ndarray | None,
    boxes: np.ndarray,
    valid: np.ndarray,
    *,
    labels: Sequence[str] | None = None,
    max_rows: int = 8,
    min_panel: int = 256,
    box_width: int = 2,
) -> np.ndarray:
    """A uint8 ``(H_total, W_total, 3)`` grid: one row (source | edited | target) per example.

    Args:
      source, edited, target: uint8 ``(B, H, W, 3)``; ``target`` None draws blank panels.
      boxes: float ``(B, R, 4)`` region boxes ``(x1, y1, x2, y2)`` in [0, 1], drawn on every panel,
        colour by region index; ``valid`` bool ``(B, R)`` selects the boxes drawn.
      labels: optional text per example (prompt, reward), drawn in a strip above its row.
      max_rows: the first ``max_rows`` examples are shown.
      min_panel: images are upscaled by an integer factor (nearest) until their longer side is at least
        this many pixels; box outlines are ``box_width`` pixels wide, inside the box.

    Layout (for locating pixels): a ``GRID_HEADER`` title strip, then per row an optional ``GRID_LABEL``
    strip and the panels, with ``GRID_PAD`` pixels around and between panels and rows.
    """
    source, edited = np.asarray(source), np.asarray(edited)
    target = None if target is None else np.asarray(target)
    boxes, valid = np.asarray(boxes, np.float32), np.asarray(valid, bool)
    for name, arr in (("source", source), ("edited", edited), ("target", target)):
        if arr is None:
            continue
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape != source.shape:
            raise ValueError(
                f"{name} must be uint8 (B, H, W, 3) like source {source.shape}, got {arr.dtype} {arr.shape}"
            )
    b, h, w, _ = source.shape
    if boxes.shape[:1] != (b,) or boxes.ndim != 3 or boxes.shape[-1] != 4 or valid.shape != boxes.shape[:2]:
        raise ValueError(
            f"boxes must be (B, R, 4) and valid (B, R) with B={b}, got {boxes.shape} / {valid.shape}"
        )
    if labels is not None and len(labels) < min(b, max_rows):
        raise ValueError(f"need a label per shown row, got {len(labels)} for {min(b, max_rows)} rows")

    rows = min(b, max_rows)
    s = panel_scale(h, w, min_panel)
    ph, pw = h * s, w * s
    label_h = GRID_LABEL if labels is not None else 0
    row_h = label_h + ph + GRID_PAD
    canvas = Image.new("RGB", (3 * pw + 4 * GRID_PAD, GRID_HEADER + rows * row_h + GRID_PAD), _BG)
    draw = ImageDraw.Draw(canvas)
    title_font, label_font = _font(16), _font(12)
    titles = ("source", "edited", "target" if target is not None else "target (none)")
    for col, title in enumerate(titles):
        draw.text((GRID_PAD + col * (pw + GRID_PAD) + 2, 4), title, fill=_TEXT, font=title_font)

    for i in range(rows):
        top = GRID_HEADER + i * row_h
        if labels is not None:
            draw.text((GRID_PAD + 2, top + 2), str(labels[i]), fill=_TEXT, font=label_font)
        y0 = top + label_h
        panels = (source[i], edited[i], None if target is None else target[i])
        for col, img in enumerate(panels):
            x0 = GRID_PAD + col * (pw + GRID_PAD)
            if img is None:
                canvas.paste(Image.new("RGB", (pw, ph), _BLANK), (x0, y0))
            else:
                canvas.paste(Image.fromarray(img).resize((pw, ph), Image.Resampling.NEAREST), (x0, y0))
            for r in np.flatnonzero(valid[i]):
                left, t, right, bottom = _box_pixels(boxes[i, r], ph, pw)
                color = _BOX_COLORS[r % len(_BOX_COLORS)]
                draw.rectangle((x0 + left, y0 + t, x0 + right, y0 + bottom), outline=color, width=box_width)
    return np.asarray(canvas, dtype=np.uint8)


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Writes a uint8 ``(H, W, 3)`` image as PNG, creating the parent directory (on every caller)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="PNG")


# ----------------------------------------------------------------------------- reward plot


def _series(records: Iterable[Mapping[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """stage -> (steps, values) of the finite values of ``key``, in file order."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for rec in records:
        value = rec.get(key)
        if isinstance(value, int | float) and math.isfinite(value) and isinstance(rec.get("step"), int):
            steps, values = out.setdefault(str(rec.get("stage", "")), ([], []))
            steps.append(rec["step"])
            values.append(float(value))
    return out


def plot_rewards(
    metrics_jsonl_path: str | Path,
    out_png_path: str | Path,
    keys: Sequence[str] = ("reward/mean", "eval/reward/mean"),
) -> int:
    """Plots ``keys`` against step, one line per (stage, key), to a PNG; returns the number of lines.

    Missing keys, missing files and non-finite values are skipped; with nothing to plot the PNG says so.
    """
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state

    path = Path(metrics_jsonl_path)
    records = read_metrics(path) if path.exists() else []
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    lines = 0
    for key in keys:
        for stage, (steps, values) in _series(records, key).items():
            style = "o-" if len(steps) < 30 else "-"
            ax.plot(steps, values, style, markersize=3, label=f"{stage}: {key}" if stage else key)
            lines += 1
    if lines:
        ax.legend(fontsize=8)
    else:
        ax.text(
            0.5, 0.5, f"no values for {', '.join(keys)}", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return lines
