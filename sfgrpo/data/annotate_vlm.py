"""Edit regions from a grounding VLM behind an OpenAI-compatible endpoint: the prompt, the request, the answer
parser and the answer cache of ``python -m sfgrpo.data.annotate --method vlm``.

One request per record: the source image (base64 PNG) and a prompt asking which parts of the image the
instruction will change, as labelled ``bbox_2d`` boxes on a 0..1000 grid (the convention of Qwen3-VL and of
the region judges, SPEC section 2). The transport is the judges' (``sfgrpo.rewards.remote.Transport``:
timeouts, retries with backoff on refused connections, 5xx and 429).

The answer is read as robustly as a judge's: a reasoning block (``<think> ... </think>``) is skipped, a
fenced JSON value is preferred to one in the prose, numbers may be strings. Accepted shapes: a list of
regions (Qwen-VL's own grounding format), ``{"regions": [...]}`` or ``{"edit_region": [...]}``, a region
being ``{"bbox_2d" (or "bbox", "box"): [x1, y1, x2, y2], "label": str, "confidence": 0..1 (optional)}``.
An answer that gives no usable regions raises ``RegionError`` with the reason; nothing is clipped,
truncated or guessed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
from typing import Any, NamedTuple

import numpy as np
import PIL.Image

from sfgrpo.data.region_diff import RegionError
from sfgrpo.rewards.base import RewardError
from sfgrpo.rewards.remote import Transport, TransportError, served_models
from sfgrpo.rewards.vlm import answer_text, chat_body
from sfgrpo.rewards.wire import png_b64

_log = logging.getLogger(__name__)

GROUNDING_PROMPT = """\
You mark where an image edit will happen. The image is the SOURCE image of an edit with this instruction:

Instruction: {instruction}

List the objects or areas of the source image that carrying out the instruction will change: each object
to recolour, replace, move, resize or remove, and for something to add, the area where it will appear.
Give each one a short label naming it and a box [x1, y1, x2, y2] on a 0-1000 grid over the image (x to the
right, y downwards) that covers all of it, and how confident you are (0 to 1). At most {max_regions}
regions; one region per separate object.

