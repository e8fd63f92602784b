"""VLM judges of editing benchmarks over an OpenAI-compatible chat-completions endpoint.

Three protocols, each a fixed set of judge calls per edited image and a scoring rule:

  'viescore'  GEdit-Bench style, 0..10. The edited image is first resized to the source's size (PIL,
              Lanczos), as GEdit does. Semantic consistency: [source, edited] and the instruction ->
              [instruction success, over-editing (10 = none)], SC = the min of the pair; perceptual quality:
              [edited] alone -> [naturalness, artifacts (10 = none)], PQ = the min of the pair;
              overall = sqrt(SC * PQ). Scores: semantics (SC), quality (PQ), success, overediting,
              naturalness, artifacts.
  'imgedit'   ImgEdit-Bench style, 1..5. One call with [source, edited], the instruction and a rubric for
              the item's edit type (``task_type``: add, remove, replace, adjust (alias alter), background,
              style, extract, compose (alias hybrid), action; a prompts file may add more) -> [compliance,
              edit_quality, preservation]; overall = their mean. Images are sent at their own sizes.
  'regions'   SPEC section 5 (the SFReward schema the training judge reads), 0..C with C = SCORE_SCALE: the
              training judge's two calls, semantic ([source, edited], instruction, regions as 0..1000 boxes)
              and quality ([source, edited]), with the edited image resized to the source's size (the
              training judge always sees the two at one size). Scores: region_success_rate (share of regions
              with success >= SUCCESS_SHARE * C), multi_region_success (1.0 when every region succeeds),
              background_preservation (background / C), region_reward (mean over the regions of Eq. 3's
              R_r); overall = the global reward R^g. An item without regions is an error.

Answers are JSON ``{"score": [...], "reasoning": "..."}`` (SPEC section 5's for 'regions'), found in free
text by ``sfgrpo.rewards.judgement.extract_json``. An answer that is unparsable, out of range or names the
wrong regions fails its item with that reason; so does a request that failed after its retries ('timeout',
'http_error') or that the endpoint refused ('request_rejected': HTTP 400/413/422, or a body over
``max_request_mb``). A failed item gets no scores and ``overall`` None, never a default.

Every answer text is cached (``AnswerCache``: ``cache_dir/answers.jsonl``) under a key of the exact images
sent, the filled prompt, the model, the temperature and max_tokens, so an interrupted evaluation resumes and a
rerun sends nothing. Unparsable answers are cached too (at temperature 0 the judge would say the same again);
transport failures are not. When ``max_consecutive_failures`` requests in a row fail after their retries
(refused, timed out, 5xx, 401/404: the endpoint is down or misconfigured, not one image's fault), ``score``
stops the other requests and raises ``EndpointDown``: the answers received stay cached for the rerun.

Prompts (the defaults and a ``--prompts`` file's schema): ``sfgrpo.evaluation.judge_prompts``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from sfgrpo.data.annotate_vlm import AnswerCache, EndpointDown
from sfgrpo.evaluation.judge_prompts import (
    EDIT_TYPE_ALIASES,
    IMGEDIT_RUBRICS,
    PROTOCOLS,
    default_prompts,
    fill,
    prompts_sha256,
    validate_prompts,
)
from sfgrpo.rewards.base import SCORE_SCALE, RewardError
from sfgrpo.rewards.judgement import JudgementError, extract_json, parse_quality, parse_semantic
from sfgrpo.rewards.remote import Transport, TransportError, served_models
from sfgrpo.rewards.vlm import answer_text, chat_body
from sfgrpo.rewards.wire import png_b64
from sfgrpo.rl.advantages import global_reward, region_rewards
from sfgrpo.rl.step import SUCCESS_SHARE

__all__ = [
    "FAILURE_REASONS",
    "BenchmarkJudge",
    "EndpointDown",
    "JudgeItem",
    "JudgeResult",
    "read_scores",
    "region_entries",
    "request_key",
    "resize_to",
    "to_row_fields",
]

_log = logging.getLogger(__name__)

FAILURE_REASONS = (
    "unparsable",
    "out_of_range",
    "missing_region",
    "timeout",
    "http_error",
    "request_rejected",
)
# Answers that reject this one request; any other transport failure after the retries counts towards
# ``max_consecutive_failures`` (the endpoint is down or its settings are wrong).
_REJECTED = (400, 413, 422)


# ---------------------------------------------------------------------------------------------- items


@dataclasses.dataclass(frozen=True, eq=False)
class JudgeItem:
    """One edited image to judge.

    source: (H, W, 3) uint8.  edited: (h, w, 3) uint8 (any size).  boxes: (K, 4) float (x1, y1, x2, y2) in
    [0, 1] of the image, and labels: K strings, the edit regions ('regions' protocol; empty otherwise).
    task_type: the benchmark's edit type ('imgedit' picks its rubric with it).
    """

    key: str
    instruction: str
    task_type: str
    source: np.ndarray
    edited: np.ndarray
    boxes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 4)))
    labels: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"JudgeItem: key must be a non-empty string, got {self.key!r}")
        where = f"JudgeItem {self.key!r}"
        for field in ("instruction", "task_type"):
            if not isinstance(getattr(self, field), str):
                raise ValueError(f"{where}: {field} must be a string, got {getattr(self, field)!r:.80}")
        for field in ("source", "edited"):
            image = getattr(self, field)
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
                raise ValueError(f"{where}: {field} must be an (H, W, 3) uint8 array, got {_describe(image)}")
            if image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
                raise ValueError(
                    f"{where}: {field} must be an (H, W, 3) uint8 array, got shape {image.shape}"
                )
        boxes = np.asarray(self.boxes, np.float64)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{where}: boxes must be (K, 4), got shape {boxes.shape}")
        if not np.all(np.isfinite(boxes)) or np.any(boxes < 0) or np.any(boxes > 1):
            raise ValueError(f"{where}: boxes must be (x1, y1, x2, y2) in [0, 1], got {boxes.tolist()}")
        if np.any(boxes[:, 0] >= boxes[:, 2]) or np.any(boxes[:, 1] >= boxes[:, 3]):
            raise ValueError(f"{where}: every box needs x1 < x2 and y1 < y2, got {boxes.tolist()}")
        labels = tuple(self.labels)
        if len(labels) != len(boxes) or not all(isinstance(s, str) for s in labels):
            raise ValueError(
                f"{where}: labels must be {len(boxes)} strings (one per box), got {labels!r:.200}"
            )
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", labels)


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__


@dataclasses.dataclass(frozen=True)
class JudgeResult:
    """One item's judgement. scores: the protocol's named scores (empty when failed); overall: the
    protocol's overall score, None exactly when failed; failure: None or (reason, message); answers: the
    judge's answer texts by call ('semantics', 'quality', 'edit'), those received even when failed."""

    scores: dict[str, float]
    overall: float | None
    failure: tuple[str, str] | None
    answers: dict[str, str]

    @property
    def ok(self) -> bool:
        return self.failure is None


