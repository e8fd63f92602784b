"""The work of ``python -m sfgrpo.data.annotate`` (see that module for the command): each record of the input
folder to an ``Outcome`` on a thread pool (kept, annotated by the VLM or the diff, or failed with a reason),
then the output folder: copied images, diff masks, ``metadata.jsonl``, ``failures.jsonl``, the preview.

``args`` is the checked ``argparse.Namespace`` of ``sfgrpo.data.annotate.check_args``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import tqdm

from sfgrpo.data import annotate_vlm, region_diff
from sfgrpo.data.annotate_preview import save_preview
from sfgrpo.data.records import EditRecord, RecordError, encode_png, parse_jsonl_record
from sfgrpo.data.region_diff import DiffSettings, RegionError

_log = logging.getLogger(__name__)

MARKER = ".sfgrpo_annotate.json"  # in the output: which input it annotates; a rerun may reuse the folder
CACHE_DIR = ".annotate_cache"
LOCK_FILE = ".annotate.lock"  # held (flock) by the run writing the output
MASK_DIR = "annotate_masks"
_IMAGE_KEYS = ("source", "image", "target")
# What this command keeps in its output folder; an input file at one of these paths is referred to by its
# absolute path instead of being copied over it.
_RESERVED = (MARKER, CACHE_DIR, LOCK_FILE, "metadata.jsonl", "failures.jsonl", "preview.png")


class UsageError(ValueError):
    """Bad arguments or input folders (exit status 2)."""


class AnnotateError(RuntimeError):
    """A run that could not finish: failed records without --skip-failed, or a failing endpoint (exit 1)."""


@dataclasses.dataclass
class Outcome:
    """What became of one input line. ``status``: 'annotated', 'cached', 'kept' or 'failed'."""

    line: int
    rid: str
    status: str
    obj: dict[str, Any] | None = None  # the output line
    copies: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (input file, output path)
    reason: str = ""
    message: str = ""


@dataclasses.dataclass
class Report:
    """Counts of a run; ``metadata`` is the written metadata.jsonl, or None when nothing was written."""

    output: str
    metadata: str | None
    records: int
    annotated: int
    from_cache: int
    kept: int
    failed: int
    written: int
    requests: int
    failures: dict[str, int]


# ---------------------------------------------------------------------------------------------- one record


class Annotator:
    """Turns one input line into an ``Outcome``; thread-safe, run on a pool."""

    def __init__(self, args: argparse.Namespace, client: annotate_vlm.GroundingClient | None) -> None:
        self.args, self.client = args, client
        self.input, self.output = os.path.realpath(args.input), os.path.realpath(args.output)
        self.cache = annotate_vlm.AnswerCache(os.path.join(self.output, CACHE_DIR)) if client else None
        self.diff = (
            DiffSettings(args.diff_threshold, args.diff_merge_gap, args.diff_min_area)
            if args.method == "diff"
            else None
        )
        self.template = args.prompt_text
        self.requests = 0
        self._count = threading.Lock()

    def __call__(self, line: int, rid: str, obj: dict[str, Any]) -> Outcome:
        keep = isinstance(obj.get("regions"), list) and bool(obj["regions"]) and not self.args.overwrite
        try:
            record = parse_jsonl_record(
                obj if keep else {**obj, "regions": []},
                self.input,
                self.args.box_format,
                line=line,
                r_max=self.args.max_regions,
            )
        except RecordError as e:
            return Outcome(
                line, rid, "failed", reason="bad_record", message=f"field {e.field!r}: {e.problem}"
            )
        out = {**obj, "id": rid}
        copies = [self._map_path(out, key) for key in _IMAGE_KEYS if isinstance(out.get(key), str)]
        if keep:
            out["regions"] = [dict(r) for r in obj["regions"]]
            for region in out["regions"]:
                if isinstance(region.get("mask"), str):
                    copies.append(self._map_path(region, "mask"))
            return Outcome(line, rid, "kept", out, copies)
        try:
            by = self._by_diff if self.diff is not None else self._by_vlm
            regions, annotation, status = by(record)
        except RegionError as e:
            return Outcome(line, rid, "failed", reason=e.reason, message=e.message)
        out["regions"] = regions
        out["meta"] = {**obj.get("meta", {}), "annotation": annotation}
        return Outcome(line, rid, status, out, copies)

    def _map_path(self, holder: dict[str, Any], key: str) -> tuple[str, str]:
        """Points ``holder[key]`` at the output's copy (or the absolute input path when the file lies outside
        the input folder); returns (input file, output path or '' for no copy)."""
        path = os.path.realpath(os.path.join(self.input, holder[key]))
        rel = os.path.relpath(path, self.input)
        outside = rel.startswith(os.pardir + os.sep) or rel == os.pardir or os.path.isabs(rel)
        if outside or rel.split(os.sep)[0] in _RESERVED:
            holder[key] = path
            return path, ""
        holder[key] = rel
        return path, rel

    def _by_diff(self, record: EditRecord) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
        if record.target is None:
            raise RegionError("no_target", "--method diff needs a target image, and the record has none")
        found, dropped = region_diff.diff_regions(
            record.source, record.target, self.diff, self.args.max_regions
        )
        h, w = record.source.shape[:2]
        stem = (
            re.sub(r"[^A-Za-z0-9._-]", "_", record.id)[:80]
            + "-"
            + hashlib.sha1(record.id.encode()).hexdigest()[:8]
        )
        regions = []
        for k, region in enumerate(found):
            mask_rel = f"{MASK_DIR}/{stem}_{k}.png"
            atomic_write(os.path.join(self.output, mask_rel), encode_png(region.mask))
            box = pixel_box_to(region.box, self.args.box_format, w, h)
            regions.append({"box": box, "label": f"changed area {k + 1}", "mask": mask_rel})
        annotation = {
            "method": "diff",
            **dataclasses.asdict(self.diff),
            "confidence": [round(r.mean_diff, 4) for r in found],
            "changed_px": [r.changed_px for r in found],
            "dropped_px": dropped,
        }
        return regions, annotation, "annotated"

    def _by_vlm(self, record: EditRecord) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
        args = self.args
        image = annotate_vlm.image_for_request(record.source, args.max_side)
        prompt = annotate_vlm.fill_prompt(self.template, record.instruction, args.max_regions)
        settings = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        key = annotate_vlm.cache_key(image, record.instruction, args.judge_model, prompt, **settings)
        answer, status = self.cache.get(key), "cached"
        if answer is None:
            answer, status = self.client.ask(image, prompt), "annotated"
            self.cache.put(key, answer, id=record.id, model=args.judge_model)
            with self._count:
                self.requests += 1
        found = annotate_vlm.parse_grounding(answer, args.max_regions)
        h, w = record.source.shape[:2]
        regions = [{"box": grid_box_to(r.box, args.box_format, w, h), "label": r.label} for r in found]
        annotation = {
            "method": "vlm",
            "model": args.judge_model,
            "prompt_template_sha256": hashlib.sha256(self.template.encode()).hexdigest(),
            "confidence": [r.confidence for r in found],
        }
        return regions, annotation, status

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def grid_box_to(box: Sequence[float], box_format: str, width: int, height: int) -> list[float]:
    """A 0..1000 grid box (x1, y1, x2, y2) in ``box_format`` units for a (height, width) image."""
    if box_format == "qwen1000":
        return [int(v) if float(v).is_integer() else float(v) for v in box]
    sx, sy = (1.0, 1.0) if box_format == "unit" else (float(width), float(height))
    x1, y1, x2, y2 = box
    return [x1 * sx / 1000, y1 * sy / 1000, x2 * sx / 1000, y2 * sy / 1000]


def pixel_box_to(box: Sequence[int], box_format: str, width: int, height: int) -> list[float]:
    """A pixel-edge box (x1, y1, x2, y2) in ``box_format`` units; on the 0..1000 grid it is rounded outwards,
    so it still covers every pixel."""
    x1, y1, x2, y2 = (int(v) for v in box)
    if box_format == "pixel":
        return [x1, y1, x2, y2]
    if box_format == "unit":
        return [x1 / width, y1 / height, x2 / width, y2 / height]
    return [x1 * 1000 // width, y1 * 1000 // height, -(-x2 * 1000 // width), -(-y2 * 1000 // height)]


def atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the run


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for text in f if text.strip())


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of the non-blank lines, read lazily."""
    with open(path, encoding="utf-8") as f:
        yield from ((n, text) for n, text in enumerate(f, start=1) if text.strip())


