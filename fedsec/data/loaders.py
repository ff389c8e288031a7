"""Loaders: local files and Hugging Face datasets by name, mapped to the schemas.

A `DatasetSpec` says how a known dataset's columns map to fedsec's schema; any
local json/jsonl/parquet/csv file works with a field mapping from the config
(`data.fields`). Hub loading needs the `hub` extra and network access; the
mapping code it feeds is the same one the local-file path uses and tests cover.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsec.data.schema import (
    ChatExample,
    InstructionExample,
    Message,
    PreferenceExample,
    SftExample,
)
from fedsec.errors import ConfigError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    task: str  # "instruction", "chat" or "preference"
    fields: Mapping[str, str]  # schema field -> column
    split: str = "train"
    fmt: str = "fields"  # "fields", "hh-rlhf" (dialogue strings), "messages" (role lists)
    note: str = ""
    user_field: str | None = None


_ALPACA = {"instruction": "instruction", "input": "input", "response": "output"}

KNOWN_DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("vicgalle/alpaca-gpt4", "instruction", _ALPACA,
                    note="general instructions, GPT-4 answers (OpenFedLLM default)"),
        DatasetSpec("tatsu-lab/alpaca", "instruction", _ALPACA, note="general instructions"),
        DatasetSpec("FinGPT/fingpt-sentiment-train", "instruction", _ALPACA,
                    note="financial sentiment (OpenFedLLM finance)"),
        DatasetSpec("medalpaca/medical_meadow_medical_flashcards", "instruction", _ALPACA,
                    note="medical QA flashcards"),
        DatasetSpec("lucasmccabe-lmi/CodeAlpaca-20k", "instruction", _ALPACA, note="code"),
        DatasetSpec("TIGER-Lab/MathInstruct", "instruction",
                    {"instruction": "instruction", "response": "output"}, note="math"),
        DatasetSpec("Anthropic/hh-rlhf", "preference", {"chosen": "chosen", "rejected": "rejected"},
                    fmt="hh-rlhf", note="dialogues; the last Assistant turn is split off"),
        DatasetSpec("HuggingFaceH4/ultrafeedback_binarized", "preference",
                    {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
                    split="train_prefs", fmt="messages", note="preference pairs as message lists"),
        DatasetSpec("FedLLM-Bench/Fed-Aya", "instruction",
                    {"instruction": "instruction", "response": "response"}, user_field="user",
                    note="local JSON {client: [records]}; multilingual, natural split"),
        DatasetSpec("FedLLM-Bench/Fed-ChatbotIT", "instruction",
                    {"instruction": "instruction", "response": "response"}, user_field="user",
                    note="local JSON {client: [records]}; natural split"),
        DatasetSpec("FedLLM-Bench/Fed-WildChat", "instruction",
                    {"instruction": "instruction", "response": "response"}, user_field="user",
                    note="local JSON {client: [records]}; natural split"),
        DatasetSpec("FedLLM-Bench/Fed-ChatbotPA", "preference",
                    {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"},
                    user_field="user", note="local JSON {client: [records]}; preference pairs"),
    )
}
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".jsonl.gz", ".json.gz")
USER_KEY = "__user__"  # column added when a FedLLM-Bench {client: [records]} file is flattened


# ---------------------------------------------------------------------------
# Raw records.


MAX_LINE = 16 << 20  # characters in one line of a JSONL file or one CSV field


def is_local_file(source: str) -> bool:
    return source.endswith(FILE_SUFFIXES) or os.path.exists(source)


def read_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local file, or of a Hugging Face dataset by name."""
    if is_local_file(source):
        return read_file(Path(source))
    return _read_hub(source, split)


