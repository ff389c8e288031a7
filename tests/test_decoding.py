"""fedsec.decoding's greedy decoding gives generate's tokens, with the frozen layers' prefill kept."""

from __future__ import annotations

import pytest
import torch

from fedsec import decoding
from fedsec.config import LoraConfig, ModelConfig
from fedsec.decoding import greedy_tokens, plain_greedy
from fedsec.evaluation import left_padded
from fedsec.models import attach_lora, load_base_model


def _adapted(seed: int):
    """The tiny model, the adapter on its top layer with non-zero weights (so it matters)."""
    model, tok = load_base_model(ModelConfig(name="tiny"))
    model = attach_lora(model, LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
                                          top_layers=1), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name) + seed))
    return model.eval(), tok


@pytest.fixture(scope="module")
def tiny():
    return _adapted(0)


def _left_padded(tok, texts):
    return left_padded([tok(t, add_special_tokens=False).input_ids for t in texts], tok.pad_token_id, "cpu")


def _generate(model, ids, mask, new, pad):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
    return out[:, ids.shape[1]:]


TEXTS = ["Write a press release about", "Explain why the shares of a mining company fell sharply today",
         "Hello", "How do I"]


def test_greedy_tokens_are_generates_with_and_without_the_frozen_prefill(tiny):
    model, tok = tiny
    first, pad = model.config.num_hidden_layers - 1, tok.pad_token_id
    for texts in (TEXTS, ["Hello there", "Hi there"]):  # padded, and not (generate passes no mask then)
        ids, mask = _left_padded(tok, texts)
        expected = _generate(model, ids, mask, 12, pad)
        assert expected.shape == (len(texts), 12)
        assert torch.equal(greedy_tokens(model, ids, mask, 12, pad), expected)
        assert torch.equal(greedy_tokens(model, ids, mask, 12, pad, first), expected)  # computes the frozen part
        assert torch.equal(greedy_tokens(model, ids, mask, 12, pad, first), expected)  # reads it


def test_the_frozen_prefill_runs_once_per_batch(tiny):
    model, tok = tiny
    first, pad = model.config.num_hidden_layers - 1, tok.pad_token_id
    ids, mask = _left_padded(tok, TEXTS[::-1])
    calls = []
    layer = model.get_base_model().get_decoder().layers[0]
    handle = layer.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        greedy_tokens(model, ids, mask, 6, pad, first)
        once = len(calls)
        greedy_tokens(model, ids, mask, 6, pad, first)
    finally:
        handle.remove()
    assert once == 6  # the prefill, then 5 new tokens through every layer
    assert len(calls) - once == 5  # the prefill's frozen layer came from the kept entry
    # another copy of the same base with another adapter (the next run of a sweep) reads it too
    other, _ = _adapted(1)
    handle = other.get_base_model().get_decoder().layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        before = len(calls)
        tokens = greedy_tokens(other, ids, mask, 6, pad, first)
    finally:
        handle.remove()
    assert len(calls) - before == 5
    assert torch.equal(tokens, _generate(other, ids, mask, 6, pad))


def test_ended_rows_are_padded_and_decoding_stops_when_all_have_ended(tiny):
    model, tok = tiny
    lm, pad = model.get_base_model(), tok.pad_token_id
    ids, mask = _left_padded(tok, TEXTS)
    free = _generate(model, ids, mask, 8, pad)
    before = lm.generation_config.eos_token_id
    try:
        lm.generation_config.eos_token_id = [int(free[0, 2])]  # row 0 ends at its third token (or before)
        expected = _generate(model, ids, mask, 8, pad)
        assert (expected[0, 3:] == pad).all()
        assert torch.equal(greedy_tokens(model, ids, mask, 8, pad, model.config.num_hidden_layers - 1), expected)
        lm.generation_config.eos_token_id = sorted({int(t) for t in free[:, 1]})  # every row ends at its second
        expected = _generate(model, ids, mask, 8, pad)
        assert expected.shape[1] <= 2
        assert torch.equal(greedy_tokens(model, ids, mask, 8, pad), expected)
    finally:
        lm.generation_config.eos_token_id = before


