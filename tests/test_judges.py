"""The benchmark judges (sfgrpo.evaluation.judges) against a fake judge that scores from pixels.

tests/fake_edit_judge.py answers each protocol's call in its JSON, with scores computed from the images it
receives, and plays scripted answers and faults; it counts requests, so the cache tests can assert that a
rerun sends nothing.
"""

import json
import math
import socket

import numpy as np
import PIL.Image
import pytest
from fake_edit_judge import (
    FakeEditJudge,
    imgedit_scores,
    pixel_measures,
    quality_measures,
    regions_scores,
    viescore_scores,
)

from sfgrpo.evaluation.judge_prompts import IMGEDIT_RUBRICS, default_prompts, load_prompts, prompts_sha256
from sfgrpo.evaluation.judges import BenchmarkJudge, EndpointDown, JudgeItem, region_entries, to_row_fields
from sfgrpo.rewards.vlm import QUALITY_PROMPT, semantic_prompt


def picture(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth (H, W, 3) uint8 picture: colour ramps and a disc, different per seed."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([x / w * 200 + 20, y / h * 180 + 40, np.full_like(x, (seed * 53) % 200 + 30)], axis=-1)
    disc = (x - w * (0.3 + 0.1 * (seed % 4))) ** 2 + (y - h * 0.5) ** 2 < (min(h, w) / 5) ** 2
    img[disc] = [230, 40 + 20 * (seed % 5), 60]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def edit(source: np.ndarray, box: tuple[float, float, float, float], colour=(20, 200, 240)) -> np.ndarray:
    """``source`` with the box (x1, y1, x2, y2 in [0, 1]) painted ``colour``."""
    h, w = source.shape[:2]
    out = source.copy()
    x1, y1, x2, y2 = box
    out[int(y1 * h) : int(np.ceil(y2 * h)), int(x1 * w) : int(np.ceil(x2 * w))] = colour
    return out


def items(n: int, h: int = 32, w: int = 40, task_type: str = "replace") -> list[JudgeItem]:
    out = []
    for i in range(n):
        src = picture(h, w, i)
        box = (0.1, 0.1, 0.3 + 0.15 * (i % 5), 0.6)
        out.append(JudgeItem(f"ex{i}", f"paint the area {i} blue", task_type, src, edit(src, box)))
    return out


def region_item(key: str = "r0") -> JudgeItem:
    src = picture(40, 50, 3)
    boxes = np.array([[0.1, 0.2, 0.5, 0.6], [0.6, 0.1, 0.9, 0.4]])
    edited = edit(src, tuple(boxes[0]))
    return JudgeItem(key, "paint the disc blue", "adjust", src, edited, boxes, ("disc", "corner"))


def judge(protocol: str, fake: FakeEditJudge, tmp_path, *, url=None, model=None, **options) -> BenchmarkJudge:
    """A judge of ``fake`` (or of ``url``, ``model``): quick test settings, ``options`` over them."""
    settings = dict(
        max_tokens=256,
        timeout_s=5.0,
        retries=1,
        backoff_s=0.01,
        max_concurrency=2,
        cache_dir=tmp_path / "cache",
    )
    settings.update(options)
    return BenchmarkJudge(protocol, url or fake.url, model or fake.model, **settings)


@pytest.fixture
def fake():
    with FakeEditJudge() as server:
        yield server


# ---------------------------------------------------------------------------------------------- viescore


def test_viescore_takes_the_min_of_each_pair_and_the_geometric_mean(fake, tmp_path):
    fake.fault("answer", only="viescore_semantics", text='{"score": [7, 4], "reasoning": "over-edited"}')
    fake.fault("answer", only="viescore_quality", text='Fine.\n```json\n{"score": ["9", 6.5]}\n```')
    with judge("viescore", fake, tmp_path) as j:
        [result] = j.score(items(1))
    assert result.failure is None
    assert result.scores == {
        "semantics": 4.0,
        "quality": 6.5,
        "success": 7.0,
        "overediting": 4.0,
        "naturalness": 9.0,
        "artifacts": 6.5,
    }
    assert result.overall == pytest.approx(math.sqrt(4.0 * 6.5))
    row = to_row_fields(result)
    assert row["overall"] == pytest.approx(math.sqrt(26.0)) and row["failure"] is None
    assert row["scores"]["semantics"] == 4.0
    assert row["judge"]["answers"]["semantics"] == '{"score": [7, 4], "reasoning": "over-edited"}'
    assert set(row["judge"]["answers"]) == {"semantics", "quality"}
    json.dumps(row)  # a row is plain JSON


def test_viescore_scores_follow_the_pixels(fake, tmp_path):
    batch = items(5)
    with judge("viescore", fake, tmp_path, max_concurrency=3) as j:
        results = j.score(batch)
    for item, result in zip(batch, results, strict=True):
        m = pixel_measures(item.source, item.edited)
        success, overediting = viescore_scores(m, "viescore_semantics")
        naturalness, artifacts = (int(round(10 * v)) for v in quality_measures(item.edited))
        assert result.scores["success"] == success and result.scores["overediting"] == overediting
        assert result.scores["naturalness"] == naturalness and result.scores["artifacts"] == artifacts
        sc, pq = min(success, overediting), min(naturalness, artifacts)
        assert result.overall == pytest.approx(math.sqrt(sc * pq))
    # the edits differ in size, so the judge's success scores do too
    assert len({r.scores["success"] for r in results}) > 1


def test_viescore_sends_the_edit_at_the_source_size(fake, tmp_path):
    src = picture(48, 64, 1)
    edited = picture(30, 36, 2)  # another size, as a policy at its own resolution makes
    item = JudgeItem("big", "change it", "style", src, edited)
    with judge("viescore", fake, tmp_path) as j:
        j.score([item])
    [semantics] = fake.of_kind("viescore_semantics")
    [quality] = fake.of_kind("viescore_quality")
    assert semantics.sizes == [(48, 64), (48, 64)] and quality.sizes == [(48, 64)]
    lanczos = np.asarray(PIL.Image.fromarray(edited).resize((64, 48), PIL.Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(semantics.images[0], src)
    np.testing.assert_array_equal(semantics.images[1], lanczos)
    np.testing.assert_array_equal(quality.images[0], lanczos)
    assert "Instruction: change it" in semantics.text


def test_imgedit_sends_both_images_at_their_own_sizes(fake, tmp_path):
    src, edited = picture(48, 64, 1), picture(30, 36, 2)
    with judge("imgedit", fake, tmp_path) as j:
        j.score([JudgeItem("a", "restyle", "style", src, edited)])
    assert fake.of_kind("imgedit")[0].sizes == [(48, 64), (30, 36)]


# ---------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    "fault, text, reason",
    [
        ("malformed", "", "unparsable"),
        ("out_of_range", "", "out_of_range"),
        ("answer", "I cannot judge this edit.", "unparsable"),
        ("answer", '{"score": [11, 3]}', "out_of_range"),
        ("answer", '{"score": [-1, 3]}', "out_of_range"),
        ("answer", '{"score": [true, 3]}', "unparsable"),
        ("answer", '{"score": [3]}', "unparsable"),
        ("answer", '{"score": ["high", 3]}', "unparsable"),
    ],
)
def test_a_bad_answer_fails_its_item_only(fake, tmp_path, fault, text, reason):
    fake.fault(fault, times=1, only="viescore_semantics", text=text)
    with judge("viescore", fake, tmp_path, max_concurrency=1) as j:
        results = j.score(items(3))
    bad, *good = results
    assert bad.failure[0] == reason and bad.failure[1].startswith("semantics: ")
    assert bad.overall is None and bad.scores == {}
    assert set(bad.answers) == {"semantics", "quality"}  # what the judge said stays visible
    row = to_row_fields(bad)
    assert row["scores"] == {} and row["overall"] is None
    assert row["failure"] == {"reason": reason, "message": bad.failure[1]}
    assert all(r.failure is None and r.overall is not None for r in good)


def test_a_500_is_retried(fake, tmp_path):
    fake.fault("http_500", times=1)
    with judge("viescore", fake, tmp_path, retries=2) as j:
        results = j.score(items(3))
    assert all(r.failure is None for r in results)
    assert fake.requests == 6 + 1 and fake.answered == 6


def test_a_request_failing_after_its_retries_fails_its_item_and_is_asked_again_on_rerun(fake, tmp_path):
    fake.fault("http_500", times=2, only="viescore_semantics")  # the first request and its one retry
    with judge("viescore", fake, tmp_path, retries=1, max_concurrency=1) as j:
        first = j.score(items(3))
    assert first[0].failure[0] == "http_error" and "HTTP 500" in first[0].failure[1]
    assert first[0].overall is None and "quality" in first[0].answers
    assert all(r.failure is None for r in first[1:])
    before = fake.requests
    with judge("viescore", fake, tmp_path, retries=1) as j:
        second = j.score(items(3))
    assert fake.requests == before + 1  # only the lost request
    assert all(r.failure is None for r in second)
    assert [r.overall for r in second[1:]] == [r.overall for r in first[1:]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_endpoint_stops_the_evaluation_and_a_rerun_resumes(fake, tmp_path):
    batch = items(6)
    with judge("viescore", fake, tmp_path) as j:
        j.score(batch[:2])
        fake.fault("die")
        with pytest.raises(EndpointDown, match=r"failed 3 requests in a row.*rerun to resume"):
            j.score(batch)
    with FakeEditJudge() as revived, judge("viescore", revived, tmp_path) as j:
        results = j.score(batch)  # another URL, the same model: the cached answers still count
        assert revived.requests == 2 * 4
    assert all(r.failure is None for r in results)


def test_check_names_a_dead_endpoint_or_a_missing_model(fake, tmp_path):
    with judge("viescore", fake, tmp_path) as j:
        j.check()
    quick = dict(max_tokens=8, retries=0, max_concurrency=1)
    wrong = judge(
        "viescore", fake, tmp_path, model="another-model", timeout_s=5, cache_dir=tmp_path / "c2", **quick
    )
    with wrong, pytest.raises(ValueError, match="does not serve 'another-model'"):
        wrong.check()
    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    dead = judge(
        "viescore", fake, tmp_path, url=dead_url, model="m", timeout_s=2, cache_dir=tmp_path / "c3", **quick
    )
    with dead, pytest.raises(EndpointDown, match="not answering"):
        dead.check()


# ---------------------------------------------------------------------------------------------- cache


def test_a_rerun_makes_no_request_and_a_torn_cache_line_is_asked_again(fake, tmp_path):
    batch = items(3)
    seen = []
    with judge("viescore", fake, tmp_path) as j:
        first = j.score(batch, progress=lambda done, total: seen.append((done, total)))
    assert fake.requests == 6 and seen[-1] == (3, 3) and len(seen) == 3
    with judge("viescore", fake, tmp_path) as j:
        again = j.score(batch, progress=lambda done, total: seen.append((done, total)))
    assert fake.requests == 6  # nothing sent
    assert seen[-1] == (3, 3)
    assert [r.overall for r in again] == [r.overall for r in first]
    assert [r.answers for r in again] == [r.answers for r in first]

    cache = tmp_path / "cache" / "answers.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    assert len(lines) == 6
    cache.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    with judge("viescore", fake, tmp_path) as j:
        resumed = j.score(batch)
    assert fake.requests == 7  # only the torn answer
    assert [r.overall for r in resumed] == [r.overall for r in first]
    with judge("viescore", fake, tmp_path) as j:
        j.score(batch)
    assert fake.requests == 7


@pytest.mark.parametrize(
    "change",
    [
        {"max_tokens": 300},
        {"temperature": 0.5},
        {"prompts": {"viescore": {"quality": 'Rate it. {"score": [naturalness, artifacts]}'}}},
    ],
)
def test_the_cache_key_holds_the_request_settings(fake, tmp_path, change):
    batch = items(2)
    with judge("viescore", fake, tmp_path) as j:
        j.score(batch)
    assert fake.requests == 4
    with judge("viescore", fake, tmp_path, **change) as j:
        j.score(batch)
    assert fake.requests == (6 if "prompts" in change else 8)  # a new quality prompt: only those calls


def test_another_edit_is_asked_again(fake, tmp_path):
    batch = items(2)
    with judge("viescore", fake, tmp_path) as j:
        j.score(batch)
        other = JudgeItem("ex0", batch[0].instruction, "replace", batch[0].source, batch[1].edited[:, ::-1])
        j.score([other])
    assert fake.requests == 4 + 2


# ---------------------------------------------------------------------------------------------- imgedit


def test_imgedit_averages_three_scores_with_the_edit_types_rubric(fake, tmp_path):
    fake.fault("answer", text='Ok. {"score": [5, 3, "4"], "reasoning": "removed, slight smear"}')
    batch = [*items(1, task_type="remove"), *items(1, task_type="Alter")]
    with judge("imgedit", fake, tmp_path, max_concurrency=1) as j:
        results = j.score(batch)
    for r in results:
        assert r.scores == {"compliance": 5.0, "edit_quality": 3.0, "preservation": 4.0}
        assert r.overall == pytest.approx(4.0) and set(r.answers) == {"edit"}
    remove, alter = (r.text for r in fake.of_kind("imgedit"))
    assert IMGEDIT_RUBRICS["remove"] in remove and 'of type "remove"' in remove
    assert IMGEDIT_RUBRICS["adjust"] in alter and 'of type "alter"' in alter  # alter is adjust's alias
    assert "Instruction: paint the area 0 blue" in remove


def test_imgedit_scores_follow_the_pixels(fake, tmp_path):
    batch = items(4, task_type="add")
    with judge("imgedit", fake, tmp_path) as j:
        results = j.score(batch)
    for item, r in zip(batch, results, strict=True):
        expected = imgedit_scores(pixel_measures(item.source, item.edited))
        assert list(r.scores.values()) == expected
        assert r.overall == pytest.approx(sum(expected) / 3)


def test_imgedit_rejects_an_unknown_edit_type_before_asking(fake, tmp_path):
    batch = [*items(2, task_type="add"), *items(1, task_type="teleport")]
    with judge("imgedit", fake, tmp_path) as j:
        with pytest.raises(
            ValueError, match=r"'ex0'.*edit type 'teleport'.*known types: \[.*'add'.*'hybrid'"
        ):
            j.score(batch)
        with pytest.raises(ValueError, match="teleport"):
            j.check_example("x", "teleport", 0)
        j.check_example("x", "hybrid", 0)
    assert fake.requests == 0
    prompts = {"imgedit": {"rubrics": {"teleport": "The subject moves elsewhere; {instruction}"}}}
    with judge("imgedit", fake, tmp_path, prompts=prompts) as j:
        j.score(batch)
    # Requests run concurrently: the teleport one is any of them, not necessarily the last.
    texts = [r.text for r in fake.of_kind("imgedit")]
    assert any("The subject moves elsewhere; paint the area 0 blue" in t for t in texts)


# ---------------------------------------------------------------------------------------------- regions


def test_regions_scores_by_hand(fake, tmp_path):
    semantic = {
        "edit_region": [
            {"id": 1, "label": "disc", "bbox_2d": [100, 200, 500, 600], "score": [24, 20], "reasoning": "ok"},
            {
                "id": 2,
                "label": "corner",
                "bbox_2d": [600, 100, 900, 400],
                "score": [10, 25],
                "reasoning": "no",
            },
        ],
        "background": {"score": 22, "reasoning": "kept"},
        "overall_score": [15, 21],
    }
    fake.fault("answer", only="regions_semantics", text=json.dumps(semantic))
    fake.fault("answer", only="regions_quality", text='{"score": [20, 23]}')
    item = region_item()
    with judge("regions", fake, tmp_path) as j:
        [r] = j.score([item])
    # C = 25: region 1 succeeds (24 >= 0.8 C = 20), region 2 does not
    aes = min(20, 23)
    expected_region = np.mean([math.sqrt(min(24, 20) * aes) / 25, math.sqrt(min(10, 25) * aes) / 25])
    assert r.failure is None
    assert r.scores["region_success_rate"] == 0.5
    assert r.scores["multi_region_success"] == 0.0
    assert r.scores["background_preservation"] == pytest.approx(22 / 25)
    assert r.scores["region_reward"] == pytest.approx(expected_region, rel=1e-6)  # (0.8 + 0.5657) / 2
    assert r.overall == pytest.approx(math.sqrt(min(15, 21) * aes) / 25, rel=1e-6)
    # the training judge's own prompts, the regions on the 0..1000 grid
    regions = region_entries(item.boxes, item.labels)
    assert regions == [
        {"id": 1, "label": "disc", "bbox_2d": [100, 200, 500, 600]},
        {"id": 2, "label": "corner", "bbox_2d": [600, 100, 900, 400]},
    ]
    [sem] = fake.of_kind("regions_semantics")
    [qual] = fake.of_kind("regions_quality")
    assert sem.text == semantic_prompt(item.instruction, regions, 25.0)
    assert qual.text == QUALITY_PROMPT.format(scale=25.0)
    assert sem.sizes == qual.sizes == [(40, 50), (40, 50)]


def test_regions_all_succeeding(fake, tmp_path):
    semantic = {
        "edit_region": [{"id": k, "score": [21, 25]} for k in (1, 2)],
        "background": {"score": 25},
        "overall_score": [25, 25],
    }
    fake.fault("answer", only="regions_semantics", text=json.dumps(semantic))
    fake.fault("answer", only="regions_quality", text='{"score": [25, 25]}')
    with judge("regions", fake, tmp_path) as j:
        [r] = j.score([region_item()])
    assert r.scores["region_success_rate"] == 1.0 and r.scores["multi_region_success"] == 1.0
    assert r.overall == pytest.approx(1.0)


def test_regions_scores_follow_the_pixels_in_the_boxes(fake, tmp_path):
    item = region_item()  # the first box painted over, the second left alone
    with judge("regions", fake, tmp_path) as j:
        [r] = j.score([item])
    s = regions_scores(item.source, item.edited, region_entries(item.boxes, item.labels), 25.0)
    assert s["success"][0] >= 20 and s["success"][1] == 0.0 and s["background"] == 25.0
    assert r.scores["region_success_rate"] == 0.5 and r.scores["multi_region_success"] == 0.0
    assert r.scores["background_preservation"] == 1.0
    aes = min(s["quality"])
    phi = [min(a, b) for a, b in zip(s["success"], s["preserve"], strict=True)]
    assert r.scores["region_reward"] == pytest.approx(
        np.mean([math.sqrt(p * aes) / 25 for p in phi]), rel=1e-5
    )
    assert r.overall == pytest.approx(math.sqrt(min(s["overall"]) * aes) / 25, rel=1e-5)


def test_regions_answer_missing_a_region_fails_the_item(fake, tmp_path):
    semantic = {
        "edit_region": [{"id": 1, "score": [21, 25]}],
        "background": {"score": 25},
        "overall_score": [25, 25],
    }
    fake.fault("answer", only="regions_semantics", text=json.dumps(semantic))
    with judge("regions", fake, tmp_path) as j:
        [r] = j.score([region_item()])
    assert r.failure[0] == "missing_region" and r.failure[1].startswith("semantics: ") and r.overall is None


def test_regions_needs_regions(fake, tmp_path):
    with judge("regions", fake, tmp_path) as j:
        with pytest.raises(ValueError, match="item 'ex1' has no edit regions"):
            j.score([region_item(), items(2)[1]])
    assert fake.requests == 0


# ---------------------------------------------------------------------------------------------- prompts


def test_custom_prompts_are_used_and_recorded(fake, tmp_path):
    custom = 'CUSTOM: did "{instruction}" happen? {"score": [instruction_success, over_editing]}'
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"viescore": {"semantics": custom}}))
    prompts = load_prompts(path)
    with judge("viescore", fake, tmp_path, prompts=prompts) as j:
        [r] = j.score(items(1))
        described = j.describe()
    assert r.failure is None
    [sem] = fake.of_kind("viescore_semantics")
    assert sem.text == custom.replace("{instruction}", "paint the area 0 blue")
    assert described["prompts"] == {"semantics": custom, "quality": default_prompts()["viescore"]["quality"]}
    assert described["prompts_sha256"] == prompts_sha256(described["prompts"])
    assert described["prompts_sha256"] != prompts_sha256(default_prompts()["viescore"])


