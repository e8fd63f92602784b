"""A fake VLM judge for the shapes task: an OpenAI-compatible chat-completions server on loopback.

It answers the way a VLM does (JSON of SPEC section 5 inside a ```json fence or bare, with prose around it,
integer or float scores, reasoning strings), but its scores are meaningful: it decodes the source and
edited images from the request's data URLs, looks the source up (a hash of its pixels) among the shapes
examples it was built from, and scores the edit with the shapes scorer against that example's target and
region masks, optionally judging against the pixel autoencoder's round trip as the trainer's in-graph
reward does. Faults can be scripted for the fault tests (``FakeVLM.fault``).

In tests::

    with FakeVLM(ShapesOracle.from_records(records)) as vlm:
        judge = VLMJudge(vlm.url, vlm.model, ...)

As a process, for a demo run with ``reward.kind='vlm'``, ``reward.url='http://127.0.0.1:P/v1'``,
``reward.model='fake-shapes-judge'``::

    python tests/fake_vlm.py --port P --resolution 64 --pool 4 --seed 0 --train 4096 --eval 32 --max-edits 3 \
        --preserve-floor 0.012 --preserve-tol 0.04 --tv-tol 0.1 --shape-margin 4
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import json
import logging
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from fake_chat_server import ChatHandler, FakeChatServer, Fault, decode_content

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sfgrpo.data.pipeline import fit_to_resolution  # noqa: E402
from sfgrpo.data.records import EditRecord  # noqa: E402
from sfgrpo.data.shapes import ShapesConfig, ShapesSource  # noqa: E402
from sfgrpo.models.tiny import PixelAutoencoder  # noqa: E402
from sfgrpo.rewards.base import SCORE_SCALE, ScoreRequest  # noqa: E402
from sfgrpo.rewards.reward_config import SHAPES_DEFAULTS, SHAPES_OPTIONS, shapes_reward_options  # noqa: E402
from sfgrpo.rewards.synthetic import shapes_scores  # noqa: E402

_log = logging.getLogger("fake_vlm")
MODEL = "fake-shapes-judge"
FAULTS = ("slow", "malformed", "missing_region", "extra_region", "out_of_range", "http_500", "die")


def pixel_key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, np.uint8).tobytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Example:
    """A shapes example at the judged resolution: (H, W, 3) uint8 images, (K, 4) boxes, (K, H, W) masks."""

    source: np.ndarray
    target: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    labels: tuple[str, ...]
    instruction: str


class ShapesOracle:
    """Source pixels -> the example's ground truth, and the shapes scorer of one edit.

    ``pool`` > 0 judges against ``PixelAutoencoder(pool)``'s round trip of source and target, like the
    trainer's in-graph reward (``Programs._scores``). ``tolerances``: shapes_scores' keyword tolerances
    (``config.reward``'s preserve_floor, preserve_tol, tv_tol, shape_margin, noise_floor, noise_tol);
    {}: its defaults.
    """

    def __init__(
        self,
        examples: Iterable[Example],
        *,
        pool: int = 0,
        scale: float = SCORE_SCALE,
        tolerances: dict[str, float] | None = None,
    ) -> None:
        tolerances = dict(tolerances or {})
        self.examples = {pixel_key(e.source): e for e in examples}
        self.scale = scale
        ae = PixelAutoencoder(pool=pool) if pool else None

        @jax.jit
        def score(
            edited: jax.Array, source: jax.Array, target: jax.Array, masks: jax.Array, boxes: jax.Array
        ):
            if ae is not None:
                grid = ae.grid(source.shape[1], source.shape[2])
                source = ae.decode(ae.encode(source), grid)
                target = ae.decode(ae.encode(target), grid)
            valid = jnp.ones(boxes.shape[:2], bool)
            return shapes_scores(
                edited.astype(jnp.float32) / 255.0,
                source,
                target,
                masks,
                boxes,
                valid,
                scale=scale,
                **tolerances,
            )

        self._score = score

    @classmethod
    def from_records(
        cls,
        records: Iterable[EditRecord],
        resolution: int,
        *,
        pool: int = 0,
        scale: float = SCORE_SCALE,
        tolerances: dict[str, float] | None = None,
    ) -> ShapesOracle:
        """The examples as the data pipeline presents them at ``resolution`` ('resize' mode)."""
        examples = []
        for rec in records:
            source, target, boxes, valid, masks = fit_to_resolution(rec, (resolution, resolution))
            keep = np.flatnonzero(valid)
            labels = tuple(rec.regions[k].label for k in keep)
            examples.append(Example(source, target, boxes[keep], masks[keep], labels, rec.instruction))
        return cls(examples, pool=pool, scale=scale, tolerances=tolerances)

    def judge(self, source: np.ndarray, edited: np.ndarray) -> tuple[Example, dict[str, Any]]:
        """The example of ``source`` and the scores of ``edited`` (floats; per-region lists)."""
        example = self.examples.get(pixel_key(source))
        if example is None:
            raise KeyError("the source image is not one of this judge's shapes examples")
        out = jax.device_get(
            self._score(
                edited[None],
                example.source[None],
                example.target[None],
                example.masks[None],
                example.boxes[None],
            )
        )
        return example, {
            "success": [float(v) for v in out.success[0]],
            "preserve": [float(v) for v in out.preserve[0]],
            **{
                f: float(getattr(out, f)[0])
                for f in ("background", "naturalness", "artifacts", "overall_success", "overall_preserve")
            },
        }


def request_from_examples(examples: Sequence[Example], edited: np.ndarray, r_max: int) -> ScoreRequest:
    """A ScoreRequest of ``edited`` (B, H, W, 3) uint8 images of these examples, padded to ``r_max`` slots."""
    b = len(examples)
    h, w = examples[0].source.shape[:2]
    boxes = np.zeros((b, r_max, 4), np.float32)
    valid = np.zeros((b, r_max), bool)
    labels = np.full((b, r_max), "", dtype=object)
    masks = np.zeros((b, r_max, h, w), bool)
    for i, e in enumerate(examples):
        k = len(e.labels)
        boxes[i, :k], valid[i, :k], labels[i, :k], masks[i, :k] = e.boxes, True, e.labels, e.masks
    return ScoreRequest(
        source=np.stack([e.source for e in examples]),
        edited=np.asarray(edited, np.uint8),
        instructions=[e.instruction for e in examples],
        boxes=boxes,
        region_valid=valid,
        region_labels=labels,
        target=np.stack([e.target for e in examples]),
        region_masks=masks,
    )


def edited_variants(examples, seed=0):
    """(B, H, W, 3) uint8 edits of graded quality: perfect, none, noisy, half-way, one region fixed."""
    rng = np.random.default_rng(seed)
    out = []
    for i, e in enumerate(examples):
        src, tgt = e.source.astype(np.float32), e.target.astype(np.float32)
        kind = i % 5
        if kind == 0:
            img = tgt
        elif kind == 1:
            img = src
        elif kind == 2:
            img = tgt + rng.normal(0, 30, tgt.shape)
        elif kind == 3:
            img = 0.5 * (src + tgt)
        else:
            img = src.copy()
            img[e.masks[0]] = tgt[e.masks[0]]
        out.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return np.stack(out)


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout_s: float) -> re.Match:
    """The first line of ``proc``'s stderr (text mode) matching ``pattern``; RuntimeError after ``timeout_s``
    or if the process exits. Its stderr is drained in a thread from then on, so it never blocks on a pipe."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            raise RuntimeError(
                f"the process exited ({proc.wait()}) before logging {pattern!r}: {''.join(seen)[-2000:]}"
            )
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise RuntimeError(f"no line matching {pattern!r} within {timeout_s} s: {''.join(seen)[-2000:]}")