def test_a_generation_config_that_changes_the_arg_max_goes_through_generate(tiny, monkeypatch):
    model, tok = tiny
    lm, pad = model.get_base_model(), tok.pad_token_id
    ids, mask = _left_padded(tok, TEXTS)
    assert plain_greedy(model)
    monkeypatch.setattr(lm.generation_config, "repetition_penalty", 5.0)
    assert not plain_greedy(model)
    expected = _generate(model, ids, mask, 10, pad)
    monkeypatch.setattr(decoding, "_frozen", None)  # not reached: generate decodes
    assert torch.equal(greedy_tokens(model, ids, mask, 10, pad, 1), expected)


def test_canary_extraction_decodes_over_the_frozen_prefill(tiny, monkeypatch):
    from fedsec import evaluation
    from fedsec.data.schema import Canary
    from fedsec.leakage import extracted

    model, tok = tiny
    first = model.config.num_hidden_layers - 1
    canaries = [Canary(i, f"My PIN is {pin}.", "My PIN is", pin) for i, pin in enumerate(("4821", "0937", "5560"))]
    seen, real = [], evaluation.greedy_tokens
    monkeypatch.setattr(evaluation, "greedy_tokens", lambda *args: seen.append(args[-1]) or real(*args))
    assert extracted(model, tok, canaries, "chat", 4, first) == extracted(model, tok, canaries, "chat", 4)
    assert seen == [first, 0]  # one batch each: the frozen layers' prefill kept, then the plain way


def test_the_eval_suites_open_ended_replies_decode_over_the_frozen_prefill(tiny, monkeypatch):
    from fedsec import evaluation
    from fedsec.evalsuite.runner import PeftModelLM

    model, tok = tiny
    first = model.config.num_hidden_layers - 1
    seen, real = [], evaluation.greedy_tokens
    monkeypatch.setattr(evaluation, "greedy_tokens", lambda *args: seen.append(args[-1]) or real(*args))
    prompts = ["Write a press release.", "Explain the news."]
    kept = PeftModelLM(model, tok, "chat", 4, frozen=first).complete(prompts, 6)
    assert kept == PeftModelLM(model, tok, "chat", 4).complete(prompts, 6)
    assert seen == [first, 0]


def test_a_model_in_training_mode_goes_through_generate(tiny, monkeypatch):
    model, tok = tiny
    ids, mask = _left_padded(tok, TEXTS)
    asked = []

    def generate(**kwargs):  # a stand-in: training mode's dropout would make two real calls differ
        asked.append(kwargs["max_new_tokens"])
        return torch.cat([kwargs["input_ids"], torch.full((len(ids), 5), 7)], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    model.train()
    try:
        out = greedy_tokens(model, ids, mask, 5, tok.pad_token_id, model.config.num_hidden_layers - 1)
    finally:
        model.eval()
    assert asked == [5] and (out == 7).all()


def test_kept_prefills_stay_within_their_byte_budget(tiny, monkeypatch):
    model, tok = tiny
    first, pad = model.config.num_hidden_layers - 1, tok.pad_token_id
    monkeypatch.setattr(decoding, "_FROZEN", {})
    ids, mask = _left_padded(tok, TEXTS)
    expected = _generate(model, ids, mask, 4, pad)
    monkeypatch.setattr(decoding, "FROZEN_BYTES", 1)  # below one batch's: used, then not kept
    assert torch.equal(greedy_tokens(model, ids, mask, 4, pad, first), expected)
    assert decoding._FROZEN == {}
    monkeypatch.setattr(decoding, "FROZEN_BYTES", 2 ** 30)
    for texts in (TEXTS, TEXTS[:2], TEXTS[1:]):
        greedy_tokens(model, *_left_padded(tok, texts), 4, pad, first)
    sizes = [entry.nbytes for entry in decoding._FROZEN.values()]
    assert len(sizes) == 3
    oldest = next(iter(decoding._FROZEN))
    monkeypatch.setattr(decoding, "FROZEN_BYTES", sum(sizes[1:]))  # the next batch evicts the oldest first
    greedy_tokens(model, *_left_padded(tok, TEXTS[:3]), 4, pad, first)
    kept = list(decoding._FROZEN.values())
    assert oldest not in decoding._FROZEN and kept  # oldest out first, the newest batch kept
    assert sum(e.nbytes for e in kept) <= sum(sizes[1:])
