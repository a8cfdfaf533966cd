"""Ctrl-C and SIGTERM as a request to stop: the trainer finishes its step, saves, and says so.

Schedulers, ``timeout`` and torchrun stop a job with SIGTERM; a user presses Ctrl-C (SIGINT). Either
one sets a flag that the training loop reads after each optimiser update; the handler does nothing
else (no printing, no raising), so a second Ctrl-C while the checkpoint is written changes nothing.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM are recorded instead of acted on.

    received: the first signal's number, or None. Elsewhere than the main thread (where Python
    cannot install handlers) entering does nothing and signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
