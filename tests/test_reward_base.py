"""Host-side score types of sfgrpo.rewards.base: validation, invalid batches, conversion, Eq. 3 on them."""

import jax.numpy as jnp
import numpy as np
import pytest

from sfgrpo.rewards.base import (
    FAILURE_REASONS,
    HostScores,
    RegionScores,
    ScoreRequest,
    no_failures,
    score_rewards,
)


def _request(b=2, r=3, h=16, w=16, **over):
    rng = np.random.default_rng(0)
    fields = dict(
        source=rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
        edited=rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
        instructions=["make the circle red"] * b,
        boxes=np.tile(np.float32([0.1, 0.2, 0.5, 0.6]), (b, r, 1)),
        region_valid=np.array([[True] * (r - 1) + [False]] * b),
        region_labels=np.array([["red circle"] * (r - 1) + [""]] * b, dtype=object),
        target=rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
        region_masks=np.zeros((b, r, h, w), bool),
    )
    fields.update(over)
    return ScoreRequest(**fields)


def test_request_accepts_the_batch_contract_and_slices_rows():
    req = _request(b=4)
    assert (req.batch_size, req.num_regions) == (4, 3)
    part = req.rows(1, 3)
    assert part.batch_size == 2 and part.instructions == req.instructions[1:3]
    np.testing.assert_array_equal(part.edited, req.edited[1:3])
    np.testing.assert_array_equal(part.region_masks, req.region_masks[1:3])
    assert _request(target=None, region_masks=None).target is None


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("edited", np.zeros((2, 16, 16, 3), np.float32), "ScoreRequest.edited"),
        ("edited", np.zeros((3, 16, 16, 3), np.uint8), "ScoreRequest.edited"),
        ("boxes", np.zeros((2, 2, 4), np.float32), "ScoreRequest.boxes"),
        ("boxes", np.full((2, 3, 4), 1.5, np.float32), "finite and in"),
        ("region_valid", np.ones((2, 3), np.int32), "ScoreRequest.region_valid"),
        ("region_masks", np.zeros((2, 3, 8, 8), bool), "ScoreRequest.region_masks"),
        ("instructions", ["only one"], "ScoreRequest.instructions"),
    ],
)
def test_request_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        _request(**{field: value})


def test_invalid_batch_is_all_zero_and_counted():
    s = HostScores.invalid(3, 2, {"batch_skipped": 3, "timeout": 3})
    assert not s.valid.any() and s.success.shape == (3, 2)
    for f in RegionScores._fields[:-1]:
        assert np.all(getattr(s, f) == 0)
    assert s.failures["batch_skipped"] == 3 and s.failures["unparsable"] == 0
    assert set(s.failures) == set(FAILURE_REASONS)


def test_host_scores_validate_shapes_and_reasons():
    ok = HostScores.invalid(2, 3)
    fields = {f: getattr(ok, f) for f in RegionScores._fields}
    with pytest.raises(ValueError, match="HostScores.preserve"):
        HostScores(**{**fields, "preserve": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="HostScores.valid"):
        HostScores(**{**fields, "valid": np.zeros((2,), np.float32)})
    with pytest.raises(ValueError, match="unknown reasons"):
        HostScores(**fields, failures={"bored": 1})


def test_from_region_scores_zeroes_invalid_images_and_feeds_eq3():
    rng = np.random.default_rng(1)
    b, r = 4, 2
    scores = RegionScores(
        success=rng.uniform(0, 25, (b, r)),
        preserve=rng.uniform(0, 25, (b, r)),
        background=rng.uniform(0, 25, b),
        naturalness=rng.uniform(0, 25, b),
        artifacts=rng.uniform(0, 25, b),
        overall_success=rng.uniform(0, 25, b),
        overall_preserve=rng.uniform(0, 25, b),
        valid=np.array([True, False, True, True]),
    )
    host = HostScores.from_region_scores(scores, {"unparsable": 1})
    assert host.failures == {**no_failures(), "unparsable": 1}
    assert np.all(host.success[1] == 0) and host.background[1] == 0
    np.testing.assert_allclose(host.success[0], scores.success[0], rtol=1e-6)
    rs = host.region_scores()
    assert rs.success.dtype == np.float32 and rs.valid.dtype == np.bool_
    region_valid = jnp.ones((b, r), bool)
    a, c = (
        score_rewards(rs, region_valid),
        score_rewards(RegionScores(*map(jnp.asarray, scores)), region_valid),
    )
    keep = np.asarray(scores.valid)
    np.testing.assert_allclose(np.asarray(a.region)[keep], np.asarray(c.region)[keep], rtol=1e-5)
    np.testing.assert_array_equal(a.image_valid, keep)
    assert not np.asarray(a.region_valid)[1].any()


def test_concatenate_adds_failures():
    a = HostScores.invalid(2, 3, {"timeout": 2})
    b = HostScores.invalid(1, 3, {"unparsable": 1})
    c = HostScores.concatenate([a, b])
    assert c.batch_size == 3 and c.failures["timeout"] == 2 and c.failures["unparsable"] == 1
