"""sfgrpo's reward wire format: a ``ScoreRequest`` and ``HostScores`` as JSON, images as base64 PNG.

Shared by the reward server (``sfgrpo.rewards.server``), its client (``sfgrpo.rewards.remote``) and the
VLM client's data URLs (``sfgrpo.rewards.vlm``). Never pickle: a malformed body raises ``BadRequest`` naming
the field and what is wrong. The request format is in the server's module docstring.

A few hundred KiB of PNG can declare gigabytes of pixels (all-zero rows deflate ~1000:1), so
``request_from_json`` reads every image's declared size from its PNG header (the first 24 bytes) before
decoding any, and refuses with ``TooLarge`` an image over ``max_image_pixels`` or a request whose images
decode to more than ``max_decoded_bytes`` (RGB: 3 bytes a pixel, masks: 1). Pillow only opens PNGs whose
header passed, so its own decompression-bomb check (``PIL.Image.MAX_IMAGE_PIXELS``) is never the guard.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from typing import Any

import numpy as np
import PIL.Image

from sfgrpo.rewards.base import HostScores, RegionScores, ScoreRequest

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # 16.8 MP, 48 MiB decoded as RGB: 4x a 2048x2048 judge's input
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What a non-PNG image is, for the error message: PIL never opens anything but a PNG here.
_OTHER_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "WEBP",
}


class BadRequest(ValueError):
    """A request the server cannot read; the message says which field and why."""


class TooLarge(BadRequest):
    """A request whose images would decode beyond the server's limits (answered 413)."""


def png_b64(image: np.ndarray) -> str:
    """(H, W, 3) uint8 or (H, W) bool -> base64 PNG text (fast compression: these travel once)."""
    arr = np.asarray(image)
    pil = PIL.Image.fromarray(arr if arr.dtype != np.bool_ else arr.astype(np.uint8) * 255, mode=None)
    if arr.dtype == np.bool_:
        pil = pil.convert("1")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_size(text: Any, field: str) -> tuple[int, int]:
    """(width, height) declared by a base64 PNG's header, read from its first 32 characters, without
    decoding the image; ``BadRequest`` naming ``field`` if it is not base64 or not a PNG."""
    if not isinstance(text, str):
        raise BadRequest(f"{field}: expected a base64 PNG string, got {type(text).__name__}")
    head = _b64decode(_strip_data_url(text)[:32], field)
    if not head.startswith(PNG_SIGNATURE):
        kind = next((k for sig, k in _OTHER_SIGNATURES.items() if head.startswith(sig)), "another format")
        raise BadRequest(f"{field}: expected a PNG, got {kind}")
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise BadRequest(f"{field}: not a readable PNG (no IHDR header)")
    width, height = struct.unpack(">II", head[16:24])
    if width == 0 or height == 0:
        raise BadRequest(f"{field}: not a readable PNG (declares {width}x{height} pixels)")
    return width, height


def image_from_b64(
    text: Any, field: str, *, mask: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """base64 PNG -> (H, W, 3) uint8, or (H, W) bool with ``mask``; ``BadRequest`` naming ``field``, and
    ``TooLarge`` before decoding when the header declares more than ``max_pixels``."""
    _check_pixels(field, *png_size(text, field), max_pixels)
    raw = _b64decode(_strip_data_url(text), field)
    try:
        with PIL.Image.open(io.BytesIO(raw), formats=["PNG"]) as pil:
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


def _check_pixels(field: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise TooLarge(
            f"{field}: a {width}x{height} image ({width * height / 1e6:.1f} MP) exceeds the server's limit "
            f"of {max_pixels} pixels (--max-image-pixels)"
        )


def _strip_data_url(text: str) -> str:
    return text.partition(",")[2] if text.startswith("data:") else text


def _b64decode(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}: not valid base64") from None


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


def request_from_json(
    body: Any,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_decoded_bytes: int | None = None,
) -> ScoreRequest:
    """A /score body back into a ``ScoreRequest``; ``BadRequest`` names the first bad field.

    Every field but the images is checked first, then every image's PNG header (``check_image_sizes``),
    and only then are the images decoded, into arrays allocated once.
    """
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    for key in ("source", "edited", "instructions", "boxes", "region_valid", "region_labels"):
        if key not in body:
            raise BadRequest(f"missing field {key!r}")
    b = _length(body["source"], "source")
    if b == 0:
        raise BadRequest("source: the batch is empty")
    image_keys = [k for k in ("source", "edited", "target") if body.get(k) is not None]
    for key in image_keys:
        _length(body[key], key, b)
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
    mask_rows = body.get("region_masks")
    if mask_rows is not None:
        _length(mask_rows, "region_masks", b)
        for i, row in enumerate(mask_rows):
            _length(row, f"region_masks[{i}]", r)
    images = [(f"{key}[{i}]", x, False) for key in image_keys for i, x in enumerate(body[key])]
    masks_in = [
        (f"region_masks[{i}][{k}]", x, True)
        for i, row in enumerate(mask_rows or [])
        for k, x in enumerate(row)
    ]
    h, w = check_image_sizes(images + masks_in, max_image_pixels, max_decoded_bytes)

    decoded = {}
    for key in image_keys:
        decoded[key] = np.empty((b, h, w, 3), np.uint8)
        for i, text in enumerate(body[key]):
            decoded[key][i] = image_from_b64(text, f"{key}[{i}]", max_pixels=max_image_pixels)
    masks = None
    if mask_rows is not None:
        masks = np.empty((b, r, h, w), np.bool_)
        for i, row in enumerate(mask_rows):
            for k, text in enumerate(row):
                masks[i, k] = image_from_b64(
                    text, f"region_masks[{i}][{k}]", mask=True, max_pixels=max_image_pixels
                )
    try:
        return ScoreRequest(
            source=decoded["source"],
            edited=decoded["edited"],
            instructions=list(instructions),
            boxes=boxes,
            region_valid=valid,
            region_labels=np.array(labels, dtype=object).reshape(b, r),
            target=decoded.get("target"),
            region_masks=masks,
        )
    except ValueError as e:
        raise BadRequest(str(e)) from None


def check_image_sizes(
    images: list[tuple[str, Any, bool]], max_image_pixels: int, max_decoded_bytes: int | None
) -> tuple[int, int]:
    """(H, W) shared by every image, read from the PNG headers of ``(field, base64, is_mask)`` entries.

    ``BadRequest`` for an unreadable header or a size unlike ``images[0]``'s; ``TooLarge`` for an image over
    ``max_image_pixels`` or a total beyond ``max_decoded_bytes`` (3 bytes a pixel, 1 for a mask).
    """
    total, hw = 0, None
    for field, text, is_mask in images:
        width, height = png_size(text, field)
        _check_pixels(field, width, height, max_image_pixels)
        if hw is None:
            hw = (height, width)
        elif (height, width) != hw:
            what = "mask" if is_mask else "image"
            raise BadRequest(
                f"{field}: the {what} is {height}x{width} (HxW), {images[0][0]} is {hw[0]}x{hw[1]}"
            )
        total += width * height * (1 if is_mask else 3)
    if max_decoded_bytes is not None and total > max_decoded_bytes:
        raise TooLarge(
            f"the request's {len(images)} images decode to {total / 2**20:.1f} MiB, beyond the server's "
            f"limit of {max_decoded_bytes / 2**20:.1f} MiB a request (--max-decoded-mb); send fewer images"
        )
    assert hw is not None  # 'source' is non-empty
    return hw


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
