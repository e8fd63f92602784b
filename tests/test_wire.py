"""The reward wire format: exact JSON round trips, and malformed bodies refused with the field named."""

import base64
import io
import json

import numpy as np
import PIL.Image
import pytest
from fake_vlm import ShapesOracle, edited_variants, request_from_examples
from png_bomb import zero_png

from sfgrpo.data.shapes import ShapesConfig, ShapesSource
from sfgrpo.rewards.base import HostScores
from sfgrpo.rewards.wire import (
    BadRequest,
    TooLarge,
    image_from_b64,
    png_b64,
    png_size,
    request_from_json,
    request_to_json,
)

RES, R_MAX = 64, 3


@pytest.fixture(scope="module")
def request_():
    source = ShapesSource(8, split="train", seed=7, config=ShapesConfig(image_size=RES))
    examples = list(ShapesOracle.from_records(source, RES).examples.values())[:3]
    return request_from_examples(examples, edited_variants(examples), R_MAX)


def test_wire_round_trip_is_exact(request_):
    back = request_from_json(json.loads(json.dumps(request_to_json(request_))))
    for f in ("source", "edited", "target", "region_masks", "boxes", "region_valid"):
        np.testing.assert_array_equal(getattr(back, f), getattr(request_, f), err_msg=f)
    assert back.instructions == list(request_.instructions)
    assert back.region_labels.tolist() == request_.region_labels.tolist()


def test_png_round_trip_and_bad_images():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(image_from_b64(png_b64(image), "source[0]"), image)
    with pytest.raises(BadRequest, match=r"source\[0\]"):
        image_from_b64("not base64!", "source[0]")
    buf = io.BytesIO()
    PIL.Image.new("RGB", (4, 4)).save(buf, format="JPEG")
    with pytest.raises(BadRequest, match=r"edited\[1\]"):
        image_from_b64(base64.b64encode(buf.getvalue()).decode(), "edited[1]")


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda b: b.pop("edited"), "edited"),
        (lambda b: b.__setitem__("instructions", b["instructions"][:1]), "instructions"),
        (lambda b: b.__setitem__("boxes", [[[0.0, 0.0, 1.0]]] * 3), "boxes"),
        (lambda b: b.__setitem__("region_valid", "yes"), "region_valid"),
    ],
)
def test_malformed_requests_name_the_field(request_, change, field):
    body = request_to_json(request_)
    change(body)
    with pytest.raises(BadRequest, match=field):
        request_from_json(body)


def test_invalid_scores_are_all_zero_and_counted():
    s = HostScores.invalid(2, 3, {"batch_skipped": 2})
    assert not s.valid.any() and s.success.shape == (2, 3) and s.failures["batch_skipped"] == 2


def test_zero_png_decodes_to_zeros():
    np.testing.assert_array_equal(image_from_b64(zero_png(37, 20), "x"), np.zeros((20, 37, 3), np.uint8))
    np.testing.assert_array_equal(image_from_b64(zero_png(37, 20, mask=True), "x", mask=True), False)
    assert len(zero_png(10_000, 10_000)) < 400_000  # 300 MB of pixels


def test_image_size_is_read_from_the_header_and_bounded_before_decoding():
    assert png_size(zero_png(7, 5), "source[0]") == (7, 5)
    assert png_size("data:image/png;base64," + zero_png(7, 5), "source[0]") == (7, 5)
    # 20000 x 20000 is beyond Pillow's own bomb limit, whose error would not name the flag.
    for width, height in [(20_000, 20_000), (4097, 4096)]:
        with pytest.raises(
            TooLarge,
            match=rf"edited\[1\]: a {width}x{height} image .* exceeds the server's "
            rf"limit of 16777216 pixels \(--max-image-pixels\)",
        ):
            image_from_b64(zero_png(width, height), "edited[1]")
    with pytest.raises(TooLarge, match=r"region_masks\[0\]\[2\]: a 9x9 image"):
        image_from_b64(zero_png(9, 9, mask=True), "region_masks[0][2]", mask=True, max_pixels=80)
    assert image_from_b64(zero_png(4096, 4096), "source[0]").shape == (4096, 4096, 3)  # the limit itself
    with pytest.raises(BadRequest, match=r"source\[0\]: not a readable PNG \(no IHDR header\)"):
        png_size(base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(20)).decode(), "source[0]")


def test_request_images_are_bounded_in_total_before_any_is_decoded(request_):
    body = request_to_json(request_)  # 3 rows of 64 x 64: 9 images and 9 masks
    decoded = (9 * 3 + 9) * 64 * 64
    assert request_from_json(body, max_decoded_bytes=decoded).batch_size == 3
    with pytest.raises(
        TooLarge,
        match=r"the request's 18 images decode to 0.1 MiB, beyond the server's limit "
        r"of 0.1 MiB a request \(--max-decoded-mb\)",
    ):
        request_from_json(body, max_decoded_bytes=decoded - 1)
    # An image too large, even the last one, is refused before the first is decoded: a broken first
    # image would otherwise be reported first.
    bad = {**body, "source": [body["source"][0][:64], *body["source"][1:]]}  # header, no pixels
    bad["region_masks"] = [row[:] for row in body["region_masks"]]
    bad["region_masks"][2][2] = zero_png(5000, 5000, mask=True)
    with pytest.raises(TooLarge, match=r"region_masks\[2\]\[2\]: a 5000x5000 image"):
        request_from_json(bad)
    bad["region_masks"][2][2] = zero_png(64, 32, mask=True)
    with pytest.raises(
        BadRequest, match=r"region_masks\[2\]\[2\]: the mask is 32x64 \(HxW\), source\[0\] is 64x64"
    ):
        request_from_json({**body, "region_masks": bad["region_masks"]})
