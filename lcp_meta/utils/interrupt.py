"""Stopping a long run without losing work: a Ctrl-C (SIGINT) or a ``kill`` (SIGTERM) is deferred to the end of the
step in flight, where the training loop saves its checkpoint and stops; and a clock that asks for a checkpoint every
few minutes, so that a run killed outright (SIGKILL, a lost machine) loses at most those minutes.

Why deferred: a signal that lands between ``optimizer.step()`` and the bookkeeping of that step would leave a
checkpoint whose parameters and counters disagree; at a step boundary the saved state is exactly the state an
uninterrupted run had there, so the resumed run continues bit for bit.  A second signal stops at once (the
previous checkpoint stays the resume point).
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Optional

__all__ = ["Interrupted", "DeferredInterrupts", "CheckpointClock"]

_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class Interrupted(KeyboardInterrupt):
    """Raised by a training loop that stopped on a signal after saving its checkpoint; ``exit_code`` is the shell's
    convention for the signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class DeferredInterrupts:
    """Context manager: while active, the first SIGINT/SIGTERM only sets :attr:`signum`; the loop polls
    :attr:`requested` at its step boundaries.  A second signal raises ``KeyboardInterrupt`` at once.  Outside the
    main thread (where Python cannot install handlers) it does nothing and signals act as usual."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return _NAMES.get(self.signum, f"signal {self.signum}")

    def _handler(self, signum, frame):
        if self.signum is not None:  # the second one: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "DeferredInterrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()


class CheckpointClock:
    """``due()`` is True once ``minutes`` of wall time have passed since the last :meth:`reset` (0: never)."""

    def __init__(self, minutes: float):
        if not minutes >= 0:
            raise ValueError(f"expected checkpoint minutes >= 0, got {minutes}")
        self.seconds = 60.0 * minutes
        self.reset()

    def reset(self) -> None:
        self._last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self._last >= self.seconds
