from __future__ import annotations

import dataclasses

import pytest
import torch

from fedsec import evaluation
from fedsec.config import LoraConfig, ModelConfig
from fedsec.data.schema import InstructionExample
from fedsec.encoding import IGNORE, Encoded, collate_packed, shared_prefix_length
from fedsec.evaluation import build_eval_set, evaluate, map_sequences, per_example, share_prefix, summarize
from fedsec.models import attach_lora, load_base_model
from fedsec.prefix import cache_frozen_prefix


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


# --- the shared prefix computed once per forward (encoding.collate_packed) ----------------


def _perturbed(model, scale=1.0):
    """Non-zero adapter weights, so the adapted layers' attention over the packed prefix matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * scale)
    return model


def _varied(choices):
    """Prompts of different lengths and words behind one chat template (system turn included)."""
    words = "market rose fell bank bond yield tech oil gold rate".split()
    return [InstructionExample(" ".join(words[i * k % 10] for k in range(1 + 3 * i % 7)) + "?",
                               choices[i % len(choices)], system="Answer with one of the labels.")
            for i in range(11)]


def test_shared_prefix_length_by_hand():
    def item(ids, first_target):
        return Encoded(torch.tensor(ids), torch.tensor([IGNORE] * first_target + ids[first_target:]))

    a, b = item([1, 2, 3, 4, 5], 3), item([1, 2, 3, 9, 9, 9], 4)
    assert shared_prefix_length([a, b]) == 2  # 3 tokens in common, but position 2 predicts a's first target
    assert shared_prefix_length([item([1, 2, 3, 4], 3), b]) == 2
    assert shared_prefix_length([item([1, 2, 3, 4], 3), item([1, 2, 3, 4], 3)]) == 2
    assert shared_prefix_length([item([5, 2, 3], 2), b]) == 0
    assert shared_prefix_length([b]) == 0


def test_collate_packed_layout_by_hand():
    a = Encoded(torch.tensor([1, 2, 3, 4]), torch.tensor([IGNORE, IGNORE, IGNORE, 4]))
    b = Encoded(torch.tensor([1, 2, 7, 8, 9]), torch.tensor([IGNORE, IGNORE, IGNORE, 8, 9]))
    batch = collate_packed([a, b], 2)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    assert batch["owner"].tolist() == [[-1, -1, 0, 0, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 4, IGNORE, 8, 9]]
    seen = batch["attention_mask"][0, 0]
    assert [seen[row].nonzero().flatten().tolist() for row in range(7)] == [
        [0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4], [0, 1, 4, 5], [0, 1, 4, 5, 6]]
    with pytest.raises(ValueError):  # the prefix would hide b's first target
        collate_packed([a, b], 3)


def test_packed_rows_layout_by_hand():
    """Two packed groups as a batch of two rows: the second (one item, nothing shared) padded
    to the first's width, its padding attending to itself only, items numbered across rows."""
    from fedsec.encoding import collate_packed_rows

    a = Encoded(torch.tensor([1, 2, 3, 4]), torch.tensor([IGNORE, IGNORE, IGNORE, 4]))
    b = Encoded(torch.tensor([1, 2, 7, 8, 9]), torch.tensor([IGNORE, IGNORE, IGNORE, 8, 9]))
    c = Encoded(torch.tensor([5, 6, 7]), torch.tensor([IGNORE, 6, 7]))
    batch = collate_packed_rows([([a, b], 2), ([c], 0)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 7, 8, 9], [5, 6, 7, 0, 0, 0, 0]]
    assert batch["owner"].tolist() == [[-1, -1, 0, 0, 1, 1, 1], [2, 2, 2, -1, -1, -1, -1]]
    assert batch["labels"].tolist()[1] == [IGNORE, 6, 7, IGNORE, IGNORE, IGNORE, IGNORE]
    assert batch["position_ids"].tolist()[1] == [0, 1, 2, 0, 0, 0, 0]
    seen = batch["attention_mask"][1, 0]
    assert [seen[row].nonzero().flatten().tolist() for row in range(7)] == [
        [0], [0, 1], [0, 1, 2], [3], [4], [5], [6]]
    assert torch.equal(batch["attention_mask"][0, 0], collate_packed([a, b], 2)["attention_mask"][0, 0])


