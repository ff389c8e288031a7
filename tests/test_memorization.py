"""Exposure and membership-inference metrics on hand-built and synthetic scores."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from scipy import stats

from fedsec.attacks.memorization import (
    exposure_exact,
    exposure_extrapolated,
    loss_score,
    mia_metrics,
    min_k_score,
    reference_score,
    tpr_at_fpr,
    zlib_score,
)


def test_exposure_by_hand():
    # a space of 8 candidates (the secret among them)
    others = [5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    assert exposure_exact(1.0, others) == 3.0  # the secret is the model's favourite: log2 8
    assert exposure_exact(20.0, others) == 0.0  # its least favourite: log2 8 - log2 8
    assert exposure_exact(6.5, others) == 3.0 - math.log2(3)  # two candidates beat it
    # the secret's own score may be in the list: counted once
    assert exposure_exact(6.5, others + [6.5]) == 3.0 - math.log2(3)


def test_extrapolated_exposure_matches_the_exact_one_on_a_large_space():
    rng = np.random.default_rng(0)
    space = rng.normal(10.0, 1.0, size=2 ** 16)
    secret = 6.5  # 3.5 standard deviations below the mean
    exact = exposure_exact(secret, space)
    sample = rng.choice(space, size=4000, replace=False)
    assert abs(exposure_extrapolated(secret, sample) - exact) < 0.6
    # and the Gaussian tail it estimates: -log2 Phi(-3.5) = 14.2
    assert abs(exposure_extrapolated(secret, sample) + stats.norm.logcdf(-3.5) / math.log(2)) < 0.6


def test_scores_by_hand():
    logps = [-0.1, -2.0, -0.5, -4.0, -0.2]
    assert loss_score(logps) == pytest.approx(-1.36)
    assert min_k_score(logps, k=0.2) == -4.0  # ceil(0.2 * 5) = 1 lowest
    assert min_k_score(logps, k=0.4) == -3.0  # the two lowest
    assert zlib_score(logps, "abcabc") == pytest.approx(-1.36 / len(zlib.compress(b"abcabc")))
    assert reference_score(logps, [-1.0] * 5) == pytest.approx(-0.36)


def test_auc_by_counting_pairs():
    members, non_members = [0.9, 0.8, 0.3], [0.7, 0.2, 0.1, 0.85]
    pairs = sum((m > n) + 0.5 * (m == n) for m in members for n in non_members)
    assert mia_metrics(members, non_members).auc == pytest.approx(pairs / 12)
    perfect = mia_metrics([2.0, 3.0], [0.0, 1.0])
    assert perfect.auc == 1.0 and perfect.tpr_at_1pct_fpr == 1.0


def test_tpr_at_low_fpr_by_hand():
    non_members = np.arange(100.0)  # 0..99
    members = np.array([99.5, 120.0, 98.5, 50.0])
    # threshold above 99 (no false positive): members 99.5 and 120 -> 0.5
    assert tpr_at_fpr(members, non_members, 0.0) == 0.5
    # one false positive allowed (1%): threshold above 98 also takes 98.5 -> 0.75
    assert tpr_at_fpr(members, non_members, 0.01) == 0.75


def test_gaussian_scores_have_the_known_auc():
    # members ~ N(d, 1), non-members ~ N(0, 1): AUC = Phi(d / sqrt 2)
    rng = np.random.default_rng(1)
    d = 1.0
    result = mia_metrics(rng.normal(d, 1, 20_000), rng.normal(0, 1, 20_000))
    assert abs(result.auc - stats.norm.cdf(d / math.sqrt(2))) < 0.01
    # TPR at 1% FPR: P[N(d, 1) > z_0.99] = 1 - Phi(2.326 - d)
    assert abs(result.tpr_at_1pct_fpr - (1 - stats.norm.cdf(stats.norm.ppf(0.99) - d))) < 0.02
    chance = mia_metrics(rng.normal(0, 1, 5000), rng.normal(0, 1, 5000))
    assert abs(chance.auc - 0.5) < 0.02
    with pytest.raises(ValueError):
        mia_metrics([], [1.0])


def _canary_run(tmp_path, privacy):
    from conftest import tiny_config

    from fedsec.loop import run_experiment
    from fedsec.rundir import RunDir

    data = {"benchmark": {"num_clients": 4, "examples_per_client": 8, "size_alpha": 0, "test_size": 6,
                          "client_test_size": 0, "num_probes": 0, "canaries_per_client": 1, "canary_repeats": 32,
                          "canary_clients": 1},
            "max_length": 256}
    lora = {"rank": 8, "alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    cfg = tiny_config(tmp_path, data=data, lora=lora, privacy=privacy,
                      federation={"rounds": 20, "clients_per_round": 4, "local_only_clients": 0},
                      training={"local_steps": 4, "batch_size": 8, "lr": 5e-3, "min_lr": 5e-3},
                      eval={"clients": False, "canaries": True, "every": 20, "canary_candidates": 300})
    run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    rows = RunDir(tmp_path / "run").read_metrics()  # under DP the exposure is in the not-covered place
    evals = [r["global_eval"]["memorization"] for r in rows if r.get("global_eval")]
    return evals[0], evals[-1]  # untuned, final


def test_a_canary_is_exposed_and_extracted_without_dp_and_neither_under_strong_dp(tmp_path):
    """One client holds one canary 32 times beside its 8 examples; 20 rounds. Measured:
    without DP the PIN ranks first among the 300 sampled (exposure capped at log2 10^6 =
    19.9 bits) and greedy decoding after the prefix writes it; under user-level DP
    (sigma 1, C 0.1) exposure 2.8 bits (0.5 at the earlier settings) and nothing extracted. A canary
    the model never learned scores like any candidate: exposure of k bits or more has
    probability 2^-k, so 5 bits is the bound (1/32).

    lr 5e-3 over 20 rounds: at the former 1e-2 the greedy PIN flipped between machines
    (one wrote 51260 for 512600) and between neighbouring round counts."""
    untuned, plain = _canary_run(tmp_path / "plain", {})
    _, private = _canary_run(tmp_path / "dp", {"mode": "user", "noise_multiplier": 1.0, "clip_norm": 0.1,
                                                "delta": 1e-3, "reproducible": True})  # the measured draw
    assert untuned["canaries"] == plain["canaries"] == 1
    assert untuned["exposure_mean"] < 4 and untuned["extraction_rate"] == 0.0
    assert plain["exposure_mean"] > 15 and plain["extraction_rate"] == 1.0
    assert private["exposure_mean"] < 5 and private["extraction_rate"] == 0.0


def test_canary_evaluation_needs_planted_canaries(tmp_path):
    from conftest import tiny_config

    from fedsec.errors import ConfigError
    from fedsec.setup import prepare

    with pytest.raises(ConfigError, match="eval.canaries.*canaries_per_client"):
        prepare(tiny_config(tmp_path, eval={"canaries": True}))


def test_console_shows_exposure_per_evaluation_and_in_the_summary():
    from fedsec.console import round_line, summary_lines
    from fedsec.results import RoundResult, RunResult

    mem = {"exposure_mean": 12.94, "exposure_max": 17.3, "extraction_rate": 0.25, "canaries": 4}
    ev = {"accuracy": 0.5, "loss": 1.0, "memorization": mem}
    line = round_line(3, 8, RoundResult(3, 1e-3, (0, 1), 0.5, (), 1.0, global_eval=ev), ev, None)
    assert "exposure 12.9 bits extracted 0.250" in line
    untuned = {"accuracy": 0.4, "loss": 2.0, "n": 6, "memorization": {**mem, "exposure_mean": 2.6}}
    result = RunResult("runs/x", 8, True, untuned, {"accuracy": 0.5, "loss": 1.0, "n": 6, "memorization": mem},
                       None)
    assert any(s.startswith("canary exposure (bits):      untuned 2.6 -> fedavg 12.9; extracted 0.250")
               for s in summary_lines(result))


def test_mia_candidates_leave_planted_canaries_out_and_the_sample_is_even_and_seeded():
    from fedsec.config import BenchmarkConfig, DataConfig
    from fedsec.data import build_federated_data
    from fedsec.leakage import mia_candidates, mia_sample
    from fedsec.objectives import SftObjective

    cfg = DataConfig(benchmark=BenchmarkConfig(num_clients=6, examples_per_client=8, size_alpha=0, test_size=9,
                                               client_test_size=0, num_probes=0, canaries_per_client=1,
                                               canary_repeats=3, canary_clients=2))
    data = build_federated_data(cfg, 0, "sft")
    assert [c.client_id for c in data.canaries] == [0, 1]  # only the first 2 clients hold one
    members, held_out = mia_candidates(data, 4, SftObjective)  # the first 4 clients are the federation
    assert len(members) == 4 * 8 and held_out == list(data.global_test)
    assert not any("vault PIN" in e.response for e in members)
    first, again = mia_sample(members, held_out, 100, 5), mia_sample(members, held_out, 100, 5)
    assert first == again and len(first[0]) == len(first[1]) == 9  # as many of each: the test set's 9
    assert len(set(map(id, first[0]))) == 9 and all(e in members for e in first[0])
    small = mia_sample(members, held_out, 4, 5)
    assert len(small[0]) == len(small[1]) == 4


def test_membership_scores_of_the_untuned_model_match_the_evaluator_and_the_reference_ties(tmp_path):
    """With the adapter's output at zero (LoRA's B = 0) the target is the reference: every calibrated score is 0
    (AUC exactly 0.5), and the loss attack's AUC equals the one computed by hand from the
    evaluator's per-example losses."""
    from conftest import tiny_config
    from sklearn.metrics import roc_auc_score

    from fedsec.encoding import encode_all
    from fedsec.evaluation import EvalSet, per_example
    from fedsec.leakage import membership_inference, mia_candidates, mia_sample
    from fedsec.objectives import SftObjective
    from fedsec.setup import prepare

    setup = prepare(tiny_config(tmp_path))
    cfg = setup.cfg
    members, held_out = mia_sample(*mia_candidates(setup.data, len(setup.data.clients), SftObjective), 50, 0)
    encoded = [encode_all(x, setup.tokenizer, cfg.data.template, cfg.data.max_length) for x in (members, held_out)]
    result = membership_inference(setup.model, setup.tokenizer, *encoded, batch_size=8)
    assert result["reference"]["auc"] == 0.5 and result["loss"]["members"] == len(encoded[0])
    items = tuple(encoded[0] + encoded[1])
    nll, count, _ = per_example(setup.model, EvalSet(items, (0,) * len(items), None, None, None), setup.pad_id, 8)
    labels = [1] * len(encoded[0]) + [0] * len(encoded[1])
    assert result["loss"]["auc"] == pytest.approx(roc_auc_score(labels, (-nll / count).numpy()), abs=1e-9)
    assert set(result) == {"loss", "min_k", "zlib", "reference"}


