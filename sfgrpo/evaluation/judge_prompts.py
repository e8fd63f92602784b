"""The judges' prompts (``sfgrpo.evaluation.judges``): each protocol's default templates, the imgedit rubrics
by edit type (and their aliases), and the ``--prompts`` file that replaces some of them.

Prompts (``--prompts FILE``, ``load_prompts``): a JSON object by protocol, each giving any of its templates
(the others keep the defaults of ``default_prompts()``)::

  {"viescore": {"semantics": "...{instruction}...", "quality": "..."},
   "imgedit":  {"edit": "...{instruction}...{rubric}...", "rubrics": {"add": "...", "<new type>": "..."}},
   "regions":  {"semantics": "...{instruction}...{regions}...{template}...{scale}...",
                "quality": "...{scale}..."}}

Placeholders are ``{name}``, filled in one pass (a value is never scanned again); any other braces are left
as they are, so a template shows its JSON answer without escaping. Required and allowed placeholders per
template are in ``TEMPLATES``; a missing required or an unknown ``{name}`` is an error naming the file and
the template. Rubric keys are edit types; a file's new keys extend the known types.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sfgrpo.rewards.vlm import QUALITY_PROMPT, SEMANTIC_PROMPT

__all__ = [
    "EDIT_TYPE_ALIASES",
    "IMGEDIT_RUBRICS",
    "PROTOCOLS",
    "TEMPLATES",
    "default_prompts",
    "fill",
    "load_prompts",
    "prompts_sha256",
    "validate_prompts",
]

PROTOCOLS = ("viescore", "imgedit", "regions")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

# protocol -> template -> (required placeholders, other allowed placeholders)
TEMPLATES: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "viescore": {"semantics": (("instruction",), ()), "quality": ((), ("instruction",))},
    "imgedit": {"edit": (("instruction", "rubric"), ("edit_type",))},
    "regions": {
        "semantics": (("instruction", "regions", "template", "scale"), ()),
        "quality": (("scale",), ("instruction",)),
    },
}
RUBRIC_PLACEHOLDERS = ("instruction",)  # allowed in an imgedit rubric
EDIT_TYPE_ALIASES = {"alter": "adjust", "hybrid": "compose"}

# ---------------------------------------------------------------------------------------------- prompts

VIESCORE_SEMANTICS = """\
You are grading an image edit. The first image is the ORIGINAL; the second is the EDITED image, made from the
original by following this instruction:

Instruction: {instruction}

Give two scores, each a whole number from 0 to 10:
1. instruction_success: how fully and correctly does the edited image carry out the instruction?
   0 = not carried out at all, 10 = carried out completely and exactly.
2. over_editing: did everything the instruction does not ask to change stay as it was in the original?
   0 = the image was changed far beyond the instruction (or is a different picture), 10 = no over-editing:
   only the instructed change was made.
Do not grade image quality (blur, noise, distortions); it is graded separately.

Answer with exactly this JSON and nothing else:
{"score": [instruction_success, over_editing], "reasoning": "one or two sentences"}"""

VIESCORE_QUALITY = """\
You are grading the perceptual quality of one image, produced by an image editing model. Grade how it looks,
not what it shows or whether it matches any request.

Give two scores, each a whole number from 0 to 10:
1. naturalness: does the scene look natural and physically plausible (lighting, shadows, proportions,
   perspective, textures)? 0 = clearly unnatural, 10 = fully natural.
2. artifacts: is the image free of visible artifacts (blur, noise, seams, warped or malformed objects,
   hands or faces)? 0 = severe artifacts, 10 = no artifacts at all.

Answer with exactly this JSON and nothing else:
{"score": [naturalness, artifacts], "reasoning": "one or two sentences"}"""

IMGEDIT_EDIT = """\
You are grading an image edit of type "{edit_type}". The first image is the ORIGINAL; the second is the
EDITED image, made from the original by following this instruction:

