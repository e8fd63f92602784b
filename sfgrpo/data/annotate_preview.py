"""A PNG grid of annotated records with their region boxes and labels drawn, to check annotations by eye.

One row per record: a caption (id and instruction), then three panels: the source with every region's box
and label, the target (grey when the record has none) with the same boxes, and the regions' masks over
the dimmed source (grey when the regions have no masks). Images are scaled by a whole factor (nearest) so
their longer side is at least ``panel`` pixels; region ``k`` has colour ``k`` everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sfgrpo.data.records import EditRecord

COLOURS = ((255, 64, 64), (64, 220, 64), (64, 128, 255), (255, 220, 0), (255, 0, 255), (0, 230, 230))
_BG, _TEXT, _BLANK = (32, 32, 32), (235, 235, 235), (80, 80, 80)
PAD, CAPTION = 6, 20  # pixels between panels; height of a row's caption strip


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def box_on_panel(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """A [0, 1] box (x1, y1, x2, y2) -> inclusive pixel corners (left, top, right, bottom) on a panel."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = min(round(x1 * width), width - 1), min(round(y1 * height), height - 1)
    right, bottom = max(round(x2 * width) - 1, left), max(round(y2 * height) - 1, top)
    return left, top, right, bottom


def mask_image(record: EditRecord) -> np.ndarray:
    """(H, W, 3) uint8: the source at a third of its brightness, each region's mask pixels in its colour."""
    image = record.source // 3
    for k, region in enumerate(record.regions):
        image[region.mask] = COLOURS[k % len(COLOURS)]
    return image


def _panel(image: np.ndarray, record: EditRecord, scale: int) -> Image.Image:
    h, w = image.shape[:2]
    panel = Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(panel)
    font = _font(12)
    for k, region in enumerate(record.regions):
        colour = COLOURS[k % len(COLOURS)]
        left, top, right, bottom = box_on_panel(region.box, h * scale, w * scale)
        draw.rectangle((left, top, right, bottom), outline=colour, width=2)
        text = f"{k + 1} {region.label}"
        tw, th = draw.textbbox((0, 0), text, font=font)[2:]
        ty = top - th - 2 if top >= th + 2 else top + 2  # above the box, or inside it at the top edge
        draw.rectangle((left, ty, left + tw + 3, ty + th + 1), fill=colour)
        draw.text((left + 2, ty), text, fill=(0, 0, 0), font=font)
    return panel


def preview_grid(records: Sequence[EditRecord], panel: int = 320) -> np.ndarray:
    """A uint8 (H, W, 3) grid of ``records``: per record a caption and the source, target and mask panels."""
    if not records:
        raise ValueError("no records to preview")
    rows = []
    for rec in records:
        h, w = rec.source.shape[:2]
        scale = max(1, math.ceil(panel / max(h, w)))
        src = _panel(rec.source, rec, scale)
        blank = Image.new("RGB", src.size, _BLANK)
        tgt = _panel(rec.target, rec, scale) if rec.target is not None else blank
        masks = _panel(mask_image(rec), rec, scale) if rec.has_masks else blank
        rows.append((rec, (src, tgt, masks)))
    width = max(4 * PAD + sum(p.width for p in panels) for _, panels in rows)
    height = CAPTION + sum(CAPTION + panels[0].height + PAD for _, panels in rows) + PAD
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    x = PAD
    for title, p in zip(("source", "target", "masks"), rows[0][1], strict=True):
        draw.text((x + 2, 3), title, fill=_TEXT, font=_font(15))
        x += p.width + PAD
    y = CAPTION
    for rec, panels in rows:
        caption = f"{rec.id}: {rec.instruction}"
        caption += "" if rec.target is not None else "   (no target)"
        caption += "" if rec.has_masks else "   (no masks)"
        draw.text((PAD, y + 2), caption[:160], fill=_TEXT, font=font)
        y += CAPTION
        x = PAD
        for p in panels:
            canvas.paste(p, (x, y))
            x += p.width + PAD
        y += panels[0].height + PAD
    return np.asarray(canvas, np.uint8)


def save_preview(path: str, records: Sequence[EditRecord], panel: int = 320) -> None:
    """Writes ``preview_grid(records)`` as a PNG at ``path``."""
    Image.fromarray(preview_grid(records, panel)).save(path, format="PNG")