def test_console_summary_names_each_membership_score():
    from fedsec.console import summary_lines
    from fedsec.results import RunResult

    auc = {"tpr_at_1pct_fpr": 0.0, "tpr_at_01pct_fpr": 0.0, "members": 200, "non_members": 120}
    membership = {"loss": {**auc, "auc": 0.5071}, "reference": {**auc, "auc": 0.5}}
    result = RunResult("runs/x", 8, True, {"accuracy": 0.4, "loss": 2.0, "n": 6},
                       {"accuracy": 0.5, "loss": 1.0, "n": 6}, None, membership=membership)
    assert "membership inference AUC (200 members vs 120 held out): loss 0.507, reference 0.500" in \
        summary_lines(result)


def test_answer_extraction_counts_replies_that_start_with_the_answer(monkeypatch):
    import torch

    from fedsec import evaluation
    from fedsec.data.schema import InstructionExample
    from fedsec.leakage import answer_extraction
    from fedsec.models import tiny_tokenizer

    tok = tiny_tokenizer()
    said = tok(" positive and more", add_special_tokens=False).input_ids

    class Parrot:  # a model stub: every greedy reply is " positive and more", cut to the length asked
        asked: list[int] = []
        device = torch.device("cpu")

        def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
            self.asked.append(max_new_tokens)
            reply = torch.tensor(said[:max_new_tokens]).expand(len(input_ids), -1)
            return torch.cat([input_ids, reply], dim=1)

    examples = [InstructionExample("q1", "positive"), InstructionExample("q2", "negative"),
                InstructionExample("q3", " positive "), InstructionExample("q4", "positive and more than that")]
    parrot = Parrot()
    monkeypatch.setattr(evaluation, "GENERATE_TOKENS", 1)  # batches of batch_size prompts exactly
    assert answer_extraction(parrot, tok, examples, "chat", batch_size=3) == 0.5
    longest = len(tok("positive and more than that", add_special_tokens=False).input_ids)
    assert parrot.asked == [longest + 1, longest + 1]  # two batches, the longest answer plus one
    assert math.isnan(answer_extraction(parrot, tok, [], "chat", batch_size=3))


