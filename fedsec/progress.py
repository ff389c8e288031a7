"""Progress bars for the long steps of a run's setup (tokenizing, the frozen prefix, DPO's
reference pass), shown on stderr while `showing(True)` is in force and stderr is a
terminal: counts, rate and the time left, as tqdm prints them. A bar is cleared when its
step ends, so a setup that fails on bad input still ends with its one error line (into
a file or pipe no bar is written at all). Off by default: library calls stay quiet."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar

from tqdm import tqdm

_SHOW: ContextVar[bool] = ContextVar("fedsec_setup_progress", default=False)


@contextlib.contextmanager
def showing(enabled: bool) -> Iterator[None]:
    """Show setup progress bars inside this block (a run with progress on)."""
    token = _SHOW.set(enabled)
    try:
        yield
    finally:
        _SHOW.reset(token)


def shown() -> bool:
    """Whether setup progress bars are on here (a sweep turns them on around its runs)."""
    return _SHOW.get()


def bar(total: int, desc: str, unit: str) -> tqdm:
    """A bar of `total` `unit`s, or a silent one when progress is off or the step is tiny."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not _SHOW.get() or total < 2 or not sys.stderr.isatty())


def note(text: str) -> None:
    """One line on stderr while progress is shown (a run's setup facts: what a cache holds)."""
    if _SHOW.get():
        print(text, file=sys.stderr)
