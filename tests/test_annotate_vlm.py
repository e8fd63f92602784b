"""Tests for the grounding VLM's prompt, answer parser, request and answer cache (fake VLM on loopback)."""

import json

import numpy as np
import pytest
from fake_vlm import GROUNDING_FAULTS, FakeGroundingVLM, ShapesOracle, grounding_answer, grounding_boxes

from sfgrpo.data import annotate_vlm as av
from sfgrpo.data import shapes
from sfgrpo.data.region_diff import RegionError

BOX = {"bbox_2d": [100, 200, 300, 400], "label": "cup"}


@pytest.mark.parametrize(
    "answer",
    [
        f"```json\n{json.dumps([BOX])}\n```",  # Qwen-VL's own format, fenced
        json.dumps({"regions": [BOX]}),
        "The cup is here: " + json.dumps({"edit_region": [{"id": 1, **BOX}]}) + " That is all.",
        json.dumps(BOX),  # one region, bare
        json.dumps({"regions": [{"label": "cup", "bbox_2d": ["100", " 200", "300.0", "400"]}]}),  # strings
        # A reasoning block with braces and a wrong draft, then the answer.
        '<think>Boxes are {x1, y1, x2, y2}. Draft: [{"bbox_2d": [0, 0, 5, 5], "label": "no"}]</think>\n'
        + json.dumps([BOX]),
        "only its closing tag, the template opened it</think>" + json.dumps([BOX]),
        # A model that corrects itself: the last region list wins; plain arrays of numbers are not answers.
        json.dumps([{"bbox_2d": [1, 1, 2, 2], "label": "x"}]) + " no, [1, 2] wait: " + json.dumps([BOX]),
    ],
)
def test_parses_the_answers_vlms_give(answer):
    (region,) = av.parse_grounding(answer, max_regions=8)
    assert region.label == "cup" and region.box == (100, 200, 300, 400)


def test_confidence_is_read_or_left_unknown():
    text = json.dumps([{**BOX, "confidence": "0.75"}, {**BOX, "label": "saucer"}])
    got = av.parse_grounding(text, max_regions=8)
    assert [r.confidence for r in got] == [0.75, None] and [r.label for r in got] == ["cup", "saucer"]


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("I see no cup.", "unparsable"),
        ('{"regions": [{"bbox_2d": [1, 2, 3, 4], "label": "cup"}', "unparsable"),  # cut off
        # Cut off in the second region: the first one alone must not pass for the answer.
        ('{"regions": [{"bbox_2d": [1, 2, 3, 4], "label": "cup"}, {"bbox_2d": [5, 6', "unparsable"),
        # Broken JSON around a valid list: nothing is taken from inside it.
        ('{"regions": [{"bbox_2d": [1, 2, 3, 4], "label": "cup"}] oops}', "unparsable"),
        ("<think>still thinking about {the cup", "unparsable"),
        ('[{"bbox_2d": [1, 2, 3], "label": "cup"}]', "unparsable"),
        ('[{"bbox_2d": [1, 2, "three", 4], "label": "cup"}]', "unparsable"),
        ('[{"label": "cup"}]', "unparsable"),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "cup", "confidence": 90}]', "unparsable"),
        ('{"regions": []}', "no_region"),
        ('[{"bbox_2d": [0, 0, 1200, 40], "label": "cup"}]', "box_outside"),
        ('[{"bbox_2d": [-5, 0, 10, 40], "label": "cup"}]', "box_outside"),
        ('[{"bbox_2d": [50, 0, 50, 40], "label": "cup"}]', "empty_box"),
        ('[{"bbox_2d": [60, 0, 50, 40], "label": "cup"}]', "empty_box"),
        ('[{"bbox_2d": [1, 2, 3, 4]}]', "unlabelled"),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "  "}]', "unlabelled"),
        (json.dumps([BOX] * 3), "too_many_regions"),
    ],
)
def test_unusable_answers_fail_with_their_reason(answer, reason):
    with pytest.raises(RegionError) as info:
        av.parse_grounding(answer, max_regions=2)
    assert info.value.reason == reason


def test_prompt_template():
    prompt = av.fill_prompt(av.GROUNDING_PROMPT, "make the cup red", 4)
    assert "Instruction: make the cup red" in prompt and "At most 4" in prompt
    assert '{"regions": [{"label"' in prompt  # JSON braces of the template are kept as they are
    custom = av.fill_prompt('Find {instruction}; answer {"x": 1}', "the cup", 8)
    assert custom == 'Find the cup; answer {"x": 1}'
    with pytest.raises(ValueError, match="my.txt: the prompt template has no {instruction}"):
        av.check_template("Find the regions.", "my.txt")


def test_cache_key_changes_with_each_part():
    img = np.zeros((8, 8, 3), np.uint8)
    base = dict(image=img, instruction="a", model="m", prompt="p", max_tokens=10, temperature=0.0)
    key = av.cache_key(**base)
    assert av.cache_key(**base) == key
    other = img.copy()
    other[0, 0, 0] = 1
    for change in (
        {"image": other},
        {"image": np.zeros((4, 16, 3), np.uint8)},  # same bytes, another shape
        {"instruction": "b"},
        {"model": "n"},
        {"prompt": "q"},
        {"temperature": 0.5},
    ):
        assert av.cache_key(**{**base, **change}) != key, change


