"""The reward server's limits: checked values, admission of requests, bodies read against a deadline."""

import socket
import threading
import time

import pytest

from sfgrpo.rewards.server_limits import Admission, ServerLimits, discard_body, read_body


@pytest.mark.parametrize(
    "over, message",
    [
        ({"max_request_mb": 0}, "--max-request-mb must be > 0, got 0"),
        ({"max_decoded_mb": float("nan")}, "--max-decoded-mb must be a finite number, got nan"),
        ({"read_timeout_s": "60"}, "--read-timeout-s must be a finite number, got '60'"),
        ({"max_image_pixels": 1.5}, "--max-image-pixels must be an integer, got 1.5"),
        ({"max_concurrent": True}, "--max-concurrent must be an integer, got True"),
        ({"max_queue": -1}, "--max-queue must be >= 0, got -1"),
        ({"max_image_pixels": 2**27}, "--max-image-pixels must be <= 89478485"),
    ],
)
def test_bad_limits_name_their_flag(over, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerLimits(**over)


def test_limit_units():
    limits = ServerLimits(max_request_mb=0.5, max_decoded_mb=2)
    assert (limits.max_request_bytes, limits.max_decoded_bytes) == (2**19, 2**21)


def test_admission_lets_n_score_and_q_wait_then_refuses():
    admission = Admission(max_concurrent=1, max_queue=1)
    assert admission.try_enter() and admission.try_enter()
    assert not admission.try_enter()  # the third request is answered 503
    order = []

    def second():
        with admission.scoring():
            order.append("second")

    with admission.scoring():
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.1)
        order.append("first")  # the second waits for the one scoring slot
    thread.join(5)
    assert order == ["first", "second"]
    admission.leave()
    assert admission.try_enter()


def _pair(timeout=5.0):
    server, client = socket.socketpair()
    server.settimeout(timeout)
    return server, server.makefile("rb"), client


def test_read_body_reads_exactly_the_length_and_restores_the_timeout():
    server, rfile, client = _pair()
    client.sendall(b"0123456789extra")
    assert read_body(server, rfile, 10, 1.0) == bytearray(b"0123456789")
    assert server.gettimeout() == 5.0 and rfile.read(5) == b"extra"
    sender = threading.Thread(target=client.sendall, args=(b"x" * (3 << 20) + b"end",))
    sender.start()
    discard_body(server, rfile, 3 << 20, 2.0)  # more than its 1 MiB scratch buffer
    sender.join(5)
    assert rfile.read(3) == b"end"


def test_the_deadline_is_for_the_whole_body_not_each_read():
    server, rfile, client = _pair()

    def trickle():
        for _ in range(20):
            try:
                client.sendall(b"x")
            except OSError:
                return
            time.sleep(0.05)

    thread = threading.Thread(target=trickle)
    thread.start()
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"of 100 bytes in 0.3 s"):
        read_body(server, rfile, 100, 0.3)
    assert time.perf_counter() - t0 < 0.6
    client.close()
    thread.join(5)


def test_a_client_closing_mid_body_is_an_eof():
    server, rfile, client = _pair()
    client.sendall(b"abc")
    client.close()
    with pytest.raises(EOFError, match="after 3 of 10 bytes"):
        read_body(server, rfile, 10, 1.0)