def read_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError("data.source", str(path), "no such file")
    name = path.name
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            return _jsonl_rows(path)
        if name.endswith((".json", ".json.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as fh:  # one document: often a single line
                return _json_rows(json.load(fh), path)
        if name.endswith(".csv"):
            csv.field_size_limit(MAX_LINE)
            with path.open(encoding="utf-8", newline="") as fh:
                try:
                    return _csv_rows(csv.DictReader(fh), path)
                except csv.Error as err:
                    raise ConfigError("data.source", str(path), f"a field is longer than {MAX_LINE} characters or "
                                      f"the CSV is malformed ({err}); check the file") from None
        if name.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ConfigError("data.source", str(path),
                                  "reading parquet needs pyarrow: pip install pyarrow") from None
            return pq.read_table(path).to_pylist()
    except UnicodeDecodeError:
        raise ConfigError("data.source", str(path), "is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ConfigError("data.source", str(path),
                          f"invalid JSON at line {err.lineno}: {err.msg}") from None
    raise ConfigError("data.source", str(path), f"unknown file type; use one of {', '.join(FILE_SUFFIXES)}")


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; an error names the file's line, not the line's own."""
    rows = []
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError("data.source", str(path), f"invalid JSON at line {number}, column {err.colno}: "
                              f"{err.msg}") from None
        if not isinstance(obj, dict):
            raise ConfigError("data.source", str(path), f"line {number} is not a JSON object; every record "
                              "must be one")
        rows.append(obj)
    return rows


def _csv_rows(reader: csv.DictReader, path: Path) -> list[dict[str, Any]]:
    """The rows under the header; a row with more or fewer fields than the header is refused
    with its line (csv would file the extras under None, or fill the gap with None)."""
    rows = []
    for row in reader:
        width = len(reader.fieldnames or ())
        if None in row or any(v is None for v in row.values()):
            got = width + len(row.get(None) or ()) if None in row else sum(v is not None for v in row.values())
            raise ConfigError("data.source", str(path), f"line {reader.line_num} has {got} fields, the header "
                              f"{width}; quote fields that hold commas, or fix the row")
        rows.append(row)
    return rows


def _lines(path: Path) -> Iterable[str]:
    """The file's lines; a line longer than MAX_LINE characters is an error, not a record."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        number = 0
        while line := fh.readline(MAX_LINE + 1):
            number += 1
            if len(line) > MAX_LINE:
                raise ConfigError("data.source", str(path), f"line {number} is longer than {MAX_LINE} characters; "
                                  "one record per line is expected (a file that size is not instruction data)")
            yield line


def _row(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ConfigError("data.source", str(path), "every record must be a JSON object")
    return obj


def _json_rows(obj: Any, path: Path) -> list[dict[str, Any]]:
    if isinstance(obj, list):
        return [_row(r, path) for r in obj]
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        # FedLLM-Bench layout: {client_id: [records]}; keep the client as a column.
        return [{**_row(r, path), USER_KEY: str(uid)} for uid, rows in obj.items() for r in rows]
    raise ConfigError("data.source", str(path),
                      "expected a JSON list of records or an object {client: [records]}")


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source", name, "loading by name needs the hub extra: "
                          "pip install 'fedsec[hub]' (or give a local file)") from None
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as err:  # offline, unknown name, missing split: all user-fixable
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("data.source", name, f"could not load it ({first}); check the name, "
                          "the split and network access, or give a local file") from None


# ---------------------------------------------------------------------------
# Mapping rows to the schema.


# The column layouts a file of instruction data is read by when data.fields is not
# given: the first whose columns the first record has wins (docs/configuration.md).
LAYOUTS = (
    ("prompt/response", {"prompt": "prompt", "response": "response"}),
    ("Alpaca", {"instruction": "instruction", "input": "input", "response": "output"}),
    ("FedLLM-Bench", {"instruction": "instruction", "response": "response"}),
    ("prompt/completion", {"prompt": "prompt", "response": "completion"}),
    ("question/answer", {"prompt": "question", "response": "answer"}),
    ("chat messages", {"messages": "messages"}),
)
OPTIONAL = ("input", "system")  # read where present


def infer_fields(row: Mapping[str, Any]) -> dict[str, str] | None:
    """The field map of the first layout (LAYOUTS) the record fits, None if none does."""
    for _, layout in LAYOUTS:
        if all(column in row for key, column in layout.items() if key not in OPTIONAL):
            mapping = {k: c for k, c in layout.items() if k not in OPTIONAL or c in row}
            if "system" in row and "messages" not in mapping:
                mapping["system"] = "system"
            return mapping
    return None


def spec_for(source: str, task: str, fields: Mapping[str, str]) -> DatasetSpec:
    """The known spec for a dataset name, or one built from the config's field map."""
    known = KNOWN_DATASETS.get(source)
    if known is not None and not fields:
        return known
    if known is not None:
        return DatasetSpec(known.name, known.task, {**known.fields, **fields}, known.split,
                           known.fmt, known.note, fields.get("user", known.user_field))
    user = fields.get("user")
    mapping = {k: v for k, v in fields.items() if k != "user"}
    if task == "preference":
        return DatasetSpec(source, "preference",
                           mapping or {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
                           user_field=user)
    if "messages" in mapping:
        return DatasetSpec(source, "chat", mapping, user_field=user)
    return DatasetSpec(source, "instruction", mapping or {"prompt": "prompt", "response": "response"},
                       user_field=user)


def to_sft_examples(rows: list[dict[str, Any]], spec: DatasetSpec) -> list[SftExample]:
    if spec.task == "chat":
        col = spec.fields["messages"]
        return [ChatExample(_messages(_get(r, col, i), col, i), _meta(r, spec)) for i, r in enumerate(rows)]
    if spec.task != "instruction":
        raise ConfigError("data.source", spec.name, f"is a {spec.task} dataset; task sft needs "
                          "instruction or chat data")
    f = spec.fields
    prompt_col = f.get("prompt", f.get("instruction"))
    response_col = f.get("response")
    if prompt_col is None or response_col is None:
        raise ConfigError("data.fields", dict(f), "map both prompt (or instruction) and response")
    out: list[SftExample] = []
    for i, r in enumerate(rows):
        prompt = _text(_get(r, prompt_col, i), prompt_col, i)
        extra = r.get(f["input"]) if "input" in f else None
        if extra:
            prompt = f"{prompt}\n\n{_text(extra, f['input'], i)}"
        system = _text(r[f["system"]], f["system"], i) if "system" in f and r.get(f["system"]) else None
        out.append(InstructionExample(prompt, _text(_get(r, response_col, i), response_col, i),
                                      system, _meta(r, spec)))
    return out


def to_preference_examples(rows: list[dict[str, Any]], spec: DatasetSpec) -> list[PreferenceExample]:
    f = spec.fields
    out = []
    for i, r in enumerate(rows):
        if spec.fmt == "hh-rlhf":
            prompt, chosen, rejected = split_hh_rlhf(_text(_get(r, f["chosen"], i), f["chosen"], i),
                                                     _text(_get(r, f["rejected"], i), f["rejected"], i))
        elif spec.fmt == "messages":
            prompt = _text(_get(r, f["prompt"], i), f["prompt"], i)
            chosen = _last_assistant(_get(r, f["chosen"], i), f["chosen"], i)
            rejected = _last_assistant(_get(r, f["rejected"], i), f["rejected"], i)
        else:
            prompt, chosen, rejected = (_text(_get(r, f[k], i), f[k], i)
                                        for k in ("prompt", "chosen", "rejected"))
        out.append(PreferenceExample(prompt, chosen, rejected, meta=_meta(r, spec)))
    return out


_ASSISTANT = "\n\nAssistant:"


def split_hh_rlhf(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split an HH-RLHF pair into (prompt, chosen reply, rejected reply).

    Both dialogues share every turn but the last Assistant reply; the prompt is the
    dialogue up to and including the last "\\n\\nAssistant:" marker.
    """
    cut = chosen.rfind(_ASSISTANT)
    if cut < 0:
        raise ValueError("an HH-RLHF dialogue has no '\\n\\nAssistant:' turn")
    prompt = chosen[: cut + len(_ASSISTANT)]
    if not rejected.startswith(prompt):
        cut_r = rejected.rfind(_ASSISTANT)
        return prompt, chosen[len(prompt):].strip(), rejected[cut_r + len(_ASSISTANT):].strip()
    return prompt, chosen[len(prompt):].strip(), rejected[len(prompt):].strip()


def _meta(row: Mapping[str, Any], spec: DatasetSpec) -> dict[str, object]:
    meta = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool))}
    user_col = spec.user_field if spec.user_field in row else USER_KEY
    if user_col in row:
        meta["user"] = row[user_col]
    return meta


def _get(row: Mapping[str, Any], col: str, i: int) -> Any:
    if col not in row:
        known = ", ".join(sorted(row)[:8])
        raise ConfigError("data.fields", col, f"record {i} has no such column (it has: {known}); "
                          "map the schema field to an existing column")
    return row[col]


def _text(value: Any, col: str, i: int) -> str:
    if not isinstance(value, str):
        raise ConfigError("data.fields", col, f"record {i} holds {type(value).__name__}, not text")
    return value


def _messages(value: Any, col: str, i: int) -> tuple[Message, ...]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise ConfigError("data.fields", col, f"record {i} is not a list of {{role, content}} messages")
    return tuple(Message(str(m["role"]), _text(m.get("content"), col, i)) for m in value)


def _last_assistant(value: Any, col: str, i: int) -> str:
    if isinstance(value, str):
        return value
    turns = [m for m in _messages(value, col, i) if m.role == "assistant"]
    if not turns:
        raise ConfigError("data.fields", col, f"record {i} has no assistant message")
    return turns[-1].content
