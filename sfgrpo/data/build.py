"""Builds the sfgrpo editing dataset (TFDS, ArrayRecord) from a JSONL folder or from the shapes task.

    python -m sfgrpo.data.build --input DIR --output DATA_DIR --box-format {pixel,unit,qwen1000}
    python -m sfgrpo.data.build --shapes N --seed S --output DATA_DIR [--heldout M] [--image-size 64]

Read the result with ``tfds.data_source("sfgrpo_edit", data_dir=DATA_DIR, split="train")``. With
``--skip-bad-records`` bad records are skipped, counted, logged, printed and stored in the dataset's
metadata; without it the first bad record stops the build with an error naming the record and the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NoReturn

import tensorflow_datasets as tfds

from sfgrpo.data import shapes as shapes_lib
from sfgrpo.data.records import BOX_FORMATS, BadRecords, EditRecord, read_jsonl_folder
from sfgrpo.data.tfds_builder import write_dataset

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildReport:
    """What a build wrote: the dataset folder, examples per split, and the bad records it skipped."""

    path: str
    num_examples: dict[str, int]
    skipped: int = 0
    skipped_messages: list[str] = dataclasses.field(default_factory=list)


def _counted(
    name: str, make: Callable[[], Iterable[EditRecord]], counts: dict[str, int]
) -> Callable[[], Iterable[EditRecord]]:
    def gen() -> Iterable[EditRecord]:
        counts[name] = 0
        for record in make():
            counts[name] += 1
            yield record

    return gen


def build_from_folder(
    input_dir: str,
    data_dir: str,
    box_format: str,
    *,
    split: str = "train",
    r_max: int | None = 8,
    skip_bad_records: bool = False,
) -> BuildReport:
    """Writes ``input_dir/metadata.jsonl`` (+ its images) as split ``split`` of a dataset in ``data_dir``."""
    bad = BadRecords(skip=skip_bad_records)
    meta = tfds.core.MetadataDict(
        source="jsonl", input_dir=str(input_dir), box_format=box_format, r_max=r_max, skipped_bad_records=0
    )
    counts: dict[str, int] = {}

    # Opens eagerly, so a missing folder fails before TFDS creates anything.
    reader = read_jsonl_folder(input_dir, box_format, r_max=r_max, bad=bad)

    def records() -> Iterable[EditRecord]:
        yield from reader
        meta["skipped_bad_records"] = bad.count  # known only once the folder has been read

    path = write_dataset(data_dir, {split: _counted(split, records, counts)}, meta)
    if bad.count:
        _log.warning("skipped %d bad records while building %s", bad.count, path)
    return BuildReport(path=path, num_examples=counts, skipped=bad.count, skipped_messages=bad.messages)


def build_shapes(
    data_dir: str,
    n: int,
    seed: int,
    *,
    heldout: int | None = None,
    config: shapes_lib.ShapesConfig = shapes_lib.ShapesConfig(),
) -> BuildReport:
    """Writes ``n`` shapes examples as "train" and ``heldout`` (default max(1, n // 10)) as "test"."""
    if n < 1:
        raise ValueError(f"--shapes needs at least one example, got {n}")
    heldout = max(1, n // 10) if heldout is None else heldout
    counts: dict[str, int] = {}
    splits = {"train": shapes_lib.ShapesSource(n, split="train", seed=seed, config=config)}
    if heldout > 0:
        splits["test"] = shapes_lib.ShapesSource(heldout, split="test", seed=seed, config=config)
    meta = tfds.core.MetadataDict(
        source="shapes", seed=seed, shapes_config=dataclasses.asdict(config), skipped_bad_records=0
    )
    path = write_dataset(data_dir, {k: _counted(k, v.__iter__, counts) for k, v in splits.items()}, meta)
    return BuildReport(path=path, num_examples=counts)


PROG = "python -m sfgrpo.data.build"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like every other bad input, instead of the usage
        _fail(f"{message} (see --help)")


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, metavar="DATA_DIR", help="TFDS data_dir to write into")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="DIR", help="folder with metadata.jsonl and the image files")
    src.add_argument("--shapes", type=int, metavar="N", help="write N synthetic shapes examples instead")
    p.add_argument(
        "--box-format", choices=BOX_FORMATS, help="units of the JSONL boxes (required with --input)"
    )
    p.add_argument("--split", default="train", help="split name for --input (default: train)")
    p.add_argument("--r-max", type=int, default=8, help="most regions per record; 0 = no limit (default: 8)")
    p.add_argument("--skip-bad-records", action="store_true", help="skip (and count) bad records")
    p.add_argument("--seed", type=int, default=0, help="shapes: seed (default: 0)")
    p.add_argument(
        "--heldout", type=int, default=None, help="shapes: held-out 'test' examples (default N//10)"
    )
    p.add_argument("--image-size", type=int, default=64, help="shapes: image side in pixels (default: 64)")
    p.add_argument("--min-shapes", type=int, default=2)
    p.add_argument("--max-shapes", type=int, default=4)
    p.add_argument(
        "--max-edits", type=int, default=3, help="shapes: most shapes one instruction changes (1-3)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> BuildReport:
    """Runs the CLI; prints a one-line JSON summary and returns the report. Bad input exits with status 2
    and one line naming it, and leaves --output as it was (what this run created there is removed)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tfds.display_progress_bar(False)
    output = Path(args.output)
    before = set(output.iterdir()) if output.is_dir() else None
    try:
        report = _build(args)
    except (ValueError, OSError) as err:  # RecordError is a ValueError; FileExistsError an OSError
        _remove_new(output, before)
        _fail(str(err))
    except BaseException:
        _remove_new(output, before)
        raise
    print(
        json.dumps(
            {"path": report.path, "num_examples": report.num_examples, "skipped_bad_records": report.skipped}
        )
    )
    return report


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    output = Path(args.output)
    existing = next((p for p in (output, *output.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        _fail(f"--output {args.output!r}: {str(existing)!r} is a file, not a directory")
    if args.r_max < 0:
        _fail(f"--r-max must be >= 0 (0 = no limit), got {args.r_max}")
    if args.input is not None:
        if args.box_format is None:
            _fail("--box-format is required with --input: say whether boxes are pixel, unit or qwen1000")
        shapes_only = [
            f"--{k.replace('_', '-')}" for k in _SHAPES_ONLY if getattr(args, k) != parser.get_default(k)
        ]
        if shapes_only:
            _fail(f"{', '.join(shapes_only)} only apply to --shapes, not to --input")
        return
    if args.split != "train":
        _fail(
            f"--split {args.split!r} applies to --input; --shapes writes 'train' and 'test' (see --heldout)"
        )
    if args.box_format is not None:
        _fail("--box-format applies to --input; --shapes writes its own boxes")
    if args.shapes < 1:
        _fail(f"--shapes needs at least one example, got {args.shapes}")
    if args.heldout is not None and args.heldout < 0:
        _fail(f"--heldout must be >= 0, got {args.heldout}")
    if args.seed < 0:
        _fail(f"--seed must be >= 0, got {args.seed}")


_SHAPES_ONLY = ("seed", "heldout", "image_size", "min_shapes", "max_shapes", "max_edits")


def _build(args: argparse.Namespace) -> BuildReport:
    if args.input is not None:
        return build_from_folder(
            args.input,
            args.output,
            args.box_format,
            split=args.split,
            r_max=args.r_max or None,
            skip_bad_records=args.skip_bad_records,
        )
    config = shapes_lib.ShapesConfig(
        image_size=args.image_size,
        min_shapes=args.min_shapes,
        max_shapes=args.max_shapes,
        max_edits=args.max_edits,
    )
    return build_shapes(args.output, args.shapes, args.seed, heldout=args.heldout, config=config)


def _remove_new(output: Path, before: set[Path] | None) -> None:
    """Removes what a failed build created: --output itself when it did not exist, else its new entries."""
    if before is None:
        shutil.rmtree(output, ignore_errors=True)
        return
    for path in set(output.iterdir()) - before if output.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