# ---------------------------------------------------------------------------------------------- answers


def _num(x: float, integer: bool) -> float | int:
    return int(round(x)) if integer else round(x, 3)


def semantic_answer(example: Example, scores: dict[str, Any], regions: list[dict], style: int) -> str:
    """A VLM-like answer: the SPEC section 5 JSON in one of three wrappings, integer scores in style 1."""
    integer = style == 1
    entries = [
        {
            "id": r["id"],
            "label": r["label"],
            "bbox_2d": r["bbox_2d"],
            "score": [_num(scores["success"][k], integer), _num(scores["preserve"][k], integer)],
            "reasoning": f"The {r['label']} {'matches' if scores['success'][k] > 12 else 'misses'} the edit.",
        }
        for k, r in enumerate(regions)
    ]
    obj = {
        "edit_region": entries,
        "background": {"score": _num(scores["background"], integer), "reasoning": "Outside the boxes."},
        "overall_score": [
            _num(scores["overall_success"], integer),
            _num(scores["overall_preserve"], integer),
        ],
    }
    return _wrap(json.dumps(obj, indent=2), style)


def quality_answer(scores: dict[str, Any], style: int) -> str:
    integer = style == 1
    obj = {"score": [_num(scores["naturalness"], integer), _num(scores["artifacts"], integer)]}
    return _wrap(json.dumps(obj), style)


