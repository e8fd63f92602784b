"""Tests for the annotation preview grid: where the panels, boxes, labels and masks land."""

import numpy as np
import pytest

from sfgrpo.data.annotate_preview import CAPTION, COLOURS, PAD, box_on_panel, mask_image, preview_grid
from sfgrpo.data.records import EditRecord, Region


def _record(target=True, masks=True):
    src = np.full((32, 32, 3), 100, np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:16, 4:20] = True
    region = Region(box=(4 / 32, 8 / 32, 20 / 32, 16 / 32), label="cup", mask=mask if masks else None)
    return EditRecord(
        id="r1",
        source=src,
        instruction="make the cup red",
        regions=(region,),
        target=np.full_like(src, 50) if target else None,
    )


def test_grid_layout_boxes_and_masks():
    grid = preview_grid([_record(), _record(target=False, masks=False)], panel=128)
    side = 128  # 32 px images at scale 4; the label fits above the box
    assert grid.shape == (CAPTION + 2 * (CAPTION + side + PAD) + PAD, 4 * PAD + 3 * side, 3)
    top = 2 * CAPTION  # the first row's panels
    left, t, right, bottom = box_on_panel(_record().regions[0].box, side, side)
    assert (left, t, right, bottom) == (16, 32, 79, 63)
    red = np.asarray(COLOURS[0])
    for col in range(3):  # the box outline is drawn on the source, target and mask panels
        x0 = PAD + col * (side + PAD)
        np.testing.assert_array_equal(grid[top + bottom, x0 + (left + right) // 2], red)
        np.testing.assert_array_equal(grid[top + (t + bottom) // 2, x0 + right], red)
    # Inside the box: the source as it is, the target as it is, the mask in the region's colour.
    inside_y, inside_x = top + t + 8, (left + right) // 2
    np.testing.assert_array_equal(grid[inside_y, PAD + inside_x], [100, 100, 100])
    np.testing.assert_array_equal(grid[inside_y, 2 * PAD + side + inside_x], [50, 50, 50])
    np.testing.assert_array_equal(grid[inside_y, 3 * PAD + 2 * side + inside_x], red)
    # Outside the box on the mask panel: the dimmed source.
    np.testing.assert_array_equal(grid[top + side - 2, 3 * PAD + 2 * side + 2], [33, 33, 33])
    # The second record has neither target nor masks: grey panels.
    second = top + side + PAD + CAPTION
    for col in (1, 2):
        x0 = PAD + col * (side + PAD)
        np.testing.assert_array_equal(grid[second + side - 2, x0 + 2], [80, 80, 80])


def test_mask_image_and_empty_input():
    img = mask_image(_record())
    assert img.dtype == np.uint8 and tuple(img[10, 10]) == COLOURS[0] and tuple(img[0, 0]) == (33, 33, 33)
    with pytest.raises(ValueError, match="no records"):
        preview_grid([])
