"""Editing benchmarks as a list of examples, whatever format they come in.

Formats (``read_benchmark`` tells them apart by what the path holds):
  records   a folder with ``metadata.jsonl`` in the project's record format (``sfgrpo.data.records``);
            needs the box format of its boxes. Task type and language come from each record's ``meta``
            (``task_type``, ``language``); a record without them is of type 'untyped' and language 'und'
            (ISO 639: undetermined), and the summary says how many were.
  tfds      a dataset written by ``python -m sfgrpo.data.build`` (a folder holding ``sfgrpo_edit/``), one
            split (``PATH:split``, default 'test'); task type and language as for records.
  gedit     a GEdit-Bench-style folder: ``*.jsonl`` files whose lines hold ``key``, ``task_type``,
            ``instruction``, ``instruction_language`` and ``input_image`` (a path relative to the folder).
  imgedit   an ImgEdit-style ``basic_edit.json``: ``{key: {"id": image path, "prompt": ..., "edit_type":
            ...}}``, image paths relative to the file's folder (or ``images=``).
  shapes    ``shapes:test`` (or ``shapes:train``): the synthetic shapes split a training run used, built
            from its config; the examples carry their exact targets and region masks. ``shapes:test:N``
            takes N examples instead of the run's count: the run's own first, then new ones of the task.

Bad records raise ``records.RecordError`` naming the record and the field, as the data builder does.
Every benchmark has a ``sha256`` over its examples (keys, instructions, types, languages, source pixels),
which ``compare`` uses to refuse two evaluations of different benchmarks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from sfgrpo.data.records import RecordError, load_image_file, read_jsonl_folder

_log = logging.getLogger(__name__)

FORMATS = ("records", "tfds", "gedit", "imgedit", "shapes")
UNTYPED = "untyped"
UNDETERMINED_LANGUAGE = "und"


class BenchmarkError(ValueError):
    """A benchmark that cannot be read as given: the message names the path and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One benchmark example.

    source: (H, W, 3) uint8.  boxes: (K, 4) float32 (x1, y1, x2, y2) in [0, 1].  labels: K strings.
    masks: (K, H, W) bool region masks, or None.  target: (H, W, 3) uint8 ground truth, or None.
    """

    key: str
    instruction: str
    task_type: str
    language: str
    source: np.ndarray
    boxes: np.ndarray
    labels: tuple[str, ...] = ()
    masks: np.ndarray | None = None
    target: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark's examples, its format, where it came from and its content hash."""

    path: str
    format: str
    examples: tuple[Example, ...]
    sha256: str

    def describe(self) -> dict[str, Any]:
        types: dict[str, int] = {}
        for e in self.examples:
            types[e.task_type] = types.get(e.task_type, 0) + 1
        languages = sorted({e.language for e in self.examples})
        return {
            "path": self.path,
            "format": self.format,
            "sha256": self.sha256,
            "examples": len(self.examples),
            "task_types": types,
            "languages": languages,
        }


def benchmark_sha256(examples: Iterable[Example]) -> str:
    """sha256 over every example's key, instruction, type, language and source pixels, in key order."""
    digest = hashlib.sha256()
    for e in sorted(examples, key=lambda e: e.key):
        fields = [e.key, e.instruction, e.task_type, e.language, repr(e.source.shape)]
        digest.update(json.dumps(fields).encode())
        digest.update(hashlib.sha256(np.ascontiguousarray(e.source).tobytes()).digest())
    return digest.hexdigest()


def _from_record(record: Any) -> Example:
    meta = record.meta if isinstance(record.meta, dict) else {}
    task_type = meta.get("task_type")
    language = meta.get("language")
    if task_type is None and meta.get("task") == "shapes":
        edits = sorted({s["edit"] for s in meta.get("shapes", ()) if s.get("edit") not in (None, "none")})
        task_type = "+".join(edits) or UNTYPED
    for name, value in (("meta.task_type", task_type), ("meta.language", language)):
        if value is not None and (not isinstance(value, str) or not value):
            raise RecordError(repr(record.id), name, f"must be a non-empty string, got {value!r}")
    masks = None
    if record.regions and record.has_masks:
        masks = np.stack([r.mask for r in record.regions]).astype(bool)
    boxes = np.asarray([r.box for r in record.regions], np.float32).reshape(-1, 4)
    return Example(
        key=record.id,
        instruction=record.instruction,
        task_type=task_type or UNTYPED,
        language=language or UNDETERMINED_LANGUAGE,
        source=record.source,
        boxes=boxes,
        labels=tuple(r.label for r in record.regions),
        masks=masks,
        target=record.target,
    )


