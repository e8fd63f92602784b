"""The reward server as a process under load: hostile PNGs leave its memory flat, and 64 concurrent clients
sending good and bad requests each get the right answer (good ones the scores of a quiet server)."""

import http.client
import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fake_vlm import ShapesOracle, edited_variants, request_from_examples, wait_for_line
from png_bomb import zero_png

from sfgrpo.data.shapes import ShapesConfig, ShapesSource
from sfgrpo.rewards.base import RegionScores
from sfgrpo.rewards.remote import ServerJudge
from sfgrpo.rewards.wire import request_to_json

RES, R_MAX = 64, 3
CLIENTS, PER_CLIENT, SLOW = 64, 4, 4
# Small queues, so that the load meets every limit: 503s, 408s, 413s.
LIMITS = ["--max-concurrent", "2", "--max-queue", "8", "--read-timeout-s", "1", "--max-decoded-mb", "64"]
GROWTH_MIB = 64  # what the hostile requests may add to the server's peak memory
CEILING_MIB = 1024  # beyond this growth the server is killed: a regression must fail, not swap the host


def _mib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


class Watch:
    """Samples the server's resident memory every 10 ms; kills it beyond ``ceiling`` MiB."""

    def __init__(self, proc, ceiling):
        self.proc, self.ceiling, self.killed = proc, ceiling, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.01):
            rss = _mib(self.proc.pid, "VmRSS")
            if rss > self.ceiling:
                self.killed = rss
                self.proc.kill()
                return

    def stop(self):
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def requests_():
    """Four distinct good requests of 2 images each (one compiled shape)."""
    source = ShapesSource(16, split="train", seed=11, config=ShapesConfig(image_size=RES))
    examples = list(ShapesOracle.from_records(source, RES).examples.values())[:8]
    edited = edited_variants(examples, seed=3)
    return [request_from_examples(examples[i : i + 2], edited[i : i + 2], R_MAX) for i in range(0, 8, 2)]


@pytest.fixture(scope="module")
def server(requests_):
    """(process, url, quiet scores of each good request): a warm server, shut down and checked after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfgrpo.rewards.server", "--reward", "shapes", "--port", "0", *LIMITS],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = wait_for_line(proc, r"serving reward 'shapes' at (http://127\.0\.0\.1:\d+)", 60).group(1)
        judge = _judge(url, retries=0)
        quiet = [judge(r) for r in requests_]  # also compiles the scorer, before any memory is measured
        yield proc, url, quiet
    finally:
        proc.terminate()
        assert proc.wait(10) is not None
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):  # nothing left listening
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def _judge(url, **over):
    kw = dict(scale=25.0, timeout_s=30.0, retries=30, backoff_s=0.05, on_failure="fail")
    return ServerJudge(url, **{**kw, **over})


def _hostile_bodies(requests_):
    body = request_to_json(requests_[0])
    big = zero_png(8000, 8000)  # 64 MP, 186 KiB: over --max-image-pixels
    many = zero_png(4000, 4000)  # 16 MP each, under it, but 3 x 2 of them decode to 275 MiB
    many_mask = zero_png(4000, 4000, mask=True)
    return {
        "big_image": {**body, "source": [big, big], "edited": [big, big], "target": [big, big]},
        "big_total": {
            **body,
            "source": [many] * 2,
            "edited": [many] * 2,
            "target": [many] * 2,
            "region_masks": [[many_mask] * R_MAX] * 2,
        },
    }


def _post(url, head, body=b"", slow=False):
    """(status, headers, JSON) of a raw POST /score: ``head`` holds the Content-Length header or not;
    ``slow`` sends the body a byte every 0.1 s until the server answers."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    resp = http.client.HTTPResponse(sock)
    try:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        if slow:
            for i in range(100):
                if select.select([sock], [], [], 0.1)[0]:
                    break
                sock.sendall(body[i : i + 1])
        else:
            sock.sendall(body)
        resp.begin()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        resp.close()
        sock.close()


def _length(body):
    return b"Content-Length: %d\r\n" % len(body)


