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
import sys
from collections.abc import Callable, Iterable, Sequence

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sfgrpo.data.build", description=__doc__.split("\n\n")[0])
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
    """Runs the CLI; prints a one-line JSON summary and returns the report. Exits 2 on usage errors."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tfds.display_progress_bar(False)
    if args.input is not None:
        if args.box_format is None:
            parser.error(
                "--box-format is required with --input: say whether boxes are pixel, unit or qwen1000"
            )
        report = build_from_folder(
            args.input,
            args.output,
            args.box_format,
            split=args.split,
            r_max=args.r_max or None,
            skip_bad_records=args.skip_bad_records,
        )
    else:
        try:
            config = shapes_lib.ShapesConfig(
                image_size=args.image_size,
                min_shapes=args.min_shapes,
                max_shapes=args.max_shapes,
                max_edits=args.max_edits,
            )
        except ValueError as err:
            parser.error(str(err))
        report = build_shapes(args.output, args.shapes, args.seed, heldout=args.heldout, config=config)
    print(
        json.dumps(
            {"path": report.path, "num_examples": report.num_examples, "skipped_bad_records": report.skipped}
        )
    )
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