def to_row_fields(result: JudgeResult) -> dict[str, Any]:
    """The "scores", "overall", "failure" and "judge" parts of a ``scores.jsonl`` row
    (``sfgrpo.evaluation``'s schema)."""
    failure = None if result.failure is None else {"reason": result.failure[0], "message": result.failure[1]}
    return {
        "scores": {} if failure else {k: float(v) for k, v in result.scores.items()},
        "overall": None if failure else float(result.overall),
        "failure": failure,
        "judge": {"answers": dict(result.answers)},
    }


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 -> (H, W, 3) uint8 with PIL's Lanczos filter; ``size`` = (H, W); as is when equal."""
    if image.shape[:2] == tuple(size):
        return image
    pil = PIL.Image.fromarray(image).resize((size[1], size[0]), PIL.Image.Resampling.LANCZOS)
    return np.asarray(pil, np.uint8)


# ---------------------------------------------------------------------------------------------- protocols


@dataclasses.dataclass(frozen=True)
class Call:
    """One judge request: ``name`` (its answer's key), the images sent in order, the filled prompt."""

    name: str
    images: tuple[np.ndarray, ...]
    prompt: str


def read_scores(answer: str, count: int, lo: float, hi: float, where: str) -> tuple[float, ...]:
    """The ``count`` numbers of the answer's ``"score"`` list, each in [lo, hi]; ``JudgementError``
    ('unparsable' or 'out_of_range') naming ``where`` otherwise."""
    obj = _named(where, lambda: extract_json(answer, ("score",)))
    value = obj.get("score")
    if not isinstance(value, list) or len(value) != count:
        raise JudgementError(
            "unparsable", f"{where}: 'score' must be a list of {count} numbers, got {value!r:.100}"
        )
    out = []
    for k, v in enumerate(value):
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise JudgementError(
                    "unparsable", f"{where}: score[{k}] is not a number: {v!r:.60}"
                ) from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise JudgementError("unparsable", f"{where}: score[{k}] is not a number: {v!r:.60}")
        if not math.isfinite(v) or not lo <= v <= hi:
            raise JudgementError("out_of_range", f"{where}: score[{k}] = {v} is outside {lo:g}..{hi:g}")
        out.append(float(v))
    return tuple(out)


