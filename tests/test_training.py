from __future__ import annotations

import math

import pytest
import torch

from fedsec.config import BenchmarkConfig, LoraConfig, ModelConfig, TrainingConfig
from fedsec.data.benchmark import make_benchmark
from fedsec.encoding import IGNORE, collate, encode, encode_all
from fedsec.models import attach_lora, load_base_model
from fedsec.objectives import SftObjective
from fedsec.training import LocalTrainer, completion_loss, cosine_lr


def _tiny(quantization="none", lora=None):
    model, tok = load_base_model(ModelConfig(name="tiny", quantization=quantization))
    return attach_lora(model, lora or LoraConfig(rank=4, alpha=8), seed=0), tok


def _data(tok, n=8):
    bench = make_benchmark(BenchmarkConfig(num_clients=1, examples_per_client=n), 0)
    return encode_all(bench.clients[0].train, tok, "chat", 160)


def test_cosine_schedule_by_hand():
    assert cosine_lr(0, 10, 1.0, 0.0) == 1.0
    assert cosine_lr(5, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine_lr(2, 4, 3e-4, 1e-5) == pytest.approx(1e-5 + 0.5 * (3e-4 - 1e-5))
    assert cosine_lr(9, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.9)))


def test_encoding_masks_the_prompt_and_targets_the_answer():
    _, tok = _tiny()
    bench = make_benchmark(BenchmarkConfig(num_clients=1, examples_per_client=4), 0)
    ex = bench.clients[0].train[0]
    enc = encode(ex, tok, "chat", 512)
    targets = enc.labels[enc.labels != IGNORE]
    assert tok.decode(targets) == ex.response + "<|im_end|>\n"
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\n" + ex.system)
    alpaca = encode(ex, tok, "alpaca", 512)
    assert tok.decode(alpaca.labels[alpaca.labels != IGNORE]) == ex.response + tok.eos_token
    assert "### Response:\n" in tok.decode(alpaca.input_ids)


def test_completion_loss_equals_transformers_loss():
    model, tok = _tiny()
    batch = collate(_data(tok)[:4], tok.pad_token_id)
    loss_sum, n = completion_loss(model, batch)
    reference = model(**batch).loss  # HF's mean over label tokens, full logits
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-5, atol=1e-6)


def test_local_training_is_deterministic_and_lowers_the_loss():
    model, tok = _tiny()
    data = _data(tok)
    trainer = LocalTrainer(model, TrainingConfig(local_steps=6, batch_size=4, lr=3e-3), SftObjective(tok.pad_token_id))
    start = trainer.adapter.get()
    a = trainer.train(start, data, 3e-3, seed=11)
    b = trainer.train(start, data, 3e-3, seed=11)
    c = trainer.train(start, data, 3e-3, seed=12)
    assert torch.equal(a.delta, b.delta) and not torch.equal(a.delta, c.delta)
    assert a.num_examples == len(data) and a.steps == 6
    full = collate(data, tok.pad_token_id)
    with torch.no_grad():
        trainer.adapter.set(start)
        before = completion_loss(model, full)[0]
        trainer.adapter.set(start + a.delta)
        after = completion_loss(model, full)[0]
    assert after < before


@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_lora_step_trains_adapter_only_and_base_weights_never_change(quantization):
    model, tok = _tiny(quantization)
    def snapshot(p):  # a plain copy (bitsandbytes parameters re-pack on clone)
        return torch.from_numpy(p.detach().cpu().numpy().copy())

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = collate(_data(tok)[:4], tok.pad_token_id)
    loss_sum, n = completion_loss(model, batch)
    (loss_sum / n).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)
    # snapshot after the first forward: bitsandbytes repacks 4-bit weights for the CPU kernel once
    base_before = {n: snapshot(p) for n, p in model.named_parameters() if not p.requires_grad}
    trainer = LocalTrainer(model, TrainingConfig(local_steps=3, batch_size=4, lr=1e-2), SftObjective(tok.pad_token_id))
    result = trainer.train(trainer.adapter.get(), _data(tok), 1e-2, seed=0)
    assert result.delta.abs().sum() > 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(snapshot(p), base_before[name]), name
    if quantization == "4bit":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_top_layers_puts_adapters_on_the_top_layers_only():
    model, _ = _tiny(lora=LoraConfig(rank=2, alpha=4, top_layers=1))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)


