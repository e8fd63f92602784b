"""A JSON reward server: any registered host reward over HTTP, images as base64 PNG (never pickle).

Run::

    python -m sfgrpo.rewards.server --reward shapes --port 8100 [--host 127.0.0.1] [--option pool=4]

and point the trainer at it with ``reward.kind='server'``, ``reward.url='http://127.0.0.1:8100'``. The
server binds 127.0.0.1 unless ``--host`` says otherwise (a warning is logged for a non-loopback address:
the protocol has no authentication).

Routes:
  GET  /health  -> {"status": "ok", "reward": NAME, "version": sfgrpo version, "protocol": 1, "scale": C}
  POST /score   -> {"reward": NAME, "scores": {field: nested lists, null where not finite},
                    "failures": {reason: images}}
Request body of /score (JSON; B images, R region slots; PNG strings are plain base64)::

    {"source": [png]*B, "edited": [png]*B, "instructions": [str]*B,
     "boxes": [[[x1, y1, x2, y2]]*R]*B  (in [0, 1]), "region_valid": [[bool]*R]*B,
     "region_labels": [[str]*R]*B, "target": [png]*B (optional), "region_masks": [[png]*R]*B (optional)}

Images are RGB PNGs of one size; masks are 1-bit or greyscale PNGs of that size (non-zero = inside).
Errors answer JSON ``{"error": message}`` naming the field or the limit: 400 for a malformed request (bad
JSON, a missing field, wrong shapes, bad base64 or PNG, a negative or non-numeric Content-Length), 404 for
an unknown route, 408 when the body does not arrive within ``--read-timeout-s``, 411 without
Content-Length, 413 beyond ``--max-request-mb``, ``--max-image-pixels`` or ``--max-decoded-mb`` (checked
from the PNG headers before decoding), 503 with ``Retry-After`` when ``--max-concurrent`` requests are
scoring and ``--max-queue`` more wait, 500 when the reward itself fails. The limits and why they bound
the server's memory: ``sfgrpo.rewards.server_limits``. A bad command line exits with status 2 and one line
naming the flag.

Registering your own reward: a factory ``(scale: float, **options: str) -> HostReward`` under a name, in a
module you pass with ``--import``::

    # my_judges.py
    from sfgrpo.rewards.server import register_reward

    @register_reward("mine")
    def make_mine(scale: float, **options: str) -> HostReward:
        def score(request: ScoreRequest) -> HostScores: ...
        return score

    python -m sfgrpo.rewards.server --import my_judges --reward mine --option key=value
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

import sfgrpo
from sfgrpo.rewards.base import SCORE_SCALE, HostReward, HostScores, RegionScores, ScoreRequest
from sfgrpo.rewards.reward_config import SHAPES_DEFAULTS, shapes_reward_options
from sfgrpo.rewards.server_limits import RETRY_AFTER_S, Admission, ServerLimits, discard_body, read_body
from sfgrpo.rewards.wire import BadRequest, TooLarge, request_from_json, scores_to_json

_log = logging.getLogger(__name__)

PROTOCOL = 1
PROG = "python -m sfgrpo.rewards.server"
RewardFactory = Callable[..., HostReward]
_REGISTRY: dict[str, RewardFactory] = {}


# ---------------------------------------------------------------------------------------------- registry


def register_reward(name: str, factory: RewardFactory | None = None) -> Any:
    """Registers ``factory(scale, **options) -> HostReward`` under ``name``; usable as a decorator."""

    def add(f: RewardFactory) -> RewardFactory:
        if name in _REGISTRY and _REGISTRY[name] is not f:
            raise ValueError(f"a reward named {name!r} is already registered")
        _REGISTRY[name] = f
        return f

    return add if factory is None else add(factory)


def registered_rewards() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def make_reward(name: str, scale: float = SCORE_SCALE, **options: str) -> HostReward:
    """The host reward registered as ``name``, built with ``options``; ``ValueError`` naming an option the
    factory does not take."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered: {registered_rewards()}")
    check_options(name, options)
    return _REGISTRY[name](scale, **options)


def check_options(name: str, options: dict[str, str]) -> None:
    """``ValueError`` naming an option that the factory of reward ``name`` does not take."""
    params = list(inspect.signature(_REGISTRY[name]).parameters.values())[1:]  # after scale
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in known:
            raise ValueError(f"reward {name!r} takes no option {key!r}; its options: {known}")