def test_an_instruction_holding_a_placeholder_is_not_filled_twice(fake, tmp_path):
    src = picture(32, 40, 0)
    item = JudgeItem(
        "odd", "write {rubric} and {edit_type} on it", "add", src, edit(src, (0.1, 0.1, 0.5, 0.5))
    )
    with judge("imgedit", fake, tmp_path) as j:
        j.score([item])
    assert "Instruction: write {rubric} and {edit_type} on it" in fake.of_kind("imgedit")[0].text


def test_describe(fake, tmp_path):
    with judge("regions", fake, tmp_path, api_key="secret", temperature=0.0) as j:
        d = j.describe()
    assert d["protocol"] == "regions" and d["url"] == fake.url and d["model"] == fake.model
    assert d["temperature"] == 0.0 and d["max_tokens"] == 256 and d["score_range"] == [0.0, 25.0]
    assert d["prompts"] == default_prompts()["regions"]
    assert "secret" not in json.dumps(d)


# ---------------------------------------------------------------------------------------------- inputs


def test_bad_items_and_settings_are_named(fake, tmp_path):
    src = picture(8, 8, 0)
    with pytest.raises(ValueError, match=r"JudgeItem 'k': edited must be an \(H, W, 3\) uint8"):
        JudgeItem("k", "i", "t", src, src.astype(np.float32))
    with pytest.raises(ValueError, match=r"JudgeItem 'k': boxes must be \(x1, y1, x2, y2\) in \[0, 1\]"):
        JudgeItem("k", "i", "t", src, src, np.array([[0.0, 0.0, 1.5, 1.0]]), ("a",))
    with pytest.raises(ValueError, match="JudgeItem 'k': every box needs x1 < x2"):
        JudgeItem("k", "i", "t", src, src, np.array([[0.5, 0.0, 0.5, 1.0]]), ("a",))
    with pytest.raises(ValueError, match="JudgeItem 'k': labels must be 1 strings"):
        JudgeItem("k", "i", "t", src, src, np.array([[0.0, 0.0, 0.5, 1.0]]))
    with pytest.raises(ValueError, match="protocol: unknown 'gedit'"):
        judge("gedit", fake, tmp_path)
    with pytest.raises(ValueError, match="max_concurrency: expected an integer >= 1"):
        judge("viescore", fake, tmp_path, max_concurrency=0)
