"""Progress of long steps, on stderr.

On a terminal: a tqdm bar. Anywhere else (CI logs, pipes, files), where a redrawn bar would be
noise and tqdm prints nothing, a plain line every :data:`INTERVAL_S` seconds:
``onnxvq: encoding 12/83 weights (14%), 31 s``, and one at the end of a step that printed any.
Both have the same small interface (``update``, ``set_postfix_str``, ``set_postfix``, iteration,
context manager), so callers do not care which they got.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

__all__ = ["INTERVAL_S", "progress"]

INTERVAL_S = 5.0


def progress(*, total: int | None = None, desc: str, unit: str, enabled: bool, iterable: Iterable | None = None):
    """A progress reporter for ``total`` units of work (or over ``iterable``)."""
    if enabled and not sys.stderr.isatty():
        return _Lines(total=total if total is not None else _length(iterable), desc=desc, unit=unit, iterable=iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


def _length(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


class _Lines:
    def __init__(self, *, total: int | None, desc: str, unit: str, iterable: Iterable | None):
        self.total, self.desc, self.unit, self.iterable = total, desc, unit, iterable
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.printed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= INTERVAL_S:
            self._line(now)

    def close(self) -> None:
        if self.printed:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self.last = now
        self.printed = True
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"onnxvq: {self.desc} {done} {self.unit}s{share}, {now - self.start:.0f} s{extra}", file=sys.stderr, flush=True)
