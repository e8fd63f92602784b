"""A VLM judge behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, or any such server).

Serve SFReward, SpatialReward or another Qwen3-VL-class judge, e.g. ``vllm serve <model> --port 8000``,
then set ``reward.kind='vlm'``, ``reward.url='http://127.0.0.1:8000/v1'``, ``reward.model=<served name>``
and, if the endpoint wants a key, ``reward.api_key_env=<variable holding it>``.

Per edited image the judge gets two requests (images as base64 PNG data URLs):
  semantic: the source image, the edited image, the instruction and the edit regions as labelled boxes on
            a 0..1000 grid; the answer is SPEC section 5's JSON (per-region [success, preserve], the
            background score, the overall pair);
  quality:  the source (as reference) and the edited image; the answer is {"score": [naturalness, artifacts]}.
Answers are read by ``sfgrpo.rewards.judgement``; an image whose answer is unparsable, names the wrong
regions or holds a score outside 0..C is invalid (scores 0) and counted, never given a default.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from sfgrpo.rewards.base import HostScores, RewardError, ScoreRequest, no_failures
from sfgrpo.rewards.judgement import JudgementError, parse_quality, parse_semantic
from sfgrpo.rewards.remote import Transport, TransportError, lost_batch, parallel_map, served_models
from sfgrpo.rewards.reward_config import ON_FAILURE, judge_options
from sfgrpo.rewards.wire import png_b64

_log = logging.getLogger(__name__)

SEMANTIC_PROMPT = """\
You are a strict judge of image edits. The first image is the SOURCE, the second the EDITED result of
applying this instruction to the source:

Instruction: {instruction}

The edit regions are given as boxes [x1, y1, x2, y2] on a 0-1000 grid over the image (x to the right, y
downwards), one JSON object per region:
Regions (JSON): {regions}

Score every region on a scale from 0 to {scale:g}:
- success: did the instructed change happen inside this region? 0 = not at all, {scale:g} = perfectly.
- preserve: was everything in the box that the instruction does not touch kept as it was?
  0 = destroyed, {scale:g} = perfectly kept.
Then score the background (everything outside all boxes) for preservation, 0 to {scale:g}, and give an
overall [success, preserve] pair for the whole image.

Answer with exactly this JSON and nothing else, one edit_region entry per region above with the same id,
label and bbox_2d, and numeric scores:
{template}"""

QUALITY_PROMPT = """\
You judge the perceptual quality of an edited image. The first image is the unedited source, for
reference only; judge the second image, the edit result.

Score on a scale from 0 to {scale:g}:
- naturalness: does it look natural and coherent? 0 = not at all, {scale:g} = fully natural.
- artifacts: is it free of artifacts (blur, noise, distortions, seams)? 0 = severe artifacts,
  {scale:g} = none.

Answer with exactly this JSON and nothing else:
{{"score": [naturalness, artifacts]}}"""


def region_entries(request: ScoreRequest, i: int) -> list[dict[str, Any]]:
    """Image ``i``'s real regions as the judge sees them: ids 1..K, labels and 0..1000 integer boxes."""
    entries = []
    for k in np.flatnonzero(request.region_valid[i]):
        box = np.clip(np.rint(np.asarray(request.boxes[i, k], np.float64) * 1000), 0, 1000).astype(int)
        entries.append(
            {"id": len(entries) + 1, "label": str(request.region_labels[i, k]), "bbox_2d": box.tolist()}
        )
    return entries


def semantic_prompt(instruction: str, regions: Sequence[dict[str, Any]], scale: float) -> str:
    template = {
        "edit_region": [
            {**r, "score": ["success", "preserve"], "reasoning": "one sentence"} for r in regions
        ],
        "background": {"score": "preserve", "reasoning": "one sentence"},
        "overall_score": ["success", "preserve"],
    }
    return SEMANTIC_PROMPT.format(
        instruction=instruction,
        regions=json.dumps(list(regions)),
        scale=scale,
        template=json.dumps(template, indent=1),
    )


def chat_body(
    model: str, prompt: str, images_png: Sequence[str], max_tokens: int, temperature: float
) -> dict:
    """A chat-completions request with the images (base64 PNG) before the text."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}} for png in images_png
    ]
    content.append({"type": "text", "text": prompt})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": int(max_tokens),
        "temperature": float(temperature),
    }


def answer_text(response: Any) -> str:
    """The assistant's text in a chat-completions response; ``JudgementError`` if there is none."""
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgementError(
            "unparsable", f"not a chat-completions response: {str(response)[:200]!r}"
        ) from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise JudgementError("unparsable", f"the message content is {type(content).__name__}, not text")
    return content


