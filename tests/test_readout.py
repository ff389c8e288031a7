"""fedsec.readout: the last decoder layer's MLP and attention output projection run only at
the positions the loss reads. The read states, the loss's gradient and per-row (DP)
gradients equal the plain forward's up to float rounding, the MLP sees fewer positions, and
a last layer that mixes positions is caught by the first batch's check and run plainly."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_config

import fedsec.training as training
from fedsec import readout
from fedsec.encoding import IGNORE, collate, collate_packed_rows, shared_prefix_length
from fedsec.setup import prepare


def _plain(monkeypatch):
    monkeypatch.setattr(training, "trimmed", lambda *args, **kwargs: contextlib.nullcontext())


def _last_mlp(setup):
    return setup.model.get_base_model().get_decoder().layers[-1].mlp


def _sft(tmp_path, **lora):
    cfg = tiny_config(tmp_path, lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj"],
                                      **lora}, training={"pack": False})
    return prepare(cfg)


def _grads(setup, batch):
    for p in setup.adapter.params:
        p.grad = None
    logp, _ = training.target_logprobs(setup.model, batch)
    (-logp.sum()).backward()
    return logp.detach(), torch.cat([p.grad.reshape(-1) for p in setup.adapter.params])


@pytest.mark.parametrize("packed", [False, True])
def test_the_read_states_and_gradients_are_the_plain_forwards_with_the_mlp_at_read_positions_only(
        tmp_path, monkeypatch, packed):
    setup = _sft(tmp_path)
    items = setup.train_sets[0][:4]
    batch = (collate_packed_rows([(items[:2], shared_prefix_length(items[:2])),
                                  (items[2:], shared_prefix_length(items[2:]))], setup.pad_id)
             if packed else collate(items, setup.pad_id))
    read = torch.nn.functional.pad(batch["labels"][:, 1:] != IGNORE, (0, 1))
    seen = []
    _last_mlp(setup).register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    logp, grad = _grads(setup, batch)
    assert set(seen) == {int(read.sum(1).max())} and seen[0] < batch["input_ids"].shape[1] // 2
    _plain(monkeypatch)
    seen.clear()
    logp_plain, grad_plain = _grads(setup, batch)
    assert set(seen) == {batch["input_ids"].shape[1]}
    assert torch.allclose(logp, logp_plain, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, grad_plain, rtol=1e-4, atol=1e-7) and float(grad.abs().max()) > 0


def test_per_row_gradients_stay_per_row(tmp_path, monkeypatch):
    """Opacus' hooks see the rows as rows: each row's gradient is the plain forward's (what
    record-level DP clips and the batched cohort path sums per client)."""
    setup = _sft(tmp_path)
    batch = collate(setup.train_sets[1][:4], setup.pad_id)
    setup.model.train()  # Opacus' hooks capture in training mode only

    def per_row():
        with training.per_sample_gradients(setup.model):
            logp, rows = training.target_logprobs(setup.model, batch)
            (-logp.sum()).backward()
            out = torch.cat([p.grad_sample.reshape(len(batch["input_ids"]), -1) for p in setup.adapter.params], 1)
        for p in setup.adapter.params:
            p.grad = None
        return out

    trimmed = per_row()
    _plain(monkeypatch)
    plain = per_row()
    assert trimmed.shape == plain.shape == (4, setup.adapter.layout.numel)
    assert torch.allclose(trimmed, plain, rtol=1e-4, atol=1e-7) and bool((plain.norm(dim=1) > 0).all())


def test_a_cached_prefix_run_trains_the_plain_update(tmp_path, monkeypatch):
    """The adapted top layer over cached states (the DP sweep's shape), one batched cohort
    call of one-step SGD clients: the deltas of the plain forward's."""
    cfg = tiny_config(tmp_path, lora={"rank": 1, "alpha": 2, "target_modules": ["gate_proj", "up_proj", "down_proj"],
                                      "top_layers": 1, "cache_frozen_layers": True},
                      training={"optimizer": "sgd", "local_steps": 1, "lr": 1.0, "max_grad_norm": 1.0})
    setup = prepare(cfg)
    start, seeds = setup.adapter.get(), [1, 2, 3, 4]
    assert setup.trainer.one_step_batchable
    trimmed = [r.delta for r in setup.trainer.train_clients(start, setup.train_sets, 1.0, seeds)]
    assert readout._EXACT.get(setup.model.get_base_model()) is True
    _plain(monkeypatch)
    plain = [r.delta for r in setup.trainer.train_clients(start, setup.train_sets, 1.0, seeds)]
    for a, b in zip(trimmed, plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7) and float(b.abs().max()) > 0


class _MixesPositions(torch.nn.Module):
    """An MLP whose output at a position depends on the others (their mean added)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + x.mean(1, keepdim=True)


def test_a_last_layer_that_mixes_positions_is_caught_by_the_check_and_run_plainly(tmp_path, monkeypatch):
    setup = _sft(tmp_path)
    decoder = setup.model.get_base_model().get_decoder()
    decoder.layers[-1].mlp = _MixesPositions(decoder.layers[-1].mlp)
    readout._EXACT.pop(setup.model.get_base_model(), None)  # prepare's evaluation set checked the plain model
    batch = collate(setup.train_sets[0][:4], setup.pad_id)
    with torch.no_grad():
        checked = training.target_logprobs(setup.model, batch)[0]
    assert readout._EXACT[setup.model.get_base_model()] is False
    _plain(monkeypatch)
    with torch.no_grad():
        plain = training.target_logprobs(setup.model, batch)[0]
    assert torch.equal(checked, plain)


def test_the_check_leaves_the_random_state_and_the_training_mode_alone(tmp_path):
    setup = _sft(tmp_path, dropout=0.1)
    lm = setup.model.get_base_model()
    readout._EXACT.pop(lm, None)  # prepare's evaluation set checked it: check again
    lm.train()
    before = torch.get_rng_state()
    decoder = lm.get_decoder()
    batch = collate(setup.train_sets[0][:2], setup.pad_id)
    read = torch.nn.functional.pad(batch["labels"][:, 1:] != IGNORE, (0, 1))
    with torch.no_grad():
        context = readout.trimmed(lm, decoder, read, lambda: decoder(input_ids=batch["input_ids"],
                                                                     attention_mask=batch["attention_mask"],
                                                                     use_cache=False).last_hidden_state)
    assert readout._EXACT[lm] is True and isinstance(context, contextlib.AbstractContextManager)
    assert torch.equal(torch.get_rng_state(), before) and lm.training
