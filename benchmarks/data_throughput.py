"""Input-pipeline throughput: examples per second at 512x512 with 1 and 2 grain worker processes.

    python benchmarks/data_throughput.py [--workers 1 2] [--repeats 3] [--batches 20]

It writes a shapes dataset (TFDS ArrayRecord, PNG images and masks) to a temporary folder, then times the
full pipeline: read, decode the source, target and region masks, fit to the resolution, pad, repeat to
groups, collate. "examples/s" counts distinct examples (groups); rows/s = examples/s x G. Each figure is
the median over repeats, timed after a warm-up batch (worker start-up excluded).
"""

import argparse
import statistics
import tempfile
import time

from sfgrpo.data import build, pipeline, shapes, tfds_builder


def _one_run(src, cfg: pipeline.PipelineConfig, batches: int) -> float:
    it = pipeline.make_iterator(src, cfg, process_index=0, process_count=1)
    next(it)  # warm-up: worker start-up, first reads
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    it.close()  # stops the worker processes before the next configuration starts its own
    return batches * cfg.groups_per_host / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--examples", type=int, default=64, help="examples written to the dataset")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--groups-per-batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=20, help="timed batches per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="read threads per worker process")
    p.add_argument("--no-repeat", action="store_true", help="one row per group (repeat_groups=False)")
    p.add_argument("--r-max", type=int, default=8, help="region slots per row (masks are R_max x H x W)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cfg_shapes = shapes.ShapesConfig(image_size=args.image_size)
        build.build_shapes(tmp, args.examples, seed=0, heldout=0, config=cfg_shapes)
        took = time.perf_counter() - t0
        print(f"built {args.examples} shapes examples at {args.image_size}px in {took:.1f}s")
        src = tfds_builder.load_split(tmp, "train")
        for workers in args.workers:
            cfg = pipeline.PipelineConfig(
                resolution=args.resolution,
                group_size=args.group_size,
                batch_size=args.group_size * args.groups_per_batch,
                num_workers=workers,
                num_threads=args.threads,
                prefetch=4,
                r_max=args.r_max,
                repeat_groups=not args.no_repeat,
            )
            rates = [_one_run(src, cfg, args.batches) for _ in range(args.repeats)]
            med = statistics.median(rates)
            print(
                f"workers={workers} threads={args.threads} {args.image_size}->{args.resolution}px "
                f"G={args.group_size} R_max={args.r_max} repeat={not args.no_repeat}: {med:.1f} examples/s "
                f"({med * args.group_size:.1f} rows/s), "
                f"median of {args.repeats}: {', '.join(f'{r:.1f}' for r in rates)}"
            )


if __name__ == "__main__":
    main()
