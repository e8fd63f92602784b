"""Remote rewards: config checks, the server client under faults (real HTTP on loopback), the worker."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from fake_vlm import ShapesOracle, request_from_examples

from sfgrpo.data.shapes import ShapesConfig, ShapesSource
from sfgrpo.rewards.base import HostScores, RegionScores, RewardError
from sfgrpo.rewards.remote import (
    RewardWorker,
    Transport,
    TransportError,
    make_host_reward,
    parallel_map,
)
from sfgrpo.rewards.reward_config import reward_config_defaults
from sfgrpo.rewards.server import register_reward, serve_in_thread
from sfgrpo.rewards.server_limits import ServerLimits

RES, R_MAX = 64, 3


@pytest.fixture(scope="module")
def request_():
    source = ShapesSource(8, split="train", seed=3, config=ShapesConfig(image_size=RES))
    examples = list(ShapesOracle.from_records(source, RES).examples.values())[:4]
    return request_from_examples(examples, np.stack([e.target for e in examples]), R_MAX)


def _config(url, **over):
    c = reward_config_defaults()
    c.kind, c.url, c.timeout_s, c.retries, c.backoff_s = "server", url, 5.0, 2, 0.01
    c.update(over)
    return c


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scripted:
    """A host reward that scores a constant, after a delay or failing as scripted."""

    def __init__(self):
        self.delay_s, self.fail_times, self.value, self.calls = 0.0, 0, 20.0, 0
        self.lock = threading.Lock()

    def __call__(self, req):
        with self.lock:
            self.calls += 1
            fail = self.fail_times > 0
            self.fail_times -= 1
        time.sleep(self.delay_s)
        if fail:
            raise RuntimeError("scripted failure")
        host = HostScores.invalid(req.batch_size, req.num_regions)
        for f in RegionScores._fields[:-1]:
            getattr(host, f)[...] = self.value
        host.valid[...] = True
        return host


SCRIPTED = Scripted()
register_reward("scripted-test", lambda scale: SCRIPTED)


@pytest.fixture
def scripted():
    SCRIPTED.__init__()
    with serve_in_thread("scripted-test") as server:
        yield server, SCRIPTED


# ---------------------------------------------------------------------------------------------- host callable


def test_a_registered_host_reward_runs_in_process(request_):
    SCRIPTED.__init__()
    c = _config("", kind="host", host_reward="scripted-test")
    judge = make_host_reward(c)
    scores = judge(request_)
    assert scores.valid.all() and np.all(scores.background == 20.0) and SCRIPTED.calls == 1


def test_a_host_reward_that_raises_fails_or_skips(request_):
    SCRIPTED.__init__()
    SCRIPTED.fail_times = 2
    with pytest.raises(
        RewardError, match="host reward 'scripted-test' raised RuntimeError: scripted failure"
    ):
        make_host_reward(_config("", kind="host", host_reward="scripted-test"))(request_)
    skipped = make_host_reward(_config("", kind="host", host_reward="scripted-test", on_failure="skip"))(
        request_
    )
    b = request_.batch_size
    assert (
        not skipped.valid.any() and skipped.failures["host_error"] == skipped.failures["batch_skipped"] == b
    )


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(host_reward=""), "config.reward.host_reward: the registered reward's name is required"),
        (dict(host_reward="x", host_options="pool"), "config.reward.host_options: 'pool' is not key=value"),
        (dict(host_reward="nope"), "unknown reward 'nope'"),
        (
            dict(host_reward="x", host_import="sfgrpo_no_such_module"),
            "config.reward.host_import: cannot import",
        ),
    ],
)
def test_bad_host_reward_configs_name_the_key(over, message):
    with pytest.raises(ValueError, match=message):
        make_host_reward(_config("", kind="host", **over))


# ---------------------------------------------------------------------------------------------- server client


def test_server_down_at_start_is_a_clear_error():
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=rf"reward server {url} is not answering.*after 3 attempt\(s\)"):
        make_host_reward(_config(url))
    assert time.perf_counter() - t0 < 5


def test_scale_mismatch_is_refused(scripted):
    server, _ = scripted
    with pytest.raises(RewardError, match="scores on 0..25.0, but reward.scale=10"):
        make_host_reward(_config(server.url, scale=10.0))


def test_server_errors_are_retried_then_succeed(scripted, request_):
    server, reward = scripted
    judge = make_host_reward(_config(server.url, retries=2))
    reward.fail_times = 2  # two 500s, then an answer
    got = judge(request_)
    assert reward.calls == 3 and got.valid.all()
    np.testing.assert_array_equal(got.background, 20.0)


@pytest.mark.parametrize("on_failure", ["fail", "skip"])
def test_persistent_5xx_fails_or_skips(scripted, request_, on_failure):
    server, reward = scripted
    judge = make_host_reward(_config(server.url, retries=1, on_failure=on_failure))
    reward.fail_times = 100
    if on_failure == "fail":
        with pytest.raises(
            RewardError, match=r"after 2 attempt\(s\): HTTP 500: reward 'scripted-test' failed"
        ):
            judge(request_)
    else:
        got = judge(request_)
        assert not got.valid.any() and np.all(got.success == 0)
        assert got.failures["batch_skipped"] == 4 and got.failures["http_error"] == 4
    assert reward.calls == 2


@pytest.mark.parametrize("on_failure", ["fail", "skip"])
def test_slow_reply_times_out(scripted, request_, on_failure):
    server, reward = scripted
    judge = make_host_reward(_config(server.url, timeout_s=0.2, retries=1, on_failure=on_failure))
    reward.delay_s = 1.0
    t0 = time.perf_counter()
    if on_failure == "fail":
        with pytest.raises(RewardError, match=r"no answer within 0.2 s"):
            judge(request_)
    else:
        got = judge(request_)
        assert got.failures["timeout"] == 4 and got.failures["batch_skipped"] == 4 and not got.valid.any()
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("value", [30.0, -1.0, float("nan")])
def test_out_of_range_scores_invalidate_the_image(scripted, request_, value):
    server, reward = scripted
    reward.value = value
    got = make_host_reward(_config(server.url))(request_)
    assert not got.valid.any() and got.failures["out_of_range"] == 4 and np.all(got.success == 0)


@pytest.mark.parametrize("on_failure", ["fail", "skip"])
def test_server_dying_mid_run(request_, on_failure):
    SCRIPTED.__init__()
    with serve_in_thread("scripted-test") as server:
        judge = make_host_reward(_config(server.url, on_failure=on_failure, retries=2))
        with RewardWorker(judge, max_pending=2) as worker:
            assert worker.submit(request_).result(timeout=10).valid.all()
            server.shutdown()
            server.server_close()  # the process is gone: connections are refused
            future = worker.submit(request_)
            if on_failure == "fail":
                with pytest.raises(RewardError, match=r"after 3 attempt\(s\)"):
                    future.result(timeout=10)
            else:
                got = future.result(timeout=10)
                assert got.failures["batch_skipped"] == 4 and got.failures["http_error"] == 4


def test_request_batch_splits_into_concurrent_requests(scripted, request_):
    server, reward = scripted
    judge = make_host_reward(_config(server.url, request_batch=1, max_concurrency=4))
    got = judge(request_)
    assert reward.calls == 4 and got.batch_size == 4 and got.valid.all()


def test_a_busy_server_is_retried_after_its_retry_after(request_):
    SCRIPTED.__init__()
    SCRIPTED.delay_s = 0.6
    limits = ServerLimits(max_concurrent=1, max_queue=0)
    with serve_in_thread("scripted-test", limits=limits) as server:
        judge = make_host_reward(_config(server.url, retries=2, backoff_s=0.01))
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(judge, request_)
            while SCRIPTED.calls == 0:  # the first batch is being scored
                time.sleep(0.01)
            t0 = time.perf_counter()
            got = judge(request_)  # 503, Retry-After: 1, then scored (backoffs of 0.01 s would give up)
            waited = time.perf_counter() - t0
            assert first.result(10).valid.all()
    assert got.valid.all() and SCRIPTED.calls == 2
    assert 0.95 < waited < 3


class _Busy(BaseHTTPRequestHandler):
    """503 with the class's Retry-After for the first answer, then 200 {"ok": true}."""

    retry_after, answered = "3600", 0

    def do_GET(self):  # noqa: N802
        busy = type(self).answered == 0
        type(self).answered += 1
        self.send_response(503 if busy else 200)
        if busy:
            self.send_header("Retry-After", type(self).retry_after)
        self.send_header("Content-Length", "12")
        self.end_headers()
        self.wfile.write(b'{"ok": true}')

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("retry_after, low, high", [("3600", 0.28, 1.5), ("soon", 0.0, 0.25)])
def test_retry_after_is_capped_at_the_timeout(retry_after, low, high):
    _Busy.retry_after, _Busy.answered = retry_after, 0
    with ThreadingHTTPServer(("127.0.0.1", 0), _Busy) as stub:
        threading.Thread(target=stub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        transport = Transport(
            f"http://127.0.0.1:{stub.server_address[1]}", timeout_s=0.3, retries=1, backoff_s=0.01
        )
        t0 = time.perf_counter()
        assert transport.request("GET", "/x") == {"ok": True}
        assert low < time.perf_counter() - t0 < high
        stub.shutdown()


# ---------------------------------------------------------------------------------------------- worker


def test_worker_applies_backpressure_and_keeps_order(request_):
    gate = threading.Event()
    order = []

    def reward(req):
        gate.wait(5)
        order.append(req.instructions[0])
        return HostScores.invalid(req.batch_size, req.num_regions)

    worker = RewardWorker(reward, max_pending=1)
    first = worker.submit(request_.rows(0, 1))
    done = threading.Event()

    def second():
        worker.submit(request_.rows(1, 2)).result(timeout=5)
        done.set()

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.2)
    assert not done.is_set() and not first.done()  # submit blocks: one batch is already in flight
    gate.set()
    assert first.result(timeout=5).batch_size == 1
    thread.join(timeout=5)
    assert done.is_set() and order == [request_.instructions[0], request_.instructions[1]]
    worker.close()
    with pytest.raises(RuntimeError, match="after close"):
        worker.submit(request_)
    with pytest.raises(ValueError, match="max_pending"):
        RewardWorker(reward, max_pending=0)


def test_worker_runs_batches_concurrently(request_):
    def reward(req):
        time.sleep(0.3)
        return HostScores.invalid(req.batch_size, req.num_regions)

    with RewardWorker(reward, max_pending=3) as worker:
        t0 = time.perf_counter()
        futures = [worker.submit(request_) for _ in range(3)]
        assert all(f.result(timeout=5).batch_size == 4 for f in futures)
        assert time.perf_counter() - t0 < 0.8


def test_parallel_map_stops_at_the_first_failure():
    stop = threading.Event()
    started = []

    def job(i):
        started.append(i)
        if i == 1:
            raise TransportError("timeout", "job 1 timed out", attempts=2)
        if stop.wait(2.0):  # a request whose retries the lost batch cuts short
            raise TransportError("http_error", "stopped", attempts=0)
        return i

    t0 = time.perf_counter()
    with pytest.raises(TransportError, match="job 1 timed out"):
        parallel_map(job, list(range(8)), 2, stop)
    assert stop.is_set() and time.perf_counter() - t0 < 1.0
    assert len(started) < 8  # the queued jobs were cancelled
    assert parallel_map(lambda x: x * x, [1, 2, 3], 2, threading.Event()) == [1, 4, 9]
