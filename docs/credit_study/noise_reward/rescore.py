"""Re-scores saved held-out edits with the shapes reward, with and without its local-noise term.

Usage: python docs/credit_study/noise_reward/rescore.py HELDOUT_DIR [HELDOUT_DIR ...] --workdir RUN
Each HELDOUT_DIR is one policy's ``credit_heldout`` output (scores.jsonl and images/); RUN is a training
run whose config gives the benchmark (``shapes:test:N``) and the reward's tolerances. Prints, per folder,
the mean global reward, naturalness (0..1) and excess gradient without and with the noise term, and for
every folder after the first its reward's difference from the first folder's (the base), edit by edit, with
a 95% normal interval over the edits (the folders must hold the same examples).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from sfgrpo.evaluation.benchmarks import read_benchmark
from sfgrpo.models.tiny import PixelAutoencoder
from sfgrpo.rewards.base import ScoreRequest, score_rewards
from sfgrpo.rewards.reward_config import shapes_reward_options
from sfgrpo.rewards.server import make_shapes_reward
from sfgrpo.rewards.synthetic import excess_gradient
from sfgrpo.trained import read_config

NOISE = {"noise_floor": 0.002, "noise_tol": 0.011}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heldout", nargs="+", type=Path)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--examples", type=int, default=512)
    args = parser.parse_args()
    config = read_config(args.workdir)
    bench = read_benchmark(f"shapes:test:{args.examples}", run_config=config)
    by_key = {e.key: e for e in bench.examples}
    pool = int(config.model.pixel_pool)
    base = dict(shapes_reward_options(config.reward))
    base.update(noise_floor=0.0, noise_tol=0.0)
    rewards = {
        "without": make_shapes_reward(pool=pool, **base),
        "with": make_shapes_reward(pool=pool, **{**base, **NOISE}),
    }
    print(f"noise term: {NOISE}; other tolerances {base}; pool {pool}")
    first: dict[str, np.ndarray] = {}
    for folder in args.heldout:
        rows = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
        rows.sort(key=lambda r: (r["key"], r["seed"]))
        examples = [by_key[r["key"]] for r in rows]
        edited = np.stack([np.asarray(Image.open(folder / r["edit"]).convert("RGB")) for r in rows])
        r_max = max(len(e.boxes) for e in examples)
        boxes = np.zeros((len(rows), r_max, 4), np.float32)
        valid = np.zeros((len(rows), r_max), bool)
        masks = np.zeros((len(rows), r_max, *edited.shape[1:3]), bool)
        for i, e in enumerate(examples):
            n = len(e.boxes)
            boxes[i, :n], valid[i, :n], masks[i, :n] = e.boxes, True, e.masks
        request = ScoreRequest(
            source=np.stack([e.source for e in examples]),
            edited=edited,
            instructions=[e.instruction for e in examples],
            boxes=boxes,
            region_valid=valid,
            region_labels=np.full(valid.shape, "", object),
            target=np.stack([e.target for e in examples]),
            region_masks=masks,
        )
        line = [folder.name]
        for name, reward in rewards.items():
            scores = reward(request).region_scores()
            image = np.asarray(score_rewards(scores, valid).image)
            line.append(
                f"{name}: reward {image.mean():.3f}, naturalness {scores.naturalness.mean() / 25:.3f}"
            )
            if name in first:
                diff = image - first[name]
                half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
                line.append(f"{name} - first: {diff.mean():+.3f} ± {half:.3f}")
            else:
                first[name] = image
        # The reward's own reference: the autoencoder's round trip of source and target.
        ae = PixelAutoencoder(pool=pool)
        grid = ae.grid(*edited.shape[1:3])
        source, target = (ae.decode(ae.encode(x), grid) for x in (request.source, request.target))
        excess = excess_gradient(edited / 255.0, source, target)
        line.append(f"excess gradient {float(np.mean(excess)):.4f}")
        print(" | ".join(line))


if __name__ == "__main__":
    main()