def test_hostile_pngs_leave_the_server_memory_flat(server, requests_):
    proc, url, _ = server
    before = _mib(proc.pid, "VmHWM")
    watch = Watch(proc, before + CEILING_MIB)
    answers = {}
    try:
        for kind, body in _hostile_bodies(requests_).items():
            data = json.dumps(body).encode()
            answers[kind] = _post(url, _length(data), data)
    except (OSError, http.client.HTTPException):
        assert watch.killed is None, f"the server grew to {watch.killed:.0f} MiB and was killed"
        raise
    finally:
        watch.stop()
    for kind, (status, _, err) in answers.items():
        flag = "--max-image-pixels" if kind == "big_image" else "--max-decoded-mb"
        assert status == 413 and flag in err["error"], (kind, err)
    growth = _mib(proc.pid, "VmHWM") - before
    print(f"server peak memory: {before:.0f} MiB before the hostile requests, +{growth:.1f} MiB after")
    assert growth < GROWTH_MIB


def test_many_clients_with_good_and_bad_requests_all_get_the_right_answer(server, requests_):
    proc, url, quiet = server
    hostile = {k: json.dumps(v).encode() for k, v in _hostile_bodies(requests_).items()}
    no_edited = json.dumps({k: v for k, v in request_to_json(requests_[0]).items() if k != "edited"}).encode()
    slow_body = json.dumps(request_to_json(requests_[0])).encode()
    # kind -> (raw request, expected status, expected message); 'good' goes through the real client.
    raw = {
        "bad_json": ((_length(b"{not json"), b"{not json"), 400, "the body is not valid JSON"),
        "missing_field": ((_length(no_edited), no_edited), 400, "missing field 'edited'"),
        "negative_length": ((b"Content-Length: -1\r\n", b"{}"), 400, "non-negative integer, got '-1'"),
        "no_length": ((b"", b"{}"), 411, "POST needs a Content-Length header"),
        "big_image": ((_length(hostile["big_image"]), hostile["big_image"]), 413, "(--max-image-pixels)"),
        "big_total": ((_length(hostile["big_total"]), hostile["big_total"]), 413, "(--max-decoded-mb)"),
        "slow": ((_length(slow_body), slow_body), 408, "(--read-timeout-s)"),
    }
    cycle = ["good", "bad_json", "good", "missing_field", "negative_length", "good", "big_image"]
    cycle += ["no_length", "good", "big_total"]
    plan = [
        [
            ("slow" if c < SLOW and j == 0 else cycle[(c * PER_CLIENT + j) % len(cycle)])
            for j in range(PER_CLIENT)
        ]
        for c in range(CLIENTS)
    ]
    busy = [0]
    lock = threading.Lock()

    def client(c):
        judge, outcomes = _judge(url), []
        for j, kind in enumerate(plan[c]):
            if kind == "good":
                k = (c + j) % len(requests_)
                outcomes.append((kind, k, judge(requests_[k])))
                continue
            (head, body), _, _ = raw[kind]
            for _ in range(30):  # a 503 is a right answer too: retry after what it says
                status, headers, answer = _post(url, head, body, slow=kind == "slow")
                if status != 503:
                    break
                assert headers["Retry-After"] == "1" and "--max-queue" in answer["error"]
                with lock:
                    busy[0] += 1
                time.sleep(float(headers["Retry-After"]))
            outcomes.append((kind, status, answer))
        return outcomes

    before = _mib(proc.pid, "VmHWM")
    watch = Watch(proc, before + CEILING_MIB)
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [o for outcomes in pool.map(client, range(CLIENTS)) for o in outcomes]
    finally:
        watch.stop()
    seconds = time.perf_counter() - t0
    assert watch.killed is None, f"the server grew to {watch.killed:.0f} MiB and was killed"
    growth = _mib(proc.pid, "VmHWM") - before

    counts = {}
    for kind, got, answer in results:
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "good":
            for f in RegionScores._fields[:-1]:
                np.testing.assert_array_equal(getattr(answer, f), getattr(quiet[got], f), err_msg=f)
            assert answer.valid.all() and sum(answer.failures.values()) == 0
        else:
            _, status, message = raw[kind]
            assert got == status and message in answer["error"], (kind, got, answer)
    print(
        f"{CLIENTS} clients, {len(results)} requests {counts}, {busy[0]} answered 503 first "
        f"(raw clients), {seconds:.1f} s, server peak memory {before:.0f} MiB +{growth:.1f} MiB"
    )
    assert len(results) == CLIENTS * PER_CLIENT and counts["slow"] == SLOW
    assert growth < GROWTH_MIB + 64  # 64 MiB more for 10 bodies in flight and handler threads
    assert seconds < 45
