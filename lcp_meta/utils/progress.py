"""Progress reporting for long loops: a tqdm bar on a terminal, plain lines otherwise.

A bar redrawn with carriage returns turns a log file or a CI transcript into one unreadable line, so when the
stream is not a terminal :func:`progress` prints a full line at most every ``interval`` seconds (and once at the
end) with the count, the elapsed time, an estimate of what is left and the last postfix, e.g.
``lcp meta-training: 40/100 (40%), 1:02 elapsed, ~1:33 left, loss=0.52``.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional

__all__ = ["progress", "PlainProgress"]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PlainProgress:
    """The subset of tqdm's interface the library uses (iteration, ``update``, ``set_postfix``, ``close``),
    writing whole lines."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 initial: int = 0, file=None, interval: float = 30.0, **_ignored):
        self.iterable, self.desc, self.n, self.start_n = iterable, desc, initial, initial
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.file, self.interval = total, file or sys.stderr, interval
        self.postfix, self.closed = "", False
        self.t0 = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kw) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def line(self, now: Optional[float] = None) -> str:
        """The line that would be printed now."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.t0
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {count}" if self.desc else count, f"{_clock(elapsed)} elapsed"]
        done = self.n - self.start_n
        if self.total and 0 < done and self.n < self.total:
            parts.append(f"~{_clock(elapsed / done * (self.total - self.n))} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _line(self, now: Optional[float] = None) -> None:
        print(self.line(now), file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.start_n:
                self._line()


def progress(iterable: Optional[Iterable] = None, *, disable: bool = False, file=None, **kw):
    """A tqdm bar when ``file`` (default stderr) is a terminal, :class:`PlainProgress` lines otherwise, nothing
    when ``disable``.  Keyword arguments are tqdm's (``total``, ``desc``, ``initial``, ``leave``, ...)."""
    from tqdm.auto import tqdm
    stream = file or sys.stderr
    if disable or (hasattr(stream, "isatty") and stream.isatty()):
        return tqdm(iterable, disable=disable, file=stream, **kw)
    return PlainProgress(iterable, file=stream, **kw)