def _wrap(text: str, style: int) -> str:
    if style == 0:
        return f"Let me compare the two images carefully.\n\n```json\n{text}\n```\n\nThese are my scores."
    if style == 1:
        return f"Assessment: {text}\nI am fairly confident in this judgement."
    return f"```\n{text}\n```"


def reasoning_answer(answer: str, draft: str) -> str:
    """``answer`` after a reasoning block, as reasoning-mode VLMs write it: the block holds stray braces and
    ``draft``, a first attempt in the answer's schema that the answer then corrects."""
    return (
        "<think>\nThe boxes are {x1, y1, x2, y2} on the 0..1000 grid. A first draft:\n"
        f"{draft}\nNo, let me look at the edited image again.\n</think>\n\n{answer}"
    )


# ---------------------------------------------------------------------------------------------- server


class _Handler(ChatHandler):
    server: FakeVLM

    def _chat(self, body: bytes) -> None:
        self.server.authorization = self.headers.get("Authorization")
        try:
            request = json.loads(body)
            images, text = _content(request["messages"])
            semantic = "edit_region" in text
            if semantic:
                regions = json.loads(re.search(r"Regions \(JSON\): (\[.*\])", text).group(1))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            self._send(400, {"error": {"message": f"bad request: {e}"}})
            return
        kind = "semantic" if semantic else "quality"
        fault = self.server.take_fault(kind)
        if self._play_fault(fault):
            return
        if fault is not None and fault.kind == "http_500":
            self._send(500, {"error": {"message": "internal error (scripted)"}})
            return
        try:
            source, edited = images
            example, scores = self.server.oracle.judge(source, edited)
        except (KeyError, ValueError) as e:
            self._send(400, {"error": {"message": str(e)}})
            return
        style = self.server.next_style()
        if semantic:
            problem = _check_regions(regions, example)
            if problem:
                self._send(400, {"error": {"message": problem}})
                return
            scores = _apply_fault(scores, fault)
            if fault is not None and fault.kind == "missing_region":
                regions = regions[:-1]
            if fault is not None and fault.kind == "extra_region":
                regions = [*regions, {"id": len(regions) + 1, "label": "extra", "bbox_2d": [0, 0, 10, 10]}]
                scores["success"] = [*scores["success"], 10.0]
                scores["preserve"] = [*scores["preserve"], 10.0]
            answer = semantic_answer(example, scores, regions, style)
        else:
            answer = quality_answer(_apply_fault(scores, fault), style)
        if fault is not None and fault.kind == "malformed":
            answer = answer.replace("}", "", 1).replace("```", "")
        if self.server.reasoning:
            zero = {k: [0.0] * len(v) if isinstance(v, list) else 0.0 for k, v in scores.items()}
            draft = (
                semantic_answer(example, zero, regions, style) if semantic else quality_answer(zero, style)
            )
            answer = reasoning_answer(answer, draft)
        self.server.count(kind)
        self._send_answer(answer, f"chatcmpl-{self.server.served}", model=self.server.model)


def _content(messages: list[dict]) -> tuple[list[np.ndarray], str]:
    images, text = decode_content(messages)
    if len(images) != 2:
        raise ValueError(f"expected two images (source, edited), got {len(images)}")
    return images, text


def _check_regions(regions: list[dict], example: Example) -> str | None:
    """The prompt's regions must be the example's, in order, with boxes within a unit of the 0..1000 grid."""
    if len(regions) != len(example.labels):
        return f"the prompt lists {len(regions)} regions, the example has {len(example.labels)}"
    for k, r in enumerate(regions):
        if r["id"] != k + 1 or r["label"] != example.labels[k]:
            return (
                f"region {k}: got id {r['id']} label {r['label']!r}, expected {k + 1} {example.labels[k]!r}"
            )
        if np.max(np.abs(np.asarray(r["bbox_2d"]) - example.boxes[k] * 1000)) > 1.0:
            return f"region {k}: bbox_2d {r['bbox_2d']} is not the example's box {example.boxes[k] * 1000}"
    return None


def _apply_fault(scores: dict[str, Any], fault: Fault | None) -> dict[str, Any]:
    scores = dict(scores)
    if fault is not None and fault.kind == "out_of_range":
        if "success" in scores and scores["success"]:
            scores["success"] = [scores["success"][0] + 40.0, *scores["success"][1:]]
        scores["naturalness"] = scores["naturalness"] + 40.0
    return scores