def test_membership_inference_without_held_out_examples_is_refused_before_training(tmp_path, monkeypatch):
    import dataclasses

    from conftest import tiny_config

    import fedsec.setup
    from fedsec.errors import ConfigError

    build = fedsec.setup.build_federated_data
    monkeypatch.setattr(fedsec.setup, "build_federated_data",
                        lambda *a: dataclasses.replace(build(*a), global_test=()))
    with pytest.raises(ConfigError, match="eval.mia.*no test set"):
        fedsec.setup.prepare(tiny_config(tmp_path, eval={"mia": True}))


def test_the_blind_baseline_sees_a_shifted_split_and_not_a_fair_one():
    """A model-free classifier: members and non-members drawn from one pool look alike to it;
    members written in one year and non-members in another (Das et al. 2024's date shift)
    do not, whatever any model memorized."""
    import numpy as np

    from fedsec.attacks.memorization import blind_baseline, blind_scores, split_shifted

    rng = np.random.default_rng(0)
    words = "profit loss revenue quarter bank growth shares market decline rose fell stable outlook".split()

    def sentence(tail=""):
        return " ".join(rng.choice(words, int(rng.integers(5, 15)))) + tail

    pool = [sentence() for _ in range(400)]
    fair = blind_baseline(pool[:200], pool[200:], seed=1)
    assert abs(fair.auc - 0.5) < 0.08 and not split_shifted(fair.auc, 200, 200)
    shifted = blind_baseline([sentence(" (2023)") for _ in range(200)], [sentence(" (2025)") for _ in range(200)], 1)
    assert shifted.auc > 0.95 and split_shifted(shifted.auc, 200, 200)
    assert blind_scores(pool[:50], pool[50:100], 3) == blind_scores(pool[:50], pool[50:100], 3)  # seeded folds
    # AUC - 1/2 against 2.326 x sqrt((m + n + 1) / (12 m n)) = 0.0672 at m = n = 200 (one-sided)
    assert not split_shifted(0.567, 200, 200) and split_shifted(0.568, 200, 200)
    assert not split_shifted(0.405, 200, 200)  # below chance: the out-of-fold bias, no exploitable shift
    with pytest.raises(ValueError):
        blind_scores(pool[:3], pool[3:10], 0)


