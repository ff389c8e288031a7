from __future__ import annotations

import torch

from fedsec.config import LoraConfig, ModelConfig
from fedsec.data.schema import InstructionExample
from fedsec.evaluation import build_eval_set, evaluate, per_example, summarize
from fedsec.models import attach_lora, load_base_model


def _model():
    model, tok = load_base_model(ModelConfig(name="tiny"))
    return attach_lora(model, LoraConfig(rank=2, alpha=4), seed=0), tok


def _examples(choices):
    return [InstructionExample(f"question {i}?", choices[i % len(choices)]) for i in range(7)]


def test_single_token_scoring_equals_full_scoring():
    model, tok = _model()
    choices = ("a", "b", "c")  # one byte each: the one-forward path applies
    data = build_eval_set(_examples(choices), [0] * 7, tok, "chat", 128, choices)
    nll, count, fast = per_example(model, data, tok.pad_token_id, 3)
    nll2, count2, full = per_example(model, data, tok.pad_token_id, 3, force_full_scoring=True)
    assert torch.equal(fast, full)
    torch.testing.assert_close(nll, nll2)


def test_accuracy_and_loss_by_hand():
    model, tok = _model()
    choices = ("yes", "no")
    data = build_eval_set(_examples(choices), [0, 1, 0, 1, 0, 1, 0], tok, "chat", 128, choices)
    nll, count, predicted = per_example(model, data, tok.pad_token_id, 4)
    answers = torch.tensor(data.answers)
    result = evaluate(model, data, tok.pad_token_id, 4)
    assert result.accuracy == float((predicted == answers).float().mean())
    assert abs(result.loss - float(nll.sum() / count.sum())) < 1e-6
    # group summaries partition the same per-example numbers
    g1 = summarize(nll, count, predicted, data, torch.tensor(data.groups) == 1)
    assert g1.num_examples == 3
    assert g1.accuracy == float((predicted[1::2] == answers[1::2]).float().mean())
