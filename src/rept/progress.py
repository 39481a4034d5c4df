"""Progress on long work: a tqdm bar on a terminal, sparse lines anywhere else.

Off a terminal (CI, `> log 2>&1`, nohup) a bar's redraws pile up into thousands of lines, so
there each bar prints one line when it starts, one each time another 10% is done or 30 s have
passed, and one when it ends. REPT_PROGRESS=bars or =lines forces either.
"""

from __future__ import annotations

import os
import sys
import time

LINE_EVERY_SECONDS = 30.0
LINE_EVERY_SHARE = 0.10


def progress_bar(iterable=None, **kwargs):
    """tqdm's signature (total, desc, disable, initial, unit, ...): a tqdm bar on a terminal,
    a LineProgress elsewhere."""
    from tqdm.auto import tqdm

    style = os.environ.get("REPT_PROGRESS") or ("bars" if sys.stderr.isatty() else "lines")
    if kwargs.get("disable") or style == "bars":
        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)


class LineProgress:
    """The few calls of tqdm that rept makes (update, set_postfix, close, iteration), as lines."""

    def __init__(self, iterable=None, total=None, desc: str = "", initial: int = 0, unit: str = "it",
                 file=None, **_ignored):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.n = desc or "progress", unit, initial
        self.file = file or sys.stderr
        self.postfix = ""
        self.start = self.last_time = time.monotonic()
        self.last_share = self._share()
        self.closed = False
        self._print(f"started ({self.total} {self.unit}s)" if self.total is not None else "started")

    def _share(self) -> float:
        return self.n / self.total if self.total else 0.0

    def _print(self, what: str) -> None:
        print(f"{self.desc}: {what}", file=self.file, flush=True)

    def _status(self) -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total} ({self._share():.0%})" if self.total else f"{self.n} {self.unit}s"
        return f"{done}, {elapsed:.0f} s" + (f", {self.postfix}" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self._share() - self.last_share >= LINE_EVERY_SHARE or now - self.last_time >= LINE_EVERY_SECONDS:
            if not (self.total and self.n >= self.total):  # the last line is close()'s
                self._print(self._status())
            self.last_time, self.last_share = now, self._share()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print("done, " + self._status())

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
