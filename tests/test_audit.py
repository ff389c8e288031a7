"""Empirical epsilon lower bounds, checked by hand, by closed forms and by brute force."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from scipy import stats

from fedsec.accountants.audit import (
    clopper_pearson_upper,
    fdp_rejects,
    guess_and_count,
    many_runs_bound,
    one_run_bound,
    one_run_fdp_bound,
    one_run_p_value,
)
from fedsec.accountants.backends import _gdp_mu_to_epsilon, gdp_delta, gdp_mu


def test_reference_value():
    # REFERENCES.md: m = 1000, r = 100, v = 100, delta = 0 gives 3.493
    assert round(one_run_bound(1000, 100, 100, 0.0).epsilon_lower_bound, 3) == 3.493


@pytest.mark.parametrize("r", [1, 10, 50, 400])
def test_all_guesses_right_without_delta_has_a_closed_form(r):
    # p(eps) = q^r, so the bound solves q^r = 0.05: q = 0.05^(1/r), eps = ln(q / (1 - q))
    q = 0.05 ** (1 / r)
    expected = max(0.0, math.log(q / (1 - q)))
    assert abs(one_run_bound(10_000, r, r, 0.0).epsilon_lower_bound - expected) < 1e-5


def _p_value_by_brute_force(m, r, v, eps, delta):
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * q ** k * (1 - q) ** (r - k) for k in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max(sum(pmf[v - i: v]) / i for i in range(1, v + 1))
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize("m, r, v, eps, delta", [(100, 20, 15, 0.7, 1e-3), (50, 30, 30, 2.0, 1e-4),
                                                 (1000, 12, 7, 0.1, 0.0), (10, 8, 8, 5.0, 0.01)])
def test_p_value_equals_the_formula_summed_by_hand(m, r, v, eps, delta):
    assert abs(one_run_p_value(m, r, v, eps, delta) - _p_value_by_brute_force(m, r, v, eps, delta)) < 1e-12


def test_the_bound_sits_where_the_p_value_crosses_the_level():
    b = one_run_bound(1000, 200, 170, 1e-5, confidence=0.95).epsilon_lower_bound
    assert one_run_p_value(1000, 200, 170, b, 1e-5) < 0.05 <= one_run_p_value(1000, 200, 170, b + 1e-4, 1e-5)


def test_monotone_in_correct_guesses_and_in_delta():
    bounds = [one_run_bound(1000, 100, v, 1e-5).epsilon_lower_bound for v in range(40, 101)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:])) and bounds[-1] > bounds[20] > 0
    assert bounds[0] == 0.0  # 40 of 100 is no evidence against any epsilon
    by_delta = [one_run_bound(1000, 100, 95, d).epsilon_lower_bound for d in (0.0, 1e-6, 1e-4, 1e-3)]
    assert all(a >= b for a, b in zip(by_delta, by_delta[1:])) and by_delta[0] > by_delta[-1]
    # higher confidence, weaker claim
    assert one_run_bound(1000, 100, 95, 0.0, 0.99).epsilon_lower_bound < by_delta[0]


# jax-privacy 2.0.0's auditing._epsilon_one_run_fdp(0, m, r, v, 0.05, delta) (its implementation
# of Mahloujifar et al. 2024), run with dp-accounting 0.6.0 on 2026-12-05; Steinke's bound of
# the same counts (its _epsilon_one_run) beside it, equal to fedsec's one_run_bound
FDP_REFERENCE = [  # (m, r, v, delta) -> (f-DP bound, Steinke bound)
    ((1000, 100, 90, 1e-5), 2.4564050672094146, 1.6261436787042223),
    ((1000, 100, 75, 1e-5), 1.0059159106249809, 0.6994669106155617),
    ((1000, 1000, 700, 1e-5), 1.3719800500431791, 0.7317406384658977),
    ((100, 50, 40, 1e-3), 1.0097897720881073, 0.71138542001327),
    ((200, 20, 20, 1e-5), 2.892102871817154, 1.8164726132401656),
    ((1000, 100, 55, 1e-5), 0.0, 0.0),
    ((64, 64, 50, 1e-3), 1.1646723625046551, 0.7211965760302591),
]


@pytest.mark.parametrize("case, fdp, steinke", FDP_REFERENCE)
def test_the_fdp_bound_matches_jax_privacy_and_is_the_tighter(case, fdp, steinke):
    assert one_run_fdp_bound(*case).epsilon_lower_bound == pytest.approx(fdp, abs=1e-5)
    assert one_run_bound(*case).epsilon_lower_bound == pytest.approx(steinke, abs=1e-5)
    assert one_run_fdp_bound(*case).epsilon_lower_bound >= one_run_bound(*case).epsilon_lower_bound


def test_gdp_mu_inverts_the_gaussian_mechanisms_delta():
    for eps, delta in ((8.0, 1e-5), (2.0, 1e-3), (0.5, 1e-6), (0.0, 1e-2)):
        mu = gdp_mu(eps, delta)
        assert gdp_delta(mu, eps) == pytest.approx(delta, rel=1e-9)
        if eps > 0:
            assert _gdp_mu_to_epsilon(mu, delta) == pytest.approx(eps, abs=1e-6)
    assert gdp_mu(8.0, 1e-3) == pytest.approx(2.0832, abs=1e-3)  # sigma 0.48 is (8, 1e-3)-DP


def test_the_fdp_bound_is_monotone_and_sits_at_the_rejection_edge():
    bounds = [one_run_fdp_bound(500, 100, v, 1e-5).epsilon_lower_bound for v in range(50, 101, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:])) and bounds[0] == 0 and bounds[-1] > 3
    b = one_run_fdp_bound(1000, 200, 170, 1e-5).epsilon_lower_bound
    assert fdp_rejects(1000, 200, 170, gdp_mu(b, 1e-5), 0.05)
    assert not fdp_rejects(1000, 200, 170, gdp_mu(b + 1e-4, 1e-5), 0.05)
    assert one_run_fdp_bound(1000, 200, 170, 1e-5, 0.99).epsilon_lower_bound < b  # more confidence, less claim


def test_the_fdp_bound_is_sound_on_a_mechanism_that_is_exactly_gaussian():
    # each canary's score is N(mu * included, 1): releasing the scores is mu-GDP in each
    # canary, so at 95% confidence at most about 5% of audits may exceed epsilon(mu)
    import numpy as np

    mu, delta, m, r = 1.5, 1e-3, 400, 100
    truth = _gdp_mu_to_epsilon(mu, delta)
    rng = np.random.default_rng(7)
    bounds = []
    for _ in range(40):
        included = rng.random(m) < 0.5
        scores = rng.normal(size=m) + mu * included
        bounds.append(one_run_fdp_bound(m, *guess_and_count(list(scores), list(included), r), delta)
                      .epsilon_lower_bound)
    assert sum(b > truth for b in bounds) <= 4  # Binomial(40, 0.05) exceeds 4 with probability 0.05
    assert float(np.median(bounds)) > 0.4 * truth  # and the test has power: the audit is not vacuous


def test_bad_counts_are_refused():
    for args in ((10, 11, 5, 0.0), (10, 5, 6, 0.0), (10, 5, 5, 1.0), (0, 1, 1, 0.0)):
        with pytest.raises(ValueError):
            one_run_bound(*args)


def test_clopper_pearson_upper_bound():
    # k = 0 has a closed form: 1 - (1 - c)^(1/n)
    assert abs(clopper_pearson_upper(0, 200, 0.95) - (1 - 0.05 ** (1 / 200))) < 1e-12
    # in general the bound u is where seeing k or fewer becomes a 1 - c event
    u = clopper_pearson_upper(7, 60, 0.975)
    assert abs(stats.binom.cdf(7, 60, u) - 0.025) < 1e-9
    assert clopper_pearson_upper(5, 5, 0.95) == 1.0


def test_many_runs_bound_by_hand():
    # no errors in 1000 + 1000 trials: both rates <= 1 - 0.025^(1/1000)
    u = 1 - 0.025 ** (1 / 1000)
    assert abs(many_runs_bound(0, 1000, 0, 1000, 1e-5) - math.log((1 - 1e-5 - u) / u)) < 1e-9
    # a coin-flip test proves nothing
    assert many_runs_bound(500, 1000, 500, 1000, 1e-5) == 0.0
    # asymmetric errors: the larger of the two ratios
    fpr, fnr = clopper_pearson_upper(10, 500, 0.975), clopper_pearson_upper(200, 500, 0.975)
    assert abs(many_runs_bound(10, 500, 200, 500, 0.0) - math.log((1 - fnr) / fpr)) < 1e-12


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fedsec", "audit", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_prints_the_bound_and_refuses_bad_counts():
    out = _cli("bound", "--canaries", "1000", "--guesses", "100", "--correct", "100", "--delta", "0", "--json")
    assert out.returncode == 0
    assert round(json.loads(out.stdout)["epsilon_lower_bound"], 3) == 3.493
    text = _cli("bound", "--canaries", "1000", "--guesses", "100", "--correct", "100", "--delta", "0")
    assert text.stdout.startswith("epsilon >= 3.492 with confidence 0.95")  # 3.49298..., rounded down
    bad = _cli("bound", "--canaries", "10", "--guesses", "5", "--correct", "6", "--delta", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "fedsec: error: --correct = 6: must be in [0, --guesses = 5]"
    assert "Traceback" not in bad.stderr


def test_guess_and_count_by_hand():
    from fedsec.accountants.audit import guess_and_count

    scores = [0.9, 0.1, 0.5, 0.7, 0.2, 0.3]
    included = [True, False, True, False, False, True]
    # r = 4: 'in' for 0.9 and 0.7 (one right), 'out' for 0.1 and 0.2 (both right)
    assert guess_and_count(scores, included, 4) == (4, 3)
    # r = 3: 'in' for 0.9 and 0.7, 'out' for 0.1
    assert guess_and_count(scores, included, 3) == (3, 2)
    assert guess_and_count(scores, included, 6) == (6, 4)  # 0.9, 0.5 in; 0.1, 0.2 out
    with pytest.raises(ValueError):
        guess_and_count(scores, included, 7)


def _audited_run(tmp_path, privacy, per_round, kind="secret", **audit):
    from conftest import tiny_config

    from fedsec.loop import run_experiment

    data = {"benchmark": {"num_clients": 2, "examples_per_client": 4, "size_alpha": 0, "test_size": 3,
                          "client_test_size": 0, "num_probes": 0}, "max_length": 256}
    lora = {"rank": 8, "alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    cfg = tiny_config(tmp_path, data=data, lora=lora, privacy=privacy,
                      federation={"rounds": 6, "clients_per_round": per_round, "local_only_clients": 0},
                      training={"local_steps": 4, "batch_size": 4, "lr": 1e-2, "min_lr": 1e-2},
                      eval={"clients": False, "every": 6},
                      audit={"canaries": 16, "guesses": 8, "repeats": 4, "kind": kind, **audit})
    return run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)


def test_the_audit_sees_canary_clients_without_dp_and_stays_below_the_accountant_with_dp(tmp_path):
    """16 canary clients (4 included with seed 3) beside 2 ordinary clients, 8 guesses.
    Measured: all 8 right without DP (bound 0.789, the most 8 guesses can show)."""
    from fedsec.canaries import audit_canaries

    _, included = audit_canaries(3, 16)  # tiny_config's seed
    every = 2 + int(included.sum())  # every client, canary clients included, in every round
    plain = _audited_run(tmp_path / "plain", {}, every).audit
    assert plain["canaries"] == 16 and plain["included"] == int(included.sum()) == 4 and plain["guesses"] == 8
    assert plain["accountant_epsilon"] is None and not plain["bound_exceeds_accountant"]
    assert plain["epsilon_lower_bound"] == one_run_bound(16, 8, plain["correct"], plain["delta"]).epsilon_lower_bound
    assert plain["correct"] == 8 and plain["epsilon_lower_bound"] > 0.75  # included canaries stand out
    private = _audited_run(tmp_path / "dp", {"mode": "user", "epsilon": 2.0, "clip_norm": 0.05, "delta": 1e-3,
                                             "reproducible": True},
                           every).audit
    assert private["accountant_epsilon"] is not None and private["accountant_epsilon"] <= 2.0
    assert private["epsilon_lower_bound"] <= private["accountant_epsilon"]
    assert private["correct"] < 8 and not private["bound_exceeds_accountant"]


def test_update_canaries_are_unit_directions_inserted_in_sampled_order_and_scored_by_the_largest_dot():
    import math

    import torch

    from fedsec.canaries import UpdateCanaries, canary_direction
    from fedsec.results import ClientUpdate

    dim = 50
    crafted = UpdateCanaries(seed=7, members={10: 2, 12: 0}, norm=0.5, examples=4,
                             scores=torch.full((3,), -math.inf))
    assert crafted.trained([1, 10, 11, 12]) == [1, 11]
    honest = [ClientUpdate(1, torch.ones(dim), 3), ClientUpdate(11, -torch.ones(dim), 3)]
    updates = crafted.insert(honest, [1, 10, 11, 12], dim)
    assert [u.client_id for u in updates] == [1, 10, 11, 12]
    assert updates[1].delta.norm().item() == pytest.approx(0.5)
    assert torch.allclose(updates[1].delta, 0.5 * canary_direction(7, 2, dim))
    assert torch.allclose(updates[3].delta, 0.5 * canary_direction(7, 0, dim)) and updates[3].num_examples == 4
    # directions are independent of each other: near-orthogonal in high dimension
    assert abs(float(canary_direction(7, 0, 10_000) @ canary_direction(7, 1, 10_000))) < 0.05
    first, second = canary_direction(7, 1, dim), -canary_direction(7, 1, dim)
    crafted.observe(first)
    crafted.observe(second)
    assert crafted.scores[1].item() == pytest.approx(1.0)  # the larger of +1 and -1
    expected = max(float(canary_direction(7, 0, dim) @ first), float(canary_direction(7, 0, dim) @ second))
    assert crafted.scores[0].item() == pytest.approx(expected)
    summed = UpdateCanaries(seed=7, members={}, norm=0.5, examples=4, scores=torch.zeros(3), statistic="sum")
    third = torch.linspace(-1, 1, dim)
    for aggregate in (first, first, third):
        summed.observe(aggregate)
    for k in range(3):  # statistic sum: the inner product with the rounds' aggregates added up
        assert summed.scores[k].item() == pytest.approx(float(canary_direction(7, k, dim) @ (2 * first + third)),
                                                        abs=1e-6)


def test_update_canaries_are_seen_without_dp_and_the_bound_stays_below_the_accountant_with_dp(tmp_path):
    """The same federation with crafted canary updates (norm C = privacy.clip_norm) scored on
    every round's released aggregate. Measured: without DP (canary norm 1) 8 of 8 right;
    under DP (C = 0.05, epsilon 2) the bound stays below the accountant's epsilon."""
    from fedsec.canaries import audit_canaries

    _, included = audit_canaries(3, 16)
    every = 2 + int(included.sum())
    plain = _audited_run(tmp_path / "plain", {"clip_norm": 1.0}, every, "update").audit
    assert plain["kind"] == "update" and plain["correct"] == 8 and plain["epsilon_lower_bound"] > 0.75
    # an included canary in every round adds its direction times 1 / 6 to each aggregate,
    # far above the projection of the honest updates on a random direction
    scores = plain["scores"]
    assert min(s for s, inc in zip(scores, plain["included_canaries"]) if inc) > \
        max(s for s, inc in zip(scores, plain["included_canaries"]) if not inc)
    private = _audited_run(tmp_path / "dp", {"mode": "user", "epsilon": 2.0, "clip_norm": 0.05, "delta": 1e-3,
                                             "reproducible": True},
                           every, "update").audit
    assert private["accountant_epsilon"] <= 2.0 and private["epsilon_lower_bound"] <= private["accountant_epsilon"]
    assert not private["bound_exceeds_accountant"]


