"""Hostile PNGs for the reward server's tests: tiny files that declare (and decode to) huge images."""

import base64
import struct
import zlib


def zero_png(width, height, *, mask=False):
    """A valid all-zero PNG (RGB, or 1-bit with ``mask``) built without holding its pixels: each run of
    rows is deflated once and repeated (a full flush makes the blocks independent), so a 10000 x 10000
    image costs ~300 KB and milliseconds. Decodes to ``width * height * (1 if mask else 3)`` bytes."""
    row = 1 + ((width + 7) // 8 if mask else 3 * width)  # the filter byte, then the pixels
    rows = next(k for k in range(min(height, 4096), 0, -1) if height % k == 0 and row * k <= 4 << 20)
    c = zlib.compressobj(9)
    first = c.compress(bytes(row * rows)) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(bytes(row * rows)) + c.flush(zlib.Z_FULL_FLUSH)
    assert first[2:] == again  # the same block after the zlib header
    total = row * height  # adler32 of n zero bytes: a = 1, b = n mod 65521
    idat = first + again * (height // rows - 1) + b"\x03\x00" + ((total % 65521) << 16 | 1).to_bytes(4, "big")
    ihdr = struct.pack(">IIBBBBB", width, height, 1 if mask else 8, 0 if mask else 2, 0, 0, 0)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()
