"""Tests for ``python -m sfgrpo.data.annotate``: the grounding VLM on loopback end to end (through
``sfgrpo.data.build``), broken answers, a failing judge, the cache across reruns and a killed run, and bad
arguments. The annotated folder in a training run: tests/test_annotate_train.py."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fake_vlm import FakeGroundingVLM, ShapesOracle
from helpers import ROOT
from test_annotate_run import shapes_folder

from sfgrpo.data import annotate, build, tfds_builder
from sfgrpo.data.annotate_run import CACHE_DIR
from sfgrpo.data.region_diff import box_iou

SIZE = 48


def _vlm_args(tmp_path, url, *extra, out="out"):
    return [
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / out),
        "--method",
        "vlm",
        "--judge-url",
        url,
        "--judge-model",
        "fake-shapes-judge",
        "--box-format",
        "qwen1000",
        "--retries",
        "1",
        "--backoff-s",
        "0.01",
        *extra,
    ]


@pytest.fixture()
def grounding(tmp_path):
    records = shapes_folder(tmp_path / "in", 8, size=SIZE, seed=2)
    with FakeGroundingVLM(ShapesOracle.from_records(records, SIZE)) as server:
        yield server, records


def test_vlm_regions_through_build_and_a_free_rerun(tmp_path, grounding, monkeypatch):
    server, records = grounding
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    args = _vlm_args(
        tmp_path, server.url, "--concurrency", "4", "--preview", "4", "--api-key-env", "MY_JUDGE_KEY"
    )
    report = annotate.main(args)
    assert (report.annotated, report.failed, report.written, report.requests) == (8, 0, 8, 8)
    assert server.grounding_requests == 8 and server.authorization == "Bearer sk-test"
    assert (tmp_path / "out" / "preview.png").stat().st_size > 0

    # Through the dataset builder, and back: labels as the VLM gave them, boxes covering the shapes.
    built = build.build_from_folder(str(tmp_path / "out"), str(tmp_path / "data"), "qwen1000")
    assert built.num_examples == {"train": 8} and built.skipped == 0
    split = tfds_builder.load_split(str(tmp_path / "data"), "train")
    got = {r.id: r for r in (tfds_builder.example_to_record(split[i]) for i in range(len(split)))}
    ious = []
    for rec in records:
        back = got[rec.id]
        assert [r.label for r in back.regions] == [r.label for r in rec.regions]
        assert back.meta["annotation"]["method"] == "vlm" and len(
            back.meta["annotation"]["confidence"]
        ) == len(rec.regions)
        for a, t in zip(back.regions, rec.regions, strict=True):
            assert a.box[0] <= t.box[0] + 1e-6 and a.box[1] <= t.box[1] + 1e-6  # covers the true box
            assert a.box[2] >= t.box[2] - 1e-6 and a.box[3] >= t.box[3] - 1e-6
            ious.append(box_iou(a.box, t.box))
    print(f"VLM (fake) boxes vs true boxes, {SIZE} px, {len(ious)} regions: IoU mean {np.mean(ious):.4f}")
    assert min(ious) > 0.9

    # A rerun costs nothing and writes the same; a changed prompt asks again.
    written = (tmp_path / "out" / "metadata.jsonl").read_text()
    again = annotate.main(args)
    assert (again.from_cache, again.requests, server.grounding_requests) == (8, 0, 8)
    assert (tmp_path / "out" / "metadata.jsonl").read_text() == written
    prompt = tmp_path / "prompt.txt"
    prompt.write_text('Instruction: {instruction}\nAnswer [{"bbox_2d": [x1, y1, x2, y2], "label": "..."}].')
    third = annotate.main([*args, "--prompt", str(prompt)])
    assert (third.annotated, third.requests, server.grounding_requests) == (8, 8, 16)


def test_broken_answers_are_reported_never_guessed(tmp_path, grounding):
    server, records = grounding
    server.ground_fault("malformed", times=1)  # with one request at a time, the first record gets them
    server.ground_fault("too_many", times=1)
    args = _vlm_args(tmp_path, server.url, "--concurrency", "1", "--max-regions", "3")
    assert annotate.cli(args) == 1
    failures = [json.loads(t) for t in open(tmp_path / "out" / "failures.jsonl")]
    assert [(f["id"], f["reason"]) for f in failures] == [
        (records[0].id, "unparsable"),
        (records[1].id, "too_many_regions"),
    ]
    assert not (tmp_path / "out" / "metadata.jsonl").exists()
    report = annotate.main([*args, "--skip-failed"])  # the broken answers are cached: no new request
    assert (report.written, report.failed, report.requests) == (6, 2, 0)
    assert [json.loads(t)["id"] for t in open(report.metadata)] == [r.id for r in records[2:]]


def test_a_judge_that_fails_stops_the_run_and_says_how_to_resume(tmp_path, grounding, capsys):
    server, _ = grounding
    server.ground_fault("http_500")
    assert annotate.cli(_vlm_args(tmp_path, server.url, "--concurrency", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "HTTP 500" in err and "rerun the same command to resume" in err


def test_resume_after_a_kill(tmp_path, grounding):
    server, records = grounding
    server.ground_fault("slow", delay_s=0.25)  # every answer takes a while, so the kill lands mid-run
    args = _vlm_args(tmp_path, server.url, "--concurrency", "2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfgrpo.data.annotate", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    answers = tmp_path / "out" / CACHE_DIR / "answers.jsonl"
    try:
        deadline = time.monotonic() + 60
        while not (answers.exists() and answers.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "out" / "metadata.jsonl").exists()
    cached = 0
    for text in answers.read_text().splitlines():  # a torn last line does not count
        try:
            cached += "answer" in json.loads(text)
        except json.JSONDecodeError:
            pass
    assert 3 <= cached < len(records)
    server.clear_faults()
    sent = server.grounding_requests
    report = annotate.main(args)
    assert report.from_cache == cached and report.requests == len(records) - cached == report.annotated
    assert server.grounding_requests - sent == len(records) - cached and report.written == len(records)
    assert annotate.main(args).requests == 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("no method", "the following arguments are required: --method"),
        ("not a number", "argument --max-regions: invalid int value: 'many'"),
        ("no input", "--input .*: not a folder"),
        ("no metadata", "has no metadata.jsonl"),
        ("output is a file", "is a file"),
        ("output is input", "is the input folder"),
        ("output inside input", "lies inside --input"),
        ("foreign output", "was not written by this command"),
        ("vlm without judge", "needs --judge-url and --judge-model"),
        ("judge option with diff", "--judge-url is an option of the other method"),
        ("diff option with vlm", "--diff-threshold is an option of the other method"),
        ("prompt missing", "--prompt .*: cannot read it"),
        ("prompt without instruction", "no {instruction} placeholder"),
        ("key variable unset", "'NO_SUCH_KEY_VAR' is not set"),
        ("max regions 0", "--max-regions must be >= 1"),
        ("bad threshold", "threshold must be in"),
        ("unserved model", "does not serve 'nope'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, grounding, capsys, case, message):
    server, _ = grounding
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "prompt.txt").write_text("Find the regions.")
    vlm = _vlm_args(tmp_path, server.url)
    diff = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--method", "diff"]
    diff += ["--box-format", "unit"]
    argv = {
        "no method": [*diff[:4], *diff[6:]],
        "not a number": [*diff, "--max-regions", "many"],
        "no input": [*diff[:1], str(tmp_path / "nope"), *diff[2:]],
        "no metadata": [*diff[:1], str(tmp_path / "empty"), *diff[2:]],
        "output is a file": [*diff[:3], str(tmp_path / "file"), *diff[4:]],
        "output is input": [*diff[:3], str(tmp_path / "in"), *diff[4:]],
        "output inside input": [*diff[:3], str(tmp_path / "in" / "sub"), *diff[4:]],
        "foreign output": [*diff[:3], str(tmp_path / "foreign"), *diff[4:]],
        "vlm without judge": [*diff[:5], "vlm", *diff[6:]],
        "judge option with diff": [*diff, "--judge-url", server.url],
        "diff option with vlm": [*vlm, "--diff-threshold", "10"],
        "prompt missing": [*vlm, "--prompt", str(tmp_path / "none.txt")],
        "prompt without instruction": [*vlm, "--prompt", str(tmp_path / "prompt.txt")],
        "key variable unset": [*vlm, "--api-key-env", "NO_SUCH_KEY_VAR"],
        "max regions 0": [*diff, "--max-regions", "0"],
        "bad threshold": [*diff, "--diff-threshold", "300"],
        "unserved model": [*vlm[:9], "nope", *vlm[10:]],
    }[case]
    assert annotate.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert re.search(message, err[0]), err[0]
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"  # nothing written over
    assert sorted(os.listdir(tmp_path / "in")) == ["img", "metadata.jsonl"]


def test_command_line_error_without_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sfgrpo.data.annotate",
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "o"),
        ]
        + ["--method", "diff", "--box-format", "unit"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip() == f"error: --input {tmp_path}: has no metadata.jsonl"
