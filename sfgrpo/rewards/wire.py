"""sfgrpo's reward wire format: a ``ScoreRequest`` and ``HostScores`` as JSON, images as base64 PNG.

Shared by the reward server (``sfgrpo.rewards.server``), its client (``sfgrpo.rewards.remote``) and the
VLM client's data URLs (``sfgrpo.rewards.vlm``). Never pickle: a malformed body raises ``BadRequest`` naming
the field and what is wrong. The request format is in the server's module docstring.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

import numpy as np
import PIL.Image

from sfgrpo.rewards.base import HostScores, RegionScores, ScoreRequest


class BadRequest(ValueError):
    """A request the server cannot read; the message says which field and why."""


def png_b64(image: np.ndarray) -> str:
    """(H, W, 3) uint8 or (H, W) bool -> base64 PNG text (fast compression: these travel once)."""
    arr = np.asarray(image)
    pil = PIL.Image.fromarray(arr if arr.dtype != np.bool_ else arr.astype(np.uint8) * 255, mode=None)
    if arr.dtype == np.bool_:
        pil = pil.convert("1")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_b64(text: Any, field: str, *, mask: bool = False) -> np.ndarray:
    """base64 PNG -> (H, W, 3) uint8, or (H, W) bool with ``mask``; ``BadRequest`` naming ``field``."""
    if not isinstance(text, str):
        raise BadRequest(f"{field}: expected a base64 PNG string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}: not valid base64") from None
    try:
        with PIL.Image.open(io.BytesIO(raw)) as pil:
            if pil.format != "PNG":
                raise BadRequest(f"{field}: expected a PNG, got {pil.format}")
            if mask:
                if pil.mode not in ("1", "L"):
                    raise BadRequest(f"{field}: a mask must be a 1-bit or greyscale PNG, got mode {pil.mode}")
                return np.asarray(pil.convert("L")) > 0
            if pil.mode != "RGB":
                raise BadRequest(f"{field}: expected an RGB PNG, got mode {pil.mode}")
            return np.asarray(pil, np.uint8)
    except BadRequest:
        raise
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise BadRequest(f"{field}: not a readable PNG ({e})") from None


def request_to_json(request: ScoreRequest) -> dict[str, Any]:
    """The /score body of a request."""
    body: dict[str, Any] = {
        "source": [png_b64(x) for x in request.source],
        "edited": [png_b64(x) for x in request.edited],
        "instructions": [str(t) for t in request.instructions],
        "boxes": np.asarray(request.boxes, np.float64).tolist(),
        "region_valid": np.asarray(request.region_valid).tolist(),
        "region_labels": [[str(s) for s in row] for row in request.region_labels],
    }
    if request.target is not None:
        body["target"] = [png_b64(x) for x in request.target]
    if request.region_masks is not None:
        body["region_masks"] = [[png_b64(m) for m in row] for row in request.region_masks]
    return body


def request_from_json(body: Any) -> ScoreRequest:
    """A /score body back into a ``ScoreRequest``; ``BadRequest`` names the first bad field."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    for key in ("source", "edited", "instructions", "boxes", "region_valid", "region_labels"):
        if key not in body:
            raise BadRequest(f"missing field {key!r}")
    b = _length(body["source"], "source")
    if b == 0:
        raise BadRequest("source: the batch is empty")
    images = {}
    for key in ("source", "edited", "target"):
        if key in body and body[key] is not None:
            _length(body[key], key, b)
            images[key] = np.stack([image_from_b64(x, f"{key}[{i}]") for i, x in enumerate(body[key])])
    hw = images["source"].shape[1:3]
    for key, arr in images.items():
        if arr.shape[1:3] != hw:
            raise BadRequest(f"{key}: images are {arr.shape[1:3]}, the sources {hw}")
    instructions = body["instructions"]
    _length(instructions, "instructions", b)
    if not all(isinstance(t, str) for t in instructions):
        raise BadRequest("instructions: expected strings")
    boxes = _array(body["boxes"], "boxes", np.float32)
    if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
        raise BadRequest(f"boxes: expected shape ({b}, R, 4), got {boxes.shape}")
    r = boxes.shape[1]
    if not np.all(np.isfinite(boxes)) or boxes.min(initial=0) < 0 or boxes.max(initial=0) > 1:
        raise BadRequest("boxes: coordinates must be finite and in [0, 1]")
    valid = _array(body["region_valid"], "region_valid", None)
    if valid.shape != (b, r) or valid.dtype != np.bool_:
        raise BadRequest(f"region_valid: expected ({b}, {r}) booleans, got {valid.shape} {valid.dtype}")
    labels = body["region_labels"]
    if (
        not isinstance(labels, list)
        or len(labels) != b
        or not all(
            isinstance(row, list) and len(row) == r and all(isinstance(s, str) for s in row) for row in labels
        )
    ):
        raise BadRequest(f"region_labels: expected {b} lists of {r} strings")
    masks = None
    if body.get("region_masks") is not None:
        rows = body["region_masks"]
        _length(rows, "region_masks", b)
        for i, row in enumerate(rows):
            _length(row, f"region_masks[{i}]", r)
        masks = np.zeros((b, r, *hw), np.bool_)
        for i, row in enumerate(rows):
            for k, text in enumerate(row):
                m = image_from_b64(text, f"region_masks[{i}][{k}]", mask=True)
                if m.shape != hw:
                    raise BadRequest(f"region_masks[{i}][{k}]: mask is {m.shape}, the images {hw}")
                masks[i, k] = m
    try:
        return ScoreRequest(
            source=images["source"],
            edited=images["edited"],
            instructions=list(instructions),
            boxes=boxes,
            region_valid=valid,
            region_labels=np.array(labels, dtype=object).reshape(b, r),
            target=images.get("target"),
            region_masks=masks,
        )
    except ValueError as e:
        raise BadRequest(str(e)) from None


def scores_to_json(scores: HostScores) -> dict[str, Any]:
    """HostScores as JSON-safe lists (non-finite values become null)."""
    out = {}
    for f in RegionScores._fields:
        x = np.asarray(getattr(scores, f))
        out[f] = x.tolist() if f == "valid" else _nulls(x.astype(np.float64).tolist())
    return {"scores": out, "failures": {k: int(v) for k, v in scores.failures.items()}}


def _nulls(x: Any) -> Any:
    if isinstance(x, list):
        return [_nulls(v) for v in x]
    return x if math.isfinite(x) else None


def _length(value: Any, field: str, expected: int | None = None) -> int:
    if not isinstance(value, list):
        raise BadRequest(f"{field}: expected a list, got {type(value).__name__}")
    if expected is not None and len(value) != expected:
        raise BadRequest(f"{field}: expected {expected} entries, got {len(value)}")
    return len(value)


def _array(value: Any, field: str, dtype: Any) -> np.ndarray:
    try:
        arr = np.array(value, dtype=dtype)
    except (TypeError, ValueError):
        raise BadRequest(f"{field}: not a regular nested list of numbers") from None
    if arr.dtype == object:
        raise BadRequest(f"{field}: not a regular nested list")
    return arr
