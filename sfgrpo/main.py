"""Entry point: ``python -m sfgrpo.main --config=configs/default.py --workdir=DIR [--config.KEY=VALUE ...]``.

Initialises the runtime (multi-host JAX when launched on several hosts), then runs ``sfgrpo.train``. A bad
config, an incompatible workdir or a training failure ends the run with a one-paragraph message and exit
status 2, not a traceback; so does a machine whose devices cannot make the config's mesh.

``--dry_run`` plans the run instead, on any machine (``sfgrpo/dry_run.py``): built from shapes on simulated
devices, compiled, checked where reachable; it prints the plan and writes nothing in the workdir.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import NoReturn

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from sfgrpo import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (ml-collections).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Plan the run on this machine instead: build it from shapes on simulated CPU devices, compile it, check "
    "what is reachable, print the plan (sfgrpo/dry_run.py). No --workdir needed; nothing is written there.",
)
_PLAN_OUT = flags.DEFINE_string("plan_out", None, "With --dry_run: also write the plan to this file.")
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    "dry_run_devices",
    None,
    "With --dry_run: devices to simulate (default: the mesh's, or the config's TARGET).",
)
flags.mark_flags_as_required(["config"])
flags.register_multi_flags_validator(
    ["workdir", "dry_run"],
    lambda f: bool(f["workdir"]) or f["dry_run"],
    message="--workdir is required (except with --dry_run)",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _usage_error(f"unexpected arguments {argv[1:]}: every setting is a --flag or a --config.KEY=VALUE")
    try:
        config = _CONFIG.value
        config.seed  # noqa: B018 - touching a field surfaces a config file that failed to load
    except (OSError, ValueError) as err:
        print(f"sfgrpo: cannot load --config: {str(err).splitlines()[0]} ({_config_path()})", file=sys.stderr)
        sys.exit(2)
    if _DRY_RUN.value:
        # Before anything starts jax's backend: the dry run sets its simulated devices (sfgrpo/dry_run.py).
        from sfgrpo import dry_run  # noqa: PLC0415

        sys.exit(
            dry_run.run(
                config,
                _config_path(),
                processes_flag=_NUM_PROCESSES.value,
                devices_flag=_DRY_RUN_DEVICES.value,
                plan_out=_PLAN_OUT.value,
            )
        )
    logging.getLogger().setLevel(logging.INFO)
    # Orbax and grain log every file operation through absl's logger; keep their warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from sfgrpo import dry_run  # noqa: PLC0415 - after the runtime is initialised

    problem = dry_run.wrong_machine(config, _config_path())
    if problem:  # the mesh does not fit the devices here: one line, before the workdir is touched
        print(f"sfgrpo: {problem}", file=sys.stderr, flush=True)
        _exit(2)
    _exit(run(config, _WORKDIR.value))


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Trains ``config`` in ``workdir``; returns the exit status: 0 when done or stopped by a preemption
    (one line says which), 2 with one line naming the problem for a bad config, workdir, checkpoint, judge
    or a failed run. Anything else is a bug and keeps its traceback."""
    from sfgrpo import builders, checkpoint, preemption, train  # noqa: PLC0415 - after the runtime is initialised
    from sfgrpo.rewards.base import RewardError  # noqa: PLC0415

    problem = _use_compilation_cache(config)
    if problem:
        print(f"sfgrpo: {problem}", file=sys.stderr, flush=True)
        return 2
    try:
        final = train.train(config, workdir)
    except preemption.Preempted as stop:
        print(f"sfgrpo: {stop}", file=sys.stderr, flush=True)
        return 0
    except (builders.ConfigError, checkpoint.CheckpointError, train.TrainingError, RewardError) as err:
        print(f"sfgrpo: {err}", file=sys.stderr, flush=True)
        return 2
    logging.info("done: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))
    return 0


def _use_compilation_cache(config: ml_collections.ConfigDict) -> str | None:
    """Turns on the persistent compilation cache of ``train.compilation_cache_dir`` (before anything
    compiles) and logs the cache in use, this key's or the environment's (``JAX_COMPILATION_CACHE_DIR``);
    returns a problem with the folder, or None."""
    import jax  # noqa: PLC0415

    from sfgrpo import compile_cache  # noqa: PLC0415

    if config.train.compilation_cache_dir:
        try:
            compile_cache.use(config.train.compilation_cache_dir)
        except ValueError as err:
            return str(err)
    folder = jax.config.jax_compilation_cache_dir
    if folder:
        logging.info(
            "persistent compilation cache: %s (%d programs); a program compiled before with the same "
            "shapes, devices and flags loads from it",
            folder,
            compile_cache.entries(folder),
        )
    else:
        logging.info("no persistent compilation cache (train.compilation_cache_dir): every program compiles")
    return None


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
    """absl flag parsing, with a one-line message and exit status 2 instead of a traceback or a usage
    screen for a missing or broken config file, an unknown config key or a bad override."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_arg is not None:
        path = config_arg.split(":", 1)[0]
        if not os.path.isfile(path):
            _usage_error(f"--config {path}: no such file")
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        _usage_error(_one_line(str(err)))
    except (AttributeError, KeyError) as err:
        # ml_collections nests the key's repr in the error (KeyError("'name'")): take the bare name.
        quoted = re.findall(r"'([^'\"]+)'", str(err))
        name = quoted[-1] if quoted else str(err)
        overrides = [a.split("=")[0][2:].removeprefix("config.") for a in argv if a.startswith("--config.")]
        named = [o for o in overrides if str(name) in o.split(".")] or overrides
        _usage_error(f"unknown config key {name!r} in --config.{named[0]}; the config file lists every key")
    except (ValueError, TypeError) as err:
        _usage_error(f"bad config override: {_one_line(str(err))}")
    except SyntaxError as err:
        _usage_error(f"--config {config_arg}: cannot load it: SyntaxError: {err}")


def _one_line(message: str) -> str:
    """A flag error's message without the traceback config_flags embeds: its first and last lines."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
        return f"{lines[0]} {lines[-1].strip()}"
    return " ".join(line.strip() for line in lines)


def _usage_error(message: str) -> NoReturn:
    print(f"sfgrpo: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