def test_every_client_every_round_is_a_gaussian_mechanism_so_the_fdp_bound_is_held_to_the_accountant(tmp_path):
    """q = 1 (every client, canaries included, in every round) under DP: the run is a
    composition of Gaussian mechanisms, so the f-DP test's bound is compared with the
    accountant too; with the sum statistic it must stay below it."""
    population = 2 + 16  # the sample rate counts every canary, in or out
    private = _audited_run(tmp_path / "dp", {"mode": "user", "epsilon": 2.0, "clip_norm": 0.05, "delta": 1e-3,
                                             "reproducible": True},
                           population, "update", statistic="sum").audit
    assert private["gaussian_mechanism"] and private["accountant_epsilon"] <= 2.0
    fdp = one_run_fdp_bound(16, 8, private["correct"], 1e-3).epsilon_lower_bound
    assert private["fdp_epsilon_lower_bound"] == fdp <= private["accountant_epsilon"]
    best = max(fdp, private["epsilon_lower_bound"])
    assert private["tightness"] == pytest.approx(best / private["accountant_epsilon"])
    assert not private["bound_exceeds_accountant"]
    from fedsec.canaries import audit_canaries

    present = 2 + int(audit_canaries(3, 16)[1].sum())  # without DP the sampling is fixed-size: all present
    plain = _audited_run(tmp_path / "plain", {"clip_norm": 1.0}, present, "update", statistic="sum").audit
    assert plain["correct"] == 8 and not plain["gaussian_mechanism"] and plain["tightness"] is None
    assert plain["fdp_epsilon_lower_bound"] > plain["epsilon_lower_bound"] > 0.75  # the f-DP test is the tighter


