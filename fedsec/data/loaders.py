"""Loaders: local files and Hugging Face datasets by name, mapped to the schemas.

A `DatasetSpec` says how a known dataset's columns map to fedsec's schema; any
local json/jsonl/parquet/csv file works with a field mapping from the config
(`data.fields`). Both load through Hugging Face `datasets` into memory-mapped Arrow
tables (loading by name needs network access); the mapping code is the same for both.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

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
# Raw records: Arrow tables through Hugging Face `datasets`.


MAX_LINE = 16 << 20  # characters in one line of a JSONL file, one CSV field or one text value


def is_local_file(source: str) -> bool:
    return source.endswith(FILE_SUFFIXES) or os.path.exists(source)


def read_table(source: str, split: str = "train") -> datasets.Dataset:
    """A local file's or a Hugging Face dataset's rows as an Arrow table, memory-mapped from
    `datasets`' cache (under $FEDSEC_CACHE/datasets, keyed by the file's fingerprint: a
    second read of an unchanged file maps the same table without parsing it again)."""
    if is_local_file(source):
        return read_file_table(Path(source))
    return _read_hub(source, split)


def read_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local file, or of a Hugging Face dataset by name, as dicts (small files:
    benchmarks, probes; a federation's data stays in its table, fedsec.data.table)."""
    return read_table(source, split).to_list()


def read_file(path: Path) -> list[dict[str, Any]]:
    return read_file_table(path).to_list()


def read_file_table(path: Path) -> datasets.Dataset:
    """A json/jsonl/csv/parquet file (.gz for the JSON ones) as an Arrow table. A file Arrow
    cannot read is examined again to say where it breaks (line and column, as an editor counts)."""
    if not path.is_file():
        raise ConfigError("data.source", str(path), "no such file")
    name = path.name
    if not name.endswith(FILE_SUFFIXES):
        raise ConfigError("data.source", str(path), f"unknown file type; use one of {', '.join(FILE_SUFFIXES)}")
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            table = _empty() if _blank(path) else _load(path, "json")
        elif name.endswith((".json", ".json.gz")):
            table = _json_document(path)
        elif name.endswith(".csv"):
            header = _check_csv(path)
            table = _load(path, "csv", features=datasets.Features({c: datasets.Value("string") for c in header}),
                          keep_default_na=False, na_filter=False) if header else _empty()
        else:
            table = _load(path, "parquet")
    except UnicodeDecodeError:
        raise ConfigError("data.source", str(path), "is not UTF-8 text") from None
    except ConfigError:
        raise
    except Exception as err:  # Arrow refused the file: find the line that breaks it
        if isinstance(err.__cause__, ConfigError):  # raised while `datasets` read the file
            raise err.__cause__ from None
        raise _diagnose(path, err) from None
    _check_lengths(table, path)
    return table


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """`datasets` without its progress bars and log lines (fedsec reports its own errors)."""
    shown, level = not datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if shown:
            datasets.enable_progress_bars()


def datasets_cache() -> Path:
    from fedsec.models import cache_dir

    return cache_dir() / "datasets"


def _load(path: Path, builder: str, **options) -> datasets.Dataset:
    with quiet_datasets():
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(datasets_cache()),
                                     **options)


def _empty() -> datasets.Dataset:
    return datasets.Dataset.from_dict({})


def _blank(path: Path) -> bool:
    """Whether the file holds whitespace only (an empty table; Arrow finds no data to type)."""
    with _open_text(path) as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else path.open(encoding="utf-8")


def _json_document(path: Path) -> datasets.Dataset:
    """A .json file: one document, a list of records or FedLLM-Bench's {client: [records]}
    (flattened, the client kept as a column), parsed once and kept as an Arrow table
    (cached by the file's path, size and modification time)."""
    stat = path.stat()
    version = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with quiet_datasets():
        table = datasets.Dataset.from_generator(_document_rows, gen_kwargs={"path": str(path), "version": version},
                                                cache_dir=str(datasets_cache()))
    return table


def _document_rows(path: str, version: tuple) -> Iterator[dict[str, Any]]:
    with _open_text(Path(path)) as fh:
        try:
            obj = json.load(fh)
        except json.JSONDecodeError as err:
            raise ConfigError("data.source", path, f"invalid JSON at line {err.lineno}: {err.msg}") from None
    if isinstance(obj, list):
        yield from (_row(r, Path(path)) for r in obj)
    elif isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        yield from ({**_row(r, Path(path)), USER_KEY: str(uid)} for uid, records in obj.items() for r in records)
    else:
        raise ConfigError("data.source", path, "expected a JSON list of records or an object {client: [records]}")


