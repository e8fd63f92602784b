"""The VLM judge: reading answers, and the client against a fake OpenAI-compatible judge on loopback.

The fake judge (tests/fake_vlm.py) scores each edit with the shapes scorer from the images it receives and
answers like a VLM (fences, prose, integer or float scores), so the client's scores must match the shapes
scorer's within the rounding of integer answers.
"""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from fake_vlm import FakeVLM, ShapesOracle, edited_variants, request_from_examples, wait_for_line

from sfgrpo.data.shapes import ShapesConfig, ShapesSource
from sfgrpo.models.tiny import PixelAutoencoder
from sfgrpo.rewards.base import RegionScores, RewardError
from sfgrpo.rewards.judgement import JudgementError, extract_json, parse_quality, parse_semantic
from sfgrpo.rewards.remote import RewardWorker, make_host_reward
from sfgrpo.rewards.reward_config import reward_config_defaults
from sfgrpo.rewards.synthetic import shapes_scores
from sfgrpo.rewards.vlm import region_entries

RES, R_MAX, B = 64, 3, 5
ANSWER = {
    "edit_region": [
        {"id": 1, "label": "red circle", "bbox_2d": [1, 2, 3, 4], "score": [20, 24.5], "reasoning": "ok"},
        {"id": 2, "label": "blue square", "bbox_2d": [5, 6, 7, 8], "score": ["3", 25], "reasoning": "no"},
    ],
    "background": {"score": 23, "reasoning": "kept"},
    "overall_score": [12.5, 24],
}


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "wrap",
    [
        "{}",
        "Here you go:\n```json\n{}\n```\nHope this helps.",
        "```\n{}\n```",
        "My judgement is {} -- done.",
        "Scores {{not json}} then the real one: {}",
    ],
)
def test_json_is_found_in_prose_and_fences(wrap):
    text = wrap.replace("{}", json.dumps(ANSWER, indent=1), 1) if wrap != "{}" else json.dumps(ANSWER)
    s = parse_semantic(text, [1, 2], 25.0)
    assert s.success == (20.0, 3.0) and s.preserve == (24.5, 25.0)
    assert (s.background, s.overall_success, s.overall_preserve) == (23.0, 12.5, 24.0)


def test_regions_are_matched_by_id_or_by_order():
    reordered = {**ANSWER, "edit_region": ANSWER["edit_region"][::-1]}
    assert parse_semantic(reordered, [1, 2], 25.0).success == (20.0, 3.0)
    no_ids = {
        **ANSWER,
        "edit_region": [{k: v for k, v in e.items() if k != "id"} for e in ANSWER["edit_region"]],
    }
    assert parse_semantic(no_ids, [1, 2], 25.0).success == (20.0, 3.0)
    assert parse_semantic({**ANSWER, "edit_region": []}, [], 25.0).success == ()


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("I cannot judge this image.", "unparsable"),
        ('```json\n{"edit_region": [\n```', "unparsable"),
        ({**ANSWER, "background": {"reasoning": "no score"}}, "unparsable"),
        ({**ANSWER, "overall_score": [1]}, "unparsable"),
        ({**ANSWER, "edit_region": ANSWER["edit_region"][:1]}, "missing_region"),
        ({**ANSWER, "edit_region": ANSWER["edit_region"] * 2}, "missing_region"),
        ({**ANSWER, "edit_region": [ANSWER["edit_region"][0]] * 2}, "missing_region"),
        (
            {**ANSWER, "edit_region": [{**ANSWER["edit_region"][0], "id": 7}, ANSWER["edit_region"][1]]},
            "missing_region",
        ),
        ({**ANSWER, "overall_score": [26, 3]}, "out_of_range"),
        ({**ANSWER, "background": {"score": -1}}, "out_of_range"),
        ('{"edit_region": [], "background": {"score": NaN}, "overall_score": [1, 2]}', "out_of_range"),
        ({**ANSWER, "overall_score": [True, 3]}, "unparsable"),
    ],
)
def test_bad_answers_fail_with_their_reason(answer, reason):
    ids = [] if isinstance(answer, str) and "NaN" in answer else [1, 2]
    with pytest.raises(JudgementError) as info:
        parse_semantic(answer, ids, 25.0)
    assert info.value.reason == reason


