"""Stopping a long run without losing work: a Ctrl-C (SIGINT) or a ``kill`` (SIGTERM) is deferred to the end of the
step in flight, where the training loop saves its checkpoint and stops; and a clock that asks for a checkpoint every
few minutes, so that a run killed outright (SIGKILL, a lost machine) loses at most those minutes.

Why deferred: a signal that lands between ``optimizer.step()`` and the bookkeeping of that step would leave a
checkpoint whose parameters and counters disagree; at a step boundary the saved state is exactly the state an
uninterrupted run had there, so the resumed run continues bit for bit.  A second signal stops at once (the
previous checkpoint stays the resume point).

Under torchrun every rank stops at the same step (the loops agree through a collective), and the ranks wait for rank 0
to finish writing before they exit.  A launcher that signals the workers twice (e.g. a scheduler that signals every
process, and the torchrun agent forwarding its own signal) stops them at once: the resume point is then the last
checkpoint written, and nothing inconsistent is saved (checkpoints are written atomically).
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

    def __init__(self, message: str, signum: Optional[int] = signal.SIGINT):
        super().__init__(message)
        # (None: the signal reached another rank; torchrun forwards SIGTERM)
        self.exit_code = 128 + int(signal.SIGTERM if signum is None else signum)


class DeferredInterrupts:
    """Context manager: while active, the first SIGINT/SIGTERM only sets :attr:`signum`; the loop polls
    :attr:`requested` at its step boundaries.  A second signal raises ``KeyboardInterrupt`` at once.  A signal still
    pending when the block ends without an exception is delivered then, with the previous handlers back (a loop of
    runs in a script stops as the user asked).  Outside the main thread (where Python cannot install handlers) it
    does nothing and signals act as usual; a signal the process ignores (``SIG_IGN``) stays ignored."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous, self._delivered = {}, False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        if self.signum is None:
            return "a signal to another rank"
        return _NAMES.get(self.signum, f"signal {self.signum}")

    def _handler(self, signum, frame):
        if self.signum is not None:  # the second one: stop now (and the first counts as delivered)
            self._delivered = True
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "DeferredInterrupts":
        if self._previous:
            raise RuntimeError("this DeferredInterrupts is already active; use a new one")
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, old in self._previous.items():
            # (None: a handler installed from C, which Python cannot put back; the default is the closest)
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        installed, self._previous = bool(self._previous), {}
        if installed and exc_type is None and self.signum is not None and not self._delivered:
            signal.raise_signal(self.signum)  # what the signal would have done had it not been deferred


class CheckpointClock:
    """When a training loop checkpoints within its run: every ``every`` steps (0: never), once ``minutes`` of wall
    time have passed since the last checkpoint (0: never), or when forced (a signal)."""

    def __init__(self, minutes: float, every: int = 0):
        if not minutes >= 0 or every < 0:
            raise ValueError(f"expected checkpoint minutes >= 0 and every >= 0, got {minutes} and {every}")
        self.seconds, self.every = 60.0 * minutes, int(every)
        self.reset()

    def reset(self) -> None:
        """A checkpoint was just written: the minutes count from now."""
        self._last = time.monotonic()

    def tick(self, step: int, force: bool = False) -> bool:
        """True when a checkpoint is due after ``step`` (and the minutes then count from now)."""
        due = (force or (self.every > 0 and step % self.every == 0)
               or (self.seconds > 0 and time.monotonic() - self._last >= self.seconds))
        if due:
            self.reset()
        return due