def _row(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ConfigError("data.source", str(path), "every record must be a JSON object")
    return obj


def _check_csv(path: Path) -> list[str]:
    """The header of a CSV file whose every row has the header's number of fields, none
    longer than MAX_LINE characters (else the line that breaks it, one error)."""
    csv.field_size_limit(MAX_LINE)
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            for row in reader:
                if header is not None and len(row) != len(header) and row:
                    raise ConfigError("data.source", str(path), f"line {reader.line_num} has {len(row)} fields, the "
                                      f"header {len(header)}; quote fields that hold commas, or fix the row")
        except csv.Error as err:
            raise ConfigError("data.source", str(path), f"a field is longer than {MAX_LINE} characters or "
                              f"the CSV is malformed ({err}); check the file") from None
    return header or []


def _diagnose(path: Path, err: Exception) -> ConfigError:
    """What breaks a JSON-lines file Arrow refused: its first line that is not one JSON
    object, or (none found) Arrow's own first line of the error."""
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        with _open_text(path) as fh:
            number = 0
            while line := fh.readline(MAX_LINE + 1):
                number += 1
                if len(line) > MAX_LINE:
                    return ConfigError("data.source", str(path), f"line {number} is longer than {MAX_LINE} characters;"
                                       " one record per line is expected (a file that size is not instruction data)")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as bad:
                    return ConfigError("data.source", str(path), f"invalid JSON at line {number}, column "
                                       f"{bad.colno}: {bad.msg}")
                if not isinstance(obj, dict):
                    return ConfigError("data.source", str(path), f"line {number} is not a JSON object; every "
                                       "record must be one")
    cause = err.__cause__ or err
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return ConfigError("data.source", str(path), f"unreadable ({first}); check the file")


def _check_lengths(table: datasets.Dataset, path: Path) -> None:
    """No text value longer than MAX_LINE characters (a file that size is not instruction data)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for column in table.data.table.columns:
        if (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) and len(column):
            longest = pc.max(pc.utf8_length(column)).as_py()
            if longest is not None and longest > MAX_LINE:
                raise ConfigError("data.source", str(path), f"a value is longer than {MAX_LINE} characters; one "
                                  "record per line is expected (a file that size is not instruction data)")


def _read_hub(name: str, split: str) -> datasets.Dataset:
    try:
        with quiet_datasets():
            return datasets.load_dataset(name, split=split, cache_dir=str(datasets_cache()))
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


def infer_preference_spec(source: str, row: Mapping[str, Any]) -> DatasetSpec | None:
    """The layout a file of preference pairs is read by without data.fields, from its first
    record: `prompt`/`chosen`/`rejected` as text, or with the replies as `{role, content}`
    lists (UltraFeedback's), or `chosen`/`rejected` alone as whole dialogues (HH-RLHF's
    "\n\nHuman: ... \n\nAssistant: ..."; the last Assistant turn is split off). None if
    none fits."""
    if all(column in row for column in ("prompt", "chosen", "rejected")):
        fmt = "messages" if isinstance(row["chosen"], list) else "fields"
        return DatasetSpec(source, "preference", {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
                           fmt=fmt)
    if isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str) and _ASSISTANT in row["chosen"]:
        return DatasetSpec(source, "preference", {"chosen": "chosen", "rejected": "rejected"}, fmt="hh-rlhf",
                           note="dialogues; the last Assistant turn is split off")
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


def to_sft_examples(rows: Iterable[Mapping[str, Any]], spec: DatasetSpec) -> list[SftExample]:
    convert = sft_converter(spec)
    return [convert(r, i) for i, r in enumerate(rows)]


def to_preference_examples(rows: Iterable[Mapping[str, Any]], spec: DatasetSpec) -> list[PreferenceExample]:
    convert = preference_converter(spec)
    return [convert(r, i) for i, r in enumerate(rows)]


def sft_converter(spec: DatasetSpec) -> Callable[[Mapping[str, Any], int], SftExample]:
    """Row i of an instruction or chat table -> its example (a one-line error names the
    field and the record where a row does not fit the mapping)."""
    if spec.task == "chat":
        col = spec.fields["messages"]
        return lambda r, i: ChatExample(_messages(_get(r, col, i), col, i), _meta(r, spec))
    if spec.task != "instruction":
        raise ConfigError("data.source", spec.name, f"is a {spec.task} dataset; task sft needs "
                          "instruction or chat data")
    f = spec.fields
    prompt_col = f.get("prompt", f.get("instruction"))
    response_col = f.get("response")
    if prompt_col is None or response_col is None:
        raise ConfigError("data.fields", dict(f), "map both prompt (or instruction) and response")

    def convert(r: Mapping[str, Any], i: int) -> SftExample:
        prompt = _text(_get(r, prompt_col, i), prompt_col, i)
        extra = r.get(f["input"]) if "input" in f else None
        if extra:
            prompt = f"{prompt}\n\n{_text(extra, f['input'], i)}"
        system = _text(r[f["system"]], f["system"], i) if "system" in f and r.get(f["system"]) else None
        return InstructionExample(prompt, _text(_get(r, response_col, i), response_col, i), system, _meta(r, spec))

    return convert


def preference_converter(spec: DatasetSpec) -> Callable[[Mapping[str, Any], int], PreferenceExample]:
    """Row i of a preference table -> its pair."""
    f = spec.fields

    def convert(r: Mapping[str, Any], i: int) -> PreferenceExample:
        if spec.fmt == "hh-rlhf":
            try:
                prompt, chosen, rejected = split_hh_rlhf(_text(_get(r, f["chosen"], i), f["chosen"], i),
                                                         _text(_get(r, f["rejected"], i), f["rejected"], i))
            except ValueError:
                raise ConfigError("data.fields", f["chosen"], f"record {i} is read as an HH-RLHF dialogue but has "
                                  "no '\\n\\nAssistant:' turn; give prompt, chosen and rejected columns "
                                  "(or map them with data.fields)") from None
        elif spec.fmt == "messages":
            prompt = _text(_get(r, f["prompt"], i), f["prompt"], i)
            chosen = _last_assistant(_get(r, f["chosen"], i), f["chosen"], i)
            rejected = _last_assistant(_get(r, f["rejected"], i), f["rejected"], i)
        else:
            prompt, chosen, rejected = (_text(_get(r, f[k], i), f[k], i)
                                        for k in ("prompt", "chosen", "rejected"))
        return PreferenceExample(prompt, chosen, rejected, meta=_meta(r, spec))

    return convert


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
