"""The client side of a deployment (fedsec.clients.prepare_clients): what a Flower
ClientApp trains on must be what the in-process loop trains on."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fedsec.clients import client_cache_key, client_updates, prepare_clients
from fedsec.setup import prepare


def _same_items(a, b) -> bool:
    if hasattr(a, "chosen"):
        return (_same_items(a.chosen, b.chosen) and _same_items(a.rejected, b.rejected)
                and a.ref_chosen == b.ref_chosen and a.ref_rejected == b.ref_rejected)
    same_hidden = (a.hidden is None and b.hidden is None) or bool(torch.equal(a.hidden, b.hidden))
    return torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) and same_hidden


def test_a_node_trains_its_partition_exactly_as_the_inprocess_loop(tmp_path):
    """Without a frozen-prefix cache every item is encoded alone, so a node's items and
    updates equal the in-process ones bit for bit; the on-disk cache reads back the same."""
    cfg = tiny_config(tmp_path, data={"benchmark": {"num_clients": 6, "examples_per_client": 8, "test_size": 9,
                                                    "client_test_size": 2, "num_probes": 2}})
    setup = prepare(cfg)
    start = setup.adapter.get() + 0.01 * torch.randn(setup.adapter.layout.numel,
                                                     generator=torch.Generator().manual_seed(0))
    cache = tmp_path / "node-cache"
    node = prepare_clients(cfg, lambda c: c % 2 == 1, cache=cache)
    assert sorted(node.train_sets) == [1, 3, 5] and node.population == 6
    assert sorted(p.name for p in cache.iterdir()) == ["client-1.pt", "client-3.pt", "client-5.pt"]
    again = prepare_clients(cfg, lambda c: c % 2 == 1, only={3, 5}, cache=cache)  # read from the cache
    assert sorted(again.train_sets) == [3, 5]
    for c in (1, 3, 5):
        assert all(_same_items(a, b) for a, b in zip(setup.train_sets[c], node.train_sets[c], strict=True))
    for c in (3, 5):
        assert all(_same_items(a, b) for a, b in zip(node.train_sets[c], again.train_sets[c], strict=True))
    (cache / "client-5.pt").write_bytes(b"half a file")  # damaged: prepared again and replaced
    mended = prepare_clients(cfg, lambda c: c == 5, cache=cache)
    assert all(_same_items(a, b) for a, b in zip(node.train_sets[5], mended.train_sets[5], strict=True))
    assert (cache / "client-5.pt").stat().st_size > 100
    here = client_updates(setup, start, [3, 5], 1e-3, 2)
    there = client_updates(again, start, [3, 5], 1e-3, 2)
    for u, v in zip(here, there, strict=True):
        assert u.client_id == v.client_id and u.num_examples == v.num_examples
        assert torch.equal(u.delta, v.delta) and u.metrics == v.metrics
    assert any(bool(u.delta.abs().sum() > 0) for u in here)


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_with_the_frozen_prefix_a_node_starts_from_the_inprocess_states_bit_for_bit(tmp_path, task):
    """One encoder for both engines: the in-process setup computes every client's
    frozen-prefix states in one call, a node only its own clients', and the states (and
    DPO's reference log-probabilities from them) are equal bit for bit, because batches
    never cross a client. Batches of 3 cut the clients' 8 examples (16 DPO sequences)
    unevenly, so a batch mixing two clients would show."""
    cfg = tiny_config(tmp_path, task=task, data={"benchmark": {"num_clients": 5, "examples_per_client": 8}},
                      eval={"batch_size": 3},
                      lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "top_layers": 1,
                            "cache_frozen_layers": True})
    setup = prepare(cfg)
    node = prepare_clients(cfg, lambda c: c in (1, 4))
    for c in (1, 4):
        mine, theirs = setup.train_sets[c], node.train_sets[c]
        first = mine[0].chosen if task == "dpo" else mine[0]
        assert first.hidden is not None
        assert all(_same_items(a, b) for a, b in zip(mine, theirs, strict=True))


def test_cached_prefix_states_and_dpo_references_read_back_unchanged(tmp_path):
    cfg = tiny_config(tmp_path, task="dpo", lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                  "top_layers": 1, "cache_frozen_layers": True})
    cache = tmp_path / "node-cache"
    first = prepare_clients(cfg, lambda c: c == 2, cache=cache)
    second = prepare_clients(cfg, lambda c: c == 2, cache=cache)
    items = first.train_sets[2]
    assert items and all(p.chosen.hidden is not None and p.ref_chosen != 0.0 for p in items)
    assert all(_same_items(a, b) for a, b in zip(items, second.train_sets[2], strict=True))


def test_the_cache_key_ignores_round_settings_and_follows_the_data(tmp_path):
    base = tiny_config(tmp_path)
    assert client_cache_key(base) == client_cache_key(tiny_config(tmp_path, federation={"rounds": 9},
                                                                  privacy={"mode": "user", "noise_multiplier": 1.0}))
    assert client_cache_key(base) != client_cache_key(tiny_config(tmp_path, data={"max_length": 120}))
    assert client_cache_key(base) != client_cache_key(tiny_config(tmp_path, seed=4))
