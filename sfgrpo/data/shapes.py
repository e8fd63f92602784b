"""The synthetic "shapes" editing task: procedural images, instructions from a small grammar, exact targets.

Each image shows a few non-overlapping flat-coloured shapes (circle, square, triangle) on a textured grey
background. The instruction changes one to four of them (``MAX_EDITS``), e.g. "make the circle red and the
square blue" or "paint the green triangle yellow and remove the square". Because everything is drawn from
geometry, each example carries the exact target image, the exact per-region pixel masks (the edited
shape's pixels in the source) and each region's tight box. ``ShapesConfig(min_edits=K, max_edits=K)`` asks
for exactly K edits (a layout with fewer than K shapes is redrawn).

Examples are a pure function of (split, seed, index): any one can be regenerated alone. The "test" split
(held out) draws from its own seed stream, disjoint from "train" for every seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from sfgrpo.data.records import EditRecord, Region

SHAPE_TYPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated colours, far from the grey background so every shape stands out.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
    "cyan": (30, 200, 210),
}
RECOLOUR_VERBS: tuple[str, ...] = ("make", "turn", "paint", "change")
# Split -> salt mixed into every example's seed; distinct salts keep the held-out split's images apart.
SPLIT_SALTS: dict[str, int] = {"train": 0x5EED_0001, "test": 0x5EED_7E57}
MAX_EDITS = 4  # edits one instruction may ask for; the grammar's words cover any count
# Layouts drawn before an example with fewer shapes than min_edits is an error: enough that a config whose
# shapes fit only rarely fails loudly instead of silently editing fewer shapes than asked.
_PLACEMENT_TRIES = 100
PAD, UNK = "<pad>", "<unk>"
_WORDS = sorted({"the", "and", "to", "remove", *RECOLOUR_VERBS, *SHAPE_TYPES, *COLOURS})
VOCAB: tuple[str, ...] = (PAD, UNK, *_WORDS)
"""Every word the grammar uses, for a word-level text embedding; index 0 is padding, 1 unknown."""
_WORD_ID = {w: i for i, w in enumerate(VOCAB)}


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """Knobs of the task. Sizes are fractions of the image side; counts are inclusive ranges."""

    image_size: int = 64
    min_shapes: int = 2
    max_shapes: int = 4
    min_edits: int = 1
    max_edits: int = 3
    min_size: float = 0.2
    max_size: float = 0.36
    remove_prob: float = 0.2  # chance that an edit removes its shape rather than recolouring it
    # Pixels between shapes' bounding squares (along x or y). 16 or more: no 16x16 token cell touches two
    # shapes' boxes, so each region owns its tokens.
    min_gap: int = 2
    shape_types: tuple[str, ...] = SHAPE_TYPES
    colours: tuple[str, ...] = tuple(COLOURS)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {self.min_shapes}, {self.max_shapes}")
        if not 1 <= self.min_edits <= self.max_edits <= MAX_EDITS:
            raise ValueError(
                f"need 1 <= min_edits <= max_edits <= {MAX_EDITS}, got min_edits={self.min_edits}, "
                f"max_edits={self.max_edits}"
            )
        if self.min_edits > self.min_shapes:
            raise ValueError(f"min_edits ({self.min_edits}) cannot exceed min_shapes ({self.min_shapes})")
        if self.min_gap < 0:
            raise ValueError(f"min_gap must be >= 0 pixels, got {self.min_gap}")
        if not 0 < self.min_size <= self.max_size < 1:
            raise ValueError(f"need 0 < min_size <= max_size < 1, got {self.min_size}, {self.max_size}")
        unknown = set(self.shape_types) - set(SHAPE_TYPES) or set(self.colours) - set(COLOURS)
        if unknown:
            raise ValueError(f"unknown shape types or colours: {sorted(unknown)}")
        if len(self.colours) < 2:
            raise ValueError("need at least two colours, so a recolour can change something")


def max_words(config: ShapesConfig = ShapesConfig()) -> int:
    """An upper bound on the instruction length in words (for a fixed token budget)."""
    # First clause "change the red circle to blue" is 6 words; each further one "and the ... to x" too.
    return 6 * config.max_edits


def tokenize(text: str, max_len: int) -> np.ndarray:
    """Word ids of ``text`` in ``VOCAB`` (lower-cased, split on spaces), zero-padded to (max_len,) int32."""
    words = text.lower().split()
    if len(words) > max_len:
        raise ValueError(f"instruction has {len(words)} words, more than max_len={max_len}: {text!r}")
    ids = np.zeros((max_len,), np.int32)
    ids[: len(words)] = [_WORD_ID.get(w, 1) for w in words]
    return ids


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured grey background, (size, size, 3) uint8: a soft wave plus a faint checkerboard."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(105, 145)
    fx, fy = rng.uniform(0.5, 3.0, size=2)
    phase = rng.uniform(0, 2 * np.pi)
    wave = 18.0 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    period = int(rng.integers(max(2, size // 16), max(3, size // 6)))
    checker = 8.0 * ((np.arange(size)[:, None] // period + np.arange(size)[None, :] // period) % 2)
    tint = rng.uniform(-6, 6, size=3)
    grey = base + wave + checker
    return np.clip(grey[..., None] + tint, 0, 255).astype(np.uint8)


def _shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Pixels whose centres fall inside the shape; (size, size) bool. Units are pixels."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if kind == "square":
        return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    # Upward isosceles triangle: apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r).
    return (y <= cy + r) & (np.abs(x - cx) * 2 <= (y - (cy - r)))


def _tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The smallest [0, 1] box holding every True pixel of an (H, W) mask."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    y1, y2 = np.flatnonzero(rows)[[0, -1]]
    x1, x2 = np.flatnonzero(cols)[[0, -1]]
    h, w = mask.shape
    return (x1 / w, y1 / h, (x2 + 1) / w, (y2 + 1) / h)


def _place_shapes(rng: np.random.Generator, cfg: ShapesConfig) -> list[dict]:
    """Draws non-overlapping shapes with distinct (type, colour) pairs; at least one always fits."""
    size = cfg.image_size
    want = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    shapes: list[dict] = []
    taken: set[tuple[str, str]] = set()
    for _ in range(want):
        for _attempt in range(50):
            r = rng.uniform(cfg.min_size, cfg.max_size) * size / 2
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            kind = str(rng.choice(cfg.shape_types))
            colour = str(rng.choice(cfg.colours))
            if (kind, colour) in taken:
                continue
            # Keep a gap between bounding squares (2 pixels by default), so masks never touch.
            gap = cfg.min_gap
            if any(
                abs(cx - s["cx"]) < r + s["r"] + gap and abs(cy - s["cy"]) < r + s["r"] + gap for s in shapes
            ):
                continue
            taken.add((kind, colour))
            shapes.append({"type": kind, "colour": colour, "cx": cx, "cy": cy, "r": r})
            break
    return shapes


def _reference(shape: dict, shapes: list[dict]) -> str:
    """How the instruction names a shape: its type when unique in the image, else colour and type."""
    if sum(s["type"] == shape["type"] for s in shapes) == 1:
        return shape["type"]
    return f"{shape['colour']} {shape['type']}"


def _instruction(rng: np.random.Generator, edits: list[dict]) -> str:
    """Renders edits with the grammar: verb + recolour clauses joined by "and", then removals."""
    verb = str(rng.choice(RECOLOUR_VERBS))
    clauses: list[str] = []
    for e in (e for e in edits if e["edit"] == "recolour"):
        body = (
            f"the {e['ref']} to {e['new_colour']}"
            if verb == "change"
            else f"the {e['ref']} {e['new_colour']}"
        )
        clauses.append(f"{verb} {body}" if not clauses else body)
    clauses += [f"remove the {e['ref']}" for e in edits if e["edit"] == "remove"]
    return " and ".join(clauses)


def generate(
    index: int, *, split: str = "train", seed: int = 0, config: ShapesConfig = ShapesConfig()
) -> EditRecord:
    """Example ``index`` of ``split``: source and exact target (S, S, 3) uint8, regions with masks and boxes.

    Deterministic in (split, seed, index, config). Regions follow the instruction's clause order.
    """
    if split not in SPLIT_SALTS:
        raise ValueError(f"split must be one of {tuple(SPLIT_SALTS)}, got {split!r}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng([SPLIT_SALTS[split], seed, index])
    size = config.image_size
    background = _background(rng, size)
    shapes = _place_shapes(rng, config)
    # Redraw a layout that fits fewer shapes than min_edits, so that min_edits edits are exact. Draws go on
    # from the same stream: a layout that fits (always, for min_edits 1) leaves the example unchanged.
    tries = 1
    while len(shapes) < config.min_edits:
        if tries == _PLACEMENT_TRIES:
            raise ValueError(
                f"example {index} of {split!r}: {tries} layouts fit fewer than min_edits={config.min_edits} "
                f"shapes of size up to {config.max_size} with min_gap={config.min_gap} in {size} px; use "
                "smaller shapes (max_size) or a smaller gap"
            )
        shapes = _place_shapes(rng, config)
        tries += 1
    source = background.copy()
    for s in shapes:
        s["mask"] = _shape_mask(s["type"], s["cx"], s["cy"], s["r"], size)
        source[s["mask"]] = COLOURS[s["colour"]]
        s["ref"] = _reference(s, shapes)
        s["edit"], s["new_colour"] = "none", None
    n_edits = int(rng.integers(config.min_edits, min(config.max_edits, len(shapes)) + 1))
    chosen = sorted(rng.choice(len(shapes), size=n_edits, replace=False).tolist())
    target = source.copy()
    for i in chosen:
        s = shapes[i]
        if rng.random() < config.remove_prob:
            s["edit"] = "remove"
            target[s["mask"]] = background[s["mask"]]
        else:
            s["edit"] = "recolour"
            s["new_colour"] = str(rng.choice([c for c in config.colours if c != s["colour"]]))
            target[s["mask"]] = COLOURS[s["new_colour"]]
    edits = [shapes[i] for i in chosen]
    # Region order = clause order: recolours first, then removals (as _instruction renders them).
    ordered = [e for e in edits if e["edit"] == "recolour"] + [e for e in edits if e["edit"] == "remove"]
    regions = tuple(Region(box=_tight_box(e["mask"]), label=e["ref"], mask=e["mask"]) for e in ordered)
    meta = {
        "task": "shapes",
        "split": split,
        "seed": seed,
        "index": index,
        "shapes": [
            {
                "type": s["type"],
                "colour": s["colour"],
                "box": list(_tight_box(s["mask"])),
                "edit": s["edit"],
                "new_colour": s["new_colour"],
            }
            for s in shapes
        ],
    }
    return EditRecord(
        id=f"shapes-{split}-{seed}-{index}",
        source=source,
        instruction=_instruction(rng, ordered),
        regions=regions,
        target=target,
        meta=meta,
    )


class ShapesSource:
    """A random-access source of ``n`` shapes examples, generated on demand (for a pipeline or a builder)."""

    def __init__(self, n: int, *, split: str = "train", seed: int = 0, config: ShapesConfig = ShapesConfig()):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.split, self.seed, self.config = n, split, seed, config

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> EditRecord:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} examples")
        return generate(index, split=self.split, seed=self.seed, config=self.config)

    def __iter__(self) -> Iterator[EditRecord]:
        return (self[i] for i in range(self.n))