Instruction: {instruction}

What to look for in this type of edit:
{rubric}

Give three scores, each a whole number from 1 (worst) to 5 (best):
1. compliance: is the instruction carried out, fully and exactly?
2. edit_quality: does the edited part look seamless and natural, without artifacts?
3. preservation: is everything the instruction does not ask to change kept as it was?

Answer with exactly this JSON and nothing else:
{"score": [compliance, edit_quality, preservation], "reasoning": "one or two sentences"}"""

IMGEDIT_RUBRICS = {
    "add": (
        "The instruction ADDS something. Compliance: the requested object is present with the requested "
        "kind, number, attributes and position. Edit quality: it fits the scene in scale, perspective, "
        "lighting, shadows and occlusion, with no seams. Preservation: everything that was there before, "
        "including the objects around the new one, is unchanged."
    ),
    "remove": (
        "The instruction REMOVES something. Compliance: the named object is gone completely, with no "
        "leftover parts, shadows or reflections. Edit quality: the area it covered is filled with a "
        "plausible continuation of its surroundings, not a blur or smear. Preservation: every other "
        "object, including similar ones the instruction does not name, is still there and unchanged."
    ),
    "replace": (
        "The instruction REPLACES one object with another. Compliance: the original object is gone and the "
        "requested one stands in its place. Edit quality: the new object has a plausible size, pose and "
        "lighting for that place. Preservation: the rest of the scene and its layout are unchanged."
    ),
    "adjust": (
        "The instruction CHANGES AN ATTRIBUTE of an object (colour, material, texture, shape, size, "
        "expression). Compliance: the named attribute of the named object changed as asked. Edit quality: "
        "the new attribute looks real (a material shows its texture and sheen, a colour follows the "
        "shading). Preservation: the object keeps its identity and its other attributes, and the rest of "
        "the image is unchanged."
    ),
    "background": (
        "The instruction CHANGES THE BACKGROUND. Compliance: the background is the requested one. Edit "
        "quality: the subjects blend into it, with consistent lighting and perspective and clean edges "
        "without halos. Preservation: the foreground subjects keep their identity, pose and details."
    ),
    "style": (
        "The instruction RESTYLES the image. Compliance: the requested style (medium, artist, era, look) is "
        "clearly applied to the whole image. Edit quality: the style is rendered consistently, without "
        "artifacts. Preservation: the content and composition (objects, layout, poses) are recognisably "
        "the same."
    ),
    "extract": (
        "The instruction EXTRACTS an object (shows it alone, e.g. on a plain background). Compliance: the "
        "named object, and only it, is shown, whole. Edit quality: clean edges, no remnants of the old "
        "background. Preservation: the object's shape, colours and details are those of the original."
    ),
    "compose": (
        "The instruction asks for SEVERAL EDITS at once. Compliance: every requested edit is carried out "
        "(lower the score for each one missing or wrong). Edit quality: each edit looks natural and they "
        "fit together. Preservation: nothing beyond the requested edits changed."
    ),
    "action": (
        "The instruction CHANGES WHAT A SUBJECT IS DOING (pose, gesture, motion, expression). Compliance: "
        "the subject performs the requested action. Edit quality: plausible anatomy and pose, no distorted "
        "limbs. Preservation: the subject's identity and clothing and the rest of the scene are unchanged."
    ),
}


def _from_format(template: str) -> str:
    """A ``str.format`` template of ``sfgrpo.rewards.vlm`` as a ``{name}`` template of this module."""
    return template.replace("{scale:g}", "{scale}").replace("{{", "{").replace("}}", "}")


def default_prompts() -> dict[str, dict[str, Any]]:
    """Every protocol's built-in templates, in the schema of a prompts file (a starting point for one)."""
    return {
        "viescore": {"semantics": VIESCORE_SEMANTICS, "quality": VIESCORE_QUALITY},
        "imgedit": {"edit": IMGEDIT_EDIT, "rubrics": dict(IMGEDIT_RUBRICS)},
        "regions": {"semantics": _from_format(SEMANTIC_PROMPT), "quality": _from_format(QUALITY_PROMPT)},
    }


