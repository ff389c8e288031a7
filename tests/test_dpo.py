"""Federated DPO: the loss against its formula, the reference policy, and full runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config

from fedsec import evaluation
from fedsec.config import ALGORITHMS, BenchmarkConfig, LoraConfig, ModelConfig
from fedsec.data.benchmark import make_benchmark
from fedsec.encoding import encode_prompt
from fedsec.evaluation import is_refusal, refusal_rate
from fedsec.loop import run_experiment
from fedsec.models import attach_lora, load_base_model
from fedsec.objectives import (
    DpoObjective,
    encode_pair,
    sequence_logprobs,
    with_reference,
)
from fedsec.preference import PairLogps

DPO = {"task": "dpo", "dpo": {"beta": 0.5, "reference": "base"}}


def _pairs(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens=(1.0, 1.0), rejected_tokens=(1.0, 1.0)):
    return PairLogps(*(torch.tensor(v, dtype=torch.float64) for v in (
        chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)))


def test_dpo_loss_on_hand_computed_log_probabilities():
    from fedsec.preference import dpo

    loss = dpo(_pairs([-2.0, -1.0], [-3.0, -1.0], [-2.5, -4.0], [-2.5, -1.0]), beta=0.1)
    # pair 1: 0.1 * ((-2 + 2.5) - (-3 + 2.5)) = 0.1;  pair 2: 0.1 * ((-1 + 4) - 0) = 0.3
    expected = torch.tensor([math.log1p(math.exp(-0.1)), math.log1p(math.exp(-0.3))], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)


def test_the_other_preference_losses_on_hand_computed_log_probabilities():
    """One pair: the policy gains 1 nat on the chosen reply (2 tokens) and loses 1 on the
    rejected (4 tokens) against the reference, so h = 2 and the per-token margin is
    1/2 + 1/4 = 0.75; beta 0.5."""
    from fedsec import preference

    pairs = _pairs([-3.0], [-5.0], [-4.0], [-4.0], [2.0], [4.0])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731 - -log sigmoid(z) = softplus(-z)
    expected = {
        "dpo": softplus(-1.0),                                   # -log sigmoid(0.5 * 2)
        "ipo": (0.75 - 1 / (2 * 0.5)) ** 2,                      # (0.75 - 1)^2 = 0.0625
        "slic": 0.0,                                             # max(0, 1 - 0.5 * 2)
        "rdpo": (0.75 * softplus(-1.0) - 0.25 * softplus(1.0)) / 0.5,
        "cdpo": 0.75 * softplus(-1.0) + 0.25 * softplus(1.0),
    }
    for name, value in expected.items():
        params = {"rdpo": {"label_noise": 0.25}, "cdpo": {"label_smoothing": 0.25}}.get(name, {})
        got = getattr(preference, name)(pairs, beta=0.5, **params)
        torch.testing.assert_close(got, torch.tensor([value], dtype=torch.float64), msg=name)
    assert float(preference.slic(_pairs([-4.0], [-4.0], [-4.0], [-4.0]), beta=0.5)) == 1.0  # h = 0: the full hinge
    # rdpo and cdpo without flipped labels are dpo, to the bit
    wide = _pairs([-2.0, -9.0], [-3.0, -1.0], [-2.5, -4.0], [-2.5, -1.0])
    assert torch.equal(preference.rdpo(wide, beta=0.3, label_noise=0.0), preference.dpo(wide, beta=0.3))
    assert torch.equal(preference.cdpo(wide, beta=0.3, label_smoothing=0.0), preference.dpo(wide, beta=0.3))
    # cdpo's pull stops where sigmoid(beta h) = 1 - e: at beta h = log(3) for e = 0.25
    h = torch.tensor([math.log(3.0) / 0.5], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    preference.cdpo(PairLogps(h, zero, zero, zero, zero + 1, zero + 1), beta=0.5, label_smoothing=0.25).backward()
    assert abs(float(h.grad)) < 1e-12


def test_a_preference_loss_is_chosen_by_name_and_its_bad_parameter_is_one_line(tmp_path):
    """dpo.loss picks the loss; rdpo at label_noise 0 trains the same adapter as dpo bit for bit,
    ipo another one; a bad parameter is a ConfigError naming dpo.params.<field>."""
    from fedsec.config import ExperimentConfig, from_mapping
    from fedsec.errors import ConfigError

    def run(name, **dpo):
        cfg = tiny_config(tmp_path / name, **DPO, federation={"rounds": 1, "clients_per_round": 2})
        cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, **dpo))
        result = run_experiment(cfg, out=tmp_path / name / "run", progress=False, log=lambda _: None)
        from safetensors.torch import load_file

        return load_file(str(tmp_path / name / "run" / "adapter" / "adapter_model.safetensors")), result

    import dataclasses

    base, _ = run("dpo")
    same, _ = run("rdpo", loss="rdpo", params={"label_noise": 0.0})
    other, result = run("ipo", loss="ipo")
    assert base.keys() == same.keys() and all(torch.equal(base[k], same[k]) for k in base)
    assert any(not torch.equal(base[k], other[k]) for k in base) and result.finished
    raw = {**DPO, "dpo": {**DPO["dpo"], "loss": "rdpo", "params": {"label_noise": 0.5}}}
    with pytest.raises(ConfigError, match="must be in") as err:
        from_mapping(ExperimentConfig, raw)
    assert err.value.field == "dpo.params.label_noise"


def _tiny():
    model, tok = load_base_model(ModelConfig(name="tiny"))
    return attach_lora(model, LoraConfig(rank=2, alpha=4), seed=0), tok


def test_sequence_logprobs_equal_a_manual_sum_over_response_tokens():
    model, tok = _tiny()
    bench = make_benchmark(BenchmarkConfig(num_clients=1, examples_per_client=4), 0)
    pair = encode_pair(bench.clients[0].preference[0], tok, "chat", 256)
    with torch.no_grad():
        ours = sequence_logprobs(model, [pair.chosen], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=pair.chosen.input_ids[None]).logits[0].log_softmax(-1)
    ids, labels = pair.chosen.input_ids, pair.chosen.labels
    manual = sum(float(logits[t - 1, ids[t]]) for t in range(1, len(ids)) if labels[t] != -100)
    assert abs(float(ours[0]) - manual) < 1e-4


def test_dpo_loss_at_the_reference_is_log_2():
    model, tok = _tiny()  # fresh adapter: B = 0, so the policy equals the base model
    bench = make_benchmark(BenchmarkConfig(num_clients=1, examples_per_client=6), 0)
    pairs = [encode_pair(p, tok, "chat", 256) for p in bench.clients[0].preference]
    with model.disable_adapter():
        pairs = with_reference(model, pairs, tok.pad_token_id, 4)
    with torch.no_grad():
        loss_sum, n = DpoObjective(tok.pad_token_id, beta=0.1).loss(model, pairs)
    assert n == len(pairs)
    assert abs(float(loss_sum) / n - math.log(2)) < 1e-5


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_runs_dpo(tmp_path, algorithm):
    cfg = tiny_config(tmp_path, federation={"rounds": 2, "clients_per_round": 2, "algorithm": algorithm},
                      training={"local_steps": 2, "batch_size": 2, "lr": 5e-3}, **DPO)
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda s: None)
    before, after = result.untuned["preference"], result.final["preference"]
    assert before["n"] == after["n"] >= 8  # of 9; pairs longer than max_length are dropped
    assert before["reward_margin"] == 0.0  # untuned policy == reference
    assert after["reward_margin"] != 0.0 and math.isfinite(after["reward_margin"])


def test_local_dpo_training_raises_the_margin_on_its_pairs():
    from fedsec.config import TrainingConfig
    from fedsec.evaluation import preference_metrics
    from fedsec.training import LocalTrainer

    model, tok = _tiny()
    bench = make_benchmark(BenchmarkConfig(num_clients=1, examples_per_client=12), 0)
    pairs = [encode_pair(p, tok, "chat", 256) for p in bench.clients[0].preference]
    with model.disable_adapter():
        pairs = with_reference(model, pairs, tok.pad_token_id, 8)
    objective = DpoObjective(tok.pad_token_id, beta=0.5)
    trainer = LocalTrainer(model, TrainingConfig(local_steps=20, batch_size=4, lr=2e-2), objective)
    start = trainer.adapter.get()
    before = preference_metrics(model, pairs, tok.pad_token_id, 8, 0.5)
    result = trainer.train(start, pairs, 2e-2, seed=0)
    trainer.adapter.set(start + result.delta)
    after = preference_metrics(model, pairs, tok.pad_token_id, 8, 0.5)
    with torch.no_grad():
        loss_after = float(objective.loss(model, pairs)[0]) / len(pairs)
    assert before["reward_margin"] == 0.0 and before["preference_accuracy"] == 0.0
    assert after["reward_margin"] > 0 and after["preference_accuracy"] > 0.5
    assert loss_after < math.log(2)


def test_sft_then_dpo_with_the_initial_adapter_as_reference(tmp_path):
    sft = tiny_config(tmp_path, federation={"rounds": 1, "clients_per_round": 2},
                      training={"local_steps": 2, "batch_size": 4, "lr": 1e-2})
    run_experiment(sft, out=tmp_path / "sft", progress=False, log=lambda s: None)
    dpo = tiny_config(tmp_path, task="dpo", dpo={"beta": 0.1, "reference": "initial"},
                      lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                            "init_from": str(tmp_path / "sft" / "adapter")},
                      federation={"rounds": 1, "clients_per_round": 2})
    result = run_experiment(dpo, out=tmp_path / "dpo", progress=False, log=lambda s: None)
    # the run starts from the SFT adapter, which is also the reference: margin exactly 0
    assert abs(result.untuned["preference"]["reward_margin"]) < 1e-6
    sft_final = json.loads((tmp_path / "sft" / "result.json").read_text())["final"]
    assert abs(result.untuned["loss"] - sft_final["loss"]) < 1e-5


def test_dpo_on_a_local_preference_file(tmp_path):
    rows = [{"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no",
             "rejected": "no" if i % 2 == 0 else "yes", "user": f"u{i % 3}"} for i in range(30)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path, task="dpo", data={"source": str(path), "fields": {"user": "user"}},
                      federation={"rounds": 1, "clients_per_round": 3}, eval={"clients": False})
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda s: None)
    assert result.final["preference"]["n"] == 3  # 10% held out
    # every other pair trains: a DPO client held out data.client_test_fraction of its pairs and
    # dropped them unread (nothing evaluates a client's pairs), 20% of the federation's data
    from fedsec.data import build_federated_data

    data = build_federated_data(cfg.data, cfg.seed, "dpo")
    assert sum(len(c.preference) for c in data.clients) == 27 and len(data.preference_test) == 3
    held = {(p.prompt, p.chosen) for c in data.clients for p in c.preference} | {
        (p.prompt, p.chosen) for p in data.preference_test}
    assert len(held) == 30


def test_refusal_rule_and_generation():
    assert is_refusal("I can't help with that.") and is_refusal("Sorry, no.")
    assert not is_refusal("Sure, here is the press release:")
    model, tok = _tiny()
    bench = make_benchmark(BenchmarkConfig(num_clients=1, num_probes=3), 0)
    prompts = [encode_prompt(p, tok, "chat") for p in bench.probes]
    rate, replies = refusal_rate(model, tok, prompts, max_new_tokens=5, batch_size=2)
    assert len(replies) == 3 and rate == sum(map(is_refusal, replies)) / 3
    # left padding in a batch must not change a reply: compare with unbatched generation
    alone = [refusal_rate(model, tok, [p], max_new_tokens=5, batch_size=1)[1][0] for p in prompts]
    assert replies == alone


def test_generation_batches_fill_the_token_budget(monkeypatch):
    monkeypatch.setattr(evaluation, "GENERATE_TOKENS", 40)
    # 2 x (10 + 6) fits in 40, a third prompt of 30 does not; each batch holds at least batch_size
    assert evaluation.generation_batches([10, 10, 30, 5], 6, 1) == [(0, 2), (2, 3), (3, 4)]
    assert evaluation.generation_batches([10, 10, 30, 5], 6, 3) == [(0, 3), (3, 4)]
    assert evaluation.generation_batches([4, 4, 4, 4, 4], 6, 1) == [(0, 4), (4, 5)]
    assert evaluation.generation_batches([], 6, 2) == []


def test_the_closing_summary_gives_no_untuned_preference_accuracy():
    """The untuned model is its own reference: its implicit reward is 0 on every pair, so its
    preference accuracy is all ties (0.0), nothing to compare with; the summary says so and
    compares the likelihood accuracy, which has an untuned value."""
    from fedsec.console import summary_lines
    from fedsec.results import RunResult

    untuned = {"preference": {"preference_accuracy": 0.0, "reward_margin": 0.0, "likelihood_accuracy": 0.5}}
    final = {"preference": {"preference_accuracy": 0.7, "reward_margin": 0.2, "likelihood_accuracy": 0.6}}
    lines = summary_lines(RunResult("runs/x", 2, True, untuned, final, None))
    assert "preference accuracy:  fedavg 0.700 (implicit reward of chosen > rejected; the untuned model, its own " \
           "reference, ties every pair)" in lines
    assert "likelihood accuracy:  untuned 0.500 -> fedavg 0.600 (policy prefers chosen, no reference)" in lines


def test_a_reference_free_loss_skips_the_reference_pass_over_training_pairs_only():
    """A loss registered reference=False gets zeros for the reference, so the training pairs
    get no reference pass (and may be encoded lazily); the held-out pairs still get it, so
    the preference metrics stay DPO's implicit reward whatever the loss."""
    model, tok = _tiny()
    bench = make_benchmark(BenchmarkConfig(num_clients=1, examples_per_client=6), 0)
    pairs = [encode_pair(p, tok, "chat", 256) for p in bench.clients[0].preference]
    free = DpoObjective(tok.pad_token_id, beta=0.1, uses_reference=False)
    assert free.precompute(model, pairs, 4) == pairs and all(p.ref_chosen == p.ref_rejected == 0.0 for p in pairs)
    with model.disable_adapter():
        expected = with_reference(model, pairs, tok.pad_token_id, 4)
    assert free.precompute(model, pairs, 4, evaluation=True) == expected
    assert any(p.ref_chosen != 0.0 for p in expected)
    assert not free.fixed_terms and DpoObjective(tok.pad_token_id, beta=0.1).fixed_terms
