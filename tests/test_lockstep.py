"""Clients in lockstep (training.lockstep): the round's clients trained side by side, one forward
per local step, equal one client at a time up to float rounding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config

from fedsec import lockstep, training
from fedsec.seeding import derive_seed
from fedsec.setup import prepare

STEPS = {"optimizer": "adamw", "local_steps": 3, "batch_size": 3, "lr": 0.01, "min_lr": 0.01,
         "max_grad_norm": None, "lockstep": True}


def _setup(tmp_path, task="sft", cached=False, lora=None, training_cfg=None, quantization="none"):
    spec = {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], **(lora or {})}
    if cached:
        spec.update(top_layers=1, cache_frozen_layers=True)
    setup = prepare(tiny_config(tmp_path, task=task, lora=spec, training={**STEPS, **(training_cfg or {})},
                                model={"name": "tiny", "quantization": quantization},
                                data={"benchmark": {"num_clients": 5, "examples_per_client": 6,
                                                    "size_alpha": 0.5, "test_size": 3,
                                                    "client_test_size": 0, "num_probes": 0}}))
    start = setup.adapter.get()
    start = start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0))
    return setup, start  # B != 0, so every LoRA matrix has a gradient


def _one_at_a_time(trainer, start, datasets, seeds, prox_mu=0.0):
    return [trainer.train(start, data, trainer.cfg.lr, seed, prox_mu=prox_mu) for data, seed in zip(datasets, seeds)]


def _assert_same(together, alone, rtol=1e-3):
    assert len(together) == len(alone)
    for a, b in zip(alone, together):
        # the products are shaped otherwise, so they round otherwise; AdamW divides by the root of
        # small second moments, which magnifies that in near-zero coordinates: compare against the
        # largest entry. A wrong client's delta is off by about its own size.
        torch.testing.assert_close(b.delta, a.delta, rtol=rtol, atol=rtol * float(a.delta.abs().max()))
        assert (b.num_examples, b.loss_terms, b.steps, b.tokens) == (a.num_examples, a.loss_terms, a.steps, a.tokens)
        assert b.loss == pytest.approx(a.loss, rel=1e-5)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("task,cached", [("sft", False), ("sft", True), ("dpo", False), ("dpo", True)])
def test_lockstep_clients_equal_one_client_at_a_time(tmp_path, monkeypatch, task, cached, packed):
    setup, start = _setup(tmp_path, task, cached)
    trainer, datasets = setup.trainer, setup.train_sets
    trainer.objective.pack = packed
    seeds = [7 * k + 3 for k in range(len(datasets))]
    assert trainer.lockstep_batchable and not trainer.one_step_batchable
    alone = _one_at_a_time(trainer, start, datasets, seeds)
    monkeypatch.setattr(training, "COHORT_TOKENS", 2 * max(max(trainer.objective.row_lengths(
        d[:3], trainer.objective.packing(setup.model, d[:3]))) for d in datasets) * (2 if task == "dpo" else 3))
    together = trainer.train_clients(start, datasets, trainer.cfg.lr, seeds)  # a few clients a chunk
    _assert_same(together, alone)
    assert all(float(a.delta.abs().max()) > 1e-4 for a in alone)  # every client did move


def test_lockstep_over_a_4bit_base_equals_one_client_at_a_time(tmp_path):
    """QLoRA: the LoRA layers are PEFT's bitsandbytes Linear4bit; the clients' rows share the
    quantized product and each keeps its own adapter."""
    from peft.tuners.lora import bnb as lora_bnb

    setup, start = _setup(tmp_path, quantization="4bit")
    trainer, datasets = setup.trainer, setup.train_sets
    layers = lockstep.lora_layers(setup.model, trainer.adapter)
    assert layers and all(type(module) is lora_bnb.Linear4bit for module, _, _ in layers)
    assert trainer.lockstep_batchable
    seeds = [7 * k + 3 for k in range(len(datasets))]
    alone = _one_at_a_time(trainer, start, datasets, seeds)
    _assert_same(trainer.train_clients(start, datasets, trainer.cfg.lr, seeds), alone)
    assert all(float(a.delta.abs().max()) > 1e-4 for a in alone)


def test_lockstep_with_the_clip_fedprox_sgd_and_accumulation(tmp_path):
    setup, start = _setup(tmp_path, training_cfg={"grad_accum": 2})
    trainer, datasets = setup.trainer, setup.train_sets
    seeds = list(range(len(datasets)))
    for change in ({}, {"optimizer": "sgd", "lr": 0.5}):
        trainer.cfg = dataclasses.replace(trainer.cfg, max_grad_norm=None, **change)
        free = _one_at_a_time(trainer, start, datasets, seeds)
        # clip at the median first-step gradient size: some clients are clipped, some are not
        trainer.cfg = dataclasses.replace(trainer.cfg, local_steps=1, optimizer="sgd", lr=1.0)
        norms = sorted(float(r.delta.norm()) for r in _one_at_a_time(trainer, start, datasets, seeds))
        trainer.cfg = dataclasses.replace(setup.cfg.training, grad_accum=2, max_grad_norm=norms[len(norms) // 2],
                                          **change)
        alone = _one_at_a_time(trainer, start, datasets, seeds, prox_mu=0.3)
        assert any((a.delta - b.delta).abs().max() > 1e-3 * b.delta.abs().max() for a, b in zip(alone, free))
        _assert_same(trainer.train_clients(start, datasets, trainer.cfg.lr, seeds, prox_mu=0.3), alone)


def test_lockstep_applies_each_clients_scaffold_correction(tmp_path):
    setup, start = _setup(tmp_path)
    trainer, datasets = setup.trainer, setup.train_sets
    seeds = list(range(len(datasets)))
    gen = torch.Generator().manual_seed(1)
    corrections = [0.05 * torch.randn(start.shape, generator=gen) for _ in datasets]
    alone = [trainer.train(start, data, trainer.cfg.lr, seed, correction=c)
             for data, seed, c in zip(datasets, seeds, corrections)]
    plain = _one_at_a_time(trainer, start, datasets, seeds)
    assert all((a.delta - b.delta).abs().max() > 1e-3 for a, b in zip(alone, plain))  # the corrections act
    _assert_same(trainer.train_clients(start, datasets, trainer.cfg.lr, seeds, corrections=corrections), alone)
    trainer.cfg = dataclasses.replace(trainer.cfg, lockstep=False)  # one at a time: train's own bits
    for a, b in zip(alone, trainer.train_clients(start, datasets, trainer.cfg.lr, seeds, corrections=corrections)):
        assert torch.equal(a.delta, b.delta)


def test_scaffold_and_fedprox_runs_in_lockstep_equal_one_client_at_a_time(tmp_path):
    """Whole runs: the global adapter and SCAFFOLD's server variate with lockstep equal the run
    without it, and a run stopped and resumed in lockstep equals the uninterrupted one bit for bit."""
    from fedsec.loop import run_experiment

    def final(out):
        return torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)

    for algorithm in ("scaffold", "fedprox"):
        ends = {}
        for lock in (False, True):
            cfg = tiny_config(tmp_path, federation={"rounds": 3, "clients_per_round": 3, "algorithm": algorithm,
                                                    "prox_mu": 0.1},
                              training={**STEPS, "lockstep": lock, "max_grad_norm": 1.0})
            out = tmp_path / f"{algorithm}-{lock}"
            run_experiment(cfg, out=out, progress=False, log=lambda _line: None)
            ends[lock] = final(out)
        a, b = ends[False], ends[True]
        assert a["global"].abs().sum() > 0
        torch.testing.assert_close(b["global"], a["global"], rtol=1e-3, atol=1e-3 * float(a["global"].abs().max()))
        if algorithm == "scaffold":
            assert a["scaffold_c"].abs().sum() > 0
            # c_i's update divides the delta by local_steps x lr (here 0.03): the deltas' rounding, 33x
            torch.testing.assert_close(b["scaffold_c"], a["scaffold_c"], rtol=1e-2,
                                       atol=1e-2 * float(a["scaffold_c"].abs().max()))
            part = tmp_path / "scaffold-part"
            run_experiment(cfg, out=part, stop_after=1, progress=False, log=lambda _line: None)
            run_experiment(cfg, out=part, resume=True, progress=False, log=lambda _line: None)
            assert torch.equal(final(part)["global"], b["global"])
            assert torch.equal(final(part)["scaffold_c"], b["scaffold_c"])


def test_lockstep_clients_from_their_own_adapters(tmp_path):
    """The local-only baseline: each client from its own adapter ([clients, numel] starts)."""
    setup, start = _setup(tmp_path)
    trainer, datasets = setup.trainer, setup.train_sets
    seeds = list(range(len(datasets)))
    gen = torch.Generator().manual_seed(2)
    starts = torch.stack([start + 0.05 * torch.randn(start.shape, generator=gen) for _ in datasets])
    alone = [trainer.train(s, data, trainer.cfg.lr, seed) for s, data, seed in zip(starts, datasets, seeds)]
    _assert_same(trainer.train_clients(starts, datasets, trainer.cfg.lr, seeds), alone)
    trainer.cfg = dataclasses.replace(trainer.cfg, lockstep=False)  # one at a time: train's own bits
    assert all(torch.equal(a.delta, b.delta)
               for a, b in zip(alone, trainer.train_clients(starts, datasets, trainer.cfg.lr, seeds)))


def test_lockstep_goes_in_groups_that_fit_its_memory_bound(tmp_path, monkeypatch):
    setup, start = _setup(tmp_path)
    trainer, datasets = setup.trainer, setup.train_sets
    seeds = list(range(len(datasets)))
    whole = trainer.train_clients(start, datasets, trainer.cfg.lr, seeds)
    groups = []
    monkeypatch.setattr(training, "LOCKSTEP_FLOATS", 4 * trainer.adapter.layout.numel * 2)  # two clients a group
    inner = training.LocalTrainer._train_lockstep
    monkeypatch.setattr(training.LocalTrainer, "_train_lockstep",
                        lambda self, start, data, *rest: groups.append(len(data)) or inner(self, start, data, *rest))
    split = trainer.train_clients(start, datasets, trainer.cfg.lr, seeds)
    assert groups == [2, 2, 1]
    for a, b in zip(whole, split):
        torch.testing.assert_close(b.delta, a.delta, rtol=1e-3, atol=1e-3 * float(a.delta.abs().max()))


def test_lockstep_trains_only_b_under_ffa_lora(tmp_path):
    setup, start = _setup(tmp_path, lora={"freeze_a": True})
    trainer, datasets = setup.trainer, setup.train_sets
    layers = lockstep.lora_layers(setup.model, trainer.adapter)
    assert layers and all(a is None and b is not None for _, a, b in layers)
    seeds = list(range(len(datasets)))
    _assert_same(trainer.train_clients(start, datasets, trainer.cfg.lr, seeds),
                 _one_at_a_time(trainer, start, datasets, seeds))


def test_lockstep_leaves_the_model_as_it_found_it(tmp_path):
    setup, start = _setup(tmp_path)
    trainer = setup.trainer
    trainer.train_clients(start, setup.train_sets, trainer.cfg.lr, [1, 2, 3, 4, 5])
    assert torch.equal(trainer.adapter.get(), start)  # the model holds the start; the clients' copies are gone
    assert not any("forward" in vars(m) for m in setup.model.modules())
    assert not setup.model.training


def test_lockstep_is_refused_where_it_would_change_the_result(tmp_path):
    setup, start = _setup(tmp_path)
    trainer = setup.trainer
    assert trainer.lockstep_batchable
    for change in ({"lockstep": False}, {"precision": "fp16"}, {"gradient_checkpointing": True}):
        trainer.cfg = dataclasses.replace(setup.cfg.training, **change)
        assert not trainer.lockstep_batchable, change
    trainer.cfg = setup.cfg.training
    trainer.record_dp = training.RecordDp(1.0, 1.0)
    assert not trainer.lockstep_batchable
    trainer.record_dp = None
    config = setup.model.config
    config.attention_dropout = 0.1
    assert not trainer.lockstep_batchable
    config.attention_dropout = 0.0
    # an unsupported trained parameter (not a LoRA A or B): the clients train one at a time
    extra = torch.nn.Parameter(torch.zeros(3))
    trainer.adapter.params.append(extra)
    assert lockstep.lora_layers(setup.model, trainer.adapter) is None and not trainer.lockstep_batchable
    trainer.adapter.params.pop()
    # LLM.int8 picks its outlier columns from the whole batch: a client's result would depend on the others'
    eight, _ = _setup(tmp_path / "8bit", quantization="8bit")
    assert lockstep.lora_layers(eight.model, eight.trainer.adapter) is None and not eight.trainer.lockstep_batchable
    # one sampled client: nothing to batch, `train` itself
    seeds = [4]
    assert torch.equal(trainer.train_clients(start, setup.train_sets[:1], trainer.cfg.lr, seeds)[0].delta,
                       trainer.train(start, setup.train_sets[0], trainer.cfg.lr, 4).delta)


def test_a_routed_forward_with_the_adapter_disabled_is_the_base_model(tmp_path):
    """A DPO reference pass (`disable_adapter()`) inside a routed forward sees the base alone."""
    setup, start = _setup(tmp_path)
    model, trainer = setup.model, setup.trainer
    trainer.adapter.set(start)
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    clients = lockstep.ClientAdapters(model, trainer.adapter, start + 0.1, 2)  # copies unlike the model's
    with torch.no_grad(), clients.active(), clients.routed(torch.tensor([0, 1])):
        routed = model(input_ids=ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
    assert torch.equal(disabled, base)
    with torch.no_grad():
        own = model(input_ids=ids).logits
    assert not torch.allclose(routed, own, atol=1e-4)  # the routed rows used the clients' copies
    trainer.adapter.set(start + 0.1)
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    torch.testing.assert_close(routed, theirs, rtol=1e-5, atol=1e-5)


def test_a_flower_node_trains_its_clients_in_lockstep_as_the_inprocess_loop(tmp_path):
    """A SuperNode's worker trains its clients through the same `client_updates`: in lockstep, its
    updates for clients 1 and 3 are the in-process loop's bit for bit."""
    from fedsec.clients import client_updates, prepare_clients

    setup, start = _setup(tmp_path)
    node = prepare_clients(setup.cfg, lambda c: c % 2 == 1)
    assert node.trainer.lockstep_batchable
    here = client_updates(setup, start, [1, 3], setup.cfg.training.lr, 2)
    there = client_updates(node, start, [1, 3], setup.cfg.training.lr, 2)
    for u, v in zip(here, there, strict=True):
        assert u.client_id == v.client_id and torch.equal(u.delta, v.delta) and u.metrics == v.metrics
    alone = [setup.trainer.train(start, setup.train_sets[c], setup.cfg.training.lr, seed)
             for c, seed in zip([1, 3], [derive_seed(setup.cfg.seed, "client", 2, c) for c in (1, 3)])]
    _assert_same([training.LocalResult(u.delta, u.num_examples, u.metrics["loss"], STEPS["local_steps"],
                                       u.metrics["loss_terms"], u.metrics["tokens"]) for u in here], alone)
