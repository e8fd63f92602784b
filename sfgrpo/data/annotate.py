"""Fills in the edit regions of a record folder, with a grounding VLM or from source/target differences.

    python -m sfgrpo.data.annotate --input DIR --output DIR --box-format {pixel,unit,qwen1000} \\
        --method vlm --judge-url http://127.0.0.1:8000/v1 --judge-model NAME [--api-key-env VAR]
    python -m sfgrpo.data.annotate --input DIR --output DIR --box-format ... --method diff

The input is the folder format of ``sfgrpo.data.build`` (``metadata.jsonl`` and images); a record without
``regions`` (absent, null or ``[]``) is annotated, one with regions keeps them unless ``--overwrite``. The
output is the same format, ready for ``python -m sfgrpo.data.build --input OUTPUT --box-format <the
same>``: each line as it was, with an explicit ``id``, the regions (``box`` in ``--box-format``,
``label``; ``mask`` files under ``annotate_masks/`` for ``diff``) and ``meta.annotation`` (the method, its
settings, a confidence per region: the VLM's own or null for ``vlm``; the region's mean largest-channel
difference / 255 for ``diff``). The images the records name are copied (files outside the input folder
are referred to by absolute path instead).

``vlm`` (``sfgrpo.data.annotate_vlm``): one request per record; ``diff`` (``sfgrpo.data.region_diff``):
needs the record's target. A record whose annotation fails is reported by id, line and reason in the log
and in ``OUTPUT/failures.jsonl``, never guessed; then ``metadata.jsonl`` is written only with
``--skip-failed`` (the rest, and the count). VLM answers are cached in ``OUTPUT/.annotate_cache``, so an
interrupted run resumes with the same command and a rerun sends no request. ``OUTPUT/metadata.jsonl``
exists only after a complete run. ``--preview N`` writes ``OUTPUT/preview.png``. Exit status: 0 done,
1 records failed or the endpoint failed, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from sfgrpo.data import annotate_vlm
from sfgrpo.data.annotate_run import (
    LOCK_FILE,
    MARKER,
    AnnotateError,
    Report,
    UsageError,
    atomic_write,
    make_client,
    run,
)
from sfgrpo.data.records import BOX_FORMATS
from sfgrpo.data.region_diff import DiffSettings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other bad input, instead of the usage
        raise UsageError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sfgrpo.data.annotate", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, metavar="DIR", help="record folder: metadata.jsonl and images")
    p.add_argument(
        "--output", required=True, metavar="DIR", help="new folder (or this command's earlier one)"
    )
    p.add_argument("--method", required=True, choices=("vlm", "diff"))
    p.add_argument(
        "--box-format",
        required=True,
        choices=BOX_FORMATS,
        help="unit of the input's boxes and of those written",
    )
    p.add_argument("--max-regions", type=int, default=8, help="most regions a record may have (default: 8)")
    p.add_argument("--overwrite", action="store_true", help="annotate records that already have regions too")
    p.add_argument("--skip-failed", action="store_true", help="write the records that did not fail")
    p.add_argument(
        "--preview", type=int, default=0, metavar="N", help="draw N annotated records to preview.png"
    )
    p.add_argument("--concurrency", type=int, default=8, help="records in work at once (default: 8)")
    v = p.add_argument_group("--method vlm")
    v.add_argument("--judge-url", help="OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1")
    v.add_argument("--judge-model", help="the served model name")
    v.add_argument("--api-key-env", help="environment variable holding the API key (default: none sent)")
    v.add_argument("--prompt", metavar="FILE", help="prompt template with {instruction} (and {max_regions})")
    v.add_argument(
        "--max-side", type=int, help="scale images down to this longer side first (default: 0 = no)"
    )
    v.add_argument("--timeout-s", type=float, help="seconds per request attempt (default: 120)")
    v.add_argument("--retries", type=int, help="retries after a timeout, refusal, 5xx or 429 (default: 3)")
    v.add_argument("--backoff-s", type=float, help="wait before retry k is backoff_s * 2**k (default: 1)")
    v.add_argument("--max-tokens", type=int, help="answer budget (default: 1024)")
    v.add_argument("--temperature", type=float, help="sampling temperature (default: 0)")
    d = p.add_argument_group("--method diff")
    d.add_argument(
        "--diff-threshold", type=float, help="changed: largest channel difference > this (0..255; default 24)"
    )
    d.add_argument(
        "--diff-merge-gap", type=float, help="join areas closer than this x longer side (default 0.02)"
    )
    d.add_argument("--diff-min-area", type=float, help="drop areas under this x image area (default 0.001)")
    return p


_VLM_DEFAULTS = {
    "max_side": 0,
    "timeout_s": 120.0,
    "retries": 3,
    "backoff_s": 1.0,
    "max_tokens": 1024,
    "temperature": 0.0,
}
_DIFF_DEFAULTS = {
    "diff_threshold": DiffSettings.threshold,
    "diff_merge_gap": DiffSettings.merge_gap,
    "diff_min_area": DiffSettings.min_area,
}


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the defaults of the chosen method and checks every argument; ``UsageError`` names the bad one."""
    own, other = (_VLM_DEFAULTS, _DIFF_DEFAULTS) if args.method == "vlm" else (_DIFF_DEFAULTS, _VLM_DEFAULTS)
    vlm_only = ["judge_url", "judge_model", "api_key_env", "prompt", *_VLM_DEFAULTS]
    for name in vlm_only if args.method == "diff" else list(_DIFF_DEFAULTS):
        if getattr(args, name) is not None:
            raise UsageError(
                f"--{name.replace('_', '-')} is an option of the other method, not --method {args.method}"
            )
    for name, default in own.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in other:
        setattr(args, name, None)
    if args.max_regions < 1:
        raise UsageError(f"--max-regions must be >= 1, got {args.max_regions}")
    if args.concurrency < 1:
        raise UsageError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.preview < 0:
        raise UsageError(f"--preview must be >= 0, got {args.preview}")
    if args.method == "diff":
        try:
            DiffSettings(args.diff_threshold, args.diff_merge_gap, args.diff_min_area)
        except ValueError as e:
            raise UsageError(f"--diff-*: {e}") from None
        args.prompt_text = None
    else:
        _check_vlm_args(args)
    _check_folders(args)
    return args