@register_reward("shapes")
def make_shapes_reward(
    scale: float = SCORE_SCALE,
    pool: str | int = 0,
    preserve_floor: str | float = SHAPES_DEFAULTS["preserve_floor"],
    preserve_tol: str | float = SHAPES_DEFAULTS["preserve_tol"],
    tv_tol: str | float = SHAPES_DEFAULTS["tv_tol"],
    shape_margin: str | int = SHAPES_DEFAULTS["shape_margin"],
    noise_floor: str | float = SHAPES_DEFAULTS["noise_floor"],
    noise_tol: str | float = SHAPES_DEFAULTS["noise_tol"],
    kept_saturation: str | float = SHAPES_DEFAULTS["kept_saturation"],
    kept_floor: str | float = SHAPES_DEFAULTS["kept_floor"],
    kept_tol: str | float = SHAPES_DEFAULTS["kept_tol"],
) -> HostReward:
    """The shapes task's reward (``sfgrpo.rewards.synthetic.shapes_scores``, jitted) as a host reward.

    Needs each request's ``target`` and ``region_masks``. ``pool`` > 0 first round-trips source and
    target through ``PixelAutoencoder(pool=pool)``, as the trainer's in-graph reward does for the demo.
    The tolerances are ``config.reward``'s keys of the same names; the demo's are ``preserve_floor=0.012,
    preserve_tol=0.04,tv_tol=0.1,shape_margin=4,noise_floor=0.002,noise_tol=0.011,kept_saturation=0.25``
    (the defaults are shapes_scores' lenient ones, without the noise and kept-shapes terms).
    """
    try:
        pool = int(pool)
    except ValueError:
        raise ValueError(f"option pool must be an integer >= 0, got {pool!r}") from None
    if pool < 0:
        raise ValueError(f"option pool must be an integer >= 0, got {pool}")
    tolerances = dict(
        shapes_reward_options(
            dict(
                preserve_floor=preserve_floor,
                preserve_tol=preserve_tol,
                tv_tol=tv_tol,
                shape_margin=shape_margin,
                noise_floor=noise_floor,
                noise_tol=noise_tol,
                kept_saturation=kept_saturation,
                kept_floor=kept_floor,
                kept_tol=kept_tol,
            ),
            where="option ",
        )
    )

    import jax  # noqa: PLC0415 (the wire codec and clients do not need jax)

    from sfgrpo.models.tiny import PixelAutoencoder  # noqa: PLC0415
    from sfgrpo.rewards.synthetic import shapes_scores  # noqa: PLC0415

    ae = PixelAutoencoder(pool=pool) if pool else None

    @jax.jit
    def scores(
        edited: jax.Array,
        source: jax.Array,
        target: jax.Array,
        masks: jax.Array,
        boxes: jax.Array,
        valid: jax.Array,
    ) -> RegionScores:
        if ae is not None:
            grid = ae.grid(source.shape[1], source.shape[2])
            source = ae.decode(ae.encode(source), grid)
            target = ae.decode(ae.encode(target), grid)
        return shapes_scores(
            edited.astype("float32") / 255.0, source, target, masks, boxes, valid, scale=scale, **tolerances
        )

    def score(request: ScoreRequest) -> HostScores:
        if request.target is None or request.region_masks is None:
            raise ValueError("the shapes reward needs 'target' and 'region_masks' in the request")
        out = scores(
            request.edited,
            request.source,
            request.target,
            request.region_masks,
            np.asarray(request.boxes, np.float32),
            request.region_valid,
        )
        return HostScores.from_region_scores(jax.device_get(out))

    return score