Answer with exactly this JSON and nothing else:
{"regions": [{"label": "what the region is", "bbox_2d": [x1, y1, x2, y2], "confidence": 0.9}]}"""

PLACEHOLDERS = ("{instruction}", "{max_regions}")
_BOX_KEYS = ("bbox_2d", "bbox", "box")
_LIST_KEYS = ("regions", "edit_region", "edit_regions")
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_JSON_START = re.compile(r"[\[{]")
# Answers that reject this one request (malformed, too large, unprocessable); any other failure after the
# retries (refused, timeout, 5xx, 401, 404, ...) means the endpoint or its settings are wrong: the run stops.
_REJECTED = (400, 413, 422)


class GroundedRegion(NamedTuple):
    """A region as the VLM named it: ``box`` (x1, y1, x2, y2) on the 0..1000 grid; ``confidence`` in [0, 1]
    or None when the answer gave none."""

    label: str
    box: tuple[float, float, float, float]
    confidence: float | None


class EndpointDown(RuntimeError):
    """The VLM endpoint failed after the retries: the run stops; the cache keeps the answers received."""


# ---------------------------------------------------------------------------------------------- prompt


def check_template(template: str, where: str) -> str:
    """The template if it holds ``{instruction}``; ``ValueError`` naming ``where`` otherwise."""
    if "{instruction}" not in template:
        raise ValueError(f"{where}: the prompt template has no {{instruction}} placeholder")
    return template


def fill_prompt(template: str, instruction: str, max_regions: int) -> str:
    """The template with ``{instruction}`` and ``{max_regions}`` filled in; other braces are left as they are,
    so a template can show JSON without escaping it."""
    return template.replace("{max_regions}", str(max_regions)).replace("{instruction}", instruction)


# ---------------------------------------------------------------------------------------------- parsing


def parse_grounding(answer: str, max_regions: int) -> list[GroundedRegion]:
    """The regions of a grounding answer (see the module docstring); ``RegionError`` with the reason."""
    if not isinstance(answer, str):
        raise RegionError("unparsable", f"expected the answer as text, got {type(answer).__name__}")
    text = _after_reasoning(answer)
    fenced = [v for m in _FENCE.finditer(text) for v in _json_values(m.group(1))]
    for values in (fenced, _json_values(text)):
        entries = [e for e in (_entries(v) for v in values) if e is not None]
        if entries:
            break
    else:
        raise RegionError("unparsable", f"no list of regions in the answer {_preview(text)}")
    found = entries[-1]  # a model that corrects itself gives its final list last
    if not found:
        raise RegionError("no_region", "the answer names no region")
    if len(found) > max_regions:
        raise RegionError(
            "too_many_regions", f"the answer names {len(found)} regions, more than {max_regions}"
        )
    return [_region(e, i) for i, e in enumerate(found)]


def _after_reasoning(text: str) -> str:
    """The text after the last ``</think>`` (a chat template may have opened the block); an unclosed
    ``<think>`` holds no answer."""
    closes = list(_THINK_CLOSE.finditer(text))
    answer = text[closes[-1].end() :] if closes else text
    if _THINK_OPEN.search(answer):
        raise RegionError(
            "unparsable", f"a '<think>' block is never closed (cut off by --max-tokens?): ...{text[-200:]!r}"
        )
    return answer


def _json_values(text: str) -> list[Any]:
    """The top-level JSON objects and arrays in ``text``, in order. A bracketed span that is not JSON is
    skipped whole, so no value is taken from inside a broken one; a bracket never closed (an answer cut
    off) raises 'unparsable' rather than leaving the values before it to stand for the whole answer."""
    decoder = json.JSONDecoder()
    out, pos = [], 0
    while (m := _JSON_START.search(text, pos)) is not None:
        try:
            value, pos = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            close = _closing_bracket(text, m.start())
            if close < 0:
                raise RegionError(
                    "unparsable", f"the answer ends inside a JSON value (cut off?): ...{text[-200:]!r}"
                ) from None
            pos = close + 1
            continue
        out.append(value)
    return out


def _closing_bracket(text: str, start: int) -> int:
    """The index of the bracket that closes ``text[start]`` (any of ``[{`` / ``]}``, outside JSON strings),
    or -1 if none does."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = c == "\\", c != '"'
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _entries(value: Any) -> list[dict[str, Any]] | None:
    """The region entries a JSON value holds, or None if it is not a region answer."""
    if isinstance(value, dict):
        for key in _LIST_KEYS:
            if isinstance(value.get(key), list):
                value = value[key]
                break
        else:
            return [value] if any(k in value for k in _BOX_KEYS) else None
    if isinstance(value, list) and all(isinstance(e, dict) for e in value):
        return value
    return None


def _region(entry: dict[str, Any], i: int) -> GroundedRegion:
    box = next((entry[k] for k in _BOX_KEYS if k in entry), None)
    if box is None:
        raise RegionError("unparsable", f"region {i} has no bbox_2d: {_preview(json.dumps(entry))}")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise RegionError(
            "unparsable", f"region {i}: bbox_2d must be 4 numbers [x1, y1, x2, y2], got {box!r}"
        )
    x1, y1, x2, y2 = (_number(v, f"region {i} bbox_2d") for v in box)
    if not all(0 <= v <= 1000 for v in (x1, y1, x2, y2)):
        raise RegionError("box_outside", f"region {i}: bbox_2d {box} is outside the 0..1000 grid")
    if not (x1 < x2 and y1 < y2):
        raise RegionError("empty_box", f"region {i}: bbox_2d {box} has zero area (needs x1 < x2, y1 < y2)")
    label = entry.get("label")
    if not isinstance(label, str) or not label.strip():
        raise RegionError("unlabelled", f"region {i} has no label: {_preview(json.dumps(entry))}")
    confidence = entry.get("confidence")
    if confidence is not None:
        confidence = _number(confidence, f"region {i} confidence")
        if not 0 <= confidence <= 1:
            raise RegionError("unparsable", f"region {i}: confidence {confidence} is outside [0, 1]")
    return GroundedRegion(label.strip(), (x1, y1, x2, y2), confidence)


