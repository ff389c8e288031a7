"""training.pack: a training batch (SFT examples, DPO pairs' replies) run as one sequence
behind their shared opening (encoding.collate_packed, as the evaluation packs) gives the
plain batch's loss, gradient and local update up to float rounding, with the shared tokens
put through the model once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config

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
    shared = objective.shared_width(packed.model, items)
    total = sum(int(i.input_ids.numel()) for i in sequences)
    assert shared > 10 and objective.positions(packed.model, items) == total - (len(sequences) - 1) * shared


def test_a_packed_local_update_equals_the_plain_one_and_counts_fewer_positions(tmp_path):
    plain, packed = _both(tmp_path)
    start = plain.adapter.get()
    a = plain.trainer.train(start, plain.train_sets[1], 1e-3, seed=7)
    b = packed.trainer.train(start, packed.train_sets[1], 1e-3, seed=7)
    assert abs(a.loss - b.loss) <= 1e-5 * abs(a.loss) and a.loss_terms == b.loss_terms
    assert torch.allclose(a.delta, b.delta, rtol=1e-3, atol=1e-7) and float(a.delta.abs().max()) > 0
    assert b.tokens < a.tokens
