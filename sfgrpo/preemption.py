"""Preemption: SIGTERM asks the run to save and stop at the next iteration boundary, on every process.

Cloud TPU maintenance events, spot/preemptible VMs and SLURM's preemption send SIGTERM, then SIGKILL after
a grace period (30 s on GCE, ``KillWait`` under SLURM). The trainer asks :meth:`PreemptionGuard.should_stop`
once per iteration (and per warm-start step); the answer is agreed over all processes with one small
collective, so a SIGTERM delivered to any one host stops every host after the same iteration, and each
saves its part of the same checkpoint.

Why not jax's preemption sync manager (what Orbax's ``PreemptionCheckpointingPolicy`` reads): it exists
only when ``jax.distributed`` is initialised (not for one process), it only *saves*, and XLA's SIGTERM
handler swallows the signal, so a second SIGTERM could not stop the run. Installing this handler replaces
XLA's.

After the first SIGTERM the default action is restored: a second SIGTERM kills the process at once, even
while it waits inside a compiled program. SIGINT (Ctrl-C) keeps Python's default, an immediate
``KeyboardInterrupt``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from sfgrpo import runtime

_log = logging.getLogger(__name__)


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped as asked
    """The run stopped on SIGTERM after saving what it must; the message says where to resume."""


class PreemptionGuard:
    """Turns SIGTERM into a request to stop; installed for the lifetime of a ``with`` block.

    Outside the main thread (signal handlers can only be installed there), the guard does nothing and
    never asks to stop.
    """

    def __init__(self) -> None:
        self.received_at: float | None = None  # time.monotonic() of the first SIGTERM on this process
        self._previous: object = None
        self._installed = False

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self.received_at = time.monotonic()
        # A second SIGTERM stops at once (the OS default), whatever the main thread is doing.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # What is saved depends on the phase (a warm-start step, a GRPO iteration, nothing before the first
        # iteration); the stop message names it.
        _log.warning("SIGTERM: stopping after the current step or iteration, saving what it has done")

    @property
    def requested(self) -> bool:
        """Whether this process received SIGTERM (not agreed with the others: see ``should_stop``)."""
        return self.received_at is not None

    def should_stop(self) -> bool:
        """Whether any process received SIGTERM. A collective: every process calls it at the same point."""
        return runtime.any_process(self.requested)
