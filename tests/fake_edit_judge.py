"""A fake benchmark judge: an OpenAI-compatible chat-completions server on loopback that scores from pixels.

It decodes the request's data-URL PNGs and answers in the JSON each protocol of
``sfgrpo.evaluation.judges`` asks for, with scores computed from the images (``pixel_measures``): success
from how much of the edited image differs from the source, over-editing from how much more than half of it
does, naturalness from how rough it is (neighbouring pixels apart), artifacts from how much of it is mid-grey.
The call is recognised from the answer schema its prompt names (``call_kind``). It counts requests, records
what it received (image sizes, pixels, prompt texts) and plays scripted faults (``FakeEditJudge.fault``).

In tests::

    with FakeEditJudge() as fake:
        judge = BenchmarkJudge("viescore", fake.url, fake.model, ...)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
from fake_chat_server import ChatHandler, FakeChatServer, Fault, decode_content

_log = logging.getLogger("fake_edit_judge")
MODEL = "fake-edit-judge"
FAULTS = ("answer", "malformed", "out_of_range", "http_500", "slow", "die")
KINDS = ("viescore_semantics", "viescore_quality", "imgedit", "regions_semantics", "regions_quality")
CHANGED = 16  # a pixel is changed when a channel moved by more than this
GREY = 24  # a pixel is mid-grey when every channel is within this of 128


# ---------------------------------------------------------------------------------------------- scores


def changed_mask(source: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of ``edited`` (resized to the source with Lanczos if need be) that differ."""
    if edited.shape != source.shape:
        size = (source.shape[1], source.shape[0])
        edited = np.asarray(PIL.Image.fromarray(edited).resize(size, PIL.Image.Resampling.LANCZOS))
    diff = np.abs(edited.astype(np.int16) - source.astype(np.int16)).max(axis=-1)
    return diff > CHANGED


def quality_measures(image: np.ndarray) -> tuple[float, float]:
    """(naturalness, artifacts) in [0, 1]: 1 - 4 * the mean horizontal step / 255; 1 - the mid-grey share."""
    x = image.astype(np.float64)
    roughness = float(np.abs(np.diff(x, axis=1)).mean() / 255) if image.shape[1] > 1 else 0.0
    grey = float((np.abs(x - 128) <= GREY).all(axis=-1).mean())
    return float(np.clip(1 - 4 * roughness, 0, 1)), 1.0 - grey


def pixel_measures(source: np.ndarray, edited: np.ndarray) -> dict[str, float]:
    """The edit's measures in [0, 1]: success (the changed share / 0.25, capped), overediting (1 - how far
    the changed share exceeds one half, / 0.5; 1 = none), naturalness and artifacts of the edited image."""
    change = float(changed_mask(source, edited).mean())
    naturalness, artifacts = quality_measures(edited)
    return {
        "success": min(1.0, change / 0.25),
        "overediting": 1.0 - max(0.0, change - 0.5) / 0.5,
        "naturalness": naturalness,
        "artifacts": artifacts,
    }


def viescore_scores(measures: dict[str, float], kind: str) -> list[int]:
    """The 0..10 integer pair of the call ``kind``."""
    names = ("success", "overediting") if kind == "viescore_semantics" else ("naturalness", "artifacts")
    return [int(round(10 * measures[n])) for n in names]


def imgedit_scores(measures: dict[str, float]) -> list[int]:
    """[compliance, edit_quality, preservation] on 1..5."""
    quality = min(measures["naturalness"], measures["artifacts"])
    return [int(round(1 + 4 * v)) for v in (measures["success"], quality, measures["overediting"])]


def regions_scores(
    source: np.ndarray, edited: np.ndarray, regions: Sequence[dict[str, Any]], scale: float
) -> dict[str, Any]:
    """SPEC section 5 scores on 0..scale from the boxes (0..1000 grid): a region's success is its changed
    share / 0.5 (capped), its preservation 1 - its mid-grey share; the background is 1 - the changed share
    outside every box; the overall pair is (mean success, background); quality as ``quality_measures``."""
    h, w = source.shape[:2]
    changed = changed_mask(source, edited)
    if edited.shape != source.shape:
        edited = np.asarray(PIL.Image.fromarray(edited).resize((w, h), PIL.Image.Resampling.LANCZOS))
    inside = np.zeros((h, w), bool)
    success, preserve = [], []
    for r in regions:
        x1, y1, x2, y2 = (int(v) for v in r["bbox_2d"])
        rows, cols = _span(y1, y2, h), _span(x1, x2, w)
        inside[rows, cols] = True
        success.append(min(1.0, float(changed[rows, cols].mean()) / 0.5))
        preserve.append(quality_measures(edited[rows, cols])[1])
    outside = ~inside
    background = 1.0 - (float(changed[outside].mean()) if outside.any() else 0.0)
    naturalness, artifacts = quality_measures(edited)

    def s(v: float) -> float:
        return round(scale * v, 1)

    return {
        "success": [s(v) for v in success],
        "preserve": [s(v) for v in preserve],
        "background": s(background),
        "overall": [s(float(np.mean(success))), s(background)],
        "quality": [s(naturalness), s(artifacts)],
    }


