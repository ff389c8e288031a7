from __future__ import annotations

import collections
import csv
import gzip
import json

import numpy as np
import pytest
from conftest import shared_file
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsec.config import BenchmarkConfig, DataConfig, from_mapping
from fedsec.data import build_federated_data
from fedsec.data.benchmark import LABELS, balanced_label_counts, make_benchmark
from fedsec.data.loaders import (
    KNOWN_DATASETS,
    read_file,
    read_records,
    spec_for,
    split_hh_rlhf,
    to_preference_examples,
    to_sft_examples,
)
from fedsec.errors import ConfigError


def test_benchmark_is_deterministic_by_seed():
    cfg = BenchmarkConfig(num_clients=5, examples_per_client=10, canaries_per_client=1)
    a, b, c = make_benchmark(cfg, 1), make_benchmark(cfg, 1), make_benchmark(cfg, 2)
    assert a == b
    assert a.clients != c.clients


def test_benchmark_global_test_is_balanced_and_clients_are_skewed():
    cfg = BenchmarkConfig(num_clients=8, examples_per_client=60, label_alpha=0.3, test_size=120)
    bench = make_benchmark(cfg, 0)
    counts = collections.Counter(ex.response for ex in bench.global_test)
    assert counts == {label: 40 for label in LABELS}
    sectors = collections.Counter(ex.meta["sector"] for ex in bench.global_test)
    assert set(sectors.values()) == {15}
    # non-IID: each client is one sector, and most have a dominant label
    for client in bench.clients:
        assert len({ex.meta["sector"] for ex in client.train}) == 1
    dominant = [max(collections.Counter(e.response for e in c.train).values()) / len(c.train)
                for c in bench.clients]
    assert sum(d > 0.6 for d in dominant) >= 4
    sizes = [len(c.train) for c in bench.clients]
    assert max(sizes) > 2 * min(sizes)  # quantity skew


def test_benchmark_extras_preference_probes_canaries():
    cfg = BenchmarkConfig(num_clients=3, examples_per_client=8, num_probes=5,
                          canaries_per_client=2, canary_repeats=3)
    bench = make_benchmark(cfg, 0)
    for client in bench.clients:
        pairs = client.preference
        assert pairs and all(p.chosen in LABELS and p.rejected in LABELS and p.chosen != p.rejected
                             for p in pairs)
        planted = [e for e in client.train if e.meta.get("canary")]
        assert len(planted) == 2 * 3
    assert len(bench.probes) == 5 and all(p.response.startswith("I can't") for p in bench.probes)
    secrets = [c.secret for c in bench.canaries]
    assert len(secrets) == 6 and all(len(s) == 6 and s.isdigit() for s in secrets)
    assert all(c.text == f"{c.prefix} {c.secret}." for c in bench.canaries)


