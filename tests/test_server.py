"""The JSON reward server on loopback: the shapes reward over HTTP equals the in-graph one; clear errors."""

import base64
import contextlib
import functools
import http.client
import io
import json
import logging
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import PIL.Image
import pytest
from fake_vlm import ShapesOracle, edited_variants, request_from_examples, wait_for_line
from helpers import load_config
from png_bomb import zero_png

from sfgrpo.data.shapes import ShapesConfig, ShapesSource
from sfgrpo.models.tiny import PixelAutoencoder
from sfgrpo.rewards import reward_config
from sfgrpo.rewards.base import HostScores, RegionScores, RewardError, score_rewards
from sfgrpo.rewards.remote import ServerJudge
from sfgrpo.rewards.server import RewardServer, register_reward, registered_rewards, serve_in_thread
from sfgrpo.rewards.server_limits import ServerLimits
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


def _in_graph(req, pool=0, **tolerances):
    source, target = req.source, req.target
    if pool:
        ae = PixelAutoencoder(pool=pool)
        grid = ae.grid(RES, RES)
        source, target = ae.decode(ae.encode(source), grid), ae.decode(ae.encode(target), grid)
    fn = jax.jit(functools.partial(shapes_scores, **tolerances))
    edited = req.edited.astype(np.float32) / 255.0
    return jax.device_get(fn(edited, source, target, req.region_masks, req.boxes, req.region_valid))


# The demo's tolerances (configs/default.py), which the server takes as options.
DEMO_TOLERANCES = dict(reward_config.shapes_reward_options(load_config().reward))


@pytest.mark.parametrize("pool, tolerances", [(0, {}), (4, {}), (4, DEMO_TOLERANCES)])
def test_server_scores_equal_the_in_graph_reward(request_, pool, tolerances):
    assert DEMO_TOLERANCES["preserve_floor"] < reward_config.SHAPES_DEFAULTS["preserve_floor"]
    expected = _in_graph(request_, pool, **tolerances)
    options = {k: str(v) for k, v in tolerances.items()}
    with serve_in_thread("shapes", pool=str(pool), **options) as server:
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
    with serve_in_thread("shapes", limits=ServerLimits(max_request_mb=0.02)) as server:
        status, err = _http("POST", server.url + "/score", b"x" * 50_000)
        assert (
            status == 413
            and "of 0.0477 MiB exceeds the server's limit of 0.02 MiB (--max-request-mb)" in err["error"]
        )
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