def test_image_for_request_scales_down_only():
    img = np.zeros((40, 100, 3), np.uint8)
    assert av.image_for_request(img, 0) is img and av.image_for_request(img, 100) is img
    assert av.image_for_request(img, 50).shape == (20, 50, 3)


def test_answer_cache_survives_a_torn_last_line(tmp_path):
    cache = av.AnswerCache(str(tmp_path))
    cache.put("k1", "answer one", id="a")
    cache.put("k2", "answer two")
    cache.close()
    with open(tmp_path / "answers.jsonl", "a") as f:
        f.write('{"key": "k3", "answ')  # the process was killed mid-line
    again = av.AnswerCache(str(tmp_path))
    assert (again.get("k1"), again.get("k2"), again.get("k3"), len(again), again.torn) == (
        "answer one",
        "answer two",
        None,
        2,
        1,
    )
    again.put("k3", "answer three")  # starts on a fresh line
    again.close()
    third = av.AnswerCache(str(tmp_path))
    assert third.get("k3") == "answer three" and len(third) == 3
    third.close()


# ---------------------------------------------------------------------------------------------- loopback

SIZE = 48


@pytest.fixture(scope="module")
def vlm():
    records = list(shapes.ShapesSource(6, seed=1, config=shapes.ShapesConfig(image_size=SIZE)))
    with FakeGroundingVLM(ShapesOracle.from_records(records, SIZE)) as server:
        yield server, records


def _client(url, **kw):
    opts = dict(timeout_s=5.0, retries=1, backoff_s=0.01, max_concurrency=2)
    return av.GroundingClient(url, "fake-shapes-judge", **{**opts, **kw})


def _prompt(rec):
    return av.fill_prompt(av.GROUNDING_PROMPT, rec.instruction, 8)


def test_fake_vlm_grounds_the_shapes_in_every_style(vlm):
    server, records = vlm
    client = _client(server.url)
    client.check()
    for rec in records:
        for _ in range(3):  # the fake rotates through its three answer styles
            found = av.parse_grounding(client.ask(rec.source, _prompt(rec)), 8)
            assert [r.label for r in found] == [r.label for r in rec.regions]
            for r, truth in zip(found, rec.regions, strict=True):
                x1, y1, x2, y2 = (v / 1000 for v in r.box)
                t = truth.box  # the fake's boxes are the true ones rounded outwards on the 0..1000 grid
                assert x1 <= t[0] < x1 + 1e-3 and y1 <= t[1] < y1 + 1e-3
                assert x2 - 1e-3 < t[2] <= x2 and y2 - 1e-3 < t[3] <= y2


@pytest.mark.parametrize("fault", [f for f in GROUNDING_FAULTS if f not in ("slow", "die", "http_500")])
def test_broken_answers_fail_the_record(vlm, fault):
    server, records = vlm
    rec = records[0]
    server.ground_fault(fault, times=1)
    client = _client(server.url)
    with pytest.raises(RegionError) as info:
        av.parse_grounding(client.ask(rec.source, _prompt(rec)), 3)
    expected = {
        "malformed": "unparsable",
        "prose": "unparsable",
        "think_unclosed": "unparsable",
        "no_region": "no_region",
        "box_outside": "box_outside",
        "too_many": "too_many_regions",
        "unlabelled": "unlabelled",
        "http_400": "request_rejected",
    }
    assert info.value.reason == expected[fault]


def test_a_failing_endpoint_stops_the_run(vlm):
    server, records = vlm
    server.ground_fault("http_500", times=2)  # the first try and its one retry
    with pytest.raises(av.EndpointDown, match="HTTP 500"):
        _client(server.url).ask(records[0].source, _prompt(records[0]))
    with pytest.raises(av.EndpointDown, match="not answering"):
        _client("http://127.0.0.1:9/v1", retries=0).check()
    with pytest.raises(ValueError, match="does not serve 'other'"):
        av.GroundingClient(
            server.url, "other", timeout_s=5, retries=0, backoff_s=0, max_concurrency=1
        ).check()


def test_unknown_images_and_wrong_prompts_are_refused_by_the_fake(vlm):
    server, records = vlm
    client = _client(server.url)
    with pytest.raises(RegionError, match="request_rejected"):
        client.ask(np.zeros((SIZE, SIZE, 3), np.uint8), _prompt(records[0]))
    with pytest.raises(RegionError, match="lacks the instruction"):
        client.ask(records[0].source, "Find the regions.")


def test_grounding_answer_styles_parse_to_the_fake_boxes(vlm):
    server, _ = vlm
    example = next(iter(server.oracle.examples.values()))
    for style in range(3):
        found = av.parse_grounding(grounding_answer(example, style), 8)
        assert [list(r.box) for r in found] == grounding_boxes(example)
