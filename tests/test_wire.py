"""The reward wire format: exact JSON round trips, and malformed bodies refused with the field named."""

import base64
import io
import json

import numpy as np
import PIL.Image
import pytest
from fake_vlm import ShapesOracle, edited_variants, request_from_examples

from sfgrpo.data.shapes import ShapesConfig, ShapesSource
from sfgrpo.rewards.base import HostScores
from sfgrpo.rewards.wire import BadRequest, image_from_b64, png_b64, request_from_json, request_to_json

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