def test_quality_answer():
    assert parse_quality('Quality: ```json\n{"score": [22, 24.5]}\n```', 25.0) == (22.0, 24.5)
    with pytest.raises(JudgementError, match="out_of_range"):
        parse_quality('{"score": [22, 99]}', 25.0)
    assert extract_json('a {"x": 1} b {"y": 2}') == {"y": 2}  # no fields asked: the last object


DRAFT = {**ANSWER, "overall_score": [1, 1]}  # a draft in the reasoning: the schema's fields, other scores


@pytest.mark.parametrize(
    "text",
    [
        # The draft carries every field and the reasoning holds stray braces: only the answer counts.
        "<think>Regions {1, 2}; draft: " + json.dumps(DRAFT) + " no, {wait}.</think>\n" + json.dumps(ANSWER),
        # The chat template opened the block: only its closing tag is in the answer.
        "Draft " + json.dumps(DRAFT) + "\n</think>\n\n```json\n" + json.dumps(ANSWER, indent=1) + "\n```",
        # An object before the answer that is not the answer (a region restated), and a corrected answer.
        'Region {"id": 1, "label": "red circle"}. First ' + json.dumps(DRAFT) + " then " + json.dumps(ANSWER),
        "<THINK>{}</THINK> Scores: " + json.dumps(ANSWER) + " -- as for the format, see {the prompt}.",
    ],
)
def test_the_answer_after_a_reasoning_block_is_read(text):
    s = parse_semantic(text, [1, 2], 25.0)
    assert (s.success, s.overall_success, s.overall_preserve) == ((20.0, 3.0), 12.5, 24.0)
    quality = '<think>Maybe {"score": [3, 4]}? Artifacts {none}.</think>{"score": [22, 24.5]}'
    assert parse_quality(quality, 25.0) == (22.0, 24.5)


@pytest.mark.parametrize(
    "text, message",
    [
        ("<think>Draft " + json.dumps(ANSWER), r"'<think>' is never closed"),  # cut off by the token limit
        ("<think>Draft " + json.dumps(ANSWER) + "</think>\n  ", r"nothing after the reasoning block"),
        ("<think>a</think> " + json.dumps(ANSWER) + " <think>more", r"'<think>' is never closed"),
        ('<think>x</think> {"score": [1, 2]} {"note": 3}', r"with the fields \['edit_region'"),
        (
            "</think> " + json.dumps({k: v for k, v in ANSWER.items() if k != "background"}),
            "no 'background' field",
        ),
    ],
)
def test_a_reasoning_answer_without_a_usable_object_is_unparsable(text, message):
    with pytest.raises(JudgementError, match=message) as info:
        parse_semantic(text, [1, 2], 25.0)
    assert info.value.reason == "unparsable"


# ---------------------------------------------------------------------------------------------- client


@pytest.fixture(scope="module")
def records():
    return list(ShapesSource(12, split="train", seed=5, config=ShapesConfig(image_size=RES)))


@pytest.fixture(scope="module")
def oracle(records):
    return ShapesOracle.from_records(records, RES)


@pytest.fixture(scope="module")
def request_(oracle):
    examples = list(oracle.examples.values())[:B]
    return request_from_examples(examples, edited_variants(examples, seed=1), R_MAX)


@pytest.fixture
def vlm(oracle):
    with FakeVLM(oracle) as server:
        yield server


def _config(url, **over):
    c = reward_config_defaults()
    c.kind, c.url, c.model = "vlm", url, "fake-shapes-judge"
    c.timeout_s, c.retries, c.backoff_s, c.max_concurrency = 5.0, 1, 0.01, 4
    c.update(over)
    return c