def _check_vlm_args(args: argparse.Namespace) -> None:
    if not args.judge_url or not args.judge_model:
        raise UsageError("--method vlm needs --judge-url and --judge-model")
    if not re.match(r"https?://[^/\s]+", args.judge_url):
        raise UsageError(
            f"--judge-url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {args.judge_url!r}"
        )
    if args.api_key_env and args.api_key_env not in os.environ:
        raise UsageError(f"--api-key-env: the environment variable {args.api_key_env!r} is not set")
    for name, low in (("timeout_s", 0), ("backoff_s", -1), ("temperature", -1), ("max_tokens", 0)):
        if not getattr(args, name) > low:
            raise UsageError(f"--{name.replace('_', '-')} must be > {low}, got {getattr(args, name)}")
    if args.retries < 0 or args.max_side < 0:
        raise UsageError("--retries and --max-side must be >= 0")
    if args.prompt is None:
        args.prompt_text = annotate_vlm.GROUNDING_PROMPT
        return
    try:
        with open(args.prompt, encoding="utf-8") as f:
            args.prompt_text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompt {args.prompt}: cannot read it: {e}") from None
    try:
        annotate_vlm.check_template(args.prompt_text, f"--prompt {args.prompt}")
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_folders(args: argparse.Namespace) -> None:
    src, dst = os.path.realpath(args.input), os.path.realpath(args.output)
    if not os.path.isdir(src):
        raise UsageError(f"--input {args.input}: not a folder")
    if not os.path.isfile(os.path.join(src, "metadata.jsonl")):
        raise UsageError(f"--input {args.input}: has no metadata.jsonl")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UsageError(f"--output {args.output}: is a file, not a folder")
    if dst == src:
        raise UsageError(f"--output {args.output}: is the input folder; the input is never written to")
    if dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise UsageError(
            f"--output {args.output}: lies inside --input {args.input} (or holds it); choose a separate "
            "folder"
        )
    if os.path.isdir(dst) and os.listdir(dst):
        try:
            with open(os.path.join(dst, MARKER), encoding="utf-8") as f:
                earlier = json.load(f).get("input")
        except (OSError, ValueError, AttributeError):
            raise UsageError(
                f"--output {args.output}: exists and was not written by this command; choose a new folder"
            ) from None
        if earlier != src:
            raise UsageError(f"--output {args.output}: holds the annotation of another input ({earlier})")


def _lock_output(args: argparse.Namespace) -> Any:
    """Creates the output folder with its marker and locks it for this run (the open lock file)."""
    dst = os.path.realpath(args.output)
    os.makedirs(dst, exist_ok=True)
    atomic_write(os.path.join(dst, MARKER), json.dumps({"input": os.path.realpath(args.input)}).encode())
    lock = open(os.path.join(dst, LOCK_FILE), "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise UsageError(
            f"--output {args.output}: another annotate run is writing it; wait for it to end"
        ) from None
    return lock


def main(argv: Sequence[str] | None = None) -> Report:
    """Parses, checks and runs; prints a one-line JSON summary. Raises ``UsageError``/``AnnotateError``."""
    args = check_args(_parser().parse_args(argv))
    client = make_client(args)  # before the output is touched: a wrong endpoint leaves nothing behind
    lock = _lock_output(args)
    try:
        report = run(args, client)
    finally:
        lock.close()
    print(json.dumps(dataclasses.asdict(report)))
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    """``main`` with errors as one ``error: ...`` line on stderr and an exit status (0, 1 or 2)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except AnnotateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "error: interrupted; rerun the same command to resume (answers so far are cached)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