def _number(value: Any, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RegionError("unparsable", f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegionError("unparsable", f"{where}: expected a number, got {value!r:.60}")
    return float(value)


def _preview(text: str) -> str:
    return repr(text if len(text) <= 200 else text[:200] + "...")


# ---------------------------------------------------------------------------------------------- requests


def image_for_request(source: np.ndarray, max_side: int) -> np.ndarray:
    """The (H, W, 3) uint8 image sent: ``source`` scaled down (bicubic) to ``max_side`` on its longer side,
    or as is when it fits or ``max_side`` is 0. Boxes on the 0..1000 grid do not depend on the size."""
    h, w = source.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return source
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(PIL.Image.fromarray(source).resize(size, PIL.Image.Resampling.BICUBIC), np.uint8)


def cache_key(image: np.ndarray, instruction: str, model: str, prompt: str, **request: Any) -> str:
    """sha256 over (the pixels sent, the instruction, the model, the prompt's sha256, the other request
    settings): a record asked again with all of these unchanged gets the cached answer."""
    pixels = hashlib.sha256(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes()).hexdigest()
    fields = {
        "image_sha256": pixels,
        "instruction": instruction,
        "model": model,
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        **request,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class GroundingClient:
    """Asks an OpenAI-compatible VLM for a record's regions; at most ``max_concurrency`` requests at once."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        max_concurrency: int,
        api_key: str | None = None,
        max_tokens: int = 1024,
        temperature: float = 0.0,
    ) -> None:
        self.url, self.model = url.rstrip("/"), model
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.transport = Transport(
            self.url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, headers=headers
        )
        self._slots = threading.Semaphore(int(max_concurrency))

    def check(self) -> None:
        """GET {url}/models: ``EndpointDown`` if nothing answers, ``ValueError`` if the model is not served.
        An endpoint without a /models route (404) passes."""
        try:
            served = served_models(self.transport)
        except TransportError as e:
            raise EndpointDown(f"the VLM endpoint {self.url} is not answering: {e}") from None
        if served and self.model not in served:
            raise ValueError(f"--judge-model: {self.url} does not serve {self.model!r}; it serves {served}")

    def ask(self, image: np.ndarray, prompt: str) -> str:
        """The answer text for one image. ``RegionError('request_rejected')`` for a request the endpoint
        refuses (4xx, or too large to send), ``EndpointDown`` after the retries of a failing endpoint."""
        body = chat_body(self.model, prompt, [png_b64(image)], self.max_tokens, self.temperature)
        try:
            with self._slots:
                response = self.transport.request("POST", "/chat/completions", body)
        except RewardError as e:  # the body is over the size limit: this record's image is too large
            raise RegionError("request_rejected", f"{e} (a smaller --max-side sends less)") from None
        except TransportError as e:
            if e.status in _REJECTED:
                raise RegionError("request_rejected", str(e)) from None
            raise EndpointDown(f"the VLM endpoint {self.url} failed: {e}") from None
        try:
            return answer_text(response)
        except ValueError as e:
            raise RegionError("unparsable", str(e)) from None


# ---------------------------------------------------------------------------------------------- cache


class AnswerCache:
    """VLM answers by ``cache_key``, appended to ``folder/answers.jsonl`` as they arrive (one line each).

    A run killed mid-write leaves at most one torn last line, which is ignored, so a rerun asks only for
    what has no complete line. One process at a time (the annotator locks its output folder).
    """

    def __init__(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "answers.jsonl")
        self._answers: dict[str, str] = {}
        self.torn = 0
        needs_newline = False
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    needs_newline = not line.endswith("\n")
                    try:
                        entry = json.loads(line)
                        self._answers[entry["key"]] = entry["answer"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.torn += 1
        if self.torn:
            _log.warning("%s: ignored %d incomplete line(s) (an interrupted run)", self.path, self.torn)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held until close()
        if needs_newline:
            self._file.write("\n")
        self._write = threading.Lock()

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> str | None:
        return self._answers.get(key)

    def put(self, key: str, answer: str, **info: Any) -> None:
        """Stores an answer; the line is flushed at once, so a killed run loses no answer it received."""
        with self._write:
            self._answers[key] = answer
            self._file.write(json.dumps({"key": key, "answer": answer, **info}) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()