def _read_records(folder: Path, box_format: str | None) -> list[Example]:
    if box_format is None:
        raise BenchmarkError(
            f"--benchmark {str(folder)!r} is a record folder (metadata.jsonl): give the format of its boxes "
            "with --box-format pixel|unit|qwen1000"
        )
    return [_from_record(r) for r in read_jsonl_folder(str(folder), box_format)]


def _read_tfds(folder: Path, split: str) -> list[Example]:
    from sfgrpo.data.tfds_builder import DatasetNotFound, example_to_record, load_split  # noqa: PLC0415

    try:
        source = load_split(str(folder), split)
    except DatasetNotFound as err:
        raise BenchmarkError(f"--benchmark {str(folder)!r}: {err}") from None
    return [_from_record(example_to_record(source[i])) for i in range(len(source))]


def _read_gedit(folder: Path) -> list[Example]:
    files = sorted(folder.glob("*.jsonl"))
    examples = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line_no, text in enumerate(f, start=1):
                if text.strip():
                    examples.append(_gedit_example(text, folder, f"{path.name} line {line_no}"))
    return examples


def _gedit_example(text: str, folder: Path, where: str) -> Example:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(where, "<line>", f"malformed JSON: {err.msg}") from None
    if not isinstance(obj, dict):
        raise RecordError(where, "<line>", f"expected a JSON object, got {type(obj).__name__}")
    fields = {}
    for name in ("key", "task_type", "instruction", "instruction_language", "input_image"):
        value = obj.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and name == "key":
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise RecordError(
                f"{obj.get('key')!r} ({where})", name, f"missing or not a non-empty string: {value!r}"
            )
        fields[name] = value
    name = f"{fields['key']!r} ({where})"
    source, _ = load_image_file(str(folder / fields["input_image"]), record=name, field="input_image")
    return Example(
        key=fields["key"],
        instruction=fields["instruction"],
        task_type=fields["task_type"],
        language=fields["instruction_language"],
        source=source,
        boxes=np.zeros((0, 4), np.float32),
    )


def _read_imgedit(path: Path, images: Path | None) -> list[Example]:
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"--benchmark {str(path)!r}: cannot read it as JSON: {err}") from None
    if not isinstance(table, dict):
        raise BenchmarkError(
            f"--benchmark {str(path)!r}: expected a JSON object {{key: {{id, prompt, edit_type}}}}"
        )
    root = images if images is not None else path.parent
    examples = []
    for key, entry in table.items():
        name = f"{key!r} ({path.name})"
        if not isinstance(entry, dict):
            raise RecordError(
                name, "<entry>", f"expected an object with id, prompt, edit_type, got {entry!r}"
            )
        for field in ("id", "prompt", "edit_type"):
            if not isinstance(entry.get(field), str) or not entry[field].strip():
                raise RecordError(name, field, f"missing or not a non-empty string: {entry.get(field)!r}")
        source, _ = load_image_file(str(root / entry["id"]), record=name, field="id")
        examples.append(
            Example(
                key=str(key),
                instruction=entry["prompt"],
                task_type=entry["edit_type"],
                language=entry.get("language", "en"),  # ImgEdit-Bench's prompts are English
                source=source,
                boxes=np.zeros((0, 4), np.float32),
            )
        )
    return examples


def _shapes_spec(path: str) -> tuple[str, int | None]:
    """``shapes[:SPLIT[:N]]`` -> (split, N or None: the run's own count)."""
    parts = path.split(":")[1:]
    split = parts[0] if parts else "test"
    if split not in ("train", "test") or len(parts) > 2:
        raise BenchmarkError(
            f"--benchmark {path!r}: expected shapes:train or shapes:test, optionally :N examples"
        )
    if len(parts) < 2:
        return split, None
    try:
        count = int(parts[1])
    except ValueError:
        count = 0
    if count < 1:
        raise BenchmarkError(f"--benchmark {path!r}: N must be a positive number of examples")
    return split, count


