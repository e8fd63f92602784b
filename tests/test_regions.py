"""Boxes and masks to token weights (SPEC section 6), with hypothesis property tests."""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from sfgrpo import builders
from sfgrpo.iteration import Programs
from sfgrpo.rl.regions import (
    area_share,
    box_coverage,
    mask_token_weights,
    region_token_weights,
    token_weights,
    validate_boxes,
)

unit = st.floats(0.0, 1.0, allow_nan=False, width=32)


@st.composite
def box_batches(draw):
    b = draw(st.integers(1, 3))
    r = draw(st.integers(1, 4))
    h = draw(st.integers(1, 6))
    w = draw(st.integers(1, 6))
    boxes = np.zeros((b, r, 4), np.float32)
    for i in range(b):
        for j in range(r):
            x1, x2 = sorted((draw(unit), draw(unit)))
            y1, y2 = sorted((draw(unit), draw(unit)))
            boxes[i, j] = (x1, y1, x2, y2)
    valid = np.array(draw(st.lists(st.booleans(), min_size=b * r, max_size=b * r))).reshape(b, r)
    return boxes, valid, (h, w)


@settings(max_examples=60, deadline=None)
@given(box_batches())
def test_weights_nonnegative_and_sum_to_one(batch):
    boxes, valid, grid = batch
    validate_boxes(boxes, valid, grid)
    w = np.asarray(token_weights(jnp.asarray(boxes), jnp.asarray(valid), grid))
    assert w.shape == (boxes.shape[0], boxes.shape[1] + 1, grid[0] * grid[1])
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(box_batches())
def test_padded_slots_have_zero_weight(batch):
    boxes, valid, grid = batch
    w = np.asarray(token_weights(jnp.asarray(boxes), jnp.asarray(valid), grid))
    assert np.all(w[:, :-1][~valid] == 0)


@settings(max_examples=60, deadline=None)
@given(box_batches())
def test_background_is_one_where_no_box_covers(batch):
    boxes, valid, grid = batch
    cover = np.asarray(box_coverage(jnp.asarray(boxes), grid))
    w = np.asarray(token_weights(jnp.asarray(boxes), jnp.asarray(valid), grid))
    uncovered = ~np.any((cover > 0) & valid[..., None], axis=1)
    assert np.all(w[:, -1][uncovered] == 1.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.data())
def test_box_covering_a_whole_cell_gives_weight_one(h, w, data):
    i0 = data.draw(st.integers(0, h - 1))
    i1 = data.draw(st.integers(i0, h - 1))
    j0 = data.draw(st.integers(0, w - 1))
    j1 = data.draw(st.integers(j0, w - 1))
    box = np.array([[[j0 / w, i0 / h, (j1 + 1) / w, (i1 + 1) / h]]], np.float32)
    weights = np.asarray(token_weights(jnp.asarray(box), jnp.ones((1, 1), bool), (h, w)))
    grid = weights[0, 0].reshape(h, w)
    inside = np.zeros((h, w), bool)
    inside[i0 : i1 + 1, j0 : j1 + 1] = True
    np.testing.assert_allclose(grid[inside], 1.0, atol=1e-6)
    np.testing.assert_allclose(grid[~inside], 0.0, atol=1e-6)