class FakeVLM(FakeChatServer):
    """The fake judge's server on 127.0.0.1 (port 0: ephemeral), run in a thread by the context manager."""

    log = _log

    def __init__(
        self,
        oracle: ShapesOracle,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        model: str = MODEL,
        reasoning: bool = False,
    ):
        super().__init__(_Handler, host=host, port=port, model=model)
        self.oracle = oracle
        self.reasoning = reasoning  # answers start with a <think> block holding a wrong draft
        self.served = 0
        self.counts = {"semantic": 0, "quality": 0}
        self.authorization: str | None = None  # the last request's Authorization header

    def fault(
        self, kind: str, times: int | None = None, *, only: str | None = None, delay_s: float = 1.0
    ) -> None:
        """Scripts a fault for the next ``times`` matching requests (None: all of them until cleared).

        slow: answer after ``delay_s``; malformed: broken JSON; missing_region / extra_region: one region too
        few / many; out_of_range: a score 40 above its true value; http_500: a server error; die: drop the
        connection and stop listening (every later request is refused).
        """
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {FAULTS}")
        with self._lock:
            self._faults.append(Fault(kind, times, only, delay_s))  # only: 'semantic', 'quality' or None

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            self.served += 1


# ---------------------------------------------------------------------------------------------- grounding

GROUNDING_FAULTS = (
    "malformed",
    "prose",
    "no_region",
    "box_outside",
    "too_many",
    "unlabelled",
    "think_unclosed",
    "http_400",
    "http_500",
    "slow",
    "die",
)


def grounding_boxes(example: Example) -> list[list[int]]:
    """The example's region boxes on the 0..1000 grid, rounded outwards so that they cover the shapes."""
    boxes = np.asarray(example.boxes, np.float64) * 1000
    lo, hi = np.floor(boxes[:, :2] + 1e-6), np.ceil(boxes[:, 2:] - 1e-6)
    return np.concatenate([lo, hi], axis=1).astype(int).tolist()


def grounding_answer(example: Example, style: int, fault: str | None = None) -> str:
    """A grounding VLM's answer naming the example's regions, in one of three styles: 0 Qwen-VL's own list
    in a json fence; 1 a <think> block (braces, a wrong draft) then {"regions": ...} with string numbers;
    2 a bare {"edit_region": ...} with ids. ``fault`` breaks it in one of the ``GROUNDING_FAULTS`` ways."""
    if fault == "prose":
        return "I could not find anything in this image that the instruction refers to."
    if fault == "think_unclosed":
        return '<think>\nThe instruction names {the shapes}. Their boxes are [{"bbox_2d": [12, 40'
    boxes, labels = grounding_boxes(example), list(example.labels)
    confidence = [round(0.9 - 0.1 * k, 2) for k in range(len(boxes))]
    if fault == "too_many":
        boxes, labels, confidence = boxes * 12, labels * 12, confidence * 12
    if fault == "box_outside":
        boxes = [[*boxes[0][:2], 1200, boxes[0][3]], *boxes[1:]]
    if fault == "no_region":
        boxes, labels, confidence = [], [], []
    entries: list[dict[str, Any]] = []
    for k, (box, label, c) in enumerate(zip(boxes, labels, confidence, strict=True)):
        if style == 0:
            entries.append({"bbox_2d": box, "label": label})
        elif style == 1:
            entries.append({"label": label, "bbox_2d": [str(v) for v in box], "confidence": str(c)})
        else:
            entries.append({"id": k + 1, "label": label, "bbox_2d": box, "confidence": c})
    if fault == "unlabelled" and entries:
        del entries[0]["label"]
    payload = json.dumps(
        [entries, {"regions": entries}, {"edit_region": entries}][style], indent=style or None
    )
    if fault == "malformed":
        payload = payload.replace("}", "", 1)
    if style == 0:
        return f"Here are the regions to edit.\n```json\n{payload}\n```"
    if style == 1:
        draft = json.dumps([{"bbox_2d": [0, 0, 10, 10], "label": "draft"}])
        return (
            f"<think>\nThe instruction names {{the shapes}}. A first draft: {draft}\nNo, the boxes are "
            f"elsewhere.\n</think>\n\n{payload}"
        )
    return payload


