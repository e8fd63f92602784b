"""Reading a judge's answer: the JSON of SPEC section 5, found in free text and checked field by field.

A VLM answers in prose: the JSON may sit inside a ```json fence or between sentences, and scores may be
integers, floats or numeric strings. What is read must be complete and in range; anything else raises
``JudgementError`` with the failure reason (``sfgrpo.rewards.base.FAILURE_REASONS``) so the image is marked
invalid and counted, never given a default score.

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


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in ``text``: inside a code fence if there is one, else anywhere in the text."""
    if not isinstance(text, str):
        raise JudgementError("unparsable", f"expected the answer as text, got {type(text).__name__}")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for chunk in candidates:
        for start in (m.start() for m in re.finditer(r"\{", chunk)):
            try:
                obj, _ = decoder.raw_decode(chunk, start)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    preview = text if len(text) <= 200 else text[:200] + "..."
    raise JudgementError("unparsable", f"no JSON object in the answer {preview!r}")


def parse_semantic(answer: str | dict[str, Any], ids: Sequence[int], scale: float) -> SemanticScores:
    """Scores of the regions ``ids`` (in that order), the background and the overall pair.

    Entries are matched by their ``id``; entries without ids are taken in order when their number is
    right. A missing, extra or duplicated region raises 'missing_region'.
    """
    obj = extract_json(answer) if isinstance(answer, str) else answer
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
    obj = extract_json(answer) if isinstance(answer, str) else answer
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