# ---------------------------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def setup(self) -> None:
        # The socket timeout of every read and write: a silent client does not hold a thread for ever.
        self.timeout = self.server.limits.read_timeout_s
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        _log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") == "/health":
            self._send(200, self.server.health())
        else:
            self._send(404, {"error": f"no route GET {self.path}; routes: GET /health, POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        limits = self.server.limits
        value = self.headers.get("Content-Length")
        if value is None:
            self._refuse_and_close(411, "POST needs a Content-Length header")
            return
        if not re.fullmatch(r"[0-9]+", value.strip()):
            self._refuse_and_close(400, f"Content-Length must be a non-negative integer, got {value!r}")
            return
        length = int(value)
        if self.path.rstrip("/") != "/score":
            self._answer_without_body(
                length, 404, f"no route POST {self.path}; routes: GET /health, POST /score"
            )
            return
        if length > limits.max_request_bytes:
            self._answer_without_body(
                length,
                413,
                f"request of {length / 2**20:.3g} MiB exceeds the server's limit of "
                f"{limits.max_request_mb:g} MiB (--max-request-mb); send smaller batches",
            )
            return
        if not self.server.admission.try_enter():
            self._answer_without_body(
                length,
                503,
                f"the server is busy ({limits.max_concurrent} requests scoring and {limits.max_queue} "
                f"waiting: --max-concurrent, --max-queue); retry after {RETRY_AFTER_S} s",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
            return
        try:
            try:
                raw = read_body(self.connection, self.rfile, length, limits.read_timeout_s)
            except TimeoutError as e:
                self.close_connection = True
                message = f"the body did not arrive within the server's read timeout (--read-timeout-s): {e}"
                self._send(408, {"error": message})
                return
            except (EOFError, OSError):  # the client left mid-body: nobody to answer
                self.close_connection = True
                return
            with self.server.admission.scoring():
                status, payload = self._score(raw)
        finally:
            self.server.admission.leave()
        self._send(status, payload)

    def _score(self, raw: bytearray) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON answer) of one /score body."""
        name, limits = self.server.reward_name, self.server.limits
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return 400, {"error": f"the body is not valid JSON: {e}"}
        del raw
        try:
            request = request_from_json(
                body, max_image_pixels=limits.max_image_pixels, max_decoded_bytes=limits.max_decoded_bytes
            )
        except TooLarge as e:
            return 413, {"error": str(e)}
        except BadRequest as e:
            return 400, {"error": str(e)}
        del body
        try:
            scores = self.server.reward(request)
            if scores.batch_size != request.batch_size or scores.success.shape[1] != request.num_regions:
                raise ValueError(
                    f"the reward returned scores of shape {scores.success.shape} for a batch of "
                    f"{request.batch_size} with {request.num_regions} region slots"
                )
            return 200, {"reward": name, **scores_to_json(scores)}
        except ValueError as e:  # the reward refusing this request (e.g. a field it needs is absent)
            return 400, {"error": f"reward {name!r}: {e}"}
        except Exception as e:  # noqa: BLE001 (any failure of the user's reward becomes a clear 500)
            _log.exception("reward %r failed", name)
            return 500, {"error": f"reward {name!r} failed: {type(e).__name__}: {e}"}

    def _answer_without_body(
        self, length: int, status: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        """Discards the body (up to 4 request limits, within the read timeout), then answers: a client
        still sending when the connection closes would read a reset, not the error."""
        limits = self.server.limits
        if length > 4 * limits.max_request_bytes:
            self._refuse_and_close(status, message, headers)
            return
        try:
            discard_body(self.connection, self.rfile, length, limits.read_timeout_s)
        except (TimeoutError, EOFError, OSError):
            self.close_connection = True
        self._send(status, {"error": message}, headers)

    def _refuse_and_close(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        """Answers, then closes after reading what the client still sends (its length unknown) for at most
        a second, so that the answer is read rather than reset."""
        self.close_connection = True
        self._send(status, {"error": message}, headers)
        deadline = time.monotonic() + 1.0
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(1 << 16):
                    break
        except OSError:  # timed out or reset: the connection closes either way
            pass


class RewardServer(ThreadingHTTPServer):
    """The HTTP server of one host reward (a thread per connection; closing joins them).

    ``limits`` bound what requests may cost (``sfgrpo.rewards.server_limits``); ``ValueError`` for a bad
    ``scale``, ``OSError`` when the address cannot be bound.
    """

    daemon_threads = False
    # Connections waiting to be accepted: a burst of clients (a trainer's concurrent sub-requests, several
    # hosts) must queue, not be refused (the default 5 reset 32 concurrent clients of a fresh server).
    request_queue_size = 128

    def __init__(
        self,
        reward: HostReward,
        reward_name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        scale: float = SCORE_SCALE,
        limits: ServerLimits | None = None,
    ) -> None:
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"--scale must be a finite number > 0, got {scale}")
        self.limits = limits if limits is not None else ServerLimits()
        self.admission = Admission(self.limits.max_concurrent, self.limits.max_queue)
        super().__init__((host, port), _Handler)
        if not _is_loopback(host):
            _log.warning("the reward server listens on %s: any host that reaches it can use it", host)
        self.reward, self.reward_name, self.scale = reward, reward_name, float(scale)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The usual cause: a client that timed out and closed the connection before the answer.
        _log.warning("request from %s: the connection failed (client gone?)", client_address, exc_info=True)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "reward": self.reward_name,
            "version": sfgrpo.__version__,
            "protocol": PROTOCOL,
            "scale": self.scale,
        }


@contextlib.contextmanager
def serve_in_thread(
    reward: HostReward | str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    scale: float = SCORE_SCALE,
    limits: ServerLimits | None = None,
    **options: str,
) -> Iterator[RewardServer]:
    """A running server (port 0: an ephemeral one) in a background thread, shut down on exit."""
    name = reward if isinstance(reward, str) else getattr(reward, "__name__", "custom")
    fn = make_reward(reward, scale, **options) if isinstance(reward, str) else reward
    server = RewardServer(fn, name, host=host, port=port, scale=scale, limits=limits)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (``sfgrpo.rewards.server_cli``): serve a registered reward until interrupted."""
    from sfgrpo.rewards.server_cli import main as cli_main  # noqa: PLC0415 (it imports this module)

    cli_main(argv)


if __name__ == "__main__":
    # Run the importable module's main, so rewards registered by --import modules (which import
    # sfgrpo.rewards.server) land in the registry that main reads, not in this __main__ copy's.
    from sfgrpo.rewards.server import main as _main

    _main()