def _write_rows(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_map_alpaca_fields(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    _write_rows(path, ALPACA_ROWS)
    spec = spec_for("vicgalle/alpaca-gpt4", "instruction", {})
    examples = to_sft_examples(read_file(path), spec)
    assert examples[0].prompt == "Add the numbers.\n\n2 and 3" and examples[0].response == "5"
    assert examples[1].prompt == "Name a colour." and examples[1].response == "Blue"


def test_fedllm_bench_client_dict_gives_natural_split(tmp_path):
    path = tmp_path / "fed_aya.json"
    path.write_text(json.dumps({
        "u7": [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(5)],
        "u9": [{"instruction": f"r{i}", "response": f"b{i}"} for i in range(4)],
    }))
    cfg = from_mapping(DataConfig, {"source": str(path), "fields": {"instruction": "instruction",
                                                                    "response": "response"},
                                    "test_fraction": 0.2, "client_test_fraction": 0.0})
    fed = build_federated_data(cfg, seed=0)
    assert len(fed.clients) == 2
    seen = sorted(ex.prompt for c in fed.clients for ex in c.train) + sorted(e.prompt for e in fed.global_test)
    assert sorted(seen) == sorted([f"q{i}" for i in range(5)] + [f"r{i}" for i in range(4)])
    for client in fed.clients:
        assert len({ex.meta["user"] for ex in client.train}) == 1


def test_dirichlet_partition_of_a_file_by_label(tmp_path):
    rows = [{"prompt": f"text {i}", "response": lab, "label": lab}
            for i, lab in enumerate(["pos", "neg", "neu"] * 20)]
    path = tmp_path / "d.jsonl"
    _write_rows(path, rows)
    cfg = from_mapping(DataConfig, {"source": str(path), "choices": ["pos", "neg", "neu"],
                                    "partition": {"scheme": "dirichlet", "num_clients": 4,
                                                  "alpha": 0.5, "by": "label"}})
    fed = build_federated_data(cfg, seed=1)
    total = len(fed.global_test) + sum(len(c.train) + len(c.test) for c in fed.clients)
    assert total == 60 and len(fed.clients) == 4 and fed.choices == ("pos", "neg", "neu")


def test_missing_column_is_a_config_error(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_rows(path, [{"q": "q", "a": "a"}] * 3)  # no layout fedsec reads without data.fields
    cfg = from_mapping(DataConfig, {"source": str(path)})
    with pytest.raises(ConfigError, match="no such column"):
        build_federated_data(cfg, seed=0)


@pytest.mark.parametrize("row, prompt, response, system", [
    ({"instruction": "Sum", "input": "2 and 3", "output": "5"}, "Sum\n\n2 and 3", "5", None),  # Alpaca
    ({"instruction": "Sum", "input": "", "output": "5"}, "Sum", "5", None),  # an empty input adds nothing
    ({"instruction": "Sum", "response": "5", "system": "Be brief."}, "Sum", "5", "Be brief."),  # FedLLM-Bench
    ({"prompt": "Sum", "completion": "5"}, "Sum", "5", None),
    ({"question": "Sum", "answer": "5"}, "Sum", "5", None),
    ({"prompt": "Sum", "response": "5", "instruction": "ignored"}, "Sum", "5", None),  # the first layout wins
])
def test_common_column_layouts_are_read_without_a_field_map(tmp_path, row, prompt, response, system):
    path = tmp_path / "d.jsonl"
    _write_rows(path, [row] * 4)
    cfg = {"source": str(path), "partition": {"scheme": "iid", "num_clients": 1}}
    example = build_federated_data(from_mapping(DataConfig, cfg), seed=0).global_test[0]
    assert (example.prompt, example.response, example.system) == (prompt, response, system)


def test_chat_messages_mapping(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    spec = spec_for("x.jsonl", "instruction", {"messages": "messages"})
    (example,) = to_sft_examples(rows, spec)
    assert [m.role for m in example.messages()] == ["user", "assistant"]


def test_hh_rlhf_split_by_hand():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant: Sure, with what?"
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant: No."
    prompt, c, r = split_hh_rlhf(chosen, rejected)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant:"
    assert (c, r) == ("Sure, with what?", "No.")


def test_hh_rlhf_mapping_on_the_real_test_split():
    path = shared_file("hh-rlhf-harmless-base-test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for _, line in zip(range(300), fh)]
    pairs = to_preference_examples(rows, KNOWN_DATASETS["Anthropic/hh-rlhf"])
    assert len(pairs) == 300
    for row, pair in zip(rows, pairs):
        assert pair.prompt.endswith("\n\nAssistant:") and pair.prompt.startswith("\n\nHuman:")
        assert row["chosen"] == pair.prompt + " " + pair.chosen or row["chosen"].startswith(pair.prompt)
        assert "\n\nAssistant:" not in pair.chosen and "\n\nAssistant:" not in pair.rejected
    assert sum(p.chosen != p.rejected for p in pairs) > 290


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_local_file_of_preference_pairs_is_read_by_its_layout_without_data_fields(tmp_path):
    """task dpo on a local file: prompt/chosen/rejected as text, UltraFeedback's replies as
    {role, content} lists beside the prompt, and HH-RLHF's whole dialogues in chosen/rejected
    alone (the last Assistant turn split off), each read without data.fields."""
    from fedsec.data import read_examples

    dialogues = [{"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: Yes {i}.",
                  "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: No."} for i in range(3)]
    pairs = list(read_examples(DataConfig(source=str(_jsonl(tmp_path / "hh.jsonl", dialogues))), "dpo"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (f"\n\nHuman: Q{i}?\n\nAssistant:", f"Yes {i}.", "No.") for i in range(3)]
    asked = {"role": "user", "content": "Why?"}
    turns = [{"prompt": "Why?", "chosen": [asked, {"role": "assistant", "content": "Because."}],
              "rejected": [asked, {"role": "assistant", "content": "No idea."}]}]
    (pair,) = read_examples(DataConfig(source=str(_jsonl(tmp_path / "uf.jsonl", turns))), "dpo")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Why?", "Because.", "No idea.")
    plain = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    (pair,) = read_examples(DataConfig(source=str(_jsonl(tmp_path / "plain.jsonl", plain))), "dpo")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("2+2?", "4", "5")
    # a later dialogue without an Assistant turn: one line naming the record
    broken = _jsonl(tmp_path / "broken.jsonl", [*dialogues, {"chosen": "just text", "rejected": "other text"}])
    with pytest.raises(ConfigError, match="record 3 is read as an HH-RLHF dialogue") as err:
        read_examples(DataConfig(source=str(broken)), "dpo")
    assert err.value.field == "data.fields" and "\n" not in str(err.value)
    # neither layout: the missing column is named, as before
    with pytest.raises(ConfigError, match="no such column"):
        read_examples(DataConfig(source=str(_jsonl(tmp_path / "odd.jsonl", [{"a": "x", "b": "y"}]))), "dpo")


def test_the_real_hh_rlhf_file_reads_as_the_dataset_by_name_does(tmp_path):
    """../shared/data's HH-RLHF test split, given as a local file without data.fields: the same
    pairs as the mapping of Anthropic/hh-rlhf by name."""
    from fedsec.data import read_examples

    path = shared_file("hh-rlhf-harmless-base-test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for _, line in zip(range(200), fh)]
    by_name = to_preference_examples(rows, KNOWN_DATASETS["Anthropic/hh-rlhf"])
    local = list(read_examples(DataConfig(source=str(path)), "dpo", max_examples=200))
    assert [(p.prompt, p.chosen, p.rejected) for p in local] == [(p.prompt, p.chosen, p.rejected) for p in by_name]


def test_ultrafeedback_messages_mapping():
    rows = [{"prompt": "Why?", "chosen": [{"role": "user", "content": "Why?"},
                                          {"role": "assistant", "content": "Because."}],
             "rejected": [{"role": "user", "content": "Why?"},
                          {"role": "assistant", "content": "No idea."}]}]
    (pair,) = to_preference_examples(rows, KNOWN_DATASETS["HuggingFaceH4/ultrafeedback_binarized"])
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Why?", "Because.", "No idea.")


def test_hub_name_without_network_is_one_line_error():
    cfg = from_mapping(DataConfig, {"source": "tatsu-lab/alpaca"})
    with pytest.raises(ConfigError) as info:
        build_federated_data(cfg, seed=0)
    assert info.value.field == "data.source" and "\n" not in str(info.value)


@settings(max_examples=40, deadline=None)
@given(clients=st.integers(1, 30), alpha=st.floats(0.05, 5.0), seed=st.integers(0, 10_000))
def test_balanced_label_counts_keep_sizes_and_balance_the_union(clients, alpha, seed):
    rng = np.random.default_rng(seed)
    mixes = rng.dirichlet(np.full(3, alpha), size=clients)
    sizes = rng.integers(4, 60, size=clients).astype(float)
    counts = balanced_label_counts(mixes, sizes)
    assert (counts >= 0).all()
    assert (counts.sum(1) == sizes.astype(int)).all()  # every client keeps its size
    columns = counts.sum(0)
    assert columns.max() - columns.min() <= clients + 1  # the union is label-balanced


def test_benchmark_union_is_balanced_for_every_seed():
    cfg = BenchmarkConfig(num_clients=8, examples_per_client=48, label_alpha=0.5)
    for seed in range(5):
        bench = make_benchmark(cfg, seed)
        counts = collections.Counter(e.response for c in bench.clients for e in c.train)
        assert max(counts.values()) - min(counts.values()) <= 8


def test_broken_jsonl_is_reported_at_its_line_in_the_file(tmp_path):
    path = tmp_path / "train.jsonl"
    good = [json.dumps({"instruction": f"q{k}", "output": f"a{k}"}) for k in range(60)]
    good[51] = '{"instruction": "q51", "output": '  # line 52, cut short
    path.write_text("\n".join(good[:30]) + "\n\n" + "\n".join(good[30:]) + "\n")  # a blank line before it
    with pytest.raises(ConfigError, match="invalid JSON at line 53, column"):
        read_records(str(path))
    path.write_text(good[0] + "\n[1, 2]\n")
    with pytest.raises(ConfigError, match="line 2 is not a JSON object"):
        read_records(str(path))


@pytest.mark.parametrize("row, got", [("q,a,x,y,z,w", 6), ("only one", 1)])
def test_a_csv_row_with_more_or_fewer_fields_than_the_header_is_refused_with_its_line(tmp_path, row, got):
    path = tmp_path / "train.csv"
    lines = ["instruction,input,output,user"] + [f"q{k},,a{k},u{k % 2}" for k in range(38)] + [row, "q,,a,u0"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=f"line 40 has {got} fields, the header 4"):
        read_records(str(path))
    quoted = ["instruction,input,output,user", '"q, with a comma",,a,u0']
    path.write_text("\n".join(quoted) + "\n")
    assert read_records(str(path))[0]["instruction"] == "q, with a comma"  # a quoted comma is one field


def test_a_split_by_a_column_the_file_lacks_names_the_column_and_the_fix(tmp_path):
    """dirichlet needs class labels and natural a user column: a file without them is one line
    saying which column is missing and what to set (it once suggested a user mapping for labels)."""
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    source = str(_jsonl(tmp_path / "plain.jsonl", rows))
    for scheme, column, words in (("dirichlet", "label", "a column of class labels"),
                                  ("natural", "user", "the column that names each example's user")):
        partition = {"scheme": scheme, **({"num_clients": 4} if scheme != "natural" else {})}
        with pytest.raises(ConfigError, match=words) as err:
            build_federated_data(from_mapping(DataConfig, {"source": source, "partition": partition}), seed=0)
        assert err.value.field == "data.partition.by" and f"no '{column}' column" in str(err.value)
        assert "\n" not in str(err.value)


def test_num_clients_under_the_natural_scheme_is_refused_not_ignored():
    with pytest.raises(ConfigError) as err:
        from_mapping(DataConfig, {"source": "x.jsonl", "partition": {"scheme": "natural", "num_clients": 5}})
    assert err.value.field == "partition.num_clients" and "one client per user" in str(err.value)


def test_fltrust_without_a_root_set_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch):
    from conftest import tiny_config

    import fedsec.setup

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{k}", "response": f"a{k}", "user": f"u{k % 4}"}) + "\n"
                            for k in range(40)))
    cfg = tiny_config(tmp_path, data={"source": str(path), "partition": {"scheme": "natural", "by": "user"}},
                      defense={"aggregator": "fltrust"})
    monkeypatch.setattr(fedsec.setup, "load_model", lambda *_: pytest.fail("the model was loaded first"))
    with pytest.raises(ConfigError) as err:
        fedsec.setup.prepare(cfg)
    assert err.value.field == "defense.aggregator" and "root set" in str(err.value)


def test_a_files_clients_are_rows_of_one_memory_mapped_table_read_once(tmp_path, monkeypatch):
    """A file is parsed once into `datasets`' Arrow cache (under $FEDSEC_CACHE) and mapped
    from there; clients hold row numbers into it, turned into examples only when read, and
    equal to reading every row up front."""
    from fedsec.data.loaders import datasets_cache, read_table
    from fedsec.data.table import Examples

    monkeypatch.setenv("FEDSEC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "user": f"u{i % 7}"} for i in range(70)]
    _write_rows(path, rows)
    cfg = from_mapping(DataConfig, {"source": str(path), "partition": {"scheme": "natural"},
                                    "test_fraction": 0.1, "client_test_fraction": 0.25})
    fed = build_federated_data(cfg, seed=3)
    table = read_table(str(path))
    files = [f["filename"] for f in table.cache_files]
    assert files and all(f.startswith(str(datasets_cache())) for f in files)  # memory-mapped from the cache
    assert [f["filename"] for f in read_table(str(path)).cache_files] == files  # the second read parses nothing
    assert len(fed.clients) == 7 and all(isinstance(c.train, Examples) for c in fed.clients)
    everything = to_sft_examples(rows, spec_for(str(path), "instruction", {}))
    by_prompt = {e.prompt: e for e in everything}
    read = [e for c in fed.clients for e in (*c.train, *c.test)] + list(fed.global_test)
    assert sorted(e.prompt for e in read) == sorted(by_prompt)  # every row once
    assert all(e == by_prompt[e.prompt] for e in read)  # the same examples as reading them up front
    for client in fed.clients:
        assert len({e.meta["user"] for e in (*client.train, *client.test)}) == 1
        assert client.train[1] == list(client.train)[1] and client.train[-1] == tuple(client.train)[-1]


def test_a_row_of_another_type_is_refused_with_its_record(tmp_path):
    """Arrow keeps a column of mixed JSON types; the mapping names the record that is not text."""
    path = tmp_path / "mixed.jsonl"
    _write_rows(path, [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": 4}])
    cfg = from_mapping(DataConfig, {"source": str(path)})
    with pytest.raises(ConfigError, match="record 1 holds int, not text"):
        build_federated_data(cfg, seed=0)


def test_benchmark_clients_as_small_as_asked():
    """examples_per_client below 4 (many users of few records each, as user-level DP wants):
    equal sizes with size_alpha 0; with Dirichlet sizes no client gets fewer than
    min(4, examples_per_client), and a config of 48 keeps its floor of 4."""
    equal = make_benchmark(BenchmarkConfig(num_clients=30, examples_per_client=2, size_alpha=0,
                                           client_test_size=0), seed=0)
    assert [len(c.train) for c in equal.clients] == [2] * 30
    skewed = make_benchmark(BenchmarkConfig(num_clients=30, examples_per_client=2, size_alpha=0.5,
                                            client_test_size=0), seed=0)
    assert min(len(c.train) for c in skewed.clients) == 2
    usual = make_benchmark(BenchmarkConfig(num_clients=30, examples_per_client=48, size_alpha=0.5,
                                           client_test_size=0), seed=0)
    assert min(len(c.train) for c in usual.clients) == 4
    with pytest.raises(ConfigError, match="examples_per_client"):
        BenchmarkConfig(examples_per_client=0)
