"""Prints the shapes reward's scores of damaged versions of the multi-edit task's targets, at the demo's
tolerances and at the multi-edit variant's (configs/default.py:multi), and writes a PNG of the cases.

Damage is applied to the target's round trip through a pixel autoencoder (``--pool``; the variant runs 4),
what the trainer judges against: speckle (independent colour noise per pooled pixel), a mosaic like the
demo's sampler leaves (colour noise per 8x8 block), blocky (pooled) images, blur, and smeared shapes.
Scores are means over 8 examples on 0..1.

    python benchmarks/shapes_reward_damage.py [--pool 4] [--out /tmp/damage.png]
"""

import argparse
import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from sfgrpo import builders
from sfgrpo.data import shapes
from sfgrpo.models.tiny import PixelAutoencoder, images_to_uint8
from sfgrpo.rewards import reward_config
from sfgrpo.rewards.synthetic import shapes_scores

ROOT = Path(__file__).resolve().parents[1]

SIZE, B = 128, 8
POOL = 2  # set from --pool


def _pooled(images: np.ndarray, pool: int) -> np.ndarray:
    """(B, S, S, 3) float images through a pool-``pool`` pixel autoencoder."""
    ae = PixelAutoencoder(pool=pool)
    return np.asarray(ae.decode(ae.encode(jnp.asarray(images)), (SIZE // 16, SIZE // 16)))


def _multi_variant():
    """configs/default.py:multi: the task and the tolerances measured here."""
    spec = importlib.util.spec_from_file_location("default", ROOT / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("multi")


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    return gaussian_filter(images, (0, sigma, sigma, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="write the first two examples' cases to this PNG")
    parser.add_argument("--pool", type=int, default=2, help="the autoencoder's pooling (and shape_margin)")
    args = parser.parse_args()
    global POOL
    POOL = args.pool
    variant = _multi_variant()
    tolerances = {
        "demo": {},
        "multi": {**dict(reward_config.shapes_reward_options(variant.reward)), "shape_margin": POOL},
    }
    cfg = builders.shapes_config(variant)
    recs = [shapes.generate(i, seed=0, config=cfg) for i in range(B)]
    masks = np.stack([[r.mask for r in rec.regions] for rec in recs])
    boxes = np.asarray([[r.box for r in rec.regions] for rec in recs], np.float32)
    valid = np.ones(masks.shape[:2], bool)
    source = _pooled(np.stack([r.source for r in recs]).astype(np.float32) / 255, POOL)
    target = _pooled(np.stack([r.target for r in recs]).astype(np.float32) / 255, POOL)
    raw_target = np.stack([r.target for r in recs]).astype(np.float32) / 255
    rng = np.random.default_rng(0)

    def speckle(sigma: float, block: int) -> np.ndarray:
        noise = rng.normal(0, sigma, (B, SIZE // block, SIZE // block, 3)).astype(np.float32)
        return target + noise.repeat(block, 1).repeat(block, 2)

    in_shape = masks.any(1)[..., None]
    cases = {
        "faithful round trip": target,
        "speckle std 0.01": speckle(0.01, POOL),
        "speckle std 0.02": speckle(0.02, POOL),
        "speckle std 0.04": speckle(0.04, POOL),
        "speckle std 0.06": speckle(0.06, POOL),
        "mosaic std 0.06 (8 px blocks, demo-like)": speckle(0.06, 8),
        "blocky: pooled 4 px": _pooled(raw_target, 4),
        "blocky: pooled 8 px": _pooled(raw_target, 8),
        "blocky: pooled 16 px": _pooled(raw_target, 16),
        "blurred (sigma 2.5 px)": _blur(target, 2.5),
        "shapes smeared (blur 3 px inside)": np.where(in_shape, _blur(target, 3.0), target),
        "no edit (the source)": source,
    }
    fields = ("success", "preserve", "background", "naturalness", "overall_preserve")
    for name, tol in tolerances.items():
        print(f"\ntolerances: {name} {tol or '(shapes_scores defaults)'}")
        print(f"{'case':42s}" + "".join(f"{f[:10]:>11s}" for f in fields))
        for case, edited in cases.items():
            s = shapes_scores(jnp.asarray(edited, jnp.float32), source, target, masks, boxes, valid, **tol)
            row = "".join(f"{float(np.mean(np.asarray(getattr(s, f)))) / 25:11.3f}" for f in fields)
            print(f"{case:42s}{row}")
    if args.out:
        rows = [
            np.concatenate(
                [
                    np.pad(images_to_uint8(c[b]), ((2, 2), (2, 2), (0, 0)), constant_values=255)
                    for c in cases.values()
                ],
                1,
            )
            for b in range(2)
        ]
        Image.fromarray(np.concatenate(rows, 0)).save(args.out)
        print(f"\nwrote {args.out}: columns in the order above")


if __name__ == "__main__":
    main()
