"""Turn preemption signals into "finish this step, checkpoint, exit" instead of dying mid-step.

A signal can land anywhere, even inside an optimizer step, so the handler only records it; the training loop checks
:attr:`StopFlag.requested` between steps, saves a checkpoint and calls :meth:`StopFlag.finish`, which hands the
signal to whoever handled it before (submitit's requeue on USR2) or exits with 128 + signal number.

Usage::

    with StopFlag() as stop:
        for step in ...:
            ...
            if stop.requested:
                save(); stop.finish()
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopFlag:
        # Signal handlers can only be installed from the main thread (e.g. not inside a DataLoader thread).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def finish(self) -> None:
        """Leave the process the way the signal's previous owner would have; never returns."""
        signum = self.signum
        assert signum is not None
        previous = self._previous.get(signum)
        self.__exit__()
        print(f"received {signal.Signals(signum).name}: checkpoint written, exiting", flush=True)
        if callable(previous) and previous not in (signal.default_int_handler,):
            previous(signum, None)  # submitit: checkpoint() -> requeue -> exit
        sys.exit(128 + signum)
