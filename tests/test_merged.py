"""fedsec.merged: evaluation through W + s B A. The merged forward equals the LoRA branch's up to
fp32 rounding, follows the adapter's values, leaves the base weights and the state dict bit for
bit as they were, and steps aside wherever it would not be the same computation (autograd,
training mode, disabled adapters, a base it cannot merge into, past its memory budget)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fedsec import merged
from fedsec.encoding import collate
from fedsec.round_eval import evaluate_model
from fedsec.setup import prepare


def _setup(tmp_path, **model):
    cfg = tiny_config(tmp_path, lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj"]},
                      model={"name": "tiny", **model})
    return prepare(cfg)


def _trained(setup, seed: int = 0) -> torch.Tensor:
    """An adapter with B away from its zero start, so the merged delta is not zero."""
    start = setup.adapter.get()
    return start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(seed))


def _logits(setup, batch) -> torch.Tensor:
    return setup.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _batch(setup):
    return collate(setup.train_sets[0][:4], setup.pad_id)


def _lora_layers(setup):
    return [m for m in setup.model.modules() if merged.mergeable(m)]


@pytest.mark.parametrize("budget", [None, 0])
def test_the_merged_forward_is_the_lora_branch_up_to_fp32_rounding(tmp_path, budget):
    """Merged (the default budget), the logits are the LoRA branch's up to fp32 rounding; past
    the budget (0 bytes) nothing merges and they are its bits."""
    setup = _setup(tmp_path)
    setup.adapter.set(_trained(setup))
    batch = _batch(setup)
    with torch.no_grad():
        plain = _logits(setup, batch)
        with merged.merged_lora(setup.model, budget) as count:
            got = _logits(setup, batch)
    if budget == 0:
        assert count == 0 and torch.equal(got, plain)
        return
    # 3 target modules in each of the tiny model's layers
    assert count == 3 * setup.model.config.num_hidden_layers == len(_lora_layers(setup))
    assert not torch.equal(got, plain)  # a different computation, not the same one ...
    assert torch.allclose(got, plain, rtol=1e-5, atol=1e-5)  # ... with the same values
    with torch.inference_mode(), merged.merged_lora(setup.model):
        assert torch.equal(_logits(setup, batch), got)


def test_the_base_weights_and_state_dict_are_untouched(tmp_path):
    setup = _setup(tmp_path)
    setup.adapter.set(_trained(setup))
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    with torch.no_grad(), merged.merged_lora(setup.model):
        _logits(setup, _batch(setup))
        inside = setup.model.state_dict()
        assert all(torch.equal(inside[k], v) for k, v in before.items())
    after = setup.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any("forward" in vars(m) for m in _lora_layers(setup))  # PEFT's own forward again


def test_a_new_adapter_inside_the_block_takes_effect(tmp_path):
    setup = _setup(tmp_path)
    first, second = _trained(setup, 0), _trained(setup, 1)
    batch = _batch(setup)
    with torch.no_grad():
        setup.adapter.set(second)
        want = _logits(setup, batch)
        setup.adapter.set(first)
        with merged.merged_lora(setup.model):
            old = _logits(setup, batch)
            setup.adapter.set(second)
            got = _logits(setup, batch)
    assert not torch.allclose(old, want, atol=1e-3)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_training_mode_and_a_disabled_adapter_run_peft_forward(tmp_path):
    setup = _setup(tmp_path)
    setup.adapter.set(_trained(setup))
    batch = _batch(setup)

    def grads() -> torch.Tensor:
        for p in setup.adapter.params:
            p.grad = None
        _logits(setup, batch).square().mean().backward()
        return torch.cat([p.grad.reshape(-1) for p in setup.adapter.params])

    want = grads()
    with torch.no_grad(), setup.model.disable_adapter():
        base = _logits(setup, batch)
    with merged.merged_lora(setup.model):
        assert torch.equal(grads(), want)  # autograd: the LoRA branch, the same bits
        with torch.no_grad(), setup.model.disable_adapter():
            assert torch.equal(_logits(setup, batch), base)
        setup.model.train()
        try:
            with torch.no_grad():
                training = _logits(setup, batch)
        finally:
            setup.model.eval()
    with torch.no_grad():
        setup.model.train()
        try:
            assert torch.equal(training, _logits(setup, batch))
        finally:
            setup.model.eval()


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_a_quantized_base_keeps_its_lora_branch(tmp_path, quantization):
    pytest.importorskip("bitsandbytes")
    setup = _setup(tmp_path, quantization=quantization)
    with merged.merged_lora(setup.model) as count:
        assert count == 0


def test_nested_blocks_leave_the_outer_in_charge(tmp_path):
    setup = _setup(tmp_path)
    with merged.merged_lora(setup.model) as outer:
        with merged.merged_lora(setup.model) as inner:
            assert (outer, inner) == (len(_lora_layers(setup)), 0)
        assert all("forward" in vars(m) for m in _lora_layers(setup))
    assert not any("forward" in vars(m) for m in _lora_layers(setup))


def test_a_rounds_evaluation_matches_the_unmerged_one(tmp_path, monkeypatch):
    """evaluate_model merges (the default): its loss and accuracy are the LoRA branch's."""
    setup = _setup(tmp_path)
    vector = _trained(setup)
    got, clients = evaluate_model(setup, vector, 1)
    monkeypatch.setattr(merged, "MERGE_BYTES", 0)
    want, clients_want = evaluate_model(setup, vector, 1)
    assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert clients.keys() == clients_want.keys()
