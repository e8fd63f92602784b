"""The untouched shapes' interior error of every edit in a shapes evaluation, as the kept term measures it.

    python docs/credit_study/kept_shapes/kept_errors.py [--by-example] RUN EVAL_DIR [EVAL_DIR ...]

RUN is the training run whose config made the examples (its data settings and autoencoder pool); each
EVAL_DIR is a ``python -m sfgrpo.evaluate --benchmark shapes:test:N`` folder of that task. Per edit whose
example leaves a shape alone: the mean |edit - source| over the untouched shapes' interiors, the pixels
``sfgrpo.rewards.synthetic.untouched_shapes`` selects (saturation 0.25, eroded by half the run's
shape_margin, as ``shapes_scores`` does),
against the autoencoder's round trip of the source, as the trainer's reward judges. Prints a histogram per
folder; the choice of kept_floor and kept_tol sits in the gap between faithful and damaged shapes.
With ``--by-example`` (an evaluation with several noise seeds per example), it also prints how often an
example's untouched shape is damaged (error > 0.12) under every seed, some, or none: whether the noise
or the example decides it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from sfgrpo import builders, trained
from sfgrpo.data import shapes
from sfgrpo.models.tiny import PixelAutoencoder
from sfgrpo.rewards.reward_config import shapes_reward_options
from sfgrpo.rewards.synthetic import _box_pixels, _dilate, untouched_shapes

SATURATION = 0.25
BINS = (0.0, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.2, 0.3, 0.5, 1.0)


def kept_errors_by_edit(run: Path, evaluation: Path) -> list[tuple[str, float]]:
    """(example key, error) per edit with an untouched shape: its interiors' mean absolute error against the
    source, [0, 1]; a key repeats once per noise seed."""
    config = trained.read_config(run)
    task = builders.shapes_config(config)
    margin = int(dict(shapes_reward_options(config.reward))["shape_margin"])
    ae = PixelAutoencoder(pool=int(config.model.pixel_pool))

    def interiors(key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The round-tripped source (H, W, 3) and its untouched shapes' interiors (H, W) bool, or None."""
        _, split, seed, index = key.rsplit("-", 3)
        rec = shapes.generate(int(index), split=split, seed=int(seed), config=task)
        if len(rec.meta["shapes"]) == len(rec.regions):
            return None  # every shape is edited
        size = rec.source.shape[0]
        source = ae.decode(ae.encode(jnp.asarray(rec.source[None])), ae.grid(size, size))
        masks = jnp.asarray(np.stack([r.mask for r in rec.regions])[None])
        boxes = jnp.asarray(np.asarray([r.box for r in rec.regions], np.float32)[None])
        edited_area = jnp.any(_box_pixels(boxes, (size, size)) | _dilate(masks, margin), axis=1)
        kept = np.asarray(untouched_shapes(source, edited_area, SATURATION, (margin + 1) // 2))[0]
        # An untouched shape too small to keep an interior counts as none.
        return (np.asarray(source)[0], kept) if kept.any() else None

    by_key: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}  # one per example, not per noise seed
    errors = []
    for line in (evaluation / "scores.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["key"] not in by_key:
            by_key[row["key"]] = interiors(row["key"])
        if by_key[row["key"]] is None:
            continue
        source, kept = by_key[row["key"]]
        edit = np.asarray(Image.open(evaluation / row["edit"]).convert("RGB"), np.float32) / 255.0
        errors.append((row["key"], float(np.abs(edit - source).mean(-1)[kept].mean())))
    return errors


def damage_by_example(by_edit: list[tuple[str, float]]) -> dict[str, int]:
    """Examples whose untouched shape is damaged (error > 0.12) under all their seeds, some, or none."""
    damaged: dict[str, list[bool]] = {}
    for key, error in by_edit:
        damaged.setdefault(key, []).append(error > 0.12)
    return {
        "all": sum(all(d) for d in damaged.values()),
        "some": sum(any(d) and not all(d) for d in damaged.values()),
        "none": sum(not any(d) for d in damaged.values()),
    }


def main(argv: list[str]) -> None:
    by_example = "--by-example" in argv
    argv = [a for a in argv if a != "--by-example"]
    if len(argv) < 2:
        sys.exit(__doc__)
    run = Path(argv[0])
    print("bins: " + " ".join(f"{b:g}" for b in BINS))
    for folder in map(Path, argv[1:]):
        by_edit = kept_errors_by_edit(run, folder)
        errors = np.asarray([error for _, error in by_edit])
        counts = np.histogram(errors, bins=BINS)[0]
        print(
            f"{folder.name}: {len(errors)} edits with an untouched shape; under 0.04: "
            f"{np.mean(errors < 0.04):.2f}, over 0.12: {np.mean(errors > 0.12):.2f}; counts {counts.tolist()}"
        )
        if by_example:
            split = damage_by_example(by_edit)
            print(f"{folder.name}: examples damaged under all / some / none of their seeds: {split}")


if __name__ == "__main__":
    main(sys.argv[1:])