class _GroundingHandler(_Handler):
    server: FakeGroundingVLM

    def _chat(self, body: bytes) -> None:
        try:
            content = json.loads(body)["messages"][-1]["content"]
            grounding = sum(p.get("type") == "image_url" for p in content) == 1
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            grounding = False
        if not grounding:  # the judge's requests
            super()._chat(body)
            return
        self.server.count_grounding()
        self.server.authorization = self.headers.get("Authorization")
        fault = self.server.take_fault("grounding")
        if self._play_fault(fault):
            return
        if fault is not None and fault.kind in ("http_400", "http_500"):
            status = int(fault.kind[-3:])
            self._send(status, {"error": {"message": f"scripted {status}"}})
            return
        try:
            images, texts = [], []
            for part in content:
                if part["type"] == "image_url":
                    data = part["image_url"]["url"].partition(",")[2]
                    with PIL.Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as pil:
                        images.append(np.asarray(pil.convert("RGB"), np.uint8))
                elif part["type"] == "text":
                    texts.append(part["text"])
            example = self.server.oracle.examples[pixel_key(images[0])]
        except (KeyError, ValueError, OSError) as e:
            self._send(400, {"error": {"message": f"bad grounding request or unknown image: {e!r}"}})
            return
        if example.instruction not in "\n".join(texts):
            problem = f"the prompt lacks the instruction {example.instruction!r}"
            self._send(400, {"error": {"message": problem}})
            return
        kind = None if fault is None else fault.kind
        answer = grounding_answer(example, self.server.next_style(), kind)
        self._send_answer(answer, "chatcmpl-ground")


class FakeGroundingVLM(FakeVLM):
    """The fake judge that also grounds: a request with one image (a source) is answered with the boxes and
    labels of that shapes example's edit regions (``grounding_answer``); two-image requests are judged as
    by ``FakeVLM``. ``grounding_requests`` counts the grounding requests received."""

    def __init__(self, oracle: ShapesOracle, **kwargs: Any) -> None:
        super().__init__(oracle, **kwargs)
        self.RequestHandlerClass = _GroundingHandler
        self.grounding_requests = 0

    def count_grounding(self) -> None:
        with self._lock:
            self.grounding_requests += 1

    def ground_fault(self, kind: str, times: int | None = None, *, delay_s: float = 1.0) -> None:
        """Scripts a grounding fault (``GROUNDING_FAULTS``) for the next ``times`` grounding requests (None:
        all until cleared): a broken answer of that kind, an HTTP 400/500, a slow answer or a dead server."""
        if kind not in GROUNDING_FAULTS:
            raise ValueError(f"unknown grounding fault {kind!r}; known: {GROUNDING_FAULTS}")
        with self._lock:
            self._faults.append(Fault(kind, times, "grounding", delay_s))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible VLM judge of the shapes task.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--resolution", type=int, default=64, help="config.data.resolution")
    parser.add_argument(
        "--pool", type=int, default=0, help="judge against PixelAutoencoder(pool)'s round trip"
    )
    parser.add_argument("--seed", "--split-seed", dest="seed", type=int, default=0, help="config.seed")
    parser.add_argument("--train", type=int, default=4096, help="config.data.shapes_train")
    parser.add_argument("--eval", type=int, default=32, help="config.data.shapes_eval")
    parser.add_argument("--max-edits", type=int, default=3, help="min(3, config.data.r_max)")
    parser.add_argument("--scale", type=float, default=SCORE_SCALE)
    for key in SHAPES_OPTIONS:
        parser.add_argument(
            "--" + key.replace("_", "-"), default=SHAPES_DEFAULTS[key], help=f"config.reward.{key}"
        )
    parser.add_argument("--model", default=MODEL)
    parser.add_argument(
        "--reasoning", action="store_true", help="answer after a <think> block, as reasoning-mode VLMs do"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    config = ShapesConfig(image_size=args.resolution, max_edits=args.max_edits)
    records = [
        *ShapesSource(args.train, split="train", seed=args.seed, config=config),
        *ShapesSource(args.eval, split="test", seed=args.seed, config=config),
    ]
    try:
        tolerances = shapes_reward_options({k: getattr(args, k) for k in SHAPES_OPTIONS}, where="--")
    except ValueError as e:
        message = str(e)
        for key in SHAPES_OPTIONS:
            message = message.replace("--" + key, "--" + key.replace("_", "-"))
        parser.error(message)
    oracle = ShapesOracle.from_records(
        records, args.resolution, pool=args.pool, scale=args.scale, tolerances=dict(tolerances)
    )
    server = FakeVLM(oracle, port=args.port, host=args.host, model=args.model, reasoning=args.reasoning)
    _log.info("fake VLM judge %r of %d shapes examples at %s", args.model, len(oracle.examples), server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