def _read_shapes(split: str, config: ml_collections.ConfigDict | None, count: int | None) -> list[Example]:
    if config is None:
        raise BenchmarkError(
            f"--benchmark shapes:{split} is the shapes split of a training run: give the run with --workdir"
        )
    if config.data.source != "shapes":
        raise BenchmarkError(
            f"--benchmark shapes:{split}: the run trained on data.source={config.data.source!r}, not the "
            "shapes task; give its dataset folder as --benchmark instead"
        )
    from sfgrpo import builders  # noqa: PLC0415

    if count is not None:
        # Examples are a pure function of (split, seed, index): the first ones are the run's own split and
        # the rest new draws from the same task (the splits are salted apart, so never trained on).
        config = ml_collections.ConfigDict(config.to_dict())
        config.data["shapes_train" if split == "train" else "shapes_eval"] = count
    return [_from_record(r) for r in builders.data_source(config, split)]


def split_suffix(path: str, default: str) -> tuple[str, str]:
    """``PATH:split`` -> (PATH, split); a path that exists as given, or has no suffix: (path, default)."""
    if ":" in path and not Path(path).exists():
        base, split = path.rsplit(":", 1)
        return base, split
    return path, default


def detect_format(path: str) -> str:
    """Which of ``FORMATS`` ``path`` holds (a ``:split`` suffix is allowed for tfds and shapes)."""
    if path.split(":")[0] == "shapes":
        return "shapes"
    p = Path(split_suffix(path, "")[0])
    if p.is_file():
        if p.suffix == ".json":
            return "imgedit"
        raise BenchmarkError(f"--benchmark {path!r} is a file, but not an ImgEdit-style .json table")
    if not p.is_dir():
        raise BenchmarkError(f"--benchmark {path!r} does not exist")
    if (p / "metadata.jsonl").is_file():
        return "records"
    if (p / "sfgrpo_edit").is_dir():
        return "tfds"
    if any(p.glob("*.jsonl")):
        return "gedit"
    if (p / "basic_edit.json").is_file():
        return "imgedit"
    found = sorted(os.listdir(p))[:8]
    raise BenchmarkError(
        f"--benchmark {path!r} holds no benchmark this reads (metadata.jsonl, a sfgrpo_edit dataset, GEdit "
        f"*.jsonl files or basic_edit.json); found {found}"
    )


def read_benchmark(
    path: str,
    *,
    box_format: str | None = None,
    images: str | None = None,
    run_config: ml_collections.ConfigDict | None = None,
    limit: int | None = None,
    task_types: Sequence[str] | None = None,
) -> Benchmark:
    """Reads the benchmark at ``path`` (see the module docstring for the formats).

    Args:
      box_format: the boxes' format in a record folder ('pixel', 'unit' or 'qwen1000').
      images: the folder an ImgEdit table's image paths are relative to (default: the table's folder).
      run_config: the training run's config, for ``shapes:<split>``.
      limit: keep the first ``limit`` examples (in the benchmark's order), after ``task_types``.
      task_types: keep only these task types.
    """
    fmt = detect_format(path)
    if fmt == "shapes":
        split, count = _shapes_spec(path)
        examples = _read_shapes(split, run_config, count)
    elif fmt == "tfds":
        folder, split = split_suffix(path, "test")
        examples = _read_tfds(Path(folder), split)
    elif fmt == "records":
        examples = _read_records(Path(path), box_format)
    elif fmt == "gedit":
        examples = _read_gedit(Path(path))
    else:
        table = Path(path) / "basic_edit.json" if Path(path).is_dir() else Path(path)
        examples = _read_imgedit(table, Path(images) if images else None)
    keys = [e.key for e in examples]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise RecordError(repr(dup), "key", f"duplicate key in --benchmark {path!r}")
    if task_types:
        known = {e.task_type for e in examples}
        unknown = sorted(set(task_types) - known)
        if unknown:
            raise BenchmarkError(f"--task-types {unknown}: not in {path!r}, whose types are {sorted(known)}")
        examples = [e for e in examples if e.task_type in set(task_types)]
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise BenchmarkError(f"--benchmark {path!r} holds no examples")
    untyped = sum(e.task_type == UNTYPED for e in examples)
    if untyped:
        _log.warning("%d of %d examples have no task type (meta.task_type): they are scored as %r",
                     untyped, len(examples), UNTYPED)  # fmt: skip
    return Benchmark(path, fmt, tuple(examples), benchmark_sha256(examples))