def _expected(req, pool=0):
    source, target = req.source, req.target
    if pool:
        ae = PixelAutoencoder(pool=pool)
        grid = ae.grid(RES, RES)
        source, target = ae.decode(ae.encode(source), grid), ae.decode(ae.encode(target), grid)
    edited = req.edited.astype(np.float32) / 255.0
    return jax.device_get(
        shapes_scores(edited, source, target, req.region_masks, req.boxes, req.region_valid)
    )


def _assert_close(got, expected, slots, rows=slice(None)):
    for f in RegionScores._fields[:-1]:
        x, y = getattr(got, f)[rows], np.asarray(getattr(expected, f))[rows]
        if x.ndim == 2:
            x, y = x[slots[rows]], y[slots[rows]]
        np.testing.assert_allclose(x, y, atol=0.5 + 1e-3, err_msg=f)  # integer answers round


def test_region_entries_are_labelled_boxes_on_the_1000_grid(request_):
    entries = region_entries(request_, 0)
    k = int(request_.region_valid[0].sum())
    assert [e["id"] for e in entries] == list(range(1, k + 1))
    assert entries[0]["label"] == request_.region_labels[0, 0]
    np.testing.assert_allclose(entries[0]["bbox_2d"], request_.boxes[0, 0] * 1000, atol=0.5)


def test_vlm_scores_match_the_shapes_scorer(vlm, request_, monkeypatch):
    monkeypatch.setenv("SFGRPO_TEST_JUDGE_KEY", "secret-123")
    judge = make_host_reward(_config(vlm.url, api_key_env="SFGRPO_TEST_JUDGE_KEY"))
    got = judge(request_)
    assert got.valid.all() and sum(got.failures.values()) == 0
    assert vlm.counts == {"semantic": B, "quality": B}  # two requests per image
    assert vlm.authorization == "Bearer secret-123"
    _assert_close(got, _expected(request_), request_.region_valid)
    # Graded edits get graded scores: perfect, none, noisy, half-way, one region fixed.
    assert got.success[0, 0] > 24 and got.success[1, 0] < 5 and 5 < got.success[3, 0] < 20


def test_vlm_judges_against_the_autoencoder_round_trip(records, request_):
    with FakeVLM(ShapesOracle.from_records(records, RES, pool=4)) as vlm:
        got = make_host_reward(_config(vlm.url))(request_)
    _assert_close(got, _expected(request_, pool=4), request_.region_valid)


def test_vlm_reads_a_reasoning_judge(oracle, request_):
    with FakeVLM(oracle, reasoning=True) as server:
        got = make_host_reward(_config(server.url))(request_)
    assert got.valid.all() and sum(got.failures.values()) == 0
    _assert_close(got, _expected(request_), request_.region_valid)


