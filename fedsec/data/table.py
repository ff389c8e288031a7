"""A federation's examples where they lie: rows of a memory-mapped Arrow table.

A file's or hub dataset's rows stay in `datasets`' Arrow table (mapped from its cache,
not copied into Python objects); `Examples` is a sequence of some of its rows, each
converted to a fedsec example (InstructionExample, ChatExample, PreferenceExample)
when it is read. A client's examples are such a sequence, so a federation of 100,000
clients holds 100,000 small index arrays, and only the clients a round samples are ever
turned into examples and tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np

BATCH = 1024  # rows read from the table per step of an iteration


class Examples(Sequence):
    """Rows `rows` of `table`, each read as `convert(row, index)` (index: the row's number
    in the table, what an error names)."""

    def __init__(self, table: datasets.Dataset, convert: Callable[[Mapping[str, Any], int], Any],
                 rows: np.ndarray | None = None):
        self.table, self.convert = table, convert
        self.rows = np.arange(len(table), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Examples(self.table, self.convert, self.rows[k])
        row = int(self.rows[k])
        return self.convert(self.table[row], row)

    def select(self, positions: Sequence[int] | np.ndarray) -> Examples:
        """The examples at `positions` of this sequence, in that order (still unread)."""
        return Examples(self.table, self.convert, self.rows[np.asarray(positions, dtype=np.int64)])

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self.rows), BATCH):
            chunk = self.rows[start: start + BATCH]
            columns = self.table[chunk.tolist()]  # one read of the batch's rows, column by column
            names = list(columns)
            for k, values in enumerate(zip(*(columns[n] for n in names), strict=True)):
                yield self.convert(dict(zip(names, values, strict=True)), int(chunk[k]))

    def column(self, name: str) -> list:
        """Column `name` of these rows, as stored (no conversion): partition keys."""
        if name not in self.table.column_names:
            return [None] * len(self.rows)
        values = self.table.data.table.column(name)
        return values.take(self.rows).to_pylist() if len(self.rows) else []

    def __eq__(self, other) -> bool:
        if isinstance(other, Examples) and other.table is self.table and other.convert is self.convert:
            return np.array_equal(self.rows, other.rows)
        return isinstance(other, (Sequence, tuple)) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __add__(self, other) -> tuple:
        return (*self, *other)

    def __radd__(self, other) -> tuple:
        return (*other, *self)

    def __repr__(self) -> str:
        return f"Examples({len(self.rows)} rows of a {len(self.table)}-row table)"