def test_a_random_mia_split_takes_the_non_members_out_of_training_by_a_seeded_coin():
    from fedsec.config import BenchmarkConfig, DataConfig
    from fedsec.data import build_federated_data
    from fedsec.leakage import mia_random_split
    from fedsec.objectives import SftObjective

    cfg = DataConfig(benchmark=BenchmarkConfig(num_clients=6, examples_per_client=8, size_alpha=0, test_size=9,
                                               client_test_size=0, num_probes=0, canaries_per_client=1,
                                               canary_repeats=3, canary_clients=2))
    data = build_federated_data(cfg, 0, "sft")
    split, members, non_members = mia_random_split(data, SftObjective, 10, seed=4)
    again = mia_random_split(data, SftObjective, 10, seed=4)
    assert (members, non_members) == (again[1], again[2]) and split == again[0]
    assert len(members) + len(non_members) == 20 and 4 <= len(non_members) <= 16  # a fair coin on 20
    training = [e for c in split.clients for e in c.train]
    assert all(e in training for e in members) and not any(e in training for e in non_members)
    assert sum(len(c.train) for c in split.clients) == sum(len(c.train) for c in data.clients) - len(non_members)
    assert not any("vault PIN" in e.response for e in members + non_members)  # planted canaries aside
    assert all(len(c.train) >= 1 for c in split.clients)
    other = mia_random_split(data, SftObjective, 10, seed=5)
    assert (other[1], other[2]) != (members, non_members)