class ViescoreProtocol:
    """GEdit-Bench's VIEScore: SC = min(success, over-editing), PQ = min(naturalness, artifacts), overall =
    sqrt(SC * PQ), all on 0..10."""

    name = "viescore"
    score_range = (0.0, 10.0)
    score_names = ("semantics", "quality", "success", "overediting", "naturalness", "artifacts")

    def check_example(self, key: str, task_type: str, num_regions: int, prompts: Mapping[str, Any]) -> None:
        """Every example can be judged."""

    def calls(self, item: JudgeItem, prompts: Mapping[str, Any]) -> list[Call]:
        edited = resize_to(item.edited, item.source.shape[:2])
        values = {"instruction": item.instruction}
        return [
            Call("semantics", (item.source, edited), fill(prompts["semantics"], values)),
            Call("quality", (edited,), fill(prompts["quality"], values)),
        ]

    def score(self, item: JudgeItem, answers: Mapping[str, str]) -> tuple[dict[str, float], float]:
        lo, hi = self.score_range
        success, overediting = read_scores(answers["semantics"], 2, lo, hi, "semantics")
        naturalness, artifacts = read_scores(answers["quality"], 2, lo, hi, "quality")
        sc, pq = min(success, overediting), min(naturalness, artifacts)
        scores = {
            "semantics": sc,
            "quality": pq,
            "success": success,
            "overediting": overediting,
            "naturalness": naturalness,
            "artifacts": artifacts,
        }
        return scores, math.sqrt(sc * pq)


class ImgEditProtocol:
    """ImgEdit-Bench: one call with the edit type's rubric; three 1..5 scores, overall = their mean."""

    name = "imgedit"
    score_range = (1.0, 5.0)
    score_names = ("compliance", "edit_quality", "preservation")

    @staticmethod
    def edit_types(prompts: Mapping[str, Any]) -> list[str]:
        """The edit types these prompts have a rubric for, aliases included."""
        rubrics = prompts["rubrics"]
        return sorted({*rubrics, *(a for a, t in EDIT_TYPE_ALIASES.items() if t in rubrics)})

    def rubric(self, key: str, task_type: str, prompts: Mapping[str, Any]) -> tuple[str, str]:
        """(the normalised edit type, its rubric); ``ValueError`` naming the item and the known types."""
        rubrics = prompts["rubrics"]
        name = task_type.strip().lower()
        found = name if name in rubrics else EDIT_TYPE_ALIASES.get(name)
        if found not in rubrics:
            raise ValueError(
                f"item {key!r}: the imgedit protocol has no rubric for edit type {task_type!r}; known types: "
                f"{self.edit_types(prompts)} (a --prompts file can add one under imgedit.rubrics)"
            )
        return name, rubrics[found]

    def check_example(self, key: str, task_type: str, num_regions: int, prompts: Mapping[str, Any]) -> None:
        self.rubric(key, task_type, prompts)

    def calls(self, item: JudgeItem, prompts: Mapping[str, Any]) -> list[Call]:
        edit_type, rubric = self.rubric(item.key, item.task_type, prompts)
        rubric = fill(rubric, {"instruction": item.instruction})
        values = {"instruction": item.instruction, "rubric": rubric, "edit_type": edit_type}
        return [Call("edit", (item.source, item.edited), fill(prompts["edit"], values))]

    def score(self, item: JudgeItem, answers: Mapping[str, str]) -> tuple[dict[str, float], float]:
        lo, hi = self.score_range
        values = read_scores(answers["edit"], 3, lo, hi, "edit")
        return dict(zip(self.score_names, values, strict=True)), sum(values) / 3.0


