"""Progress bars for the long steps of a run's setup (tokenizing, the frozen prefix, DPO's
reference pass), shown on stderr while `showing(True)` is in force: counts, rate and the
time left, as tqdm prints them. Off by default, so library calls and tests stay quiet."""

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


def bar(total: int, desc: str, unit: str) -> tqdm:
    """A bar of `total` `unit`s, or a silent one when progress is off or the step is tiny."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not _SHOW.get() or total < 2)
