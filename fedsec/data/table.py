"""A federation's examples where they lie: rows of a memory-mapped Arrow table.

A file's or hub dataset's rows stay in `datasets`' Arrow table (mapped from its cache,
not copied into Python objects); `Examples` is a sequence of some of its rows, each
converted to a fedsec example (InstructionExample, ChatExample, PreferenceExample)
when it is read. A client's examples are such a sequence, so a federation of 100,000
clients holds 100,000 small index arrays, and only the clients a round samples are ever
turned into examples and tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch

BATCH = 1024  # rows read from the table per step of an iteration


class Examples(Sequence):
    """Rows `rows` of `table`, each read as `convert(row, index)` (index: the row's number
    in the table, what an error names); `mapping` says in words what `convert` reads (the
    task and field mapping: part of the key under which TokenTable caches their tokens)."""

    __slots__ = ("table", "convert", "rows", "mapping")

    def __init__(self, table: datasets.Dataset, convert: Callable[[Mapping[str, Any], int], Any],
                 rows: np.ndarray | None = None, mapping: str = ""):
        self.table, self.convert, self.mapping = table, convert, mapping
        self.rows = np.arange(len(table), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Examples(self.table, self.convert, self.rows[k], self.mapping)
        row = int(self.rows[k])
        return self.convert(self.table[row], row)

    def select(self, positions: Sequence[int] | np.ndarray) -> Examples:
        """The examples at `positions` of this sequence, in that order (still unread)."""
        return Examples(self.table, self.convert, self.rows[np.asarray(positions, dtype=np.int64)], self.mapping)

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

    def __add__(self, other) -> Extended:
        """These rows, then `other`'s examples (a few: canaries, alignment data), still unread."""
        return Extended(self, tuple(other))

    def __radd__(self, other) -> tuple:
        return (*other, *self)

    def __repr__(self) -> str:
        return f"Examples({len(self.rows)} rows of a {len(self.table)}-row table)"


class Extended(Sequence):
    """A client's table rows (`rows`, Examples) followed by examples of its own (`extra`: the
    canaries or alignment data planted in it), the rows still unread: a federation of many
    file clients with alignment data keeps the memory of its table, and its rows' tokens stay
    the token table's (fedsec.setup.TokenTables)."""

    __slots__ = ("rows", "extra")

    def __init__(self, rows: Examples, extra: tuple):
        self.rows, self.extra = rows, extra

    def __len__(self) -> int:
        return len(self.rows) + len(self.extra)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return tuple(self[i] for i in range(len(self))[k])
        k = range(len(self))[k]  # a negative index counts from the end; out of range raises IndexError
        return self.rows[k] if k < len(self.rows) else self.extra[k - len(self.rows)]

    def __iter__(self) -> Iterator[Any]:
        yield from self.rows
        yield from self.extra

    def __add__(self, other) -> Extended:
        return Extended(self.rows, self.extra + tuple(other))

    def __radd__(self, other) -> tuple:
        return (*other, *self)

    def __eq__(self, other) -> bool:
        return isinstance(other, (Sequence, tuple)) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Extended({self.rows!r} + {len(self.extra)} examples)"


class TokenTable:
    """Every row of a table encoded once, `encode(example)` -> Encoded or None (None: the
    answer does not fit), kept as a memory-mapped Arrow table of its own. Cached by
    fingerprint: the table's and `key` (what the encoding depends on: tokenizer,
    template, max_length, the field mapping), so a later run on the same file and
    settings, a sweep's next run, reads the tokens instead of tokenizing again."""

    def __init__(self, examples: Examples, encode: Callable[[Any], Any], key: str):
        from fedsec.data.loaders import datasets_cache, quiet_datasets

        table, convert = examples.table, examples.convert
        fingerprint = hashlib.sha256(f"{table._fingerprint}|{examples.mapping}|{key}".encode()).hexdigest()[:32]
        path = datasets_cache() / "tokens" / f"{fingerprint}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)

        def encode_batch(batch: dict, indices: list[int]) -> dict:
            ids, labels = [], []
            for values, i in zip(zip(*batch.values(), strict=True), indices, strict=True):
                item = encode(convert(dict(zip(batch, values, strict=True)), i))
                ids.append(item.input_ids.tolist() if item is not None else [])
                labels.append(item.labels.tolist() if item is not None else [])
            return {"input_ids": ids, "labels": labels}

        column = datasets.List(datasets.Value("int32"))
        with quiet_datasets():
            self.tokens = table.map(encode_batch, batched=True, with_indices=True, remove_columns=table.column_names,
                                    features=datasets.Features({"input_ids": column, "labels": column}),
                                    new_fingerprint=fingerprint, cache_file_name=str(path))
        import pyarrow.compute as pc

        self.lengths = pc.list_value_length(self.tokens.data.table.column("input_ids")).to_numpy(zero_copy_only=False)

    def size(self, rows: np.ndarray) -> int:
        """How many of `rows` fit (have items)."""
        return int((self.lengths[rows] > 0).sum())

    def items(self, rows: np.ndarray) -> list:
        """The items of `rows` that fit, in their order: what encoding their examples gives."""
        from fedsec.encoding import DATA, Encoded

        kept = [int(r) for r in rows if self.lengths[r] > 0]
        if not kept:
            return []
        columns = self.tokens[kept]
        return [Encoded(torch.tensor(ids, dtype=torch.int32, device=DATA),
                        torch.tensor(labels, dtype=torch.int32, device=DATA))
                for ids, labels in zip(columns["input_ids"], columns["labels"], strict=True)]