def test_wrong_model_and_server_down_at_start(vlm):
    with pytest.raises(RewardError, match="does not serve model 'other'.*fake-shapes-judge"):
        make_host_reward(_config(vlm.url, model="other"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=rf"127.0.0.1:{port}/v1 is not answering.*after 3 attempt\(s\)"):
        make_host_reward(_config(f"http://127.0.0.1:{port}/v1", retries=2))
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize(
    "fault, only, reason",
    [
        ("malformed", "semantic", "unparsable"),
        ("malformed", "quality", "unparsable"),
        ("missing_region", "semantic", "missing_region"),
        ("extra_region", "semantic", "missing_region"),
        ("out_of_range", "semantic", "out_of_range"),
        ("out_of_range", "quality", "out_of_range"),
    ],
)
def test_bad_answers_invalidate_one_image_and_are_counted(vlm, request_, fault, only, reason):
    judge = make_host_reward(_config(vlm.url, max_concurrency=1))  # requests in order: image 0 first
    vlm.fault(fault, times=1, only=only)
    got = judge(request_)
    assert got.failures[reason] == 1 and sum(got.failures.values()) == 1
    assert not got.valid[0] and got.valid[1:].all()
    for f in RegionScores._fields[:-1]:
        assert np.all(getattr(got, f)[0] == 0), f  # never a default score
    _assert_close(got, _expected(request_), request_.region_valid, rows=slice(1, None))


def test_transient_5xx_is_retried(vlm, request_):
    judge = make_host_reward(_config(vlm.url, retries=2))
    vlm.fault("http_500", times=2)
    got = judge(request_)
    assert got.valid.all() and sum(got.failures.values()) == 0


@pytest.mark.parametrize("on_failure", ["fail", "skip"])
def test_persistent_5xx_fails_or_skips(vlm, request_, on_failure):
    judge = make_host_reward(_config(vlm.url, retries=2, on_failure=on_failure))
    vlm.fault("http_500")
    if on_failure == "fail":
        with pytest.raises(
            RewardError, match=r"chat/completions.*after 3 attempt\(s\): HTTP 500: internal error"
        ):
            judge(request_)
    else:
        got = judge(request_)
        assert not got.valid.any() and got.failures["batch_skipped"] == B and got.failures["http_error"] == B


@pytest.mark.parametrize("on_failure", ["fail", "skip"])
def test_slow_reply_times_out(vlm, request_, on_failure):
    judge = make_host_reward(_config(vlm.url, timeout_s=0.2, retries=1, on_failure=on_failure))
    vlm.fault("slow", delay_s=1.0)
    t0 = time.perf_counter()
    if on_failure == "fail":
        with pytest.raises(RewardError, match="no answer within 0.2 s"):
            judge(request_)
    else:
        got = judge(request_)
        assert got.failures["timeout"] == B and got.failures["batch_skipped"] == B and not got.valid.any()
    assert time.perf_counter() - t0 < 3.0  # the lost batch stops its other requests' retries


@pytest.mark.parametrize("on_failure", ["fail", "skip"])
def test_judge_dying_mid_run(vlm, request_, on_failure):
    judge = make_host_reward(_config(vlm.url, retries=2, on_failure=on_failure))
    with RewardWorker(judge, max_pending=2) as worker:
        assert worker.submit(request_).result(timeout=20).valid.all()
        vlm.fault("die", times=1)
        future = worker.submit(request_)
        if on_failure == "fail":
            with pytest.raises(RewardError, match=r"after 3 attempt\(s\)"):
                future.result(timeout=20)
        else:
            got = future.result(timeout=20)
            assert got.failures["batch_skipped"] == B and not got.valid.any()
        # Later batches meet a refused connection: the same outcome, quickly.
        t0 = time.perf_counter()
        future = worker.submit(request_)
        if on_failure == "fail":
            with pytest.raises(RewardError, match="ConnectionRefusedError"):
                future.result(timeout=20)
        else:
            assert future.result(timeout=20).failures["http_error"] == B
        assert time.perf_counter() - t0 < 3.0


def test_oversized_request_is_refused_before_sending(vlm, request_):
    judge = make_host_reward(_config(vlm.url, max_request_mb=0.001))
    with pytest.raises(RewardError, match="exceeds reward.max_request_mb=0.001"):
        judge(request_)
    assert vlm.counts == {"semantic": 0, "quality": 0}


def test_fake_judge_runs_as_a_process_for_the_demo():
    # As the lead's demo runs it: the train and test splits of a seed, judged at the pooled round trip.
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("fake_vlm.py")),
            "--port",
            "0",
            "--resolution",
            "64",
            "--pool",
            "4",
            "--seed",
            "0",
            "--train",
            "3",
            "--eval",
            "2",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = wait_for_line(proc, r"of 5 shapes examples at (http://127\.0\.0\.1:\d+/v1)", 120).group(1)
        config = ShapesConfig(image_size=RES, max_edits=3)
        records = [
            *ShapesSource(3, split="train", seed=0, config=config),
            ShapesSource(2, split="test", seed=0, config=config)[1],
        ]
        examples = list(ShapesOracle.from_records(records, RES).examples.values())
        req = request_from_examples(examples, edited_variants(examples), R_MAX)
        got = make_host_reward(_config(url))(req)
        assert got.valid.all()
        _assert_close(got, _expected(req, pool=4), req.region_valid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