def _check_template(text: Any, where: str, required: Sequence[str], allowed: Sequence[str]) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: expected a non-empty template string, got {text!r:.80}")
    found = set(_PLACEHOLDER.findall(text))
    missing = [p for p in required if p not in found]
    if missing:
        raise ValueError(
            f"{where}: the template has no {', '.join('{' + p + '}' for p in missing)} placeholder "
            f"(it needs {', '.join('{' + p + '}' for p in required)})"
        )
    unknown = sorted(found - set(required) - set(allowed))
    if unknown:
        known = [*required, *allowed]
        raise ValueError(
            f"{where}: unknown placeholder(s) {', '.join('{' + p + '}' for p in unknown)}; this template "
            f"takes {', '.join('{' + p + '}' for p in known) or 'none'}"
        )


def validate_prompts(prompts: Any, where: str = "prompts") -> dict[str, dict[str, Any]]:
    """``prompts`` (the schema of the module docstring) checked: known protocols and templates, each template
    with its required placeholders and no unknown ones; ``ValueError`` naming ``where`` and the template."""
    if not isinstance(prompts, Mapping):
        raise ValueError(
            f"{where}: expected a JSON object by protocol {PROTOCOLS}, got {type(prompts).__name__}"
        )
    out: dict[str, dict[str, Any]] = {}
    for protocol, section in prompts.items():
        if protocol not in TEMPLATES:
            raise ValueError(f"{where}: unknown protocol {protocol!r}; known: {list(PROTOCOLS)}")
        if not isinstance(section, Mapping):
            raise ValueError(f"{where}: {protocol}: expected an object of templates, got {section!r:.80}")
        names = [*TEMPLATES[protocol], *(["rubrics"] if protocol == "imgedit" else [])]
        checked: dict[str, Any] = {}
        for name, text in section.items():
            if name not in names:
                raise ValueError(f"{where}: {protocol}: unknown template {name!r}; known: {names}")
            if name == "rubrics":
                checked[name] = _validate_rubrics(text, f"{where}: {protocol}.rubrics")
                continue
            required, allowed = TEMPLATES[protocol][name]
            _check_template(text, f"{where}: {protocol}.{name}", required, allowed)
            checked[name] = text
        out[protocol] = checked
    return out


def _validate_rubrics(rubrics: Any, where: str) -> dict[str, str]:
    if not isinstance(rubrics, Mapping):
        raise ValueError(f"{where}: expected an object of rubrics by edit type, got {rubrics!r:.80}")
    out = {}
    for edit_type, text in rubrics.items():
        name = str(edit_type).strip().lower()
        if not name:
            raise ValueError(f"{where}: an empty edit type name")
        _check_template(text, f"{where}.{edit_type}", (), RUBRIC_PLACEHOLDERS)
        out[name] = text
    return out


def load_prompts(path: str | Path) -> dict[str, dict[str, Any]]:
    """The prompts file at ``path`` (JSON, the schema of the module docstring), validated;
    ``ValueError`` naming the file (and the template) when it is unreadable or wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = json.load(f)
    except OSError as e:
        raise ValueError(f"--prompts {path}: cannot read it: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts {path}: not JSON: {e}") from None
    return validate_prompts(prompts, f"--prompts {path}")


def prompts_sha256(prompts: Mapping[str, Any]) -> str:
    """sha256 of the prompts' canonical JSON (sorted keys): it names the prompts an evaluation used."""
    text = json.dumps(prompts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def fill(template: str, values: Mapping[str, str]) -> str:
    """``template`` with its ``{name}`` placeholders replaced in one pass (inserted text is not rescanned)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)
