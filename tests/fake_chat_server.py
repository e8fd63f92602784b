"""What the loopback fake OpenAI-compatible chat servers of the tests share (free of jax: the benchmark-judge
fake imports only this and numpy/PIL).

``ChatHandler`` answers GET /v1/models with the server's model and sends JSON replies; ``FakeChatServer``
is a ``ThreadingHTTPServer`` on loopback that keeps scripted faults, cycles the answer style, can die like
a killed process and runs in a thread as a context manager; ``decode_content`` reads the images (data-URL
PNGs) and the text of a chat request's last message.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import numpy as np
import PIL.Image


@dataclasses.dataclass
class Fault:
    """A scripted fault: its ``kind``, for the next ``times`` requests (None: every one until cleared) of
    the request kind ``only`` (None: all); ``delay_s``: how long a 'slow' one waits."""

    kind: str
    times: int | None
    only: str | None
    delay_s: float


def decode_content(messages: list[dict[str, Any]], *, png_only: bool = False) -> tuple[list[np.ndarray], str]:
    """The images ((H, W, 3) uint8, decoded from base64 PNG data URLs) and the texts (joined by newlines)
    of the last message's content parts. ValueError on another kind of data URL and, with ``png_only``, on
    an image that is not a PNG; OSError on one PIL cannot read."""
    images, texts = [], []
    for part in messages[-1]["content"]:
        if part["type"] == "image_url":
            head, _, data = part["image_url"]["url"].partition(",")
            if head != "data:image/png;base64":
                raise ValueError(f"expected a base64 PNG data URL, got {head!r}")
            with PIL.Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as pil:
                if png_only and pil.format != "PNG":
                    raise ValueError(f"expected a PNG, got {pil.format}")
                images.append(np.asarray(pil.convert("RGB"), np.uint8))
        elif part["type"] == "text":
            texts.append(part["text"])
    return images, "\n".join(texts)


class ChatHandler(BaseHTTPRequestHandler):
    """GET /v1/models, JSON replies and the common steps of a chat-completions POST; subclasses answer the
    body of a POST to /v1/chat/completions in ``_chat``."""

    server: FakeChatServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        self.server.log.debug(format, *args)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        self._chat(body)

    def _chat(self, body: bytes) -> None:
        raise NotImplementedError

    def _play_fault(self, fault: Fault | None) -> bool:
        """Plays the transport part of a scripted fault: 'die' stops the server and drops the connection
        without an answer, as when the process dies mid-request (True: the request is done); 'slow' waits
        ``fault.delay_s`` (cut short when the server closes)."""
        if fault is not None and fault.kind == "die":
            self.server.die()
            self.close_connection = True
            return True
        if fault is not None and fault.kind == "slow":
            self.server.closing.wait(fault.delay_s)
        return False

    def _send_answer(self, answer: str, ident: str, **extra: Any) -> None:
        """A 200 chat completion of one assistant message ``answer``; ``extra``: more top-level fields."""
        message = {"role": "assistant", "content": answer}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        self._send(200, {"id": ident, "object": "chat.completion", **extra, "choices": [choice]})


class FakeChatServer(ThreadingHTTPServer):
    """A fake chat server on ``host`` (port 0: ephemeral), run in a thread by the context manager.

    Subclasses set ``log`` and append their faults (``Fault``) to ``_faults`` under ``_lock``; handlers take
    them with ``take_fault``.
    """

    daemon_threads = False  # server_close joins the handler threads: nothing outlives the context
    log = logging.getLogger("fake_chat_server")

    def __init__(self, handler: type[ChatHandler], *, host: str, port: int, model: str) -> None:
        super().__init__((host, port), handler)
        self.model = model
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._style = 0
        self._thread: threading.Thread | None = None
        self._dead = False
        self.closing = threading.Event()  # cuts scripted delays short at exit

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and left is part of the fault tests, not an error of the server.
        self.log.debug("request from %s ended early", client_address)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def take_fault(self, kind: str) -> Fault | None:
        """The first scripted fault that applies to a request of ``kind`` (counting it down), or None."""
        with self._lock:
            for f in self._faults:
                if f.only in (None, kind):
                    if f.times is not None:
                        f.times -= 1
                        if f.times <= 0:
                            self._faults.remove(f)
                    return f
        return None

    def next_style(self) -> int:
        with self._lock:
            self._style = (self._style + 1) % 3
            return self._style

    def die(self) -> None:
        """Stops listening now (later connections are refused), as when the judge's process dies."""
        with self._lock:
            if self._dead:
                return
            self._dead = True

        def stop() -> None:
            self.shutdown()
            self.server_close()

        threading.Thread(target=stop, daemon=True).start()

    def __enter__(self) -> Self:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        if not self._dead:
            self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
