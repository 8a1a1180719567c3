"""Stop requests: SIGTERM, SIGINT and SIGUSR1 ask the loop to stop after the current optimiser step.

During training the handler only records the signal; the loop looks at it once per step, after
the gradients are complete (every rank agrees on it there), finishes that step and saves a
checkpoint, so the saved data position is exactly the one of the last applied step. A second
signal, or one outside training (set-up), stops at once, without a checkpoint. Exit codes follow
the shell convention, 128 + the signal number: 143 SIGTERM, 130 SIGINT, 138 SIGUSR1.
"""
from __future__ import annotations

import os
import signal
import threading

from upo.train.errors import RunStopped, StopNow

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


def exit_code(signum: int) -> int:
    """143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def stop_if_signalled(trainer) -> None:
    """After a run that finished: a stop signal in its last step (which upo-train finishes rather than stops)
    raises :class:`RunStopped`, so that whatever drives several runs (upo-frontier) stops after this one."""
    if trainer.stop_signum:
        raise RunStopped(f"stopped by {signal_name(trainer.stop_signum)}", exit_code(trainer.stop_signum))


class StopRequests:
    """While entered, stop signals set :attr:`signum` (``defer``, the training loop) or raise
    :class:`StopNow` (set-up) instead of killing the process without a word.

    ``announce`` (rank 0) writes one line when a deferred signal arrives, so a user who pressed
    Ctrl-C knows the run heard it. Outside the main thread signals cannot be caught; then this
    does nothing and the signals keep their usual effect.
    """

    def __init__(self, defer: bool = True, announce: bool = True):
        self.signum = 0
        self.defer = defer
        self.announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default is the closest.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum or not self.defer:
            raise StopNow(signal_name(signum), exit_code(signum))
        self.signum = signum
        if self.announce:
            # os.write, not print: a handler may run while the main code is inside a print to stderr.
            os.write(2, f"upo-train: {signal_name(signum)} received: stopping after this step with a checkpoint "
                        "(send it again to stop at once, without one)\n".encode())
