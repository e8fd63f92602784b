"""The reward server's command line: its flags, their checks, and serving until interrupted.

``python -m sfgrpo.rewards.server`` runs ``main``. A bad input (a flag's value, a module that does not
import, an option the reward does not take, a port in use) exits with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

from sfgrpo.rewards.base import SCORE_SCALE, HostScores, ScoreRequest
from sfgrpo.rewards.server import (
    PROG,
    RewardServer,
    check_options,
    make_reward,
    registered_rewards,
)
from sfgrpo.rewards.server_limits import ServerLimits

_log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(message)


def _not_built(request: ScoreRequest) -> HostScores:
    raise RuntimeError("the reward is not built yet")  # never called: nothing is served before it is


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """The command line; a bad input exits with status 2 and one line naming it."""
    parser = _Parser(prog=PROG, description="A JSON reward server: any registered host reward over HTTP.")
    parser.add_argument("--reward", required=True, help="registered reward name, e.g. shapes")
    parser.add_argument("--port", type=int, required=True, help="0..65535; 0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--scale", type=float, default=SCORE_SCALE, help="C, the top of the score scale")
    ServerLimits.add_arguments(parser)
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], help="module registering rewards"
    )
    parser.add_argument(
        "--option", action="append", default=[], help="KEY=VALUE passed to the reward factory"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        _fail(f"--port must be in 0..65535, got {args.port}")
    if not math.isfinite(args.scale) or args.scale <= 0:
        _fail(f"--scale must be a finite number > 0, got {args.scale}")
    try:
        limits = ServerLimits.from_args(args)
    except ValueError as e:
        _fail(str(e))
    options: dict[str, str] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--option expects KEY=VALUE, got {item!r}")
        if key in options:
            _fail(f"--option {key} is given twice ({key}={options[key]}, {item})")
        options[key] = value
    for module in args.imports:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 (a user's module may raise anything while importing)
            _fail(f"--import {module}: cannot import it: {type(e).__name__}: {e}")
    if args.reward not in registered_rewards():
        _fail(f"--reward: unknown reward {args.reward!r}; registered: {list(registered_rewards())}")
    try:
        check_options(args.reward, options)
    except ValueError as e:
        _fail(f"--option: {e}")
    # Bind before building the reward: a port in use is found before a judge model spends minutes loading.
    try:
        server = RewardServer(
            _not_built, args.reward, host=args.host, port=args.port, scale=args.scale, limits=limits
        )
    except OSError as e:
        where = f"{args.host}:{args.port}"
        if e.errno == errno.EADDRINUSE:
            _fail(f"--port {args.port}: {where} is already in use")
        if e.errno == errno.EACCES:
            _fail(
                f"--port {args.port}: no permission to listen on {where} (ports below 1024 need privileges)"
            )
        _fail(f"--host {args.host}: cannot listen on {where}: {e.strerror or e}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        server.reward = make_reward(args.reward, args.scale, **options)
    except (ValueError, TypeError) as e:
        server.server_close()
        given = ",".join(f"{k}={v}" for k, v in options.items()) or "(none)"
        _fail(f"--option {given}: reward {args.reward!r} refused its options: {e}")
    _log.info(
        "serving reward %r at %s (max request %g MiB, %d scoring + %d waiting)",
        args.reward,
        server.url,
        limits.max_request_mb,
        limits.max_concurrent,
        limits.max_queue,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
