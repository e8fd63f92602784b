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
Errors answer JSON ``{"error": message}``: 400 for a malformed request (bad JSON, a missing field, wrong
shapes, bad base64 or PNG), 404 for an unknown route, 411 without Content-Length, 413 beyond
``--max-request-mb``, 500 when the reward itself fails.

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

import argparse
import contextlib
import importlib
import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

import sfgrpo
from sfgrpo.rewards.base import SCORE_SCALE, HostReward, HostScores, RegionScores, ScoreRequest
from sfgrpo.rewards.wire import BadRequest, request_from_json, scores_to_json

_log = logging.getLogger(__name__)

PROTOCOL = 1
DEFAULT_MAX_REQUEST_MB = 64.0
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
    """The host reward registered as ``name``, built with ``options``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered: {registered_rewards()}")
    return _REGISTRY[name](scale, **options)


@register_reward("shapes")
def make_shapes_reward(scale: float = SCORE_SCALE, pool: str | int = 0) -> HostReward:
    """The shapes task's reward (``sfgrpo.rewards.synthetic.shapes_scores``, jitted) as a host reward.

    Needs each request's ``target`` and ``region_masks``. ``pool`` > 0 first round-trips source and
    target through ``PixelAutoencoder(pool=pool)``, as the trainer's in-graph reward does for the demo.
    """
    import jax  # noqa: PLC0415 (the wire codec and clients do not need jax)

    from sfgrpo.models.tiny import PixelAutoencoder  # noqa: PLC0415
    from sfgrpo.rewards.synthetic import shapes_scores  # noqa: PLC0415

    pool = int(pool)
    if pool < 0:
        raise ValueError(f"shapes reward: pool must be >= 0, got {pool}")
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
            edited.astype("float32") / 255.0, source, target, masks, boxes, valid, scale=scale
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

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        _log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") == "/health":
            self._send(200, self.server.health())
        else:
            self._send(404, {"error": f"no route GET {self.path}; routes: GET /health, POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._drain(self._content_length() or 0)
            self._send(404, {"error": f"no route POST {self.path}; routes: GET /health, POST /score"})
            return
        length = self._content_length()
        if length is None:
            self.close_connection = True
            self._send(411, {"error": "POST /score needs a Content-Length header"})
            return
        limit = self.server.max_request_bytes
        if length > limit:
            self._drain(length)
            self._send(
                413,
                {
                    "error": f"request of {length / 2**20:.1f} MiB exceeds the server's limit of "
                    f"{limit / 2**20:.1f} MiB (--max-request-mb); send smaller batches"
                },
            )
            return
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._send(400, {"error": f"the body is not valid JSON: {e}"})
            return
        try:
            request = request_from_json(body)
        except BadRequest as e:
            self._send(400, {"error": str(e)})
            return
        try:
            scores = self.server.reward(request)
            if scores.batch_size != request.batch_size or scores.success.shape[1] != request.num_regions:
                raise ValueError(
                    f"the reward returned scores of shape {scores.success.shape} for a batch of "
                    f"{request.batch_size} with {request.num_regions} region slots"
                )
            payload = {"reward": self.server.reward_name, **scores_to_json(scores)}
        except ValueError as e:  # the reward refusing this request (e.g. a field it needs is absent)
            self._send(400, {"error": f"reward {self.server.reward_name!r}: {e}"})
            return
        except Exception as e:  # noqa: BLE001 (any failure of the user's reward becomes a clear 500)
            _log.exception("reward %r failed", self.server.reward_name)
            self._send(500, {"error": f"reward {self.server.reward_name!r} failed: {type(e).__name__}: {e}"})
            return
        self._send(200, payload)

    def _content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def _drain(self, length: int) -> None:
        """Reads and discards a body, so the client can read the error instead of a reset connection."""
        remaining = min(length, 4 * self.server.max_request_bytes)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
        if length > 4 * self.server.max_request_bytes:
            self.close_connection = True


class RewardServer(ThreadingHTTPServer):
    """The HTTP server of one host reward (a thread per connection; closing joins them)."""

    daemon_threads = False

    def __init__(
        self,
        reward: HostReward,
        reward_name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        scale: float = SCORE_SCALE,
        max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
    ) -> None:
        if max_request_mb <= 0:
            raise ValueError(f"max_request_mb must be > 0, got {max_request_mb}")
        if not _is_loopback(host):
            _log.warning("the reward server listens on %s: any host that reaches it can use it", host)
        super().__init__((host, port), _Handler)
        self.reward, self.reward_name, self.scale = reward, reward_name, float(scale)
        self.max_request_bytes = int(max_request_mb * 2**20)

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
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
    **options: str,
) -> Iterator[RewardServer]:
    """A running server (port 0: an ephemeral one) in a background thread, shut down on exit."""
    name = reward if isinstance(reward, str) else getattr(reward, "__name__", "custom")
    fn = make_reward(reward, scale, **options) if isinstance(reward, str) else reward
    server = RewardServer(fn, name, host=host, port=port, scale=scale, max_request_mb=max_request_mb)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="registered reward name, e.g. shapes")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--scale", type=float, default=SCORE_SCALE, help="C, the top of the score scale")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB)
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], help="module registering rewards"
    )
    parser.add_argument(
        "--option", action="append", default=[], help="KEY=VALUE passed to the reward factory"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for module in args.imports:
        importlib.import_module(module)
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--option expects KEY=VALUE, got {item!r}")
        options[key] = value
    if args.reward not in _REGISTRY:
        parser.error(f"unknown reward {args.reward!r}; registered: {registered_rewards()}")
    reward = make_reward(args.reward, args.scale, **options)
    server = RewardServer(
        reward,
        args.reward,
        host=args.host,
        port=args.port,
        scale=args.scale,
        max_request_mb=args.max_request_mb,
    )
    _log.info("serving reward %r at %s (max request %.0f MiB)", args.reward, server.url, args.max_request_mb)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    # Run the importable module's main, so rewards registered by --import modules (which import
    # sfgrpo.rewards.server) land in the registry that main reads, not in this __main__ copy's.
    from sfgrpo.rewards.server import main as _main

    _main()