def test_a_run_with_a_random_split_reports_the_blind_baseline_beside_the_attacks(tmp_path):
    from conftest import tiny_config

    from fedsec.errors import ConfigError
    from fedsec.loop import run_experiment

    cfg = tiny_config(tmp_path, federation={"rounds": 1, "clients_per_round": 2, "local_only_clients": 0},
                      eval={"mia": True, "mia_examples": 10, "mia_split": "random", "clients": False})
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    blind = result.membership["blind"]
    assert set(result.membership) == {"loss", "min_k", "zlib", "reference", "blind", "answer_extraction"}
    assert blind["members"] == blind["non_members"] == result.membership["loss"]["members"] <= 10
    assert isinstance(blind["shifted"], bool)
    with pytest.raises(ConfigError, match="eval.mia_split"):
        tiny_config(tmp_path, eval={"mia_split": "random"})  # without eval.mia


def test_a_users_score_is_the_mean_of_its_records_scores():
    from fedsec.leakage import user_scores

    assert user_scores([1.0, 2.0, 3.0, 10.0, -4.0], [0, 0, 1, 1, 2]) == [1.5, 6.5, -4.0]
    assert user_scores([5.0, 1.0, 3.0], [1, 0, 1]) == [1.0, 4.0]  # by user number, not by order
    with pytest.raises(ValueError):
        user_scores([1.0, 2.0], [0])


def test_a_user_split_takes_whole_clients_out_keeping_attackers_and_canary_holders():
    from fedsec.config import BenchmarkConfig, DataConfig
    from fedsec.data import build_federated_data
    from fedsec.leakage import mia_user_split
    from fedsec.objectives import SftObjective

    cfg = DataConfig(benchmark=BenchmarkConfig(num_clients=24, examples_per_client=4, size_alpha=0, test_size=9,
                                               client_test_size=0, num_probes=0, canaries_per_client=1,
                                               canary_repeats=2, canary_clients=2))
    data = build_federated_data(cfg, 0, "sft")
    holders = {c.client_id for c in data.canaries}
    protected = (3, 7, *holders)
    split, renumber, members, non_members = mia_user_split(data, SftObjective, 6, 4, protected)
    again = mia_user_split(data, SftObjective, 6, 4, protected)
    assert (members, non_members, renumber) == (again[2], again[3], again[1]) and split == again[0]
    assert len(members) == len(non_members) == 6 and len(split.clients) == 24 - 6
    assert [c.client_id for c in split.clients] == list(range(18))
    names = {c.name for c in split.clients}
    assert all(data.clients[k].name in names for k in protected)  # never taken out
    assert {old: split.clients[new].name for old, new in renumber.items()} == {
        old: data.clients[old].name for old in renumber}
    for canary in split.canaries:  # a canary still points at the client that holds it
        assert canary.text in [e.response for e in split.clients[canary.client_id].train]
    training = [list(c.train) for c in split.clients]
    assert all(user in training for user in [list(u) for u in members])
    gone = [c for c in data.clients if c.name not in names]
    assert len(gone) == 6 and [list(u) for u in non_members] == [list(c.train) for c in gone]
    assert not any("vault PIN" in e.response for user in members + non_members for e in user)
    other = mia_user_split(data, SftObjective, 6, 5, protected)
    assert (other[2], other[3]) != (members, non_members)
    assert len(mia_user_split(data, SftObjective, 100, 4, protected)[2]) == (24 - 4) // 2  # m capped at half
    with pytest.raises(ValueError, match="at least 10 clients"):
        mia_user_split(data, SftObjective, 6, 4, tuple(range(15)))