def test_an_update_audit_resumed_after_a_crash_ends_with_the_same_scores(tmp_path):
    """The canaries' running scores live in the checkpoint: a run stopped after round 1 and
    resumed ends with the uninterrupted run's scores, guesses and bound (with DP)."""
    from conftest import tiny_config

    from fedsec.loop import run_experiment

    cfg = tiny_config(tmp_path, privacy={"mode": "user", "reproducible": True, "noise_multiplier": 0.5,
                                         "clip_norm": 0.05, "delta": 1e-3},
                      federation={"rounds": 3, "clients_per_round": 4, "local_only_clients": 0},
                      eval={"clients": False, "every": 3}, audit={"canaries": 8, "kind": "update"})
    whole = run_experiment(cfg, out=tmp_path / "whole", progress=False, log=lambda _: None)
    run_experiment(cfg, out=tmp_path / "parts", stop_after=1, progress=False, log=lambda _: None)
    resumed = run_experiment(cfg, out=tmp_path / "parts", resume=True, progress=False, log=lambda _: None)
    assert resumed.audit == whole.audit and len(whole.audit["scores"]) == 8
    assert all(math.isfinite(s) for s in whole.audit["scores"])


def test_canary_secrets_are_seeded_of_their_kind_and_never_in_the_training_text():
    import re

    from fedsec.canaries import audit_canaries
    from fedsec.config import SECRET_KINDS, BenchmarkConfig, DataConfig
    from fedsec.data import build_federated_data
    from fedsec.data.benchmark import NEW_TOKEN_LENGTH
    from fedsec.data.benchmark import SECRET_KINDS as GENERATED

    assert SECRET_KINDS == GENERATED
    data = build_federated_data(DataConfig(benchmark=BenchmarkConfig(num_clients=8, examples_per_client=48)), 0, "sft")
    training = " ".join(m.content for c in data.clients for e in c.train for m in e.messages())
    new = r"(?:<\|fedsec-canary-(?:[0-9]|[1-9][0-9]|[1-4][0-9][0-9]|50[0-9]|51[01])\|>){8}"  # 64 x 8 tokens
    for kind, shape in (("pin", r"\d{6}"), ("random_tokens", r"(?:[a-z]{4} ){5}[a-z]{4}"), ("new_tokens", new)):
        canaries, included = audit_canaries(3, 64, kind)
        again = audit_canaries(3, 64, kind)
        assert canaries == again[0] and (included == again[1]).all()  # deterministic by seed
        assert canaries != audit_canaries(4, 64, kind)[0]
        assert all(re.fullmatch(shape, c.secret) and c.text == f"{c.prefix} {c.secret}." for c in canaries)
        assert len({c.secret for c in canaries}) == 64  # no two canaries share a secret
        if kind == "new_tokens":  # nor a token: an absent canary's tokens are in no training text
            held = [re.findall(r"<[^>]*>", c.secret) for c in canaries]
            assert len({t for tokens in held for t in tokens}) == 64 * NEW_TOKEN_LENGTH
        assert not any(c.secret in training for c in canaries)  # nor does any training text hold one


