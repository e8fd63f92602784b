"""Where a rerun resumes: the newest readable checkpoint, its config compared with this run's.

Read-only: nothing here writes in the workdir, so a run that must be refused (another experiment's
checkpoint, an unreadable step) leaves the workdir as it was. Two phases, because the config comparison
is cheap and the model is not: :func:`find` reads the newest step's metadata before the model is built;
:meth:`ResumePoint.restore` reads its arrays into the model's shardings afterwards.

An unreadable newest step stops the run with one line naming it, unless ``train.restore_fallback`` is set:
then the run warns and takes the newest readable earlier step.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from sfgrpo import checkpoint, run_config, runtime

_log = logging.getLogger(__name__)


class ConfigChangeError(checkpoint.CheckpointError):
    """The config differs from the checkpoint's in keys that alter the experiment."""


class ResumePoint:
    """A checkpoint step to resume from, and how this run's config differs from the one that wrote it.

    ``changes``: {key: (saved, current)} of every difference that was accepted (harmless keys, and
    experiment-altering ones under ``train.allow_config_change``); empty for an identical config.
    """

    def __init__(
        self,
        ckpt: checkpoint.Checkpointer,
        current: dict[str, Any],
        train: ml_collections.ConfigDict,
    ) -> None:
        self.ckpt = ckpt
        self.current = current
        self.allow_change = bool(train.allow_config_change)
        self.fallback = bool(train.restore_fallback)
        self.candidates = sorted(ckpt.all_steps(), reverse=True)
        self.step: int | None = None
        self.changes: dict[str, tuple[Any, Any]] = {}
        self.unreadable: list[int] = []  # newer steps passed over under restore_fallback
        self._next()

    def _next(self) -> None:
        """Moves to the newest remaining step whose metadata reads and whose config may resume."""
        while self.candidates:
            step = self.candidates.pop(0)
            try:
                meta = self.ckpt.read_meta(step)
            except checkpoint.CheckpointCorruptError as err:
                self._unreadable(step, err)
                continue
            self.step, self.changes = step, self._check_config(step, meta)
            return
        raise checkpoint.CheckpointCorruptError(
            f"no readable checkpoint in {self.ckpt.directory}; move the directory away to start afresh"
        )

    def _unreadable(self, step: int, err: checkpoint.CheckpointError) -> None:
        earlier = self.candidates
        if not self.fallback:
            hint = (
                f"rerun with --config.train.restore_fallback=True to resume from the newest readable "
                f"earlier step (steps {earlier} are there)"
                if earlier
                else "there is no earlier step; move the checkpoints directory away to start afresh"
            )
            raise checkpoint.CheckpointCorruptError(
                f"the newest checkpoint, step {step}, cannot be read: {_reason(err)}; {hint}"
            ) from None
        _log.warning(
            "checkpoint step %d cannot be read (%s); falling back to an earlier step", step, _reason(err)
        )
        self.unreadable.append(step)

    def _check_config(self, step: int, meta: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        saved = meta.get("config")
        if not isinstance(saved, dict):
            _log.warning(
                "checkpoint step %d stores no config (written by an older sfgrpo): config changes since "
                "then cannot be checked",
                step,
            )
            return {}
        altering, harmless = run_config.compare(saved, self.current)
        if altering and not self.allow_change:
            raise ConfigChangeError(
                f"the config differs from the one that wrote checkpoint step {step} in "
                f"{self.ckpt.directory}: {run_config.describe(altering)}; resume with the same config, use "
                "another workdir, or pass --config.train.allow_config_change=True to go on with the change"
            )
        if altering:
            _log.warning("resuming with a changed experiment (allowed): %s", run_config.describe(altering))
        if harmless:
            _log.info("resuming with changed settings: %s", run_config.describe(harmless))
        return {**altering, **harmless}

    def restore(self, abstract_train_state: Any) -> tuple[Any, Any]:
        """(train_state, data_state) of the resume step, placed as ``abstract_train_state`` says.

        With ``restore_fallback``, a step whose arrays cannot be read gives way to the next readable one
        (``self.step`` then names the step actually restored).
        """
        while True:
            try:
                state, data_state, _ = self.ckpt.restore(self.step, abstract_train_state=abstract_train_state)
                return state, data_state
            except checkpoint.CheckpointMismatchError:
                raise
            except checkpoint.CheckpointCorruptError as err:
                self._unreadable(self.step, err)
                self._next()

    def set_aside(self) -> None:
        """Moves the unreadable steps passed over to ``<checkpoints>.unreadable/`` (kept, not deleted), so
        that the resumed run can write those steps again. Process 0 moves; every process calls it."""
        if self.unreadable and jax.process_index() == 0:
            aside = self.ckpt.directory.with_name(self.ckpt.directory.name + ".unreadable")
            aside.mkdir(exist_ok=True)
            for step in self.unreadable:
                target = aside / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
                (self.ckpt.directory / str(step)).rename(target)
                _log.warning("moved the unreadable checkpoint step %d to %s", step, target)
        runtime.barrier("unreadable checkpoints set aside")
        self.ckpt.close()


def find(directory: Path, current: dict[str, Any], config: ml_collections.ConfigDict) -> ResumePoint | None:
    """The resume point in ``directory`` (a checkpoints folder), or None when it holds no checkpoint.

    Raises ConfigChangeError or checkpoint.CheckpointCorruptError (see the module docstring).
    """
    if not directory.exists():
        return None
    if not directory.is_dir():
        raise checkpoint.CheckpointError(f"{directory} exists and is not a directory")
    ckpt = checkpoint.Checkpointer(
        directory,
        save_every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
        create=False,
    )
    if not ckpt.all_steps():
        ckpt.close()
        return None
    return ResumePoint(ckpt, current, config.train)


def _reason(err: checkpoint.CheckpointError) -> str:
    return getattr(err, "reason", "") or str(err)
