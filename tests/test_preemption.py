"""SIGTERM handling: the first asks to stop at the next boundary, a second one stops at once."""

import os
import signal
import subprocess
import sys
import textwrap

from sfgrpo import preemption


def test_sigterm_requests_a_stop_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionGuard() as guard:
        assert not guard.requested and not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.should_stop()
        # After the first SIGTERM, a second one takes the OS default: it would stop the process at once.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == before


_SECOND = textwrap.dedent(
    """
    import os, signal, time
    from sfgrpo import preemption
    with preemption.PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        print("first", guard.requested, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("still running", flush=True)
    """
)


def test_a_second_sigterm_stops_at_once():
    done = subprocess.run([sys.executable, "-c", _SECOND], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "first True"
    assert done.returncode == -signal.SIGTERM
