"""Many clients, one SGD step each: the batched path equals one client at a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config

from fedsec import training
from fedsec.setup import prepare
from fedsec.training import _chunks

ONE_STEP = {"optimizer": "sgd", "local_steps": 1, "batch_size": 3, "lr": 0.5, "max_grad_norm": None}


def _setup(tmp_path, task, cached):
    lora = {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    if cached:
        lora.update(top_layers=1, cache_frozen_layers=True)
    setup = prepare(tiny_config(tmp_path, task=task, lora=lora, training=ONE_STEP,
                                data={"benchmark": {"num_clients": 6, "examples_per_client": 5,
                                                    "size_alpha": 0.5, "test_size": 3,
                                                    "client_test_size": 0, "num_probes": 0}}))
    start = setup.adapter.get()
    start = start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0))
    return setup, start  # B != 0, so every LoRA matrix has a gradient


def _one_at_a_time(trainer, start, datasets, seeds):
    return [trainer.train(start, data, 0.5, seed) for data, seed in zip(datasets, seeds)]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("task,cached", [("sft", False), ("sft", True), ("dpo", False), ("dpo", True)])
def test_batched_one_step_clients_equal_one_client_at_a_time(tmp_path, monkeypatch, task, cached, packed):
    """packed (training.pack): each client's batch is in rows of its own in the batched
    forward, behind its examples' shared opening, and those rows' per-sample gradients sum
    to the client's."""
    setup, start = _setup(tmp_path, task, cached)
    trainer, datasets = setup.trainer, setup.train_sets
    seeds = [11 * k + 1 for k in range(len(datasets))]
    assert trainer.one_step_batchable
    monkeypatch.setattr(training, "COHORT_TOKENS", 300)  # several chunks, clients split across them
    trainer.objective.pack = False  # the reference: plain batches, one client at a time
    plain = _one_at_a_time(trainer, start, datasets, seeds)
    # clip at the median gradient norm: some clients are clipped, some are not
    norms = torch.stack([r.delta.norm() / 0.5 for r in plain])
    trainer.cfg = dataclasses.replace(trainer.cfg, max_grad_norm=float(norms.median()))
    plain = _one_at_a_time(trainer, start, datasets, seeds)
    trainer.objective.pack = packed
    if packed:
        monkeypatch.setattr(training, "COHORT_TOKENS", 2 * max(trainer.objective.positions(setup.model, d[:3])
                                                               for d in datasets))  # two clients a chunk at most
    batched = trainer.train_clients(start, datasets, 0.5, seeds)
    if packed:  # the opening once per client: fewer positions than its sequences hold
        assert any(trainer.objective.packing(setup.model, d[:3]) is not None for d in datasets)
        # SFT: a client's 3 examples in one row; DPO: its 6 replies in rows of 2, whose
        # per-row gradients sum to the client's
        rows = {len(trainer.objective.row_lengths(d[:3], trainer.objective.packing(setup.model, d[:3])))
                for d in datasets}
        assert rows == ({1} if task == "sft" else {3})
        assert all(b.tokens < a.tokens for a, b in zip(plain, batched))
    assert len(batched) == len(datasets)
    for a, b in zip(plain, batched):
        # batched sums round differently: entries near zero after cancellation (DPO's most)
        # differ by up to 1e-5 of the largest entry on an AMD EPYC; a wrong delta is off by ~1e-1
        torch.testing.assert_close(b.delta, a.delta, rtol=1e-4, atol=1e-4 * float(a.delta.abs().max()))
        assert b.num_examples == a.num_examples and b.loss_terms == a.loss_terms and b.steps == 1
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
    assert all(float(b.delta.norm()) <= 0.5 * float(norms.median()) * (1 + 1e-5) for b in batched)
    assert any(float(n) > float(norms.median()) * 1.01 for n in norms)  # clipping did act


def test_batching_is_refused_where_it_would_change_the_result(tmp_path):
    setup, _ = _setup(tmp_path, "sft", cached=False)
    trainer = setup.trainer
    for change in ({"optimizer": "adamw"}, {"local_steps": 2}, {"grad_accum": 2}):
        trainer.cfg = dataclasses.replace(trainer.cfg, **change)
        assert not trainer.one_step_batchable
        trainer.cfg = dataclasses.replace(trainer.cfg, **ONE_STEP, grad_accum=1)
    assert trainer.one_step_batchable
    setup.model.add_module("extra_dropout", torch.nn.Dropout(0.1))  # randomness in the forward
    assert not trainer.one_step_batchable


def test_chunks_by_hand():
    # sorted by length: 1 (1), 2 (3), 0 (5), 3 (9); at most 10 padded tokens per chunk
    assert _chunks([5, 1, 3, 9], tokens=10, max_rows=3) == [[1, 2], [0], [3]]
    assert _chunks([2, 2, 2, 2, 2], tokens=100, max_rows=2) == [[0, 1], [2, 3], [4]]
    assert _chunks([50], tokens=10, max_rows=4) == [[0]]  # too long for any chunk: alone