def _head(line: int, text: str, seen: set[str]) -> tuple[str, dict[str, Any] | None, Outcome | None]:
    """The record's id and object, or a failed Outcome for a line that is not a record or repeats an id."""
    where = f"line{line}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return (
            where,
            None,
            Outcome(line, where, "failed", reason="bad_record", message=f"malformed JSON: {e.msg}"),
        )
    if not isinstance(obj, dict):
        message = f"expected a JSON object, got {type(obj).__name__}"
        return where, None, Outcome(line, where, "failed", reason="bad_record", message=message)
    rid = obj.get("id", where)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        message = f"field 'id' must be a non-empty string or an integer, got {rid!r}"
        return where, None, Outcome(line, where, "failed", reason="bad_record", message=message)
    rid = str(rid)
    if rid in seen:
        message = "an earlier line has the same id"
        return rid, None, Outcome(line, rid, "failed", reason="duplicate_id", message=message)
    seen.add(rid)
    return rid, obj, None


def make_client(args: argparse.Namespace) -> annotate_vlm.GroundingClient | None:
    """The VLM client for ``--method vlm`` (None for diff), checked to answer and to serve the model:
    ``UsageError`` for a model it does not serve, ``AnnotateError`` for an endpoint that does not answer."""
    if args.method != "vlm":
        return None
    client = annotate_vlm.GroundingClient(
        args.judge_url,
        args.judge_model,
        timeout_s=args.timeout_s,
        retries=args.retries,
        backoff_s=args.backoff_s,
        max_concurrency=args.concurrency,
        api_key=os.environ[args.api_key_env] if args.api_key_env else None,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    try:
        client.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    except annotate_vlm.EndpointDown as e:
        raise AnnotateError(str(e)) from None
    return client


def run(args: argparse.Namespace, client: annotate_vlm.GroundingClient | None) -> Report:
    """Annotates ``args.input`` into ``args.output`` (see the module docstring) with the checked arguments
    and ``make_client``'s client."""
    output = os.path.realpath(args.output)
    meta_path = os.path.join(output, "metadata.jsonl")
    if os.path.exists(meta_path):  # from an earlier run: it must not outlive a run that fails
        os.remove(meta_path)
    metadata = os.path.join(args.input, "metadata.jsonl")
    annotator = Annotator(args, client)
    outcomes: list[Outcome] = []
    seen: set[str] = set()
    failures: collections.Counter[str] = collections.Counter()
    bar = tqdm.tqdm(
        total=_count_lines(metadata), desc=f"annotate ({args.method})", unit="record", mininterval=0.5
    )
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency)
    pending: collections.deque[concurrent.futures.Future[Outcome]] = collections.deque()

    def finish(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if outcome.status == "failed":
            failures[outcome.reason] += 1
            _log.warning(
                "record %r (line %d) failed: %s: %s",
                outcome.rid,
                outcome.line,
                outcome.reason,
                outcome.message,
            )
        bar.update(1)
        bar.set_postfix(failed=failures.total(), refresh=False)

    try:
        for line, text in _read_lines(metadata):
            rid, obj, failed = _head(line, text, seen)
            if failed is None:
                pending.append(pool.submit(annotator, line, rid, obj))
            else:
                done: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
                done.set_result(failed)
                pending.append(done)
            while len(pending) > 2 * args.concurrency:  # bounded: records are read as the pool frees up
                finish(pending.popleft().result())
        while pending:
            finish(pending.popleft().result())
    except annotate_vlm.EndpointDown as e:
        cached = len(annotator.cache) if annotator.cache is not None else 0
        raise AnnotateError(
            f"{e}; {cached} answers are cached in {os.path.join(output, CACHE_DIR)}: rerun the same "
            "command to resume"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        annotator.close()
    return _write(args, outcomes, annotator.requests)


def _write(args: argparse.Namespace, outcomes: list[Outcome], requests: int) -> Report:
    output = os.path.realpath(args.output)
    failed = [o for o in outcomes if o.status == "failed"]
    failures_path = os.path.join(output, "failures.jsonl")
    if failed:
        rows = [{"id": o.rid, "line": o.line, "reason": o.reason, "message": o.message} for o in failed]
        atomic_write(failures_path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    elif os.path.exists(failures_path):
        os.remove(failures_path)
    written = [o for o in outcomes if o.status != "failed"]
    report = Report(
        output=output,
        metadata=None,
        records=len(outcomes),
        annotated=sum(o.status == "annotated" for o in outcomes),
        from_cache=sum(o.status == "cached" for o in outcomes),
        kept=sum(o.status == "kept" for o in outcomes),
        failed=len(failed),
        written=0,
        requests=requests,
        failures=dict(collections.Counter(o.reason for o in failed)),
    )
    if failed and not args.skip_failed:
        first = failed[0]
        raise AnnotateError(
            f"{len(failed)} of {len(outcomes)} records failed (first: {first.rid!r} at line {first.line}: "
            f"{first.reason}: {first.message}); all are listed in {failures_path}; fix them, or pass "
            "--skip-failed to write the rest"
        )
    for o in tqdm.tqdm(written, desc="copy images", unit="record", mininterval=0.5):
        for src, rel in o.copies:
            if rel:
                _copy(src, os.path.join(output, rel))
    body = "".join(json.dumps(o.obj) + "\n" for o in written)
    meta_path = os.path.join(output, "metadata.jsonl")
    atomic_write(meta_path, body.encode())
    report.metadata, report.written = meta_path, len(written)
    if failed:
        _log.warning("skipped %d failed records (--skip-failed); listed in %s", len(failed), failures_path)
    if args.preview:
        _preview(args, written)
    return report


def _copy(src: str, dst: str) -> None:
    """Copies a file unless an identical-looking copy (size and modification time) is already there."""
    if os.path.exists(dst):
        a, b = os.stat(src), os.stat(dst)
        if a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime):
            return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _preview(args: argparse.Namespace, written: list[Outcome]) -> None:
    """Draws the first ``--preview`` annotated records as written, read back as ``sfgrpo.data.build`` will."""
    output = os.path.realpath(args.output)
    shown = [o for o in written if o.status in ("annotated", "cached")][: args.preview]
    if not shown:
        _log.warning("--preview: no record was annotated in this run, so there is nothing to draw")
        return
    records = [parse_jsonl_record(o.obj, output, args.box_format, line=o.line) for o in shown]
    path = os.path.join(output, "preview.png")
    save_preview(path, records)
    _log.info("wrote a preview of %d records to %s", len(records), path)