def region_entries(boxes: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    """The regions as the judge sees them (as ``sfgrpo.rewards.vlm.region_entries``): ids 1..K, labels and
    integer boxes on the 0..1000 grid."""
    grid = np.clip(np.rint(np.asarray(boxes, np.float64) * 1000), 0, 1000).astype(int)
    return [{"id": k + 1, "label": str(lab), "bbox_2d": grid[k].tolist()} for k, lab in enumerate(labels)]


def semantic_template(regions: Sequence[dict[str, Any]]) -> str:
    """The answer template of the semantic prompt (as ``sfgrpo.rewards.vlm.semantic_prompt`` writes it)."""
    template = {
        "edit_region": [
            {**r, "score": ["success", "preserve"], "reasoning": "one sentence"} for r in regions
        ],
        "background": {"score": "preserve", "reasoning": "one sentence"},
        "overall_score": ["success", "preserve"],
    }
    return json.dumps(template, indent=1)


class RegionsProtocol:
    """SPEC section 5: the training judge's semantic and quality calls, on 0..C; overall = R^g."""

    name = "regions"
    score_scale = SCORE_SCALE
    score_range = (0.0, SCORE_SCALE)
    score_names = ("region_success_rate", "multi_region_success", "background_preservation", "region_reward")

    def check_example(self, key: str, task_type: str, num_regions: int, prompts: Mapping[str, Any]) -> None:
        if num_regions < 1:
            raise ValueError(
                f"item {key!r} has no edit regions: the 'regions' protocol scores each region, so every "
                "example needs boxes and labels (annotate the benchmark, or use 'viescore' or 'imgedit')"
            )

    def calls(self, item: JudgeItem, prompts: Mapping[str, Any]) -> list[Call]:
        self.check_example(item.key, item.task_type, len(item.labels), prompts)
        edited = resize_to(item.edited, item.source.shape[:2])
        regions = region_entries(item.boxes, item.labels)
        scale = f"{self.score_scale:g}"
        semantic = {
            "instruction": item.instruction,
            "regions": json.dumps(regions),
            "template": semantic_template(regions),
            "scale": scale,
        }
        quality = {"instruction": item.instruction, "scale": scale}
        return [
            Call("semantics", (item.source, edited), fill(prompts["semantics"], semantic)),
            Call("quality", (item.source, edited), fill(prompts["quality"], quality)),
        ]

    def score(self, item: JudgeItem, answers: Mapping[str, str]) -> tuple[dict[str, float], float]:
        c = self.score_scale
        ids = list(range(1, len(item.labels) + 1))
        sem = _named("semantics", lambda: parse_semantic(answers["semantics"], ids, c))
        nat, art = _named("quality", lambda: parse_quality(answers["quality"], c))
        success = np.asarray(sem.success, np.float32)
        rewards = region_rewards(
            success[None],
            np.asarray(sem.preserve, np.float32)[None],
            np.float32([sem.background]),
            np.float32([nat]),
            np.float32([art]),
            scale=c,
        )
        overall = global_reward(
            np.float32([sem.overall_success]),
            np.float32([sem.overall_preserve]),
            np.float32([nat]),
            np.float32([art]),
            scale=c,
        )
        succeeded = success >= SUCCESS_SHARE * c
        scores = {
            "region_success_rate": float(succeeded.mean()),
            "multi_region_success": float(succeeded.all()),
            "background_preservation": float(sem.background) / c,
            "region_reward": float(np.asarray(rewards)[0, :-1].mean()),
        }
        return scores, float(np.asarray(overall)[0])


def _named(call: str, parse: Callable[[], Any]) -> Any:
    """``parse()``, its ``JudgementError`` message prefixed with the call's name."""
    try:
        return parse()
    except JudgementError as e:
        raise JudgementError(e.reason, f"{call}: {_message(e)}") from None


def _message(e: JudgementError) -> str:
    return str(e).removeprefix(f"{e.reason}: ")


_PROTOCOLS = {p.name: p for p in (ViescoreProtocol(), ImgEditProtocol(), RegionsProtocol())}


# ---------------------------------------------------------------------------------------------- the judge


def request_key(
    images: Sequence[np.ndarray], prompt: str, model: str, temperature: float, max_tokens: int
) -> str:
    """The cache key of one request: sha256 over the exact pixels sent (shape and bytes, in order), the
    filled prompt's sha256, the model, the temperature and max_tokens."""
    pixels = [
        hashlib.sha256(repr(im.shape).encode() + np.ascontiguousarray(im).tobytes()).hexdigest()
        for im in images
    ]
    fields = {
        "images_sha256": pixels,
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        "model": model,
        "temperature": float(temperature),
        "max_tokens": int(max_tokens),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class _CallFailed(Exception):
    """A request without an answer text: ``reason`` (FAILURE_REASONS); ``endpoint``: True when it counts
    towards ``max_consecutive_failures`` (the endpoint, not this request, is the likely cause)."""

    def __init__(self, reason: str, message: str, endpoint: bool) -> None:
        super().__init__(message)
        self.reason, self.endpoint = reason, endpoint


class BenchmarkJudge:
    """A benchmark protocol's judge behind an OpenAI-compatible endpoint, with the answer cache.

    Args:
      protocol: 'viescore', 'imgedit' or 'regions'.
      url: the API base, e.g. ``http://127.0.0.1:8000/v1``.  model: the served model name.
      temperature, max_tokens: sent with every request (and part of the cache key).
      timeout_s: seconds per attempt.  retries: retries per request (backoff ``backoff_s * 2**k`` s).
      max_concurrency: requests in flight at once.  api_key: sent as a Bearer token when given.
      prompts: prompts in the ``judge_prompts.load_prompts`` schema (all protocols or some); this
        protocol's section replaces the defaults template by template.
      cache_dir: the folder of ``answers.jsonl`` (created).
      max_consecutive_failures: requests failing in a row after their retries before ``EndpointDown``.
      max_request_mb: the largest request body sent.
    """

    def __init__(
        self,
        protocol: str,
        url: str,
        model: str,
        *,
        temperature: float = 0.0,
        max_tokens: int,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        max_concurrency: int,
        api_key: str | None = None,
        prompts: Mapping[str, Any] | None = None,
        cache_dir: str | Path,
        max_consecutive_failures: int = 3,
        max_request_mb: float = 64.0,
    ) -> None:
        if protocol not in _PROTOCOLS:
            raise ValueError(f"protocol: unknown {protocol!r}; known: {list(PROTOCOLS)}")
        if not model:
            raise ValueError("model: the served model name is required")
        for name, value, low in (
            ("max_tokens", max_tokens, 1),
            ("max_concurrency", max_concurrency, 1),
            ("retries", retries, 0),
            ("max_consecutive_failures", max_consecutive_failures, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        self.protocol = _PROTOCOLS[protocol]
        self.url, self.model = url.rstrip("/"), model
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.retries, self.max_concurrency = int(retries), int(max_concurrency)
        self.max_consecutive_failures = int(max_consecutive_failures)
        section = validate_prompts(prompts or {}).get(protocol, {})
        self.prompts = {**default_prompts()[protocol], **section}
        if "rubrics" in section:  # a file's rubrics add to the defaults, type by type
            self.prompts["rubrics"] = {**IMGEDIT_RUBRICS, **section["rubrics"]}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.transport = Transport(
            self.url,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            headers=headers,
            max_request_mb=max_request_mb,
        )
        self.cache = AnswerCache(str(cache_dir))

    # -- set-up

    def check(self) -> None:
        """GET {url}/models (with retries): ``EndpointDown`` if nothing answers, ``ValueError`` if the model
        is not served. An endpoint without a /models route (404) passes: the first request will tell."""
        try:
            served = served_models(self.transport)
        except TransportError as e:
            raise EndpointDown(f"the judge endpoint {self.url} is not answering: {e}") from None
        if served is None:
            _log.info("judge endpoint %s has no /models route; not checking the model name", self.url)
        elif served and self.model not in served:
            raise ValueError(f"--judge-model: {self.url} does not serve {self.model!r}; it serves {served}")

    def check_example(self, key: str, task_type: str, num_regions: int) -> None:
        """``ValueError`` naming ``key`` if this protocol cannot judge the example (an imgedit edit type
        without a rubric, a 'regions' example without regions): call it before making the edits."""
        self.protocol.check_example(key, task_type, num_regions, self.prompts)

    def describe(self) -> dict[str, Any]:
        """What ``summary.json`` records of the judge (no API key)."""
        return {
            "protocol": self.protocol.name,
            "url": self.url,
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "score_range": list(self.protocol.score_range),
            "prompts_sha256": prompts_sha256(self.prompts),
            "prompts": self.prompts,
        }

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> BenchmarkJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scoring

    def score(
        self, items: Sequence[JudgeItem], progress: Callable[[int, int], None] | None = None
    ) -> list[JudgeResult]:
        """One ``JudgeResult`` per item, in order. Every item is checked before any request; cached answers
        are not asked again; ``progress(done, total)`` is called as items complete (cached ones at once).
        ``EndpointDown`` after ``max_consecutive_failures`` failed requests in a row."""
        items = list(items)
        for item in items:
            if not isinstance(item, JudgeItem):
                raise TypeError(f"score: expected JudgeItems, got {type(item).__name__}")
            self.check_example(item.key, item.task_type, len(item.labels))
        plans = [self.protocol.calls(item, self.prompts) for item in items]
        answers: list[dict[str, str]] = [{} for _ in items]
        errors: list[dict[str, tuple[str, str]]] = [{} for _ in items]
        remaining = [0] * len(items)
        jobs = []
        for i, plan in enumerate(plans):
            for call in plan:
                key = request_key(call.images, call.prompt, self.model, self.temperature, self.max_tokens)
                cached = self.cache.get(key)
                if cached is None:
                    jobs.append((i, call, key))
                    remaining[i] += 1
                else:
                    answers[i][call.name] = cached
        done = sum(r == 0 for r in remaining)
        if progress is not None and done:
            progress(done, len(items))
        _log.info(
            "judging %d items (%s): %d requests, %d answers from the cache",
            len(items),
            self.protocol.name,
            len(jobs),
            sum(len(plan) for plan in plans) - len(jobs),
        )
        if jobs:
            self._ask_all(jobs, items, answers, errors, remaining, done, progress)
        results = [
            self._result(item, plan, a, e)
            for item, plan, a, e in zip(items, plans, answers, errors, strict=True)
        ]
        failed = [r.failure[0] for r in results if r.failure]
        if failed:
            _log.warning("%d of %d items failed: %s", len(failed), len(items), _counts(failed))
        return results

    def _ask_all(
        self,
        jobs: list[tuple[int, Call, str]],
        items: list[JudgeItem],
        answers: list[dict[str, str]],
        errors: list[dict[str, tuple[str, str]]],
        remaining: list[int],
        done: int,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        stop = threading.Event()
        consecutive = 0
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs)))
        try:
            futures = {
                pool.submit(self._ask, call, key, items[i].key, stop): (i, call.name) for i, call, key in jobs
            }
            for future in as_completed(futures):
                i, name = futures[future]
                try:
                    answers[i][name] = future.result()
                    consecutive = 0
                except _CallFailed as e:
                    errors[i][name] = (e.reason, str(e))
                    _log.warning("item %r, %s call: %s", items[i].key, name, e)
                    if e.endpoint:
                        consecutive += 1
                        if consecutive >= self.max_consecutive_failures:
                            raise EndpointDown(
                                f"the judge endpoint {self.url} failed {consecutive} requests in a row, "
                                f"each after {self.retries} retries (the last: {e}); the {len(self.cache)} "
                                f"answers received are cached in {self.cache.path}: rerun to resume"
                            ) from None
                remaining[i] -= 1
                if remaining[i] == 0:
                    done += 1
                    if progress is not None:
                        progress(done, len(items))
        finally:
            stop.set()  # requests still retrying give up at once
            pool.shutdown(wait=True, cancel_futures=True)

    def _ask(self, call: Call, key: str, item_key: str, stop: threading.Event) -> str:
        """The answer text of one request, cached; ``_CallFailed`` without one."""
        pngs = [png_b64(im) for im in call.images]
        body = chat_body(self.model, call.prompt, pngs, self.max_tokens, self.temperature)
        try:
            response = self.transport.request("POST", "/chat/completions", body, stop)
        except RewardError as e:  # the body is over max_request_mb
            raise _CallFailed("request_rejected", str(e), endpoint=False) from None
        except TransportError as e:
            if e.status in _REJECTED:
                raise _CallFailed("request_rejected", str(e), endpoint=False) from None
            raise _CallFailed(e.reason, str(e), endpoint=True) from None
        try:
            text = answer_text(response)
        except JudgementError as e:
            raise _CallFailed(e.reason, _message(e), endpoint=False) from None
        self.cache.put(
            key, text, item=item_key, call=call.name, protocol=self.protocol.name, model=self.model
        )
        return text

    def _result(
        self, item: JudgeItem, plan: list[Call], answers: dict[str, str], errors: dict[str, tuple[str, str]]
    ) -> JudgeResult:
        for call in plan:
            if call.name in errors:
                reason, message = errors[call.name]
                return JudgeResult({}, None, (reason, f"{call.name}: {message}"), answers)
        try:
            scores, overall = self.protocol.score(item, answers)
        except JudgementError as e:
            _log.warning("item %r: %s", item.key, e)
            return JudgeResult({}, None, (e.reason, _message(e)), answers)
        return JudgeResult({k: float(v) for k, v in scores.items()}, float(overall), None, answers)


def _counts(reasons: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        out[r] = out.get(r, 0) + 1
    return out
