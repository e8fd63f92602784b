"""Reading a judge's answer: the JSON of SPEC section 5, found in free text and checked field by field.

A VLM answers in prose: the JSON may sit inside a ```json fence or between sentences, after a reasoning
block (``<think> ... </think>``, which may hold braces and draft objects), and scores may be integers,
floats or numeric strings. The answer is the last object carrying the schema's top-level fields. What is
read must be complete and in range; anything else raises ``JudgementError`` with the failure reason
(``sfgrpo.rewards.base.FAILURE_REASONS``) so the image is marked invalid and counted, never given a
default score.

Semantic answer (one per edited image), on 0..C:
  {"edit_region": [{"id", "label", "bbox_2d", "score": [success, preserve], "reasoning"}, ...],
   "background": {"score", "reasoning"}, "overall_score": [success, preserve]}
Quality answer: {"score": [naturalness, artifacts]}.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
# The top-level fields of each answer: they pick the answer among the objects of the text.
SEMANTIC_FIELDS = ("edit_region", "background", "overall_score")
QUALITY_FIELDS = ("score",)


class JudgementError(ValueError):
    """An answer that gives no usable scores. ``reason``: 'unparsable', 'missing_region' or 'out_of_range'."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class SemanticScores(NamedTuple):
    """One image's semantic judgement; success/preserve are (K,) in the order of the requested ids."""

    success: tuple[float, ...]
    preserve: tuple[float, ...]
    background: float
    overall_success: float
    overall_preserve: float


def extract_json(text: str, fields: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON object of the answer in ``text``: the last one carrying all of ``fields``.

    A reasoning block (``<think> ... </think>``, or only its closing tag when the chat template opened it)
    comes before the answer and may hold braces or draft objects, so only the text after the last
    ``</think>`` is read; an unclosed ``<think>`` leaves no answer. Objects in code fences come first (a
    fence is the model's formal answer), then any object in the text; nested objects are not candidates.
    With no object carrying every field, the one carrying most of them is returned, so the caller's check
    names the missing field; with none carrying any, ``JudgementError('unparsable')``.
    """
    if not isinstance(text, str):
        raise JudgementError("unparsable", f"expected the answer as text, got {type(text).__name__}")
    answer = _after_reasoning(text)
    fenced = [o for m in _FENCE.finditer(answer) for o in _objects(m.group(1))]
    anywhere = _objects(answer)
    for objects in (fenced, anywhere):
        complete = [o for o in objects if all(f in o for f in fields)]
        if complete:
            return complete[-1]
    partial = [o for o in anywhere if any(f in o for f in fields)]
    if partial:
        return max(reversed(partial), key=lambda o: sum(f in o for f in fields))
    what = f"with the fields {list(fields)} " if fields and anywhere else ""
    raise JudgementError("unparsable", f"no JSON object {what}in the answer {_preview(answer)}")


def _after_reasoning(text: str) -> str:
    """The text after the last ``</think>``; ``JudgementError`` if a ``<think>`` is left open or nothing
    follows the reasoning."""
    closes = list(_THINK_CLOSE.finditer(text))
    answer = text[closes[-1].end() :] if closes else text
    if _THINK_OPEN.search(answer):
        raise JudgementError(
            "unparsable",
            f"the reasoning block '<think>' is never closed, so there is no answer after it "
            f"(cut off by the token limit?): ...{text[-200:]!r}",
        )
    if closes and not answer.strip():
        raise JudgementError(
            "unparsable", f"nothing after the reasoning block '</think>': ...{text[-200:]!r}"
        )
    return answer


def _objects(text: str) -> list[dict[str, Any]]:
    """The top-level JSON objects in ``text``, in order (an object's inner objects are not listed)."""
    decoder = json.JSONDecoder()
    out, pos = [], 0
    while (start := text.find("{", pos)) != -1:
        try:
            obj, pos = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        out.append(obj)
    return out


def _preview(text: str) -> str:
    return repr(text if len(text) <= 200 else text[:200] + "...")


def parse_semantic(answer: str | dict[str, Any], ids: Sequence[int], scale: float) -> SemanticScores:
    """Scores of the regions ``ids`` (in that order), the background and the overall pair.

    Entries are matched by their ``id``; entries without ids are taken in order when their number is
    right. A missing, extra or duplicated region raises 'missing_region'.
    """
    obj = extract_json(answer, SEMANTIC_FIELDS) if isinstance(answer, str) else answer
    regions = _field(obj, "edit_region")
    if not isinstance(regions, list) or not all(isinstance(e, dict) for e in regions):
        raise JudgementError("unparsable", f"'edit_region' must be a list of objects, got {regions!r:.200}")
    if len(regions) != len(ids):
        raise JudgementError(
            "missing_region", f"expected {len(ids)} regions (ids {list(ids)}), got {len(regions)}"
        )
    if all("id" in e for e in regions):
        by_id: dict[int, dict[str, Any]] = {}
        for e in regions:
            key = _as_int(e["id"])
            if key is None or key in by_id:
                raise JudgementError("missing_region", f"bad or repeated region id {e['id']!r}")
            by_id[key] = e
        if set(by_id) != set(ids):
            raise JudgementError("missing_region", f"expected region ids {sorted(ids)}, got {sorted(by_id)}")
        ordered = [by_id[i] for i in ids]
    else:
        ordered = regions
    pairs = [_pair(_field(e, "score"), f"edit_region[{i}].score", scale) for i, e in enumerate(ordered)]
    background = _field(obj, "background")
    bg = _field(background, "score") if isinstance(background, dict) else background
    if isinstance(bg, list) and len(bg) == 1:
        bg = bg[0]
    overall = _pair(_field(obj, "overall_score"), "overall_score", scale)
    return SemanticScores(
        success=tuple(p[0] for p in pairs),
        preserve=tuple(p[1] for p in pairs),
        background=_score(bg, "background.score", scale),
        overall_success=overall[0],
        overall_preserve=overall[1],
    )


def parse_quality(answer: str | dict[str, Any], scale: float) -> tuple[float, float]:
    """(naturalness, artifacts) from a quality answer."""
    obj = extract_json(answer, QUALITY_FIELDS) if isinstance(answer, str) else answer
    return _pair(_field(obj, "score"), "score", scale)


def _field(obj: Any, key: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise JudgementError("unparsable", f"the answer has no {key!r} field")
    return obj[key]


def _as_int(value: Any) -> int | None:
    """An integer id from an int, an integral float or a numeric string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        return int(value) if re.fullmatch(r"[+-]?\d+", value) else None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _score(value: Any, where: str, scale: float) -> float:
    """A score in [0, scale] from an int, a float or a numeric string."""
    if isinstance(value, bool):
        raise JudgementError("unparsable", f"{where}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise JudgementError("unparsable", f"{where}: expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise JudgementError("unparsable", f"{where}: expected a number, got {value!r:.100}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= scale:
        raise JudgementError("out_of_range", f"{where}: {value} is outside 0..{scale:g}")
    return value


def _pair(value: Any, where: str, scale: float) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise JudgementError("unparsable", f"{where}: expected two numbers, got {value!r:.100}")
    return _score(value[0], f"{where}[0]", scale), _score(value[1], f"{where}[1]", scale)
