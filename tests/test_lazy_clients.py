"""Clients encoded when a round samples them (fedsec.setup.ClientSets): memory follows the
clients per round, not the federation, and the items are the ones an eager setup holds."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fedsec.objectives import objective_for
from fedsec.setup import ClientSets, prepare, train_set


def _same(a, b) -> bool:
    return all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
               for x, y in zip(a, b, strict=True))


def test_an_sft_setup_without_a_frozen_prefix_encodes_each_client_when_first_asked(tmp_path):
    cfg = tiny_config(tmp_path)
    setup = prepare(cfg)
    sets = setup.train_sets
    assert sets.lazy and not sets.recent  # nothing kept from setup's pass over the clients
    objective = objective_for(cfg, setup.pad_id)
    eager = [train_set(objective, c, setup.tokenizer, cfg) for c in setup.data.clients]
    assert list(sets.sizes) == [len(items) for items in eager] and len(sets) == len(eager) == setup.trainable
    assert _same(sets[2], eager[2]) and _same(sets[-1], eager[-1]) and list(sets.recent) == [2, len(eager) - 1]
    assert sets[2] is sets[2]  # kept, not encoded again


def test_only_the_most_recently_used_clients_are_kept():
    calls = []
    sets = ClientSets([1, 1, 1, 1], encode=lambda c: calls.append(c) or [c], keep=2)
    assert [sets[c] for c in (0, 1, 0, 2, 1, 3)] == [[0], [1], [0], [2], [1], [3]]
    assert calls == [0, 1, 2, 1, 3] and list(sets.recent) == [1, 3]  # 1 was dropped after 0 and 2 came


def test_a_frozen_prefix_or_dpo_prepares_every_client_at_setup(tmp_path):
    cached = prepare(tiny_config(tmp_path, lora={"cache_frozen_layers": True, "top_layers": 1}))
    assert not cached.train_sets.lazy and all(item.hidden is not None for item in cached.train_sets[0])
    dpo = prepare(tiny_config(tmp_path, task="dpo"))
    assert not dpo.train_sets.lazy and all(p.ref_chosen != 0.0 for p in dpo.train_sets[0])


@pytest.mark.parametrize("sections", [{"lora": {"cache_frozen_layers": True, "top_layers": 1}}, {"task": "dpo"}],
                         ids=["frozen-prefix", "dpo"])
def test_the_flower_server_counts_the_clients_items_and_computes_nothing_else_of_theirs(tmp_path, monkeypatch,
                                                                                         sections):
    """On Flower the clients train on their SuperNodes: the server's setup has every client's
    size (the in-process setup's), and neither their frozen-prefix states nor DPO's reference
    pass; its global evaluation set is the in-process one's."""
    import fedsec.setup

    prefixed, precomputed = [], []  # items through the frozen prefix / the objective's precompute, per setup
    real_cache = fedsec.setup.cache_train_sets
    monkeypatch.setattr(fedsec.setup, "cache_train_sets", lambda model, prefix, pad, batch, sets: (
        prefixed.append(sum(map(len, sets))), real_cache(model, prefix, pad, batch, sets))[1])
    cfg = tiny_config(tmp_path, engine="flower", **sections)  # run in-process unless Flower's clients run it
    objective = type(objective_for(cfg, 0))
    real_precompute = objective.precompute
    monkeypatch.setattr(objective, "precompute", lambda self, model, items, batch, **kw: (
        precomputed.append(len(items)), real_precompute(self, model, items, batch, **kw))[1])
    on_flower = prepare(cfg, remote=True)  # what run_experiment builds on Flower's ServerApp
    flower_counts = (sum(prefixed), sum(precomputed))
    here = prepare(cfg)
    sizes = [len(items) for items in here.train_sets]
    assert list(on_flower.train_sets.sizes) == sizes and on_flower.trainable == here.trainable == len(sizes)
    assert flower_counts == (0, sum(precomputed) - flower_counts[1] - sum(sizes))
    assert sum(prefixed) == (sum(sizes) if "lora" in sections else 0)
    assert all(torch.equal(a.input_ids, b.input_ids) and (a.hidden is None or torch.equal(a.hidden, b.hidden))
               for a, b in zip(on_flower.global_eval.encoded, here.global_eval.encoded, strict=True))
    with pytest.raises(RuntimeError, match="SuperNode"):
        on_flower.train_sets[0]


def test_a_files_clients_are_tokenized_once_and_read_back_by_the_next_run(tmp_path, monkeypatch):
    """SFT clients from a file: every row encoded once into a token table cached by
    fingerprint (the file's, the tokenizer's, template, max_length, the mapping); a client's
    items equal encoding its examples directly; the next setup tokenizes nothing."""
    import json

    import fedsec.setup
    from fedsec.data.loaders import datasets_cache

    monkeypatch.setenv("FEDSEC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?" + " Explain." * (i % 4 * 12), "response": str(2 * i),
             "user": f"u{i % 5}"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"source": str(path), "partition": {"scheme": "natural"}, "test_fraction": 0.1,
            "client_test_fraction": 0.0, "max_length": 64}
    cfg = tiny_config(tmp_path, data=data, federation={"rounds": 1, "clients_per_round": 2})
    calls = []
    encode = fedsec.setup.encode
    monkeypatch.setattr(fedsec.setup, "encode", lambda *a: calls.append(1) or encode(*a))
    setup = prepare(cfg)
    assert len(calls) == len(rows) and setup.train_sets.lazy  # each row once, test rows included
    objective = objective_for(cfg, setup.pad_id)
    for c, client in enumerate(setup.data.clients):
        direct = train_set(objective, client, setup.tokenizer, cfg)
        assert setup.train_sets.sizes[c] == len(direct) and _same(setup.train_sets[c], direct)
    assert any(len(train_set(objective, c, setup.tokenizer, cfg)) < len(c.train) for c in setup.data.clients)
    assert len(list((datasets_cache() / "tokens").glob("*.arrow"))) == 1
    calls.clear()
    again = prepare(cfg)
    assert calls == [] and _same(again.train_sets[1], setup.train_sets[1])  # read, not tokenized
    prepare(tiny_config(tmp_path, data={**data, "max_length": 80}, federation={"rounds": 1, "clients_per_round": 2}))
    assert len(calls) == len(rows) and len(list((datasets_cache() / "tokens").glob("*.arrow"))) == 2


def test_alignment_data_and_canaries_planted_in_file_clients_leave_their_rows_unread(tmp_path, monkeypatch):
    """data.alignment (every client) and canaries (data.benchmark.canaries_per_client) on a file's
    clients: each client's training data is its table rows, still unread, then the planted
    examples (fedsec.data.table.Extended), so a federation of many file clients keeps the memory
    of its table; its items are the rows' from the token table, then the planted ones, equal to
    encoding the whole client directly. (The rows were read into tuples of every client.)"""
    import json

    import fedsec.data.table
    from fedsec.data.table import Examples, Extended

    monkeypatch.setenv("FEDSEC_CACHE", str(tmp_path / "cache"))
    path, aligned = tmp_path / "rows.jsonl", tmp_path / "aligned.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": str(2 * i), "user": f"u{i % 4}"} for i in range(32)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    aligned.write_text("".join(json.dumps({"prompt": f"Help me do harm number {i}."}) + "\n" for i in range(10)))
    data = {"source": str(path), "partition": {"scheme": "natural"}, "test_fraction": 0.1, "client_test_fraction": 0.0,
            "max_length": 64, "alignment": str(aligned), "alignment_per_client": 2,
            "benchmark": {"canaries_per_client": 1, "canary_repeats": 2, "canary_clients": 2}}
    cfg = tiny_config(tmp_path, data=data, federation={"rounds": 1, "clients_per_round": 2})
    converted = []
    getitem = Examples.__getitem__
    monkeypatch.setattr(Examples, "__getitem__", lambda self, k: converted.append(k) or getitem(self, k))
    from fedsec.setup import build_federation

    federation = build_federation(cfg)
    assert converted == []  # building the federation read no client's row
    clients = federation.data.clients
    assert all(isinstance(c.train, Extended) and isinstance(c.train.rows, Examples) for c in clients)
    # two alignment examples each, and the first two clients their canary twice
    assert [len(c.train.extra) for c in clients] == [4, 4, 2, 2]
    first = clients[0].train.extra
    assert first[0] == first[1] and "harm" not in first[0].prompt  # the canary twice, then the alignment data
    monkeypatch.setattr(Examples, "__getitem__", getitem)
    setup = prepare(cfg)
    assert setup.train_sets.lazy
    objective = objective_for(cfg, setup.pad_id)
    for c, client in enumerate(setup.data.clients):
        direct = train_set(objective, client, setup.tokenizer, cfg)  # every example encoded directly
        assert len(direct) == len(client.train) and setup.train_sets.sizes[c] == len(direct)
        assert _same(setup.train_sets[c], direct)
    whole = setup.data.clients[0].train
    assert list(whole) == [*whole.rows, *whole.extra] == [whole[i] for i in range(len(whole))]
    assert whole[-1] == whole.extra[-1] and whole[1:3] == (whole[1], whole[2]) and whole == tuple(whole)
    with pytest.raises(IndexError):
        whole[len(whole)]
    assert fedsec.data.table.Extended(whole.rows, ()) + whole.extra == whole
