"""Entry point: ``python -m sfgrpo.main --config=configs/default.py --workdir=DIR [--config.KEY=VALUE ...]``.

Initialises the runtime (multi-host JAX when launched on several hosts), then runs ``sfgrpo.train``. A bad
config, an incompatible workdir or a training failure ends the run with a one-paragraph message and exit
status 2, not a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from sfgrpo import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (ml-collections).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = _CONFIG.value
        config.seed  # noqa: B018 - touching a field surfaces a config file that failed to load
    except (OSError, ValueError) as err:
        print(f"sfgrpo: cannot load --config: {str(err).splitlines()[0]} ({_config_path()})", file=sys.stderr)
        sys.exit(2)
    logging.getLogger().setLevel(logging.INFO)
    # Orbax and grain log every file operation through absl's logger; keep their warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    from sfgrpo import builders, checkpoint, preemption, train  # noqa: PLC0415 - after the runtime is initialised
    from sfgrpo.rewards.base import RewardError  # noqa: PLC0415

    try:
        final = train.train(config, _WORKDIR.value)
    except preemption.Preempted as stop:
        print(f"sfgrpo: {stop}", file=sys.stderr, flush=True)
        _exit(0)
    except (builders.ConfigError, checkpoint.CheckpointError, train.TrainingError, RewardError) as err:
        print(f"sfgrpo: {err}", file=sys.stderr, flush=True)
        _exit(2)
    logging.info("done: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))


def _exit(status: int) -> None:
    """Exits with ``status``. With several processes and an error, at once: jax's exit handler would wait
    up to 5 minutes at a shutdown barrier for processes that may never come (the others, still blocked in
    a collective, are stopped by the coordinator when this process's heartbeat stops)."""
    import jax  # noqa: PLC0415

    if status != 0 and jax.process_count() > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _config_path() -> str:
    return next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "?")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line message instead of a traceback for a bad config override."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        print(f"sfgrpo: {err}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as err:
        overrides = [a.split("=")[0][2:] for a in argv if a.startswith("--config.")]
        print(
            f"sfgrpo: unknown config key {err} in the overrides {overrides}; the config file lists every key",
            file=sys.stderr,
        )
        sys.exit(2)
    except (ValueError, TypeError) as err:
        print(f"sfgrpo: bad config override: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