class VLMJudge:
    """A ``HostReward`` asking an OpenAI-compatible VLM endpoint for SPEC section 5 scores.

    Args:
      url: the API base, e.g. ``http://127.0.0.1:8000/v1`` (requests go to ``{url}/chat/completions``).
      model: the served model name.  api_key: sent as a Bearer token when given.
      max_concurrency: requests in flight at once, over every batch this judge scores concurrently.
      Other arguments as in ``config.reward`` (``sfgrpo.rewards.reward_config.reward_config_defaults``).
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        scale: float,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        on_failure: str,
        max_concurrency: int,
        api_key: str | None = None,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        max_request_mb: float = 64.0,
    ) -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        if not model:
            raise ValueError("model: the served model name is required")
        self.url, self.model, self.scale, self.on_failure = url.rstrip("/"), model, float(scale), on_failure
        self.max_concurrency, self.max_tokens, self.temperature = (
            int(max_concurrency),
            max_tokens,
            temperature,
        )
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.transport = Transport(
            self.url,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            headers=headers,
            max_request_mb=max_request_mb,
        )
        self._slots = threading.Semaphore(self.max_concurrency)

    @classmethod
    def from_config(cls, reward: ml_collections.ConfigDict) -> VLMJudge:
        env = reward.api_key_env
        if env and env not in os.environ:
            raise ValueError(f"config.reward.api_key_env: environment variable {env!r} is not set")
        return cls(
            reward.url,
            reward.model,
            api_key=os.environ[env] if env else None,
            max_tokens=reward.max_tokens,
            temperature=reward.temperature,
            **judge_options(reward),
        )

    def check(self) -> None:
        """GET {url}/models (with retries): ``RewardError`` if the endpoint is down or lacks the model.

        An endpoint without a /models route (404) passes: the first scoring request will tell."""
        try:
            served = served_models(self.transport)
        except TransportError as e:
            raise RewardError(f"VLM endpoint {self.url} is not answering: {e}") from e
        if served is None:
            _log.info("VLM endpoint %s has no /models route; not checking the model name", self.url)
        elif served and self.model not in served:
            raise RewardError(
                f"VLM endpoint {self.url} does not serve model {self.model!r}; it serves {served}"
            )
        else:
            _log.info("VLM endpoint %s serves %s", self.url, served or "(unlisted models)")

    def __call__(self, request: ScoreRequest) -> HostScores:
        b, r = request.batch_size, request.num_regions
        regions = [region_entries(request, i) for i in range(b)]
        jobs = []
        quality = QUALITY_PROMPT.format(scale=self.scale)
        for i in range(b):
            pngs = [png_b64(request.source[i]), png_b64(request.edited[i])]
            semantic = semantic_prompt(request.instructions[i], regions[i], self.scale)
            jobs.append(chat_body(self.model, semantic, pngs, self.max_tokens, self.temperature))
            jobs.append(chat_body(self.model, quality, pngs, self.max_tokens, self.temperature))
        stop = threading.Event()

        def ask(body: dict[str, Any]) -> Any:
            with self._slots:
                return self.transport.request("POST", "/chat/completions", body, stop)

        try:
            answers = parallel_map(ask, jobs, self.max_concurrency, stop)
        except TransportError as e:
            return lost_batch(request, e, self.on_failure, f"{self.url}/chat/completions")

        scores = HostScores.invalid(b, r)
        failures = no_failures()
        for i in range(b):
            ids = [e["id"] for e in regions[i]]
            try:
                sem = parse_semantic(answer_text(answers[2 * i]), ids, self.scale)
                nat, art = parse_quality(answer_text(answers[2 * i + 1]), self.scale)
            except JudgementError as e:
                failures[e.reason] += 1
                _log.warning("VLM judge, image %d of the batch: %s", i, e)
                continue
            slots = np.flatnonzero(request.region_valid[i])
            scores.success[i, slots] = sem.success
            scores.preserve[i, slots] = sem.preserve
            scores.background[i] = sem.background
            scores.overall_success[i] = sem.overall_success
            scores.overall_preserve[i] = sem.overall_preserve
            scores.naturalness[i], scores.artifacts[i] = nat, art
            scores.valid[i] = True
        return dataclasses.replace(scores, failures=failures)