def test_user_level_inference_with_one_record_per_user_is_record_level_inference(tmp_path):
    """The degenerate case: one record per user, the user's mean is the record's score, so
    every score's AUC and TPRs equal the record-level attack's."""
    from conftest import tiny_config

    from fedsec.data import build_federated_data
    from fedsec.encoding import encode_all
    from fedsec.leakage import membership_inference, user_membership_inference
    from fedsec.models import load_model

    cfg = tiny_config(tmp_path)
    model, tokenizer = load_model(cfg)
    data = build_federated_data(cfg.data, cfg.seed, cfg.task)
    items = encode_all([e for c in data.clients for e in c.train][:12], tokenizer, "chat", 160)
    members, non_members = items[:6], items[6:12]
    record = membership_inference(model, tokenizer, members, non_members, 4)
    user = user_membership_inference(model, tokenizer, [[e] for e in members], [[e] for e in non_members], 4)
    assert user == record
    two = user_membership_inference(model, tokenizer, [members[:3], members[3:]], [non_members[:3], non_members[3:]],
                                    4)
    assert two["loss"]["members"] == 2 and two["loss"]["non_members"] == 2


def test_a_run_with_a_user_split_attacks_clients_and_trains_without_the_kept_out(tmp_path):
    import json

    from conftest import tiny_config

    from fedsec.errors import ConfigError
    from fedsec.loop import run_experiment

    cfg = tiny_config(tmp_path, data={"benchmark": {"num_clients": 14, "examples_per_client": 4, "test_size": 9,
                                                    "client_test_size": 0, "num_probes": 0}},
                      federation={"rounds": 1, "clients_per_round": 3, "local_only_clients": 0},
                      eval={"mia": True, "mia_examples": 10, "mia_split": "user", "clients": False})
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    membership = result.membership
    assert membership["level"] == "user"
    assert set(membership) == {"level", "loss", "min_k", "zlib", "reference", "blind"}
    # 10 asked, at most half of the 14 clients: 7 in, 7 out
    assert membership["loss"]["members"] == membership["loss"]["non_members"] == 7
    assert membership["blind"]["members"] == 7 and 0 <= membership["reference"]["auc"] <= 1
    assert json.loads((tmp_path / "run" / "federation.json").read_text())["num_clients"] == 14 - 7
    from fedsec.console import summary_lines

    line = next(x for x in summary_lines(result) if "inference AUC" in x)
    assert line.startswith("user-level inference AUC (7 clients in the federation vs 7 kept out): loss ")
    with pytest.raises(ConfigError, match="eval.mia_split"):  # 4 clients: too few to split
        run_experiment(tiny_config(tmp_path, eval={"mia": True, "mia_split": "user", "clients": False}),
                       out=tmp_path / "few", progress=False, log=lambda _: None)
