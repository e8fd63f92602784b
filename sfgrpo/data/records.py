"""The editing record: one schema for real and synthetic data, its validation, box formats, the JSONL reader.

An example is an ``EditRecord``: an id, a source image, an instruction, edit regions (a box
(x1, y1, x2, y2) in [0, 1] relative to the image width and height, a label, optionally a pixel mask), and
optionally the ground-truth target image. Every bad input raises ``RecordError`` (a ``ValueError``) whose
message names the record (its id, or the JSONL line) and the field; ``BadRecords`` turns those errors into
counted, logged skips when ``skip_bad_records`` is on.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image

_log = logging.getLogger(__name__)

BOX_FORMATS: tuple[str, ...] = ("pixel", "unit", "qwen1000")
# Formats whose bytes are stored unchanged (when the image is plain RGB); anything else is re-encoded as PNG.
_KEEP_FORMATS = ("PNG", "JPEG")
# JSONL field aliases accepted on input, first name canonical.
_SOURCE_KEYS = ("source", "image")
_INSTRUCTION_KEYS = ("instruction", "prompt")
_BOX_KEYS = ("box", "bbox", "bbox_2d")


class RecordError(ValueError):
    """A bad input record; the message names the record and the field."""

    def __init__(self, record: str, field: str, problem: str) -> None:
        super().__init__(f"record {record}: field {field!r}: {problem}")
        self.record = record
        self.field = field
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class Region:
    """One edit region. ``box`` is (x1, y1, x2, y2) in [0, 1]; ``mask`` is (H, W) bool at source size."""

    box: tuple[float, float, float, float]
    label: str = ""
    mask: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class EditRecord:
    """One editing example. Images are (H, W, 3) uint8; ``target`` has the source's size.

    ``source_bytes``/``target_bytes`` optionally carry the original encoded file (PNG or JPEG), which the
    TFDS writer stores unchanged instead of re-encoding. ``meta`` is free-form JSON-serialisable data (the
    shapes task puts its shape list there).
    """

    id: str
    source: np.ndarray
    instruction: str
    regions: tuple[Region, ...] = ()
    target: np.ndarray | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source_bytes: bytes | None = None
    target_bytes: bytes | None = None

    @property
    def has_masks(self) -> bool:
        return bool(self.regions) and all(r.mask is not None for r in self.regions)


def to_unit_box(
    box: Sequence[float], box_format: str, width: int, height: int, *, record: str = "?", field: str = "box"
) -> tuple[float, float, float, float]:
    """Converts a box (x1, y1, x2, y2) in ``box_format`` to [0, 1] units and validates it.

    ``pixel``: edge coordinates in pixels (a box over columns 0..9 is x1=0, x2=10); ``unit``: [0, 1];
    ``qwen1000``: integers in [0, 1000] as Qwen-VL models speak them. A box outside the image, of zero
    area, or with non-finite or missing coordinates raises ``RecordError``.
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    if not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4:
        raise RecordError(record, field, f"expected 4 numbers (x1, y1, x2, y2), got {box!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise RecordError(record, field, f"expected 4 numbers (x1, y1, x2, y2), got {box!r}") from None
    sx, sy = {"pixel": (width, height), "unit": (1.0, 1.0), "qwen1000": (1000.0, 1000.0)}[box_format]
    unit = (x1 / sx, y1 / sy, x2 / sx, y2 / sy)
    return check_unit_box(unit, record=record, field=field, shown=f"{box!r} ({box_format})")


def check_unit_box(
    box: Sequence[float], *, record: str = "?", field: str = "box", shown: str | None = None
) -> tuple[float, float, float, float]:
    """Validates a [0, 1] box: inside the image, x1 < x2 and y1 < y2. Returns it as a float tuple."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise RecordError(record, field, f"expected 4 numbers (x1, y1, x2, y2), got {box!r}") from None
    shown = shown or repr(tuple(box))
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise RecordError(record, field, f"non-finite coordinate in {shown}")
    # A hair of tolerance: pixel boxes divided by the size can land a rounding error past 1.
    eps = 1e-6
    if any(v < -eps or v > 1 + eps for v in (x1, y1, x2, y2)):
        raise RecordError(record, field, f"box {shown} lies outside the image")
    if x2 <= x1 or y2 <= y1:
        raise RecordError(record, field, f"box {shown} has zero area (needs x1 < x2 and y1 < y2)")
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
    return (x1, y1, x2, y2)


def validate_record(record: EditRecord, r_max: int | None = None) -> EditRecord:
    """Checks every field of ``record``; raises ``RecordError`` naming the first bad one. Returns it."""
    rid = record.id
    if not isinstance(rid, str) or not rid:
        raise RecordError(repr(rid), "id", "must be a non-empty string")
    src = record.source
    if not isinstance(src, np.ndarray) or src.dtype != np.uint8 or src.ndim != 3 or src.shape[-1] != 3:
        raise RecordError(rid, "source", f"must be an (H, W, 3) uint8 array, got {_describe(src)}")
    if min(src.shape[:2]) < 1:
        raise RecordError(rid, "source", f"empty image of shape {src.shape}")
    if not isinstance(record.instruction, str) or not record.instruction.strip():
        raise RecordError(rid, "instruction", "is empty")
    if record.target is not None:
        tgt = record.target
        if not isinstance(tgt, np.ndarray) or tgt.dtype != np.uint8 or tgt.shape != src.shape:
            raise RecordError(
                rid,
                "target",
                f"must be a uint8 array of the source's shape {src.shape}, got {_describe(tgt)}",
            )
    if r_max is not None and len(record.regions) > r_max:
        raise RecordError(rid, "regions", f"has {len(record.regions)} regions, more than R_max={r_max}")
    masks = [r.mask is not None for r in record.regions]
    if any(masks) and not all(masks):
        raise RecordError(rid, "regions", "masks must be given for every region or for none")
    for i, region in enumerate(record.regions):
        check_unit_box(region.box, record=rid, field=f"regions[{i}].box")
        if not isinstance(region.label, str):
            raise RecordError(rid, f"regions[{i}].label", f"must be a string, got {region.label!r}")
        if region.mask is not None and (region.mask.dtype != bool or region.mask.shape != src.shape[:2]):
            raise RecordError(
                rid,
                f"regions[{i}].mask",
                f"must be a bool array of shape {src.shape[:2]}, got {_describe(region.mask)}",
            )
    return record


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__


def decode_image(data: bytes, *, record: str, field: str, mode: str = "RGB") -> np.ndarray:
    """Decodes image bytes to (H, W, 3) uint8 (``mode='RGB'``) or (H, W) bool (``mode='mask'``, nonzero)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img.load()
            if mode == "mask":
                return np.asarray(img.convert("L")) > 0
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise RecordError(record, field, f"cannot decode image: {err}") from None


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image or an (H, W) bool/uint8 mask (stored as 0/255 grey)."""
    if image.ndim == 2:
        image = np.where(image.astype(bool), 255, 0).astype(np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def load_image_file(path: str, *, record: str, field: str) -> tuple[np.ndarray, bytes | None]:
    """Reads and decodes an image file; returns the array and the bytes if they can be stored unchanged."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise RecordError(record, field, f"cannot read image file {path!r}: {err.strerror}") from None
    image = decode_image(data, record=record, field=field)
    with PIL.Image.open(io.BytesIO(data)) as img:
        keep = img.format in _KEEP_FORMATS and img.mode == "RGB"
    return image, (data if keep else None)


class BadRecords:
    """Raises bad-record errors, or (``skip=True``) counts and logs them so skips are never silent."""

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.count = 0
        self.messages: list[str] = []

    def handle(self, err: RecordError) -> None:
        if not self.skip:
            raise err
        self.count += 1
        self.messages.append(str(err))
        _log.warning("skipping bad record (%d so far): %s", self.count, err)


def _first(obj: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if key in obj:
            return obj[key]
    return None


def parse_jsonl_record(
    obj: Any, folder: str, box_format: str, *, line: int, r_max: int | None = None
) -> EditRecord:
    """Turns one decoded ``metadata.jsonl`` object into a validated ``EditRecord``.

    Image paths are relative to ``folder``. Errors name the record by id when it has one, else by line.
    """
    where = f"at line {line}"
    if not isinstance(obj, dict):
        raise RecordError(where, "<line>", f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", f"line{line}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        raise RecordError(where, "id", f"must be a non-empty string or an integer, got {rid!r}")
    rid = str(rid)
    name = f"{rid!r} ({where})"
    src_path = _first(obj, _SOURCE_KEYS)
    if not isinstance(src_path, str) or not src_path:
        raise RecordError(name, "source", "missing, or not a file name")
    source, source_bytes = load_image_file(os.path.join(folder, src_path), record=name, field="source")
    height, width = source.shape[:2]
    instruction = _first(obj, _INSTRUCTION_KEYS)
    if not isinstance(instruction, str) or not instruction.strip():
        raise RecordError(name, "instruction", "missing or empty")
    target, target_bytes = None, None
    if obj.get("target") is not None:
        if not isinstance(obj["target"], str):
            raise RecordError(name, "target", f"must be a file name, got {obj['target']!r}")
        target, target_bytes = load_image_file(
            os.path.join(folder, obj["target"]), record=name, field="target"
        )
        if target.shape != source.shape:
            raise RecordError(
                name, "target", f"size {target.shape[:2]} differs from the source's {(height, width)}"
            )
    raw_regions = obj.get("regions")
    if not isinstance(raw_regions, list):
        raise RecordError(name, "regions", f"must be a list of {{box, label}} objects, got {raw_regions!r}")
    if r_max is not None and len(raw_regions) > r_max:
        raise RecordError(name, "regions", f"has {len(raw_regions)} regions, more than R_max={r_max}")
    regions = []
    for i, reg in enumerate(raw_regions):
        if not isinstance(reg, dict):
            raise RecordError(name, f"regions[{i}]", f"must be an object, got {reg!r}")
        box = _first(reg, _BOX_KEYS)
        if box is None:
            raise RecordError(name, f"regions[{i}].box", "missing")
        unit = to_unit_box(box, box_format, width, height, record=name, field=f"regions[{i}].box")
        label = reg.get("label", "")
        if not isinstance(label, str):
            raise RecordError(name, f"regions[{i}].label", f"must be a string, got {label!r}")
        mask = None
        if reg.get("mask") is not None:
            field = f"regions[{i}].mask"
            try:
                with open(os.path.join(folder, str(reg["mask"])), "rb") as f:
                    mask = decode_image(f.read(), record=name, field=field, mode="mask")
            except OSError as err:
                raise RecordError(
                    name, field, f"cannot read mask file {reg['mask']!r}: {err.strerror}"
                ) from None
            if mask.shape != (height, width):
                raise RecordError(
                    name, field, f"size {mask.shape} differs from the source's {(height, width)}"
                )
        regions.append(Region(box=unit, label=label, mask=mask))
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise RecordError(name, "meta", f"must be a JSON object, got {meta!r}")
    record = EditRecord(
        id=rid,
        source=source,
        instruction=instruction,
        regions=tuple(regions),
        target=target,
        meta=meta,
        source_bytes=source_bytes,
        target_bytes=target_bytes,
    )
    try:
        return validate_record(record, r_max)
    except RecordError as err:  # re-raise with the line number in the record's name
        raise RecordError(name, err.field, err.problem) from None


def read_jsonl_folder(
    folder: str,
    box_format: str,
    *,
    r_max: int | None = None,
    bad: BadRecords | None = None,
    metadata_file: str = "metadata.jsonl",
) -> Iterator[EditRecord]:
    """An iterator of validated records from ``folder/metadata.jsonl`` (a JSON object per line).

    Bad records go to ``bad`` (default: raise). Duplicate ids are bad records too, since ids key the
    dataset.
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    path = os.path.join(folder, metadata_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {metadata_file} in {folder!r}")
    # Checked above, eagerly; the lines are read lazily.
    return _iter_jsonl(path, folder, box_format, r_max, bad or BadRecords(skip=False))


def _iter_jsonl(
    path: str, folder: str, box_format: str, r_max: int | None, bad: BadRecords
) -> Iterator[EditRecord]:
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    raise RecordError(f"at line {line_no}", "<line>", f"malformed JSON: {err.msg}") from None
                record = parse_jsonl_record(obj, folder, box_format, line=line_no, r_max=r_max)
                if record.id in seen:
                    raise RecordError(f"{record.id!r} (at line {line_no})", "id", "duplicate id")
            except RecordError as err:
                bad.handle(err)
                continue
            seen.add(record.id)
            yield record