def test_command_line_server_serves_health_and_refuses_a_port_in_use():
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfgrpo.rewards.server", "--reward", "shapes", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = wait_for_line(proc, r"serving reward 'shapes' at (http://127\.0\.0\.1:\d+)", 60).group(1)
        status, health = _http("GET", url + "/health")
        assert status == 200 and health["reward"] == "shapes"
        port = url.rsplit(":", 1)[1]  # a second server on the same port: one line, status 2
        second = subprocess.run(
            [sys.executable, "-m", "sfgrpo.rewards.server", "--reward", "shapes", "--port", port],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr == (
            f"python -m sfgrpo.rewards.server: error: --port {port}: 127.0.0.1:{port} is already in use\n"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------- hostile input


def _raw(url, data, timeout=3.0):
    """(status, headers, JSON) of the bytes ``data`` sent as they are; the server's answer must come within
    ``timeout`` seconds."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    resp = http.client.HTTPResponse(sock)
    try:
        sock.sendall(data)
        resp.begin()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:  # both, or the socket stays open (a server waiting on it would wait for ever)
        resp.close()
        sock.close()


@pytest.mark.parametrize(
    "header, status, message",
    [
        ("Content-Length: -5\r\n", 400, "Content-Length must be a non-negative integer, got '-5'"),
        ("Content-Length: abc\r\n", 400, "Content-Length must be a non-negative integer, got 'abc'"),
        ("Content-Length: 1_0\r\n", 400, "Content-Length must be a non-negative integer, got '1_0'"),
        ("", 411, "POST needs a Content-Length header"),
    ],
)
def test_bad_content_length_is_refused_at_once(header, status, message):
    with serve_in_thread("shapes") as server:
        t0 = time.perf_counter()
        got, _, err = _raw(server.url, f"POST /score HTTP/1.1\r\nHost: x\r\n{header}\r\n{{}}".encode())
        assert (got, err["error"]) == (status, message)
        assert time.perf_counter() - t0 < 2


def test_slow_and_silent_clients_are_cut_off_and_free_the_server(request_):
    body = json.dumps(request_to_json(request_.rows(0, 1))).encode()
    limits = ServerLimits(read_timeout_s=0.5, max_concurrent=1, max_queue=0)
    with serve_in_thread("shapes", limits=limits) as server:
        host, port = server.server_address[:2]
        # A client trickling its body a few bytes at a time: the deadline is for the whole body.
        with socket.create_connection((host, port), timeout=3) as sock:
            sock.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            t0 = time.perf_counter()
            for i in range(30):  # a byte every 0.1 s until the server answers
                if select.select([sock], [], [], 0.1)[0]:
                    break
                sock.sendall(body[i : i + 1])
            with contextlib.closing(http.client.HTTPResponse(sock)) as resp:
                resp.begin()
                err = json.loads(resp.read())["error"]
            assert resp.status == 408 and "--read-timeout-s" in err and f"of {len(body)} bytes" in err
            assert time.perf_counter() - t0 < 1.5
        # A client that connects and says nothing is closed.
        with socket.create_connection((host, port), timeout=3) as sock:
            t0 = time.perf_counter()
            assert sock.recv(1) == b""
            assert time.perf_counter() - t0 < 1.5
        status, ok = _http("POST", server.url + "/score", body)
        assert status == 200 and ok["scores"]["valid"] == [True]


_GATE = threading.Event()
_ENTERED = threading.Semaphore(0)


@register_reward("gated-test")
def _make_gated(scale):
    def score(req):
        _ENTERED.release()
        assert _GATE.wait(10)
        return HostScores.invalid(req.batch_size, req.num_regions)

    return score


def test_a_busy_server_answers_503_with_retry_after(request_):
    body = json.dumps(request_to_json(request_.rows(0, 1))).encode()
    _GATE.clear()
    limits = ServerLimits(max_concurrent=1, max_queue=1)
    with serve_in_thread("gated-test", limits=limits) as server, ThreadPoolExecutor(2) as pool:
        scoring = pool.submit(_http, "POST", server.url + "/score", body)
        assert _ENTERED.acquire(timeout=5)  # the first request is being scored
        waiting = pool.submit(_http, "POST", server.url + "/score", body)
        time.sleep(0.3)  # the second is admitted and waits for the scoring slot
        status, headers, err = _raw(
            server.url, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert status == 503 and headers["Retry-After"] == "1"
        assert "1 requests scoring and 1 waiting: --max-concurrent, --max-queue" in err["error"]
        assert _http("GET", server.url + "/health")[0] == 200  # health is never queued
        _GATE.set()
        assert scoring.result(10)[0] == 200 and waiting.result(10)[0] == 200


def test_images_beyond_the_limits_get_413_naming_the_limit(request_):
    body = request_to_json(request_.rows(0, 2))
    limits = ServerLimits(max_image_pixels=64 * 64, max_decoded_mb=0.09)
    with serve_in_thread("shapes", limits=limits) as server:
        hostile = {**body, "edited": [body["edited"][0], zero_png(8000, 8000)]}
        status, err = _http("POST", server.url + "/score", json.dumps(hostile).encode())
        assert status == 413
        assert err["error"].startswith(
            "edited[1]: a 8000x8000 image (64.0 MP) exceeds the server's limit of 4096"
        )
        status, err = _http("POST", server.url + "/score", json.dumps(body).encode())  # 0.094 MiB decoded
        assert (
            status == 413
            and "beyond the server's limit of 0.1 MiB a request (--max-decoded-mb)" in err["error"]
        )
    with serve_in_thread("shapes") as server:  # beyond Pillow's own limit: still the server's message
        hostile = {**body, "source": [zero_png(20_000, 20_000), body["source"][1]]}
        status, err = _http("POST", server.url + "/score", json.dumps(hostile).encode())
        assert status == 413 and "source[0]: a 20000x20000 image" in err["error"]
        assert "(--max-image-pixels)" in err["error"]


def test_the_listen_backlog_holds_a_burst_of_connections():
    server = RewardServer(lambda r: None, "x", port=0)  # listening, not yet accepting
    socks = []
    try:
        for _ in range(64):
            socks.append(socket.create_connection(server.server_address[:2], timeout=0.2))
    finally:
        for s in socks:
            s.close()
        server.server_close()
    assert len(socks) == 64