def test_random_token_canaries_stand_out_without_dp(tmp_path):
    from fedsec.canaries import audit_canaries

    _, included = audit_canaries(3, 16, "random_tokens")
    every = 2 + int(included.sum())
    plain = _audited_run(tmp_path, {}, every, secret="random_tokens").audit
    assert plain["kind"] == "secret" and plain["correct"] == 8 and plain["epsilon_lower_bound"] > 0.75


def test_new_token_canaries_add_seeded_embedding_rows_and_tokenize_whole(tmp_path):
    """audit.secret new_tokens: 8 tokens per canary that the vocabulary never had, each one
    id; their rows drawn from the seed (the same in every process of a run, other for another
    seed), the existing rows untouched; a secret is exactly its canary's own 8 new ids."""
    from conftest import tiny_config

    from fedsec.canaries import audit_canaries
    from fedsec.data.benchmark import NEW_TOKEN_LENGTH, new_token
    from fedsec.errors import ConfigError
    from fedsec.models import load_model

    audit = {"canaries": 4, "secret": "new_tokens"}
    plain_model, plain_tok = load_model(tiny_config(tmp_path))
    model, tok = load_model(tiny_config(tmp_path, audit=audit))
    again, _ = load_model(tiny_config(tmp_path, audit=audit))
    other, _ = load_model(tiny_config(tmp_path, audit=audit, seed=4))
    added = 4 * NEW_TOKEN_LENGTH  # audit.canaries 4
    ids = tok.convert_tokens_to_ids([new_token(k) for k in range(added)])
    assert len(tok) == len(plain_tok) + added and min(ids) >= len(plain_tok)
    rows = model.get_input_embeddings().weight.detach()
    old = plain_model.get_input_embeddings().weight.detach()
    assert torch.equal(rows[: old.shape[0]], old)  # the vocabulary's rows unchanged
    assert torch.equal(rows[ids], again.get_input_embeddings().weight.detach()[ids])
    assert not torch.equal(rows[ids], other.get_input_embeddings().weight.detach()[ids])
    assert abs(float(rows[ids].mean() - old.mean())) < 0.1 and 0.5 < float(rows[ids].std() / old.std()) < 1.5
    canaries, _ = audit_canaries(3, 4, "new_tokens")
    for k, c in enumerate(canaries):
        pieces = tok(c.secret, add_special_tokens=False).input_ids
        assert pieces == ids[k * NEW_TOKEN_LENGTH: (k + 1) * NEW_TOKEN_LENGTH]
    with pytest.raises(ConfigError, match="audit.secret"):
        tiny_config(tmp_path, audit=audit, model={"name": "tiny", "quantization": "4bit"})


def test_new_token_canaries_stand_out_without_dp(tmp_path):
    from fedsec.canaries import audit_canaries

    _, included = audit_canaries(3, 16, "new_tokens")
    every = 2 + int(included.sum())
    plain = _audited_run(tmp_path, {}, every, secret="new_tokens").audit
    assert plain["kind"] == "secret" and plain["correct"] == 8 and plain["epsilon_lower_bound"] > 0.75


def test_the_comparable_bound_takes_the_fdp_test_only_for_a_gaussian_guarantee():
    from fedsec.accountants.audit import comparable_bound

    assert comparable_bound(1.2, 2.5, True) == 2.5 and comparable_bound(3.0, 2.5, True) == 3.0
    assert comparable_bound(1.2, 2.5, False) == 1.2  # Poisson-subsampled: not the curve the f-DP test tests
    assert comparable_bound(1.2, None, True) == 1.2  # delta 0: no f-DP bound
