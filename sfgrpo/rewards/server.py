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
import base64
import binascii
import contextlib
import importlib
import io
import ipaddress
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import PIL.Image

import sfgrpo
from sfgrpo.rewards.base import SCORE_SCALE, HostReward, HostScores, RegionScores, ScoreRequest

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


# ---------------------------------------------------------------------------------------------- wire codec


class BadRequest(ValueError):
    """A request the server cannot read; the message says which field and why."""


def png_b64(image: np.ndarray) -> str:
    """(H, W, 3) uint8 or (H, W) bool -> base64 PNG text (fast compression: these travel once)."""
    arr = np.asarray(image)
    pil = PIL.Image.fromarray(arr if arr.dtype != np.bool_ else arr.astype(np.uint8) * 255, mode=None)
    if arr.dtype == np.bool_:
        pil = pil.convert("1")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_b64(text: Any, field: str, *, mask: bool = False) -> np.ndarray:
    """base64 PNG -> (H, W, 3) uint8, or (H, W) bool with ``mask``; ``BadRequest`` naming ``field``."""
    if not isinstance(text, str):
        raise BadRequest(f"{field}: expected a base64 PNG string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}: not valid base64") from None
    try:
        with PIL.Image.open(io.BytesIO(raw)) as pil:
            if pil.format != "PNG":
                raise BadRequest(f"{field}: expected a PNG, got {pil.format}")
            if mask:
                if pil.mode not in ("1", "L"):
                    raise BadRequest(f"{field}: a mask must be a 1-bit or greyscale PNG, got mode {pil.mode}")
                return np.asarray(pil.convert("L")) > 0
            if pil.mode != "RGB":
                raise BadRequest(f"{field}: expected an RGB PNG, got mode {pil.mode}")
            return np.asarray(pil, np.uint8)
    except BadRequest:
        raise
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise BadRequest(f"{field}: not a readable PNG ({e})") from None


def request_to_json(request: ScoreRequest) -> dict[str, Any]:
    """The /score body of a request."""
    body: dict[str, Any] = {
        "source": [png_b64(x) for x in request.source],
        "edited": [png_b64(x) for x in request.edited],
        "instructions": [str(t) for t in request.instructions],
        "boxes": np.asarray(request.boxes, np.float64).tolist(),
        "region_valid": np.asarray(request.region_valid).tolist(),
        "region_labels": [[str(s) for s in row] for row in request.region_labels],
    }
    if request.target is not None:
        body["target"] = [png_b64(x) for x in request.target]
    if request.region_masks is not None:
        body["region_masks"] = [[png_b64(m) for m in row] for row in request.region_masks]
    return body


def request_from_json(body: Any) -> ScoreRequest:
    """A /score body back into a ``ScoreRequest``; ``BadRequest`` names the first bad field."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    for key in ("source", "edited", "instructions", "boxes", "region_valid", "region_labels"):
        if key not in body:
            raise BadRequest(f"missing field {key!r}")
    b = _length(body["source"], "source")
    if b == 0:
        raise BadRequest("source: the batch is empty")
    images = {}
    for key in ("source", "edited", "target"):
        if key in body and body[key] is not None:
            _length(body[key], key, b)
            images[key] = np.stack([image_from_b64(x, f"{key}[{i}]") for i, x in enumerate(body[key])])
    hw = images["source"].shape[1:3]
    for key, arr in images.items():
        if arr.shape[1:3] != hw:
            raise BadRequest(f"{key}: images are {arr.shape[1:3]}, the sources {hw}")
    instructions = body["instructions"]
    _length(instructions, "instructions", b)
    if not all(isinstance(t, str) for t in instructions):
        raise BadRequest("instructions: expected strings")
    boxes = _array(body["boxes"], "boxes", np.float32)
    if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
        raise BadRequest(f"boxes: expected shape ({b}, R, 4), got {boxes.shape}")
    r = boxes.shape[1]
    if not np.all(np.isfinite(boxes)) or boxes.min(initial=0) < 0 or boxes.max(initial=0) > 1:
        raise BadRequest("boxes: coordinates must be finite and in [0, 1]")
    valid = _array(body["region_valid"], "region_valid", None)
    if valid.shape != (b, r) or valid.dtype != np.bool_:
        raise BadRequest(f"region_valid: expected ({b}, {r}) booleans, got {valid.shape} {valid.dtype}")
    labels = body["region_labels"]
    if (
        not isinstance(labels, list)
        or len(labels) != b
        or not all(
            isinstance(row, list) and len(row) == r and all(isinstance(s, str) for s in row) for row in labels
        )
    ):
        raise BadRequest(f"region_labels: expected {b} lists of {r} strings")
    masks = None
    if body.get("region_masks") is not None:
        rows = body["region_masks"]
        _length(rows, "region_masks", b)
        for i, row in enumerate(rows):
            _length(row, f"region_masks[{i}]", r)
        masks = np.zeros((b, r, *hw), np.bool_)
        for i, row in enumerate(rows):
            for k, text in enumerate(row):
                m = image_from_b64(text, f"region_masks[{i}][{k}]", mask=True)
                if m.shape != hw:
                    raise BadRequest(f"region_masks[{i}][{k}]: mask is {m.shape}, the images {hw}")
                masks[i, k] = m
    try:
        return ScoreRequest(
            source=images["source"],
            edited=images["edited"],
            instructions=list(instructions),
            boxes=boxes,
            region_valid=valid,
            region_labels=np.array(labels, dtype=object).reshape(b, r),
            target=images.get("target"),
            region_masks=masks,
        )
    except ValueError as e:
        raise BadRequest(str(e)) from None


def scores_to_json(scores: HostScores) -> dict[str, Any]:
    """HostScores as JSON-safe lists (non-finite values become null)."""
    out = {}
    for f in RegionScores._fields:
        x = np.asarray(getattr(scores, f))
        out[f] = x.tolist() if f == "valid" else _nulls(x.astype(np.float64).tolist())
    return {"scores": out, "failures": {k: int(v) for k, v in scores.failures.items()}}


def _nulls(x: Any) -> Any:
    if isinstance(x, list):
        return [_nulls(v) for v in x]
    return x if math.isfinite(x) else None


def _length(value: Any, field: str, expected: int | None = None) -> int:
    if not isinstance(value, list):
        raise BadRequest(f"{field}: expected a list, got {type(value).__name__}")
    if expected is not None and len(value) != expected:
        raise BadRequest(f"{field}: expected {expected} entries, got {len(value)}")
    return len(value)


def _array(value: Any, field: str, dtype: Any) -> np.ndarray:
    try:
        arr = np.array(value, dtype=dtype)
    except (TypeError, ValueError):
        raise BadRequest(f"{field}: not a regular nested list of numbers") from None
    if arr.dtype == object:
        raise BadRequest(f"{field}: not a regular nested list")
    return arr


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