def _span(lo: int, hi: int, n: int) -> slice:
    """The pixels [lo, hi) on the 0..1000 grid cover along an axis of ``n`` pixels (at least one)."""
    start = lo * n // 1000
    return slice(start, max(start + 1, -(-hi * n // 1000)))


def call_kind(text: str, num_images: int) -> str:
    """Which protocol call a prompt is, from the answer schema it names (the built-in prompts' wording)."""
    if "Regions (JSON):" in text:
        return "regions_semantics"
    if "[compliance, edit_quality, preservation]" in text:
        return "imgedit"
    if "[instruction_success, over_editing]" in text:
        return "viescore_semantics"
    if "[naturalness, artifacts]" in text:
        return "viescore_quality" if num_images == 1 else "regions_quality"
    raise ValueError(f"cannot tell which protocol call this prompt is: {text[:200]!r}")


# ---------------------------------------------------------------------------------------------- answers


def _wrap(obj: dict[str, Any], style: int) -> str:
    text = json.dumps(obj, indent=1 if style else None)
    if style == 0:
        return f"Comparing the two images.\n```json\n{text}\n```\nThose are my scores."
    if style == 1:
        return f"My assessment: {text} -- done."
    return text


def answer_for(kind: str, images: list[np.ndarray], text: str) -> dict[str, Any]:
    """The answer object of one call, scored from ``images``."""
    if kind == "viescore_quality":
        naturalness, artifacts = quality_measures(images[0])
        scores = [int(round(10 * naturalness)), int(round(10 * artifacts))]
        return {"score": scores, "reasoning": "Judged from the pixels."}
    source, edited = images
    if kind == "viescore_semantics":
        return {"score": viescore_scores(pixel_measures(source, edited), kind), "reasoning": "Pixels."}
    if kind == "imgedit":
        return {"score": imgedit_scores(pixel_measures(source, edited)), "reasoning": "Pixels."}
    scale = float(re.search(r"from 0 to (\d+(?:\.\d+)?)", text).group(1))
    if kind == "regions_quality":
        naturalness, artifacts = quality_measures(edited)
        return {"score": [round(scale * naturalness, 1), round(scale * artifacts, 1)]}
    regions = json.loads(re.search(r"Regions \(JSON\): (\[.*\])", text).group(1))
    s = regions_scores(source, edited, regions, scale)
    return {
        "edit_region": [
            {**r, "score": [s["success"][k], s["preserve"][k]], "reasoning": "Inside the box."}
            for k, r in enumerate(regions)
        ],
        "background": {"score": s["background"], "reasoning": "Outside the boxes."},
        "overall_score": s["overall"],
    }


def _out_of_range(obj: dict[str, Any]) -> dict[str, Any]:
    obj = json.loads(json.dumps(obj))
    if "edit_region" in obj:
        obj["edit_region"][0]["score"][0] += 400
    else:
        obj["score"][0] += 400
    return obj


# ---------------------------------------------------------------------------------------------- server


@dataclasses.dataclass
class Received:
    """One chat-completions request: the call kind, the images (decoded) and the prompt text."""

    kind: str
    images: list[np.ndarray]
    text: str

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [im.shape[:2] for im in self.images]


@dataclasses.dataclass
class _Fault(Fault):
    text: str = ""  # what an 'answer' fault answers; ``only``: a call kind (KINDS) or None (all)


class _Handler(ChatHandler):
    server: FakeEditJudge

    def _chat(self, body: bytes) -> None:
        self.server.count_request()
        try:
            request = json.loads(body)
            if request.get("model") != self.server.model:
                raise ValueError(f"unknown model {request.get('model')!r}")
            images, text = _content(request["messages"])
            kind = call_kind(text, len(images))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OSError) as e:
            self._send(400, {"error": {"message": f"bad request: {e}"}})
            return
        self.server.record(Received(kind, images, text))
        fault = self.server.take_fault(kind)
        if self._play_fault(fault):
            return
        if fault is not None and fault.kind == "http_500":
            self._send(500, {"error": {"message": "internal error (scripted)"}})
            return
        if fault is not None and fault.kind == "answer":
            answer = fault.text
        else:
            obj = answer_for(kind, images, text)
            if fault is not None and fault.kind == "out_of_range":
                obj = _out_of_range(obj)
            answer = _wrap(obj, self.server.next_style())
            if fault is not None and fault.kind == "malformed":
                answer = answer.replace("}", "", 1).replace("```", "")
        self.server.count_answer()
        self._send_answer(answer, "chatcmpl-fake")


def _content(messages: list[dict[str, Any]]) -> tuple[list[np.ndarray], str]:
    images, text = decode_content(messages, png_only=True)
    if not images:
        raise ValueError("no image in the request")
    return images, text


class FakeEditJudge(FakeChatServer):
    """The fake judge's server on 127.0.0.1 (port 0: ephemeral), run in a thread by the context manager.

    requests: POST /chat/completions received (faulted ones too); answered: those answered 200.
    received: every request's ``Received`` (kind, decoded images, prompt), in arrival order.
    """

    log = _log

    def __init__(self, *, model: str = MODEL, port: int = 0) -> None:
        super().__init__(_Handler, host="127.0.0.1", port=port, model=model)
        self.requests = 0
        self.answered = 0
        self.received: list[Received] = []

    def fault(
        self,
        kind: str,
        times: int | None = None,
        *,
        only: str | None = None,
        text: str = "",
        delay_s: float = 1.0,
    ) -> None:
        """Scripts a fault for the next ``times`` requests of call kind ``only`` (None: any; ``times`` None:
        all until cleared). answer: answer ``text`` verbatim; malformed: broken JSON; out_of_range: the first
        score 400 too high; http_500: a server error; slow: answer after ``delay_s``; die: drop the
        connection and stop listening (later requests are refused)."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {FAULTS}")
        if only is not None and only not in KINDS:
            raise ValueError(f"unknown call kind {only!r}; known: {KINDS}")
        with self._lock:
            self._faults.append(_Fault(kind, times, only, delay_s, text))

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def count_answer(self) -> None:
        with self._lock:
            self.answered += 1

    def record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)

    def of_kind(self, kind: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.kind == kind]
