"""The reward server's limits: what one request may cost, how many run at once, how long a body may take.

Memory: a request body is at most ``max_request_mb``; its images are refused from their PNG headers before
any is decoded when one is over ``max_image_pixels`` or all of them would decode to more than
``max_decoded_mb`` (``sfgrpo.rewards.wire``). At most ``max_concurrent`` requests parse, decode and score at
once, and ``max_queue`` more read their bodies or wait; beyond that a request is answered 503 with
``Retry-After`` before its body is read. So the server holds at most about
``(max_concurrent + max_queue) * max_request_mb`` of bodies and ``max_concurrent * max_decoded_mb`` of
pixels, whatever its clients send. The reward's working memory comes on top and scales with the pixels it
is given (the jitted shapes scorer: about 15 times the decoded bytes, 4.1 GiB for a 4000x4000 request).

Time: a connection that sends nothing for ``read_timeout_s`` is closed, and a body must arrive whole within
``read_timeout_s`` (a deadline for the whole body, not for each read: a client trickling a byte at a time
must not hold a thread).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

import PIL.Image

from sfgrpo.rewards.wire import DEFAULT_MAX_IMAGE_PIXELS

RETRY_AFTER_S = 1  # the Retry-After of a 503: about one scoring's time, so clients do not hammer


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """The limits of ``sfgrpo.rewards.server``, each the command-line flag of its name (``--max-queue``).

    max_request_mb: MiB of one request body (413 beyond). max_image_pixels: pixels of one image (413
    beyond). max_decoded_mb: MiB of one request's decoded images, 3 bytes an RGB pixel and 1 a mask pixel
    (413 beyond). max_concurrent: requests parsed and scored at once. max_queue: further requests admitted
    to wait (503 beyond). read_timeout_s: seconds for a whole body, and of silence on a connection.
    """

    max_request_mb: float = 64.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # A batch of 32 (source, edited, target) triples at 1024x1024 with 8 masks each decodes to 544 MiB.
    max_decoded_mb: float = 1024.0
    max_concurrent: int = 4
    max_queue: int = 32
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_request_mb", "max_decoded_mb", "read_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{_flag(name)} must be a finite number, got {value!r}")
            if value <= 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {value!r}")
        for name, low in (("max_image_pixels", 1), ("max_concurrent", 1), ("max_queue", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{_flag(name)} must be an integer, got {value!r}")
            if value < low:
                raise ValueError(f"{_flag(name)} must be >= {low}, got {value}")
        # Pillow warns above its threshold and refuses above twice it; staying under it keeps the header
        # check (which names the flag) the only guard, and Pillow's warning unreachable.
        pil_max = PIL.Image.MAX_IMAGE_PIXELS
        if pil_max is not None and self.max_image_pixels > pil_max:
            raise ValueError(
                f"--max-image-pixels must be <= {pil_max} (Pillow's decompression-bomb threshold, "
                f"PIL.Image.MAX_IMAGE_PIXELS), got {self.max_image_pixels}"
            )

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def max_decoded_bytes(self) -> int:
        return int(self.max_decoded_mb * 2**20)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The limits' flags, defaulting to this class's defaults."""
        helps = {
            "max_request_mb": "MiB of one request body (413 beyond)",
            "max_image_pixels": "pixels of one image, read from its PNG header before decoding (413 beyond)",
            "max_decoded_mb": "MiB of one request's decoded images (RGB 3 B/pixel, masks 1) (413 beyond)",
            "max_concurrent": "requests decoded and scored at once",
            "max_queue": "further requests waiting; beyond, 503 with Retry-After",
            "read_timeout_s": "seconds for a whole request body, and of silence on a connection (408)",
        }
        for f in dataclasses.fields(ServerLimits):
            kind = int if f.type == "int" else float
            parser.add_argument(
                _flag(f.name), type=kind, default=f.default, help=f"{helps[f.name]} (%(default)s)"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerLimits:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Admission:
    """At most ``max_concurrent`` requests scoring and ``max_queue`` more admitted to wait.

    ``try_enter`` (non-blocking) admits a request or says False (answer 503); an admitted request takes a
    scoring slot with ``scoring()`` (blocking) and leaves with ``leave()``.
    """

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self._admitted = threading.BoundedSemaphore(max_concurrent + max_queue)
        self._scoring = threading.BoundedSemaphore(max_concurrent)

    def try_enter(self) -> bool:
        return self._admitted.acquire(blocking=False)

    def leave(self) -> None:
        self._admitted.release()

    @contextlib.contextmanager
    def scoring(self) -> Iterator[None]:
        with self._scoring:
            yield


def read_body(sock: socket.socket, rfile: BinaryIO, length: int, timeout_s: float) -> bytearray:
    """The ``length`` bytes of a request body, all within ``timeout_s``.

    ``TimeoutError`` past the deadline, ``EOFError`` when the client closes first. Reads straight into one
    buffer, so the body costs ``length`` bytes and no copies. The socket's timeout is restored after.
    """
    buf = bytearray(length)
    with memoryview(buf) as view:
        _read(sock, rfile, length, timeout_s, lambda got, n: view[got : got + n])
    return buf


def discard_body(sock: socket.socket, rfile: BinaryIO, length: int, timeout_s: float) -> None:
    """Reads ``length`` bytes and drops them (so the client reads the answer, not a reset connection);
    errors as ``read_body``. Costs 1 MiB of memory whatever ``length``."""
    with memoryview(bytearray(1 << 20)) as scratch:
        _read(sock, rfile, length, timeout_s, lambda got, n: scratch[: min(n, len(scratch))])


def _read(
    sock: socket.socket,
    rfile: BinaryIO,
    length: int,
    timeout_s: float,
    target: Callable[[int, int], memoryview],
) -> None:
    """Reads ``length`` bytes into ``target(got, left)`` (a view to fill) within ``timeout_s`` in all."""
    previous = sock.gettimeout()
    deadline = time.monotonic() + timeout_s
    got = 0
    try:
        while got < length:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{got} of {length} bytes in {timeout_s:g} s")
            sock.settimeout(left)
            try:
                n = rfile.readinto1(target(got, length - got))  # type: ignore[attr-defined]
            except TimeoutError:
                raise TimeoutError(f"{got} of {length} bytes in {timeout_s:g} s") from None
            if not n:
                raise EOFError(f"the client closed the connection after {got} of {length} bytes")
            got += n
    finally:
        sock.settimeout(previous)
