"""Tests for sfgrpo.data.shapes: determinism, exact masks/boxes/targets, the grammar and its vocabulary."""

import numpy as np
import pytest

from sfgrpo.data import shapes
from sfgrpo.data.records import validate_record


def _same(a, b):
    return (
        a.id == b.id
        and a.instruction == b.instruction
        and np.array_equal(a.source, b.source)
        and np.array_equal(a.target, b.target)
        and [r.box for r in a.regions] == [r.box for r in b.regions]
        and all(np.array_equal(x.mask, y.mask) for x, y in zip(a.regions, b.regions, strict=True))
    )


def test_deterministic_by_split_seed_index():
    cfg = shapes.ShapesConfig(image_size=32)
    for i in range(5):
        assert _same(shapes.generate(i, seed=3, config=cfg), shapes.generate(i, seed=3, config=cfg))
    # Regenerating one index alone equals reading it from a source.
    assert _same(shapes.ShapesSource(10, seed=3, config=cfg)[7], shapes.generate(7, seed=3, config=cfg))


def test_seeds_indices_and_heldout_split_differ():
    cfg = shapes.ShapesConfig(image_size=32)
    base = shapes.generate(0, seed=0, config=cfg).source
    assert not np.array_equal(base, shapes.generate(0, seed=1, config=cfg).source)
    assert not np.array_equal(base, shapes.generate(1, seed=0, config=cfg).source)
    train = {shapes.generate(i, split="train", config=cfg).source.tobytes() for i in range(20)}
    test = {shapes.generate(i, split="test", config=cfg).source.tobytes() for i in range(20)}
    assert not train & test
    with pytest.raises(ValueError, match="split"):
        shapes.generate(0, split="validation")


@pytest.mark.parametrize("size", [32, 64, 128])
def test_masks_boxes_and_target_are_exact(size):
    cfg = shapes.ShapesConfig(image_size=size)
    for i in range(12):
        rec = validate_record(shapes.generate(i, config=cfg))
        assert rec.source.shape == rec.target.shape == (size, size, 3)
        assert 1 <= len(rec.regions) <= 3 and rec.has_masks
        union = np.zeros((size, size), bool)
        for region in rec.regions:
            mask = region.mask
            assert mask.any()
            # The box is the tight box of the mask, in [0, 1] units.
            ys, xs = np.nonzero(mask)
            assert region.box == (
                xs.min() / size,
                ys.min() / size,
                (xs.max() + 1) / size,
                (ys.max() + 1) / size,
            )
            # A flat-coloured shape: one colour inside the mask, in source and in target.
            assert len(np.unique(rec.source[mask], axis=0)) == 1
            assert len(np.unique(rec.target[mask], axis=0)) >= 1
            assert not np.array_equal(rec.source[mask], rec.target[mask])
            union |= mask
        # The edit changes every region and nothing outside them.
        np.testing.assert_array_equal(rec.source[~union], rec.target[~union])
        # Each region's label names a shape mentioned in the instruction.
        for region in rec.regions:
            assert f"the {region.label}" in rec.instruction


def test_instructions_use_only_the_vocabulary_and_fit_max_words():
    cfg = shapes.ShapesConfig(image_size=32)
    vocab = set(shapes.VOCAB)
    seen = set()
    for i in range(200):
        text = shapes.generate(i, config=cfg).instruction
        words = text.split()
        assert set(words) <= vocab, text
        assert len(words) <= shapes.max_words(cfg)
        seen.update(words)
        ids = shapes.tokenize(text, shapes.max_words(cfg))
        assert ids.dtype == np.int32 and (ids[: len(words)] > 1).all() and (ids[len(words) :] == 0).all()
    # The grammar's variety shows up: all verbs, shapes and removal.
    assert {"make", "turn", "paint", "change", "remove", "circle", "square", "triangle", "and"} <= seen
    assert shapes.tokenize("make the dog red", 6)[2] == shapes.VOCAB.index("<unk>")
    with pytest.raises(ValueError, match="max_len"):
        shapes.tokenize("make the circle red", 3)


def test_example_from_issue_grammar():
    # "make the circle red and the square blue" is in the language: one verb, clauses joined by "and".
    texts = {shapes.generate(i, config=shapes.ShapesConfig(image_size=32)).instruction for i in range(300)}
    assert any(t.startswith("make the ") and " and the " in t for t in texts)


def test_config_validation():
    with pytest.raises(ValueError, match="image_size"):
        shapes.ShapesConfig(image_size=8)
    with pytest.raises(ValueError, match="max_edits"):
        shapes.ShapesConfig(max_edits=4)
    with pytest.raises(ValueError, match="unknown"):
        shapes.ShapesConfig(colours=("red", "mauve"))