def test_partial_overlap_and_sharing():
    # A 2x2 grid; box A covers the left half of cell (0, 0); box B covers cell (0, 0) whole.
    boxes = jnp.array([[[0.0, 0.0, 0.25, 0.5], [0.0, 0.0, 0.5, 0.5]]])
    w = np.asarray(token_weights(boxes, jnp.ones((1, 2), bool), (2, 2)))
    # Cell (0, 0): coverage A = 0.5, B = 1, background 0 -> weights 1/3, 2/3, 0.
    np.testing.assert_allclose(w[0, :, 0], [1 / 3, 2 / 3, 0.0], atol=1e-6)
    np.testing.assert_allclose(w[0, :, 1:], [[0, 0, 0], [0, 0, 0], [1, 1, 1]], atol=1e-6)
    # A lone half-covering box shares its token with the background.
    alone = np.asarray(token_weights(boxes[:, :1], jnp.ones((1, 1), bool), (2, 2)))
    np.testing.assert_allclose(alone[0, :, 0], [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(area_share(jnp.asarray(alone))[0], [0.125, 0.875], atol=1e-6)


def test_masks_average_pool_like_boxes():
    masks = np.zeros((1, 1, 8, 8), bool)
    masks[0, 0, 0:4, 0:2] = True  # the left half of the top-left 4x4 cell
    w = np.asarray(mask_token_weights(jnp.asarray(masks), jnp.ones((1, 1), bool), (2, 2)))
    box = np.asarray(token_weights(jnp.array([[[0.0, 0.0, 0.25, 0.5]]]), jnp.ones((1, 1), bool), (2, 2)))
    np.testing.assert_allclose(w, box, atol=1e-6)
    with pytest.raises(ValueError, match="tile"):
        mask_token_weights(jnp.asarray(masks[..., :7]), jnp.ones((1, 1), bool), (2, 2))


@pytest.mark.parametrize(
    "box, message",
    [
        ([-0.1, 0.0, 0.5, 0.5], "outside"),
        ([0.0, 0.0, 1.2, 0.5], "outside"),
        ([0.6, 0.0, 0.5, 0.5], "x2 < x1"),
        ([0.0, 0.6, 0.5, 0.5], "y2 < y1"),
        ([np.nan, 0.0, 0.5, 0.5], "finite"),
    ],
)
def test_validate_rejects_bad_boxes(box, message):
    boxes = np.array([[box, [0.0, 0.0, 1.0, 1.0]]], np.float32)
    with pytest.raises(ValueError, match="boxes") as err:
        validate_boxes(boxes, np.ones((1, 2), bool), (4, 4))
    assert message in str(err.value)
    # The same box in a padded slot is not checked.
    validate_boxes(boxes, np.array([[False, True]]), (4, 4))


def test_validate_rejects_bad_shapes():
    good = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="boxes must have shape"):
        validate_boxes(good[..., :3], np.ones((2, 3), bool), (2, 2))
    with pytest.raises(ValueError, match="valid must have shape"):
        validate_boxes(good, np.ones((2, 2), bool), (2, 2))
    with pytest.raises(ValueError, match="valid must be a bool"):
        validate_boxes(good, np.ones((2, 3), np.int32), (2, 2))
    with pytest.raises(ValueError, match="grid_hw"):
        validate_boxes(good, np.ones((2, 3), bool), (0, 2))


def test_masks_where_given_and_boxes_otherwise_per_example():
    """Issue 12 item 4, SPEC section 6: with token_weights='masks', an example without pixel masks (its
    masks all False) uses its boxes, even when the other examples of the batch have masks."""
    grid = (2, 2)
    boxes = jnp.asarray([[[0.0, 0.0, 0.5, 0.5]], [[0.5, 0.0, 1.0, 1.0]]])  # (B=2, R=1, 4)
    valid = jnp.ones((2, 1), bool)
    masks = np.zeros((2, 1, 32, 32), bool)
    masks[0, 0, 16:, 16:] = True  # example 0's mask is not its box: the two must not be confused
    has_masks = jnp.asarray([True, False])
    weights = region_token_weights(boxes, jnp.asarray(masks), has_masks, valid, grid)
    np.testing.assert_allclose(weights[0], mask_token_weights(jnp.asarray(masks), valid, grid)[0])
    np.testing.assert_allclose(weights[1], token_weights(boxes, valid, grid)[1])
    np.testing.assert_allclose(weights[1, 0], [0.0, 1.0, 0.0, 1.0])  # the right column, not background


def test_device_batch_carries_has_masks():
    """The per-example choice needs ``has_masks`` on the device, next to the masks and boxes."""
    config = tiny_config()
    has = np.array([True, False] * 4)
    host = {
        "boxes": np.zeros((8, 2, 4), np.float32),
        "region_masks": np.zeros((8, 2, 32, 32), bool),
        "has_masks": has,
        "instruction": np.array(["x"] * 8, dtype=object),
    }
    out = builders.device_batch(host, builders.make_mesh(config), lambda texts: {})
    np.testing.assert_array_equal(np.asarray(out["has_masks"]), has)


def test_programs_mask_weights_fall_back_to_boxes_per_example():
    """rl.token_weights='masks' in the compiled programs: the per-example choice, from the device batch."""
    boxes = jnp.asarray([[[0.0, 0.0, 0.5, 0.5]], [[0.5, 0.0, 1.0, 1.0]]])
    masks = np.zeros((2, 1, 32, 32), bool)
    masks[0, 0, 16:, 16:] = True
    batch = {
        "boxes": boxes,
        "region_masks": jnp.asarray(masks),
        "has_masks": jnp.asarray([True, False]),
        "region_valid": jnp.ones((2, 1), bool),
    }
    weights = Programs.weights(SimpleNamespace(token_weights="masks", grid=(2, 2)), batch)
    np.testing.assert_allclose(weights[:, 0], [[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
