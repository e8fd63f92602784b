"""The JSON reward server on loopback: the shapes reward over HTTP equals the in-graph one; clear errors."""

import base64
import io
import json
import logging
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import PIL.Image
import pytest
from fake_vlm import ShapesOracle, edited_variants, request_from_examples, wait_for_line

from sfgrpo.data.shapes import ShapesConfig, ShapesSource
from sfgrpo.models.tiny import PixelAutoencoder
from sfgrpo.rewards.base import HostScores, RegionScores, RewardError, score_rewards
from sfgrpo.rewards.remote import ServerJudge
from sfgrpo.rewards.server import RewardServer, register_reward, registered_rewards, serve_in_thread
from sfgrpo.rewards.synthetic import shapes_scores
from sfgrpo.rewards.wire import request_to_json

RES, R_MAX = 64, 3
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def examples():
    source = ShapesSource(16, split="train", seed=7, config=ShapesConfig(image_size=RES))
    return list(ShapesOracle.from_records(source, RES).examples.values())[:5]


@pytest.fixture(scope="module")
def request_(examples):
    return request_from_examples(examples, edited_variants(examples), R_MAX)


def _judge(url, **over):
    kw = dict(scale=25.0, timeout_s=30.0, retries=1, backoff_s=0.01, on_failure="fail")
    return ServerJudge(url, **{**kw, **over})


def _in_graph(req, pool=0):
    source, target = req.source, req.target
    if pool:
        ae = PixelAutoencoder(pool=pool)
        grid = ae.grid(RES, RES)
        source, target = ae.decode(ae.encode(source), grid), ae.decode(ae.encode(target), grid)
    fn = jax.jit(shapes_scores)
    edited = req.edited.astype(np.float32) / 255.0
    return jax.device_get(fn(edited, source, target, req.region_masks, req.boxes, req.region_valid))


@pytest.mark.parametrize("pool", [0, 4])
def test_server_scores_equal_the_in_graph_reward(request_, pool):
    expected = _in_graph(request_, pool)
    with serve_in_thread("shapes", pool=str(pool)) as server:
        judge = _judge(server.url, request_batch=2, max_concurrency=3)  # three concurrent sub-requests
        assert judge.check()["reward"] == "shapes"
        got = judge(request_)
    assert got.valid.all() and sum(got.failures.values()) == 0
    slots = request_.region_valid
    for f in RegionScores._fields[:-1]:
        x, y = getattr(got, f), np.asarray(getattr(expected, f))
        if x.ndim == 2:
            x, y = x[slots], y[slots]
        np.testing.assert_allclose(x, y, atol=1e-5, err_msg=f)
    # The edits are graded: perfect, none, noisy, half-way, one region fixed (the pooled autoencoder's
    # round trip of the target is not the target, so the perfect edit loses a little there).
    assert got.success[0, 0] > (24.99 if pool == 0 else 20) and got.success[1, 0] < 5
    a = score_rewards(got.region_scores(), slots)
    b = score_rewards(expected, slots)
    np.testing.assert_allclose(a.region, np.where(a.region_valid, b.region, 0), atol=1e-6)
    np.testing.assert_allclose(a.image, b.image, atol=1e-6)


def _http(method, url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with _NO_PROXY.open(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _jpeg_b64():
    buf = io.BytesIO()
    PIL.Image.new("RGB", (RES, RES)).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def test_health_routes_and_clear_400s(request_):
    body = request_to_json(request_.rows(0, 2))
    bad_bodies = {
        "missing field 'edited'": {k: v for k, v in body.items() if k != "edited"},
        r"boxes: expected shape \(2, R, 4\)": {**body, "boxes": [[0.1, 0.2, 0.3, 0.4]] * 2},
        r"edited\[1\]: not valid base64": {**body, "edited": [body["edited"][0], "@@not base64@@"]},
        r"edited\[0\]: expected a PNG, got JPEG": {**body, "edited": [_jpeg_b64(), body["edited"][1]]},
        r"region_masks\[0\]: expected 3 entries": {**body, "region_masks": [[], []]},
        "needs 'target' and 'region_masks'": {k: v for k, v in body.items() if k != "target"},
        "body must be a JSON object": [1, 2],
    }
    with serve_in_thread("shapes") as server:
        status, health = _http("GET", server.url + "/health")
        assert status == 200
        assert health == {
            "status": "ok",
            "reward": "shapes",
            "version": "0.1.0",
            "protocol": 1,
            "scale": 25.0,
        }
        assert _http("GET", server.url + "/nope")[0] == 404
        status, err = _http("POST", server.url + "/nope", b"{}")
        assert status == 404 and "POST /score" in err["error"]
        status, err = _http("POST", server.url + "/score", b"{not json")
        assert status == 400 and "not valid JSON" in err["error"]
        for message, bad in bad_bodies.items():
            status, err = _http("POST", server.url + "/score", json.dumps(bad).encode())
            assert status == 400, message
            assert re.search(message, err["error"]), (message, err["error"])
        status, ok = _http("POST", server.url + "/score", json.dumps(body).encode())
        assert status == 200 and ok["reward"] == "shapes" and len(ok["scores"]["valid"]) == 2


def test_oversized_request_gets_413_and_a_clear_client_error(request_):
    with serve_in_thread("shapes", max_request_mb=0.02) as server:
        status, err = _http("POST", server.url + "/score", b"x" * 50_000)
        assert status == 413 and "exceeds the server's limit of 0.0 MiB" in err["error"]
        judge = _judge(server.url, retries=3)
        t0 = time.perf_counter()
        with pytest.raises(RewardError, match=r"HTTP 413.*send smaller batches") as info:
            judge(request_)
        assert "after 1 attempt(s)" in str(info.value)  # a 413 is final: no retries
        assert time.perf_counter() - t0 < 5
        # The client refuses to send beyond its own limit, before any transfer.
        with pytest.raises(RewardError, match=r"exceeds reward.max_request_mb=0.01"):
            _judge(server.url, max_request_mb=0.01)(request_)


def test_a_registered_host_reward_is_served(request_):
    calls = []

    @register_reward("constant-test")
    def make(scale, level="5"):
        def score(req):
            calls.append(req.batch_size)
            host = HostScores.invalid(req.batch_size, req.num_regions)
            for f in RegionScores._fields[:-1]:
                getattr(host, f)[...] = float(level)
            host.valid[...] = True
            return host

        return score

    assert "constant-test" in registered_rewards()
    with serve_in_thread("constant-test", level="7") as server:
        got = _judge(server.url)(request_)
    assert calls == [request_.batch_size]
    np.testing.assert_array_equal(got.success[request_.region_valid], 7.0)
    assert np.all(got.success[~request_.region_valid] == 0)  # padded slots carry nothing
    np.testing.assert_array_equal(got.naturalness, 7.0)


def test_non_loopback_bind_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="sfgrpo.rewards.server"):
        server = RewardServer(lambda r: None, "x", host="0.0.0.0", port=0)
        server.server_close()
    assert "any host that reaches it" in caplog.text


def test_command_line_server_serves_health():
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfgrpo.rewards.server", "--reward", "shapes", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = wait_for_line(proc, r"serving reward 'shapes' at (http://127\.0\.0\.1:\d+)", 60).group(1)
        status, health = _http("GET", url + "/health")
        assert status == 200 and health["reward"] == "shapes"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