def test_multi_turn_chat_targets_every_assistant_turn():
    from fedsec.data.schema import ChatExample, Message

    _, tok = _tiny()
    chat = ChatExample((Message("user", "hi"), Message("assistant", "hello"),
                        Message("user", "and?"), Message("assistant", "bye")))
    enc = encode(chat, tok, "chat", 512)
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in chat.turns], tokenize=False)
    targets = tok.decode(enc.labels[enc.labels != IGNORE])
    assert targets == "hello<|im_end|>\nbye<|im_end|>\n"
    with pytest.raises(ValueError, match="single-turn"):
        encode(chat, tok, "alpaca", 512)


def test_one_sgd_step_moves_the_adapter_by_minus_lr_times_the_clipped_gradient():
    model, tok = _tiny()
    data = _data(tok, n=4)
    trainer = LocalTrainer(model, TrainingConfig(optimizer="sgd", local_steps=1, batch_size=4, lr=0.5,
                                                 max_grad_norm=0.01), SftObjective(tok.pad_token_id))
    start = trainer.adapter.get() + 0.01  # B != 0, so A's gradient is not zero either
    result = trainer.train(start, data, 0.5, seed=0)
    # the same gradient by hand: mean target-token loss over the whole client batch
    trainer.adapter.set(start)
    model.train()
    loss_sum, n = completion_loss(model, collate(data, tok.pad_token_id))
    grads = torch.autograd.grad(loss_sum / n, trainer.adapter.params)
    model.eval()
    grad = torch.cat([g.reshape(-1) for g in grads])
    clipped = grad * min(1.0, 0.01 / float(grad.norm()))
    torch.testing.assert_close(result.delta, -0.5 * clipped, rtol=1e-4, atol=1e-8)
    assert float(result.delta.norm()) <= 0.5 * 0.01 * (1 + 1e-5)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_an_evaluation_pass_leaves_the_quantized_models_gradients_as_they_were(quantization):
    """bitsandbytes repacks a CPU 4-bit layer for an inference kernel without a backward the
    first time it runs in eval mode without gradients (on CPUs with AVX512-BF16, like this
    project's): after that no gradient reached the adapters. fedsec turns the repacking off."""
    model, tok = _tiny(quantization)
    batch = collate(_data(tok)[:4], tok.pad_token_id)

    def gradients():
        model.train()
        model.zero_grad(set_to_none=True)
        loss_sum, n = completion_loss(model, batch)
        (loss_sum / n).backward()
        model.eval()
        return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    with torch.no_grad():  # what a run's evaluation does between rounds
        completion_loss(model, batch)
    after = gradients()
    assert before.keys() == after.keys() and any(g.abs().sum() > 0 for g in before.values())
    for key, grad in before.items():
        assert after[key] is not None, key
        torch.testing.assert_close(after[key], grad, rtol=1e-5, atol=1e-7)


def test_a_4bit_run_trains_its_adapter(tmp_path):
    """The whole loop on the 4-bit tiny model: the round-0 evaluation comes first, and the
    adapter still moves (it stayed as initialised before the repacking was turned off)."""
    from conftest import tiny_config

    from fedsec.loop import run_experiment

    cfg = tiny_config(tmp_path, model={"name": "tiny", "quantization": "4bit"}, keep_checkpoints=3,
                      federation={"rounds": 2, "clients_per_round": 2})
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))
    first, last = (torch.load(p, weights_only=True)["global"] for p in checkpoints)
    assert not torch.equal(first, last)
    assert result.final["loss"] != pytest.approx(result.untuned["loss"], rel=1e-6)
