"""fedsec.lmhead: the LM head's target log-probabilities in blocks of the vocabulary equal
`log_softmax(h W^T).gather(targets)` and its gradient to float rounding, whatever the block
size against the vocabulary; the model's training path takes it for a plain frozen fp32
head (same losses and adapter gradients, per-row gradients included), and any other head
is the plain computation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

import fedsec.training as training
from fedsec import lmhead
from fedsec.encoding import collate
from fedsec.setup import prepare


def _plain(hidden, weight, targets):
    return torch.nn.functional.linear(hidden, weight).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def _value_and_grad(fn, hidden, weight, targets, cotangent):
    hidden = hidden.detach().requires_grad_()
    out = fn(hidden, weight, targets)
    (out * cotangent).sum().backward()
    return out.detach(), hidden.grad


@pytest.mark.parametrize("block", [7, 64, 100, 1000, 4096])  # a short last block, exact blocks, one block
def test_blocks_equal_the_full_log_softmax_and_its_gradient(block):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 24, generator=g)
    weight = torch.randn(1000, 24, generator=g) * 0.7  # logits spread over about +-15
    targets = torch.randint(0, 1000, (37,), generator=g)
    targets[:3] = torch.tensor([0, 999, 99])  # the vocabulary's edges, a block's edge
    cotangent = torch.randn(37, generator=g)
    want, want_grad = _value_and_grad(_plain, hidden, weight, targets, cotangent)
    got, got_grad = _value_and_grad(lambda h, w, t: lmhead.target_logprobs(h, w, t, block), hidden, weight,
                                    targets, cotangent)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) and float(want.min()) < -15
    assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5) and float(want_grad.abs().max()) > 1
    assert bool((got <= 0).all())  # the target's logit is one of the lse's terms, as computed
    with torch.no_grad():  # no gradient wanted: nothing kept, same values
        assert torch.equal(lmhead.target_logprobs(hidden, weight, targets, block), got)


def test_a_retained_graph_gives_the_same_gradient_twice():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 8, generator=g).requires_grad_()
    weight, targets = torch.randn(50, 8, generator=g), torch.tensor([1, 2, 3, 49, 0])
    out = lmhead.target_logprobs(hidden, weight, targets, 16).sum()
    first, = torch.autograd.grad(out, hidden, retain_graph=True)
    second, = torch.autograd.grad(out, hidden)
    assert torch.equal(first, second)


def _sft(tmp_path):
    return prepare(tiny_config(tmp_path, lora={"rank": 4, "alpha": 8}, training={"pack": False}))


def _step(setup, batch, per_row=False):
    for p in setup.adapter.params:
        p.grad = None
    if per_row:
        setup.model.train()
        with training.per_sample_gradients(setup.model):
            logp, _ = training.target_logprobs(setup.model, batch)
            (-logp.sum()).backward()
            grads = torch.cat([p.grad_sample.reshape(len(batch["input_ids"]), -1) for p in setup.adapter.params], 1)
    else:
        logp, _ = training.target_logprobs(setup.model, batch)
        (-logp.sum()).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in setup.adapter.params])
    for p in setup.adapter.params:
        p.grad = None
    return logp.detach(), grads


@pytest.mark.parametrize("per_row", [False, True])
def test_the_models_training_path_takes_the_blocks_and_equals_the_plain_head(tmp_path, monkeypatch, per_row):
    setup = _sft(tmp_path)
    batch = collate(setup.train_sets[0][:4], setup.pad_id)
    calls = []
    blocked = lmhead.target_logprobs
    monkeypatch.setattr(lmhead, "target_logprobs", lambda *a, **k: calls.append(1) or blocked(*a, **k))
    logp, grads = _step(setup, batch, per_row)
    assert calls  # the tiny model's head is a frozen, bias-free fp32 Linear
    monkeypatch.setattr(lmhead, "blockable", lambda *a: False)
    logp_plain, grads_plain = _step(setup, batch, per_row)
    assert len(calls) == 1
    assert torch.allclose(logp, logp_plain, rtol=1e-5, atol=1e-6)
    # float rounding: within 1e-5 of the largest entry (the per-row gradients' own magnitudes spread widely)
    assert float((grads - grads_plain).abs().max()) <= 1e-5 * float(grads_plain.abs().max()) > 0


def test_only_a_plain_frozen_fp32_head_is_blocked():
    hidden = torch.zeros(3, 4)
    head = torch.nn.Linear(4, 10, bias=False).requires_grad_(False)
    assert lmhead.blockable(head, hidden, None)
    assert not lmhead.blockable(head, hidden, torch.bfloat16)  # autocast: the plain head under it
    assert not lmhead.blockable(head, hidden[:0], None)
    assert not lmhead.blockable(torch.nn.Linear(4, 10).requires_grad_(False), hidden, None)  # a bias
    assert not lmhead.blockable(torch.nn.Linear(4, 10, bias=False), hidden, None)  # a trained head
    assert not lmhead.blockable(head.to(torch.bfloat16), hidden, None)
    hooked = torch.nn.Linear(4, 10, bias=False).requires_grad_(False)
    hooked.register_forward_hook(lambda *a: None)
    assert not lmhead.blockable(hooked, hidden, None)


@pytest.mark.parametrize("block", [7, 100, 4096])
def test_blocked_scores_equal_the_full_log_distributions(block):
    """Evaluation's reads: the targets' log-probabilities, the arg-max (the first of equal
    maxima, as torch.argmax), given words at given positions, and a run of positions."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(29, 16, generator=g)
    weight = torch.randn(1000, 16, generator=g) * 0.6
    hidden[4], weight[500], weight[505] = 0, 0, 0  # position 4's two largest logits exactly equal (50),
    hidden[4, 0], weight[500, 0], weight[505, 0] = 1, 50, 50  # in two blocks of 7 and one of 100
    targets = torch.randint(0, 1000, (29,), generator=g)
    full = lmhead.TargetScores.from_log_probs(torch.nn.functional.linear(hidden, weight).log_softmax(-1), targets)
    got = lmhead.target_scores(hidden, weight, targets, block)
    assert torch.allclose(got.target, full.target, rtol=1e-5, atol=1e-5) and float(full.target.min()) < -10
    assert torch.equal(got.argmax, full.argmax) and int(got.argmax[4]) == 500
    same, per_row = torch.tensor([3, 999, 0]), torch.randint(0, 1000, (5, 2), generator=g)
    mask = torch.zeros(29, dtype=torch.bool)
    mask[[1, 4, 8]] = True
    assert torch.allclose(got.words(mask, same), full.words(mask, same), rtol=1e-5, atol=1e-5)
    rows = torch.tensor([0, 2, 4, 6, 28])
    assert torch.allclose(got.words(rows, per_row), full.words(rows, per_row), rtol=1e-5, atol=1e-5)
    part, part_full = got[5:12], full[5:12]
    assert len(part) == 7 and torch.equal(part.argmax, full.argmax[5:12])
    assert torch.allclose(part.words(torch.tensor([0, 6]), same), part_full.words(torch.tensor([0, 6]), same),
                          rtol=1e-5, atol=1e-5)
