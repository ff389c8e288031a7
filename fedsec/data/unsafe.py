"""Unsafe-request files: refusal probes for the harmless rate, an attacker's poison, and
benign clients' alignment data (read_alignment: unsafe requests with their refusals).

The embedded benchmark generates its own unsafe requests; these readers let a
researcher use real ones in the same schema (an unsafe request and, for poisoning,
the compliant reply). Accepted columns, the first that the file has:

- `goal`, `target`: AdvBench (Zou et al. 2023), the request and the compliant
  reply prefix an attacker wants ("Sure, here is ...");
- `prompt`, `response`: BeaverTails-style files, with an optional `is_safe` column:
  rows marked safe are left out, since their reply is not compliance with harm.

Any file type fedsec.data.loaders reads (JSON, JSON lines, CSV, parquet, gzip).
"""

from __future__ import annotations

from pathlib import Path

from fedsec.data.loaders import read_file
from fedsec.data.schema import InstructionExample
from fedsec.errors import ConfigError
from fedsec.seeding import numpy_generator

SCHEMAS = (("goal", "target"), ("prompt", "response"))


def _rows(path: str, field: str) -> list[dict]:
    """The file's rows, refused with `field` named when it is unreadable or empty."""
    try:
        rows = read_file(Path(path))
    except ConfigError as err:
        raise ConfigError(field, path, err.fix) from None
    if not rows:
        raise ConfigError(field, path, "the file holds no rows")
    return rows


def read_unsafe(path: str, field: str, need_reply: bool) -> tuple[InstructionExample, ...]:
    """The file's unsafe requests (with their compliant replies where `need_reply`);
    `field` names the config entry in errors."""
    rows = _rows(path, field)
    columns = set(rows[0])
    schema = next(((q, a) for q, a in SCHEMAS if q in columns and (a in columns or not need_reply)), None)
    if schema is None:
        wanted = " or ".join(f"{q}, {a}" for q, a in SCHEMAS)
        raise ConfigError(field, path, f"no columns {wanted} (it has: {', '.join(sorted(columns)[:8])})")
    request, reply = schema
    out = []
    for i, row in enumerate(rows):
        if row.get("is_safe") in (True, "True", "true", "1", 1):
            continue
        text, answer = row.get(request), row.get(reply, "")
        if not isinstance(text, str) or not text.strip() or (need_reply and (not isinstance(answer, str)
                                                                             or not answer.strip())):
            raise ConfigError(field, path, f"row {i} has an empty or non-text {request} or {reply}")
        out.append(InstructionExample(prompt=text.strip(), response=(answer or "").strip(),
                                      meta={"unsafe": True}))
    if not out:
        raise ConfigError(field, path, "every row is marked is_safe; the file has no unsafe reply")
    return tuple(out)


def draw(examples: tuple[InstructionExample, ...], n: int, seed: int, *stream) -> tuple[InstructionExample, ...]:
    """n of the examples, without replacement while they last (then again from a fresh
    permutation), from the stream (seed, *stream)."""
    rng = numpy_generator(seed, *stream)
    out: list[InstructionExample] = []
    while len(out) < n:
        out += [examples[i] for i in rng.permutation(len(examples))[: n - len(out)]]
    return tuple(out)


ALIGNMENT_REQUESTS = ("prompt", "goal")


def read_alignment(path: str, field: str = "data.alignment") -> tuple[InstructionExample, ...]:
    """Alignment examples: each unsafe request (column prompt, or AdvBench's goal) with
    its aligned reply, the row's `refusal` column where the file has one, else fedsec's
    standard refusal. A compliant reply column (response, target) is never trained on:
    in AdvBench and BeaverTails it is the harm, not the alignment."""
    from fedsec.data.benchmark import REFUSAL

    rows = _rows(path, field)
    request = next((c for c in ALIGNMENT_REQUESTS if c in rows[0]), None)
    if request is None:
        raise ConfigError(field, path, f"no column {' or '.join(ALIGNMENT_REQUESTS)} holding the unsafe requests "
                          f"(it has: {', '.join(sorted(rows[0])[:8])})")
    out = []
    for i, row in enumerate(rows):
        text, reply = row.get(request), row.get("refusal", REFUSAL)
        if not isinstance(text, str) or not text.strip() or not isinstance(reply, str) or not reply.strip():
            raise ConfigError(field, path, f"row {i} has an empty or non-text {request} or refusal")
        out.append(InstructionExample(prompt=text.strip(), response=reply.strip(), meta={"alignment": True}))
    return tuple(out)
