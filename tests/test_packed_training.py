"""training.pack: a training batch (SFT examples, DPO pairs' replies) run in packed rows
behind their shared opening (encoding.collate_packed_rows, as the evaluation packs) gives the
plain batch's loss, gradient and local update up to float rounding, with the shared tokens
put through the model once per row; the rows are as many as make the forward cheapest
(encoding.pack_rows)."""

from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

from fedsec.encoding import attention_weight, pack_rows
from fedsec.setup import prepare


def _both(tmp_path, task: str = "sft", **training):
    cfg = tiny_config(tmp_path, task=task,
                      training={"local_steps": 2, "batch_size": 4, "lr": 1e-3, "pack": True, **training})
    plain = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, pack=False))
    return prepare(plain), prepare(cfg)


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_a_packed_batch_has_the_plain_loss_and_gradient_with_the_opening_computed_once(tmp_path, task):
    plain, packed = _both(tmp_path, task)
    items = plain.train_sets[0][:4]
    grads = []
    for setup in (plain, packed):
        setup.adapter.set(plain.adapter.get())
        for p in setup.adapter.params:
            p.grad = None
        loss, terms = setup.trainer.objective.loss(setup.model, items)
        loss.backward()
        grads.append((float(loss.detach()), terms, torch.cat([p.grad.reshape(-1) for p in setup.adapter.params])))
    (a, n_a, g_a), (b, n_b, g_b) = grads
    assert packed.trainer.objective._packable is True and n_a == n_b
    assert abs(a - b) <= 1e-5 * abs(a)
    assert torch.allclose(g_a, g_b, rtol=1e-4, atol=1e-6) and float(g_a.abs().max()) > 0
    objective = packed.trainer.objective
    sequences = objective.sequences(items)  # a DPO pair: both replies
    shared, sizes = objective.packing(packed.model, items)
    total = sum(int(i.input_ids.numel()) for i in sequences)
    # the tiny model's items (about 130 tokens behind a 55-token opening) go two to a row:
    # one row of 4 (SFT) or 8 (DPO) would attend over more masked pairs than it saves
    assert shared > 10 and sizes == [2] * (len(sequences) // 2)
    assert objective.positions(packed.model, items) == total - (len(sequences) - len(sizes)) * shared


def test_a_packed_local_update_equals_the_plain_one_and_counts_fewer_positions(tmp_path):
    plain, packed = _both(tmp_path)
    start = plain.adapter.get()
    a = plain.trainer.train(start, plain.train_sets[1], 1e-3, seed=7)
    b = packed.trainer.train(start, packed.train_sets[1], 1e-3, seed=7)
    assert abs(a.loss - b.loss) <= 1e-5 * abs(a.loss) and a.loss_terms == b.loss_terms
    assert torch.allclose(a.delta, b.delta, rtol=1e-3, atol=1e-7) and float(a.delta.abs().max()) > 0
    assert b.tokens < a.tokens


def test_the_attention_weight_is_a_pair_over_a_position_in_forward_flops():
    # SmolLM2-135M: q 9 x 64 = 576, kv 3 x 64 = 192, MLP 1,536: a position costs
    # 2 (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) = 7,077,888, a pair 4 * 576 = 2,304
    smollm2 = SimpleNamespace(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                              intermediate_size=1536, head_dim=64)
    assert attention_weight(smollm2) == pytest.approx(2304 / 7_077_888, rel=1e-12)
    tiny = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    assert attention_weight(tiny) == pytest.approx(256 / 73_728, rel=1e-12)  # head_dim 16 from 64 / 4


def test_packed_rows_minimise_the_forward_cost_by_hand():
    # four items of 10 tokens sharing 6: one row of 22 positions, two of 14, or four of 10 (plain)
    lengths, shared = [10, 10, 10, 10], 6
    # weight 0.1: 22 * 3.2 = 70.4, 2 * 14 * 2.4 = 67.2, 4 * 10 * 2 = 80
    assert pack_rows(lengths, shared, 0.1) == [2, 2]
    # weight 0.01: 22 * 1.22 = 26.84 wins over 31.92 and 44
    assert pack_rows(lengths, shared, 0.01) == [4]
    # attention free: one row (the fewest positions); attention dominant: the plain batch
    # (five rows of 10: 5 * 10 * 101 = 5,050 against one row of 26: 26 * 261 = 6,786)
    assert pack_rows([10, 12, 9, 30, 11], 6, 0.0) == [5]
    assert pack_rows([10] * 5, 6, 10.0) == [1, 1, 1, 1, 1]
    # but rows are padded to the widest: beside a 30-token item, five plain rows of 30 cost
    # 45,150, one packed row of 48 positions 23,088
    assert pack_rows([10, 12, 9, 30, 11], 6, 10.0) == [5]
    # seven items of 28 behind 20, weight 0.1: rows of 4 and 3 (width 52: 2 * 52 * 6.2 = 644.8)
    # beat one row of 76 (653.6), three of 44 (712.8), four of 36 (662.4) and plain (744.8)
    assert pack_rows([28] * 7, 20, 0.1) == [4, 3]
    # every item in one row, the counts as equal as can be, the larger rows first
    for weight in (0.0, 1e-3, 1e-2, 0.05, 0.1, 1.0):
        sizes = pack_rows([10, 14, 9, 12, 11, 13, 10], 6, weight)
        assert sum(sizes) == 7 and sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1


def test_long_items_stay_plain_and_the_plan_ignores_their_order():
    smollm2 = 2304 / 7_077_888
    # the quickstart's batch (8 items of about 41 tokens behind 20): one row of 188 positions
    assert pack_rows([38, 49, 41, 41, 41, 40, 39, 39], 20, smollm2) == [8]
    # 8 items of 370 tokens behind 28: one row of 2,784 positions would spend about twice the
    # plain batch's FLOPs on its dense attention (benchmarks/packing.py: 1.9x the time)
    assert pack_rows([370] * 8, 28, smollm2) == [1] * 8
    lengths = [125, 135, 132, 134, 133, 137, 121, 129]
    plans = {tuple(pack_rows(list(order), 55, 256 / 73_728)) for order in itertools.permutations(lengths, 8)}
    assert plans == {(2, 2, 2, 2)}