@pytest.mark.parametrize("top_layers", [None, 1])
@pytest.mark.parametrize("choices", [("a", "b", "c"), ("rose", "fell", "flat")])
def test_packed_evaluation_equals_plain_batches(monkeypatch, top_layers, choices):
    """Loss, counts, picks and full-sequence label scores with the shared prefix packed
    (over the frozen-prefix cache with top_layers, items and multi-token scoring sequences
    alike) equal the full model's in plain padded batches, for single- and multi-token
    labels, with packs cut by PACK_TOKENS and by the batch size."""
    model, tok = load_base_model(ModelConfig(name="tiny"))
    model = _perturbed(attach_lora(model, LoraConfig(rank=4, alpha=8, top_layers=top_layers), seed=0))
    pad = tok.pad_token_id
    data = build_eval_set(_varied(choices), [i % 3 for i in range(11)], tok, "chat", 160, choices)
    assert (data.pairs is None) == (len(choices[0]) == 1)  # scoring sequences built once for multi-token labels
    plain, plain_full = per_example(model, data, pad, 4), evaluation._full_scores(model, data, pad, 4)
    assert len(choices[0]) > 1 or len(set(plain[2].tolist())) > 1  # not one label picked for all
    fast = data
    if top_layers:
        first = model.config.num_hidden_layers - top_layers
        fast = map_sequences(data, lambda items: cache_frozen_prefix(model, items, first, pad))
        assert all(e.hidden is not None for e in fast.encoded + (fast.pairs or ()))
    fast = share_prefix(model, fast, pad)
    assert fast.shared > 10 and (fast.pairs is None or fast.pairs_shared > 10)  # the system turn, user header
    longest = max(e.input_ids.numel() for e in data.encoded)
    for cap, batch in ((longest, 32), (3 * longest, 4), (512, 32)):
        monkeypatch.setattr(evaluation, "PACK_TOKENS", cap)
        nll, count, picks = per_example(model, fast, pad, batch)
        torch.testing.assert_close(nll, plain[0], rtol=1e-5, atol=1e-4)
        assert torch.equal(count, plain[1]) and torch.equal(picks, plain[2])
        torch.testing.assert_close(evaluation._full_scores(model, fast, pad, batch), plain_full,
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shared", [False, True])
def test_one_head_call_for_several_forwards_gives_each_forwards_numbers(monkeypatch, shared):
    """The LM head runs on the target positions of several forwards at once (HEAD_ROWS): cut
    anywhere, inside a forward's positions or between them, each item gets what a head call
    per forward gives it (loss, counts, picks, greedy matches, full label scores)."""
    model, tok = load_base_model(ModelConfig(name="tiny"))
    model = _perturbed(attach_lora(model, LoraConfig(rank=4, alpha=8), seed=0))
    pad, choices = tok.pad_token_id, ("a", "b", "c")
    data = build_eval_set(_varied(choices), [i % 3 for i in range(11)], tok, "chat", 160, choices)
    if shared:
        data = share_prefix(model, data, pad)
        assert data.shared > 0

    def numbers():
        nll, count, picks = per_example(model, data, pad, 3)
        greedy = evaluation.evaluate_greedy(model, data, pad, 3)[1]
        return nll, count, picks, greedy, evaluation._full_scores(model, data, pad, 3)

    monkeypatch.setattr(evaluation, "HEAD_ROWS", 1)  # one head call per forward
    alone = numbers()
    assert len(set(alone[2].tolist())) > 1
    for rows in (5, 13, 10_000):
        monkeypatch.setattr(evaluation, "HEAD_ROWS", rows)
        nll, count, picks, greedy, full = numbers()
        torch.testing.assert_close(nll, alone[0], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(full, alone[4], rtol=1e-6, atol=1e-5)
        assert torch.equal(count, alone[1]) and torch.equal(picks, alone[2]) and greedy == alone[3]


def test_packing_is_refused_where_it_would_change_the_numbers(monkeypatch):
    """An architecture that ignored the items' own positions (here: positions counted along
    the packed sequence) gives other log-probabilities; the check keeps plain batches."""
    model, tok = load_base_model(ModelConfig(name="tiny"))
    model = _perturbed(attach_lora(model, LoraConfig(rank=4, alpha=8), seed=0))
    data = build_eval_set(_varied(("a", "b")), [0] * 11, tok, "chat", 160, ("a", "b"))
    assert share_prefix(model, data, tok.pad_token_id).shared > 0

    def contiguous_positions(batch, shared):
        out = collate_packed(batch, shared)
        out["position_ids"] = torch.arange(out["input_ids"].shape[1])[None]
        return out

    monkeypatch.setattr(evaluation, "collate_packed", contiguous_positions)
    assert share_prefix(model, data, tok.pad_token_id).shared == 0


def test_greedy_match_rate_counts_the_answers_the_model_would_say_exactly():
    """Degenerate cases: answers set to the model's own arg-max tokens match (rate 1);
    changing one target token of one example makes exactly that example miss."""
    model, tok = _model()
    data = build_eval_set(_examples(("some free text", "another reply")), [-1] * 7, tok, "chat", 128, None)
    own = list(data.encoded)
    # each target token set to the model's arg-max there; a changed token changes the
    # context of the ones after it, so repeat until nothing changes
    for _ in range(64):
        changed = False
        for k, item in enumerate(own):
            with torch.no_grad():
                logits = model(input_ids=item.input_ids[None]).logits[0]
            at = (item.labels != IGNORE).nonzero().squeeze(1)
            best = logits[at - 1].argmax(-1).to(item.labels.dtype)
            if not torch.equal(best, item.labels[at]):
                ids, labels = item.input_ids.clone(), item.labels.clone()
                ids[at], labels[at] = best.to(ids.dtype), best
                own[k], changed = Encoded(ids, labels), True
        if not changed:
            break
    assert not changed
    exact = dataclasses.replace(data, encoded=tuple(own))
    assert evaluation.greedy_match_rate(model, exact, tok.pad_token_id, 3) == 1.0
    first = own[2]
    at = int((first.labels != IGNORE).nonzero()[1])  # the second target token of example 2
    ids, labels = first.input_ids.clone(), first.labels.clone()
    labels[at] = (labels[at] + 1) % model.config.vocab_size
    ids[at] = labels[at].to(ids.dtype)
    one_off = dataclasses.replace(exact, encoded=(*own[:2], Encoded(ids, labels), *own[3:]))
    assert evaluation.greedy_match_rate(model, one_off, tok.pad_token_id, 3) == pytest.approx(6 / 7)
    assert evaluation.greedy_match_rate(model, dataclasses.replace(data, encoded=()), tok.pad_token_id, 3) is None


def test_evaluate_greedy_gives_the_loss_evaluate_gives():
    model, tok = _model()
    data = build_eval_set(_examples(("some free text", "another reply")), [-1] * 7, tok, "chat", 128, None)
    result, _ = evaluation.evaluate_greedy(model, data, tok.pad_token_id, 3)
    assert result == evaluate(model, data, tok.pad_token_id, 3)
