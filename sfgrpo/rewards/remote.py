"""Host-side rewards from remote judges, their configuration, and the worker that runs them off-thread.

``make_host_reward(config.reward)`` makes the judge named by ``reward.kind``:
  'host'    a reward registered with ``sfgrpo.rewards.server.register_reward``, run in this process
            (``reward.host_reward``, after importing ``reward.host_import``); its exceptions follow
            ``on_failure`` like transport failures;
  'server'  our JSON reward server (``sfgrpo.rewards.server``) at ``reward.url``;
  'vlm'     an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, ...) at ``reward.url``
            (``sfgrpo.rewards.vlm``).
The two remote ones check at start-up that the judge answers (GET /health, GET /models) and raise
``RewardError`` after the retries if it does not. Transport failures (refused connection, timeout, 5xx,
429) are retried with exponential backoff; after the retries ``on_failure='fail'`` raises ``RewardError``
and 'skip' returns the batch with every image invalid, counted in ``failures``. ``RewardWorker`` runs a
host reward in background threads with a bounded number of batches in flight.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import importlib
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from sfgrpo.rewards.base import (
    FAILURE_REASONS,
    HostReward,
    HostScores,
    RegionScores,
    RewardError,
    ScoreRequest,
    no_failures,
)
from sfgrpo.rewards.reward_config import ON_FAILURE, check_reward_config, host_options, judge_options
from sfgrpo.rewards.wire import request_to_json

_log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class HostCallableJudge:
    """A registered host reward run in-process. Its exceptions follow ``on_failure``: 'fail' raises
    ``RewardError`` naming the reward, 'skip' masks the batch out and counts it ('host_error')."""

    def __init__(self, fn: HostReward, name: str, on_failure: str) -> None:
        self.fn, self.name, self.on_failure = fn, name, on_failure

    def __call__(self, request: ScoreRequest) -> HostScores:
        try:
            return self.fn(request)
        except Exception as err:  # noqa: BLE001 - a user's scorer may raise anything; it is reported
            if self.on_failure == "fail":
                raise RewardError(
                    f"host reward {self.name!r} raised {type(err).__name__}: {err} "
                    "(reward.on_failure='fail'; 'skip' would mask the batch out)"
                ) from err
            _log.warning("host reward %r raised %s: %s; batch masked out", self.name, type(err).__name__, err)
            b = request.batch_size
            return HostScores.invalid(b, request.num_regions, {"host_error": b, "batch_skipped": b})


def make_host_reward(reward: ml_collections.ConfigDict) -> HostReward:
    """The host-side judge of ``reward.kind`` ('host', 'server' or 'vlm'); remote ones are checked to
    answer at start-up."""
    check_reward_config(reward)
    if reward.kind == "host":
        from sfgrpo.rewards.server import make_reward  # noqa: PLC0415

        if reward.host_import:
            try:
                importlib.import_module(reward.host_import)
            except ImportError as err:
                raise ValueError(
                    f"config.reward.host_import: cannot import {reward.host_import!r}: {err}"
                ) from None
        fn = make_reward(reward.host_reward, reward.scale, **host_options(reward.host_options))
        return HostCallableJudge(fn, reward.host_reward, reward.on_failure)
    if reward.kind == "server":
        judge: HostReward = ServerJudge.from_config(reward)
    elif reward.kind == "vlm":
        from sfgrpo.rewards.vlm import VLMJudge  # noqa: PLC0415 (vlm imports this module)

        judge = VLMJudge.from_config(reward)
    else:
        raise ValueError(f"config.reward.kind: {reward.kind!r} is in-graph, not a host reward")
    judge.check()
    return judge


# ---------------------------------------------------------------------------------------------- transport


class TransportError(Exception):
    """A request that failed after its retries. ``reason``: 'timeout' or 'http_error'."""

    def __init__(self, reason: str, message: str, attempts: int, status: int | None = None) -> None:
        super().__init__(message)
        self.reason, self.attempts, self.status = reason, attempts, status


class Transport:
    """JSON over HTTP with retries and exponential backoff (stdlib only).

    Timeouts, refused connections, 408/429/5xx are retried ``retries`` times, waiting ``backoff_s * 2**k``
    before retry k, or longer when the answer says ``Retry-After`` (seconds, at most ``timeout_s``: a busy
    server's 503); other 4xx answers are final (a malformed or oversized request does not heal).
    ``stop``, when set, ends the retries early (a batch already lost).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        headers: dict[str, str] | None = None,
        max_request_mb: float = 64.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.max_request_mb = float(max_request_mb)
        self.max_request_bytes = int(max_request_mb * 2**20)
        host = urllib.parse.urlparse(self.base_url).hostname or ""
        # A loopback judge must not be sent through an HTTP proxy from the environment.
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, stop: threading.Event | None = None
    ) -> Any:
        """The decoded JSON answer; TransportError after the retries, RewardError for too big a body."""
        url = self.base_url + path
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            if len(data) > self.max_request_bytes:
                raise RewardError(
                    f"{url}: request of {len(data) / 2**20:.1f} MiB exceeds reward.max_request_mb="
                    f"{self.max_request_mb:g}; send smaller batches or raise the limit"
                )
        last = ("http_error", "no attempt made")
        attempts, status, retry_after = 0, None, 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                delay = max(self.backoff_s * 2 ** (attempt - 1), retry_after)
                if stop is None:
                    time.sleep(delay)
                elif stop.wait(delay):
                    break
            if stop is not None and stop.is_set():
                break
            attempts += 1
            try:
                req = urllib.request.Request(url, data=data, headers=self.headers, method=method)
                with self._opener.open(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    # A healthy status with a body that is not JSON: the endpoint is not what we think.
                    raise TransportError(
                        "http_error", f"{method} {url}: the answer is not JSON: {raw[:200]!r}", attempts
                    ) from None
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                last, status = ("http_error", f"HTTP {e.code}: {detail}"), e.code
                retry_after = min(_retry_after_s(e.headers.get("Retry-After")), self.timeout_s)
                if e.code not in _RETRY_STATUS:
                    break
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, garbled
                reason = getattr(e, "reason", e)
                if isinstance(e, TimeoutError) or isinstance(reason, TimeoutError):
                    last = ("timeout", f"no answer within {self.timeout_s:g} s")
                else:
                    last = ("http_error", f"{type(reason).__name__}: {reason}")
                status, retry_after = None, 0.0
            _log.debug("%s %s attempt %d failed: %s", method, url, attempts, last[1])
        message = f"{method} {url} failed after {attempts} attempt(s): {last[1]}"
        raise TransportError(last[0], message, attempts, status)


def _retry_after_s(value: str | None) -> float:
    """The seconds a ``Retry-After`` header asks for; 0 when absent or an HTTP date (the backoff decides)."""
    try:
        seconds = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return seconds if 0 < seconds < float("inf") else 0.0


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()
    except OSError:
        return str(e.reason)
    try:
        payload = json.loads(raw)
        if isinstance(payload, dict) and "error" in payload:
            err = payload["error"]
            return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    return raw[:300].decode("utf-8", "replace") or str(e.reason)


def lost_batch(
    request: ScoreRequest,
    error: TransportError,
    on_failure: str,
    endpoint: str,
    extra: dict[str, int] | None = None,
) -> HostScores:
    """A batch whose transport failed after the retries: ``RewardError`` ('fail') or all invalid ('skip')."""
    if on_failure == "fail":
        raise RewardError(
            f"reward endpoint {endpoint}: {error} (reward.on_failure='fail'; 'skip' would mask the batch out)"
        ) from error
    b = request.batch_size
    _log.warning("reward endpoint %s: skipping a batch of %d images: %s", endpoint, b, error)
    failures = {**(extra or {}), error.reason: b, "batch_skipped": b}
    return HostScores.invalid(b, request.num_regions, failures)


def parallel_map(
    fn: Callable[[Any], Any], items: list[Any], max_workers: int, stop: threading.Event
) -> list[Any]:
    """``[fn(x) for x in items]`` on threads; the first exception sets ``stop``, cancels the rest."""
    if not items:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        futures = [pool.submit(fn, x) for x in items]
        done, pending = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed:
            stop.set()
            for f in pending:
                f.cancel()
            # Report a request that really failed, not one cut short by ``stop``.
            raise max(failed, key=lambda e: getattr(e, "attempts", 1) > 0)
        return [f.result() for f in futures]


def served_models(transport: Transport) -> list[str] | None:
    """GET {url}/models: the served model ids (empty when the listing names none), or None for an endpoint
    without a /models route (404). ``TransportError`` when the endpoint does not answer."""
    try:
        listing = transport.request("GET", "/models")
    except TransportError as e:
        if e.status == 404:
            return None
        raise
    data = listing.get("data", []) if isinstance(listing, dict) else []
    return [m.get("id") for m in data if isinstance(m, dict)]


# ---------------------------------------------------------------------------------------------- our server


class ServerJudge:
    """The client of a ``sfgrpo.rewards.server``: POST /score per batch (or per ``request_batch`` images).

    Per-image checks on the answer: finite scores in 0..scale, else the image is invalid ('out_of_range').
    """

    def __init__(
        self,
        url: str,
        *,
        scale: float,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        on_failure: str,
        max_concurrency: int = 1,
        request_batch: int = 0,
        max_request_mb: float = 64.0,
    ) -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        self.url, self.scale, self.on_failure = url.rstrip("/"), float(scale), on_failure
        self.max_concurrency, self.request_batch = int(max_concurrency), int(request_batch)
        self.transport = Transport(
            self.url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, max_request_mb=max_request_mb
        )
        self.reward_name = "?"

    @classmethod
    def from_config(cls, reward: ml_collections.ConfigDict) -> ServerJudge:
        return cls(reward.url, request_batch=reward.request_batch, **judge_options(reward))

    def check(self) -> dict[str, Any]:
        """GET /health (with retries); ``RewardError`` if the server is down or speaks another scale."""
        try:
            health = self.transport.request("GET", "/health")
        except TransportError as e:
            raise RewardError(f"reward server {self.url} is not answering: {e}") from e
        if not isinstance(health, dict) or health.get("status") != "ok":
            raise RewardError(f"reward server {self.url}: unexpected /health answer {health!r:.300}")
        if float(health.get("scale", float("nan"))) != self.scale:
            raise RewardError(
                f"reward server {self.url} scores on 0..{health.get('scale')}, "
                f"but reward.scale={self.scale:g}"
            )
        self.reward_name = str(health.get("reward"))
        _log.info(
            "reward server %s: reward %r, version %s", self.url, self.reward_name, health.get("version")
        )
        return health

    def __call__(self, request: ScoreRequest) -> HostScores:
        b = request.batch_size
        step = self.request_batch or b
        parts = [request.rows(i, min(i + step, b)) for i in range(0, b, step)]
        stop = threading.Event()

        def one(part: ScoreRequest) -> HostScores:
            return self._parse(part, self.transport.request("POST", "/score", request_to_json(part), stop))

        try:
            return HostScores.concatenate(parallel_map(one, parts, self.max_concurrency, stop))
        except TransportError as e:
            return lost_batch(request, e, self.on_failure, self.url)

    def _parse(self, request: ScoreRequest, answer: Any) -> HostScores:
        b, r = request.batch_size, request.num_regions
        try:
            scores = answer["scores"]
            arrays = {}
            for f in RegionScores._fields:
                shape = (b, r) if f in ("success", "preserve") else (b,)
                dtype = np.bool_ if f == "valid" else np.float64
                raw = scores[f]
                x = np.array(raw if f == "valid" else _nan_for_null(raw), dtype=dtype)
                if x.shape != shape:
                    raise ValueError(f"{f} has shape {x.shape}, expected {shape}")
                arrays[f] = x
            failures = {k: int(v) for k, v in answer.get("failures", {}).items() if k in FAILURE_REASONS}
        except (KeyError, TypeError, ValueError) as e:
            raise RewardError(f"reward server {self.url}: malformed /score answer ({e})") from None
        valid = arrays.pop("valid")
        # Only real region slots count: padded ones may hold anything (score_rewards masks them).
        slot = request.region_valid
        in_range = np.ones((b,), bool)
        for x in arrays.values():
            ok = np.isfinite(x) & (x >= 0) & (x <= self.scale)
            if x.ndim == 2:
                ok = ok | ~slot
                ok = ok.all(axis=1)
            in_range &= ok
        bad = valid & ~in_range
        failures = {**no_failures(), **failures}
        failures["out_of_range"] += int(bad.sum())
        if bad.any():
            _log.warning(
                "reward server %s: %d image(s) with scores outside 0..%g", self.url, bad.sum(), self.scale
            )
        valid = valid & in_range
        cleaned = {}
        for f, x in arrays.items():
            mask = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
            if x.ndim == 2:
                mask = mask & slot
            cleaned[f] = np.where(mask, np.nan_to_num(x), 0.0).astype(np.float32)
        return HostScores(**cleaned, valid=valid, failures=failures)


def _nan_for_null(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_for_null(v) for v in x]
    return float("nan") if x is None else x


# ---------------------------------------------------------------------------------------------- worker


class RewardWorker:
    """Runs a host reward in background threads, at most ``max_pending`` batches at a time.

    ``submit`` blocks while ``max_pending`` batches are in flight (backpressure on the trainer), then
    returns a future of the batch's ``HostScores``; a ``RewardError`` arrives through the future.
    """

    def __init__(self, reward: HostReward, max_pending: int) -> None:
        if int(max_pending) < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.reward = reward
        self._slots = threading.BoundedSemaphore(int(max_pending))
        self._pool = concurrent.futures.ThreadPoolExecutor(int(max_pending), thread_name_prefix="reward")
        self._closed = False

    def submit(self, request: ScoreRequest) -> concurrent.futures.Future[HostScores]:
        if self._closed:
            raise RuntimeError("RewardWorker.submit after close()")
        self._slots.acquire()
        try:
            future = self._pool.submit(self.reward, request)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def close(self) -> None:
        """Waits for the batches in flight, then stops the threads."""
        self._closed = True
        self._pool.shutdown(wait=True)

    def __enter__(self) -> RewardWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
