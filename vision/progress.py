"""Progress bars that also work in log files: tqdm on a terminal; elsewhere (CI, nohup, a cluster's log) one
line every 10 % through ``logging``, since a bar redrawn with carriage returns is unreadable there."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("negvision.progress")


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """The part of tqdm's interface the project uses, printing ``desc: 30% (300/1000), 12.3 unit/s`` lines."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", initial: int = 0, every: float = 0.1,
                 disable: bool = False, quiet_s: float = 5.0) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.disable = disable
        self.every = every
        self._t0 = time.time()
        self._n0 = initial
        self._next = self._threshold(initial)
        self._postfix = ""
        self.quiet_s = quiet_s  # short tasks print nothing: lines start once this many seconds have passed

    def _threshold(self, n: int) -> float:
        if not self.total:
            return float("inf")
        step = max(1.0, self.total * self.every)
        return (n // step + 1) * step

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and self.total and (self.n >= self._next or self.n >= self.total):
            self._next = self._threshold(self.n)
            if time.time() - self._t0 < self.quiet_s:
                return
            rate = (self.n - self._n0) / max(time.time() - self._t0, 1e-9)
            pct = 100.0 * self.n / self.total
            extra = f", {self._postfix}" if self._postfix else ""
            log.info("%s: %3.0f%% (%d/%d), %.1f %s/s%s", self.desc or "progress", pct, self.n, self.total, rate,
                     self.unit, extra)

    def set_postfix(self, **kw: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def write(self, msg: str) -> None:
        log.info("%s", msg)

    def close(self) -> None:
        return None

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str = "", unit: str = "it", initial: int = 0, enabled: bool = True,
                 leave: bool = True) -> Any:
    """A tqdm bar on a terminal, a :class:`LineProgress` otherwise (``enabled=False``: silent)."""
    if _is_tty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, dynamic_ncols=True,
                    leave=leave)
    return LineProgress(total, desc, unit, initial, disable=not enabled)


def track(iterable: Any, desc: str = "", total: int | None = None, unit: str = "it") -> Any:
    """Iterate ``iterable`` with :func:`progress_bar` (tqdm on a terminal, 10 % log lines elsewhere)."""
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    bar = progress_bar(total, desc=desc, unit=unit, leave=False)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
