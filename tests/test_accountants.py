"""Accountants against Opacus, dp-accounting and published values (REFERENCES.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

from fedsec.accountants import (
    DpEvent,
    PrivacyLedger,
    calibrate,
    epsilon,
    epsilons,
    gdp_epsilon,
)
from fedsec.accountants.backends import _gdp_mu_to_epsilon, compress
from fedsec.cli import main


def test_abadi_setting_matches_measured_values():
    # q = 0.01, sigma = 4, T = 10,000, delta = 1e-5 (Abadi et al. 2016's worked example)
    history = [DpEvent(4.0, 0.01, 10_000)]
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(1.0355, abs=1e-3)
    assert epsilon(history, 1e-5, "prv") == pytest.approx(0.9569, abs=1e-3)
    assert epsilon(history, 1e-5, "pld") == pytest.approx(0.9470, abs=1e-3)


def test_full_participation_matches_the_exact_gaussian_composition():
    # q = 1: T Gaussians of multiplier sigma compose to one of sigma / sqrt(T); its exact
    # epsilon follows from the analytic Gaussian mechanism (mu = sqrt(T) / sigma).
    history = [DpEvent(2.0, 1.0, 50)]
    exact = _gdp_mu_to_epsilon(math.sqrt(50) / 2.0, 1e-5)
    assert exact == pytest.approx(20.6755, abs=1e-3)
    assert epsilon(history, 1e-5, "pld") == pytest.approx(exact, rel=1e-3)
    assert epsilon(history, 1e-5, "prv") == pytest.approx(20.6863, abs=2e-3)
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(22.0199, abs=2e-3)
    assert epsilon(history, 1e-5, "rdp") >= exact  # RDP is safe, never below the exact value


def test_wrappers_agree_with_the_libraries_called_directly():
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = [DpEvent(1.1, 0.05, 60), DpEvent(0.9, 0.1, 40)]
    rdp, prv = RDPAccountant(), PRVAccountant()
    for acc in (rdp, prv):
        acc.history = [(1.1, 0.05, 60), (0.9, 0.1, 40)]
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 60)
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(0.9)), 40)
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
    assert epsilon(history, 1e-5, "prv") == pytest.approx(prv.get_epsilon(1e-5), rel=1e-9)
    # the PLD wrapper may use a coarser (pessimistic) grid: never below, and within 0.1%
    ours, theirs = epsilon(history, 1e-5, "pld"), pld.get_epsilon(1e-5)
    assert theirs <= ours <= theirs * 1.001


@pytest.mark.parametrize("history", [[(0.729, 0.1, 30)], [(1.1, 0.05, 60), (0.9, 0.1, 40)], [(4.0, 0.01, 10_000)],
                                     [(0.3, 0.2, 1), (0.3, 0.2, 1)]])
def test_rdp_prv_grid_and_pld_are_the_libraries_bit_for_bit_round_after_round(history):
    """The one-round RDP curve and PLD are computed once per (q, sigma) and composed over the
    rounds, as Opacus and dp-accounting do: every round of a ledger's growing history gives
    Opacus' own RDP epsilon and PRV grid and dp-accounting's PLD epsilon exactly, the
    repeated (cached) asks included."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from opacus.accountants import PRVAccountant, RDPAccountant

    from fedsec.accountants.backends import PRV_DELTA_ERROR, PRV_EPS_ERROR, _pld_at, _prv_domain

    for last in (1, 2, history[-1][2]) * 2:
        events = [DpEvent(*h) for h in [*history[:-1], (*history[-1][:2], last)]]
        grown = [(e.noise_multiplier, e.sample_rate, e.steps) for e in compress(events)]  # what epsilon() composes
        rdp, prv = RDPAccountant(), PRVAccountant()
        rdp.history = prv.history = grown
        assert epsilon(events, 1e-5, "rdp") == rdp.get_epsilon(1e-5)
        with np.errstate(divide="ignore", over="ignore"):
            theirs = prv._get_domain(prvs=[PoissonSubsampledGaussianPRV(q, s) for s, q, _ in grown],
                                     num_self_compositions=[n for *_, n in grown], eps_error=PRV_EPS_ERROR,
                                     delta_error=1e-5 * PRV_DELTA_ERROR)
            ours = _prv_domain(grown, 1e-5)
        assert ours == theirs  # t_min, t_max, size, shifts
        if sum(n for *_, n in grown) <= 100:
            assert epsilon(events, 1e-5, "prv") == prv.get_epsilon(1e-5)
        pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
        for s, q, n in grown:
            pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
        assert _pld_at(compress(events), 1e-5, 1e-3) == pld.get_epsilon(1e-5)


def test_prv_and_pld_agree_and_gdp_underestimates_in_the_fl_regime():
    history = [DpEvent(1.0, 0.1, 100)]
    eps = epsilons(history, 1e-5)
    assert eps["prv"] == pytest.approx(eps["pld"], rel=0.01)
    assert eps["pld"] <= eps["rdp"] <= 1.15 * eps["pld"]
    assert gdp_epsilon(history, 1e-5) < 0.9 * eps["pld"]  # why GDP is never shown as a guarantee


def test_degenerate_histories():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([DpEvent(0.0, 0.1, 5)], 1e-5, "pld") == math.inf
    assert compress([DpEvent(1, 0.1), DpEvent(1, 0.1), DpEvent(2, 0.1), DpEvent(1, 0.1, 0)]) == \
        [DpEvent(1, 0.1, 2), DpEvent(2, 0.1, 1)]
    with pytest.raises(ValueError):
        DpEvent(1.0, 1.5)
    with pytest.raises(ValueError):
        epsilon([DpEvent(1.0, 0.1)], 1e-5, "gdp")


@settings(max_examples=12, deadline=None)
@given(target=st.floats(0.3, 12), q=st.floats(0.005, 1.0), rounds=st.integers(1, 300))
def test_calibrated_sigma_never_overshoots_the_target(target, q, rounds):
    sigma = calibrate(target, 1e-5, q, rounds, "rdp")
    reached = epsilon([DpEvent(sigma, q, rounds)], 1e-5, "rdp")
    assert reached <= target
    assert target - reached <= 0.01 or sigma < 1e-5  # and it is tight to the tolerance


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_calibration_matches_opacus_and_never_overshoots(accountant):
    from opacus.accountants.utils import get_noise_multiplier

    sigma = calibrate(4.0, 1e-5, 0.1, 50, accountant)
    assert epsilon([DpEvent(sigma, 0.1, 50)], 1e-5, accountant) <= 4.0
    if accountant != "pld":
        theirs = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.1, steps=50,
                                      accountant=accountant)
        assert sigma == pytest.approx(theirs, rel=0.02)


def test_ledger_records_epsilon_per_round_and_round_trips():
    ledger = PrivacyLedger(1e-5, ("rdp", "pld"), "rdp")
    for r in range(1, 4):
        ledger.record(r, 1.2, 0.2, 0.5, 7)
    eps = [e.epsilon["rdp"] for e in ledger.entries]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(epsilon([DpEvent(1.2, 0.2, 3)], 1e-5, "rdp"))
    again = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert again == ledger and again.report().epsilon == eps[-1]
    with pytest.raises(ValueError):
        ledger.record(7, 1.2, 0.2, 0.5, 7)
    ledger.truncate(2)
    assert [e.round for e in ledger.entries] == [1, 2]


def test_uncertified_ledger_keeps_events_but_no_epsilon():
    ledger = PrivacyLedger(1e-5, certified=False, reason="no noise")
    entry = ledger.record(1, 0.0, 0.1, 1.0, 3)
    assert entry.epsilon is None and entry.noise_multiplier == 0.0
    report = ledger.report()
    assert report.epsilon is None and not report.certified
    assert "not certified (no noise)" in report.describe()


def test_cli_epsilon_and_calibrate_json(capsys):
    assert main(["privacy", "epsilon", "--noise-multiplier", "1.0", "--sample-rate", "0.1",
                 "--rounds", "100", "--delta", "1e-5", "--accountant", "rdp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accountant"] == "rdp" and out["delta"] == 1e-5 and out["noise_multiplier"] == 1.0
    assert out["epsilon"] == pytest.approx(epsilon([DpEvent(1.0, 0.1, 100)], 1e-5, "rdp"))
    assert main(["privacy", "calibrate", "--epsilon", "8", "--sample-rate", "0.1", "--rounds", "100",
                 "--delta", "1e-5", "--accountant", "prv", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] <= 8 and out["noise_multiplier"] > 0 and out["accountant"] == "prv"
    assert main(["privacy", "epsilon", "--noise-multiplier", "2", "--sample-rate", "1", "--rounds", "50",
                 "--accountant", "pld"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("epsilon 20.67") and "not a guarantee" in text


@pytest.mark.parametrize("argv, field", [
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0", "--rounds", "5"], "--sample-rate"),
    (["epsilon", "--noise-multiplier", "-1", "--sample-rate", "0.1", "--rounds", "5"], "--noise-multiplier"),
    (["calibrate", "--epsilon", "0", "--sample-rate", "0.1", "--rounds", "5"], "--epsilon"),
    (["calibrate", "--epsilon", "1", "--sample-rate", "0.1", "--rounds", "5", "--delta", "2"], "--delta"),
])
def test_cli_bad_privacy_arguments_are_one_line(capsys, argv, field):
    assert main(["privacy", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and "Traceback" not in err


@pytest.mark.parametrize("eps, digits, shown", [
    (7.9931, 3, "8.00"), (0.99934, 3, "1.000"), (3.9992717, 3, "4.00"), (12.345, 3, "12.4"),
    (8.0, 3, "8.00"), (7.8993, 5, "7.8994"), (0.125, 3, "0.125"), (0.0123451, 3, "0.0124"), (1234.5, 3, "1240")])
def test_printed_epsilon_is_rounded_up(eps, digits, shown):
    from fedsec.accountants import format_epsilon

    assert format_epsilon(eps, digits) == shown
    assert float(shown) >= eps


@pytest.mark.parametrize("eps, up, down", [
    (7.9990000000004, "8.00", "7.99"),  # a hair above 7.999: the old slack printed "7.999" at 4 digits
    (7.999, "8.00", "7.99"), (8.0, "8.00", "8.00"), (0.5, "0.500", "0.500"),
    (2.0000000000001, "2.01", "2.00"), (0.30000000000000004, "0.301", "0.300")])
def test_epsilons_round_up_and_lower_bounds_round_down_at_the_boundary(eps, up, down):
    from fedsec.accountants import format_epsilon, format_lower_bound

    assert format_epsilon(eps) == up and format_lower_bound(eps) == down
    assert float(format_epsilon(eps)) >= eps >= float(format_lower_bound(eps))
    assert format_epsilon(7.9990000000004, 4) == "8.000" and format_lower_bound(7.9990000000004, 4) == "7.999"


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
@pytest.mark.parametrize("delta", [0.5, 0.999])
def test_no_accountant_answers_at_a_delta_of_one_half_or_more(accountant, delta, capsys):
    # prv printed -0.22 at delta 0.5 and rdp -2.53 at 0.999: no mechanism has a negative epsilon
    with pytest.raises(ValueError, match=r"\(0, 0.5\)"):
        epsilon([DpEvent(1.0, 0.1, 100)], delta, accountant)
    assert main(["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--rounds", "100",
                 "--delta", str(delta), "--accountant", accountant]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--delta" in err


def test_a_backend_failure_or_a_hopeless_grid_is_a_one_line_refusal(capsys):
    # PRV at delta 1e-16 (floating point) and at sigma 0.3, q 0.01, 100,000 rounds (a 23 GB grid)
    for argv in (["--noise-multiplier", "1", "--sample-rate", "0.1", "--rounds", "100", "--delta", "1e-16"],
                 ["--noise-multiplier", "0.3", "--sample-rate", "0.01", "--rounds", "100000"]):
        assert main(["privacy", "epsilon", *argv, "--accountant", "prv"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--accountant" in err and "Traceback" not in err
    from fedsec.accountants.backends import MAX_PRV_POINTS, prv_grid_points

    assert prv_grid_points([DpEvent(0.3, 0.01, 100000)], 1e-5) > 10 * MAX_PRV_POINTS
    assert prv_grid_points([DpEvent(1.0, 0.1, 100)], 1e-5) < MAX_PRV_POINTS / 100


def test_gdp_for_a_large_mu_is_a_number_not_an_overflow():
    # mu = q sqrt(T (e^{1/sigma^2} - 1)) ~ 2e4 here: e^eps overflowed a float
    assert math.isfinite(gdp_epsilon([DpEvent(0.5, 0.5, 100)], 1e-5))
    big = gdp_epsilon([DpEvent(0.3, 1.0, 1000)], 1e-5)
    assert big > 1e6 and big <= math.inf
    # the log-space delta(eps) is the plain one where the plain one does not overflow
    from scipy.stats import norm

    from fedsec.accountants.backends import _gdp_mu_to_epsilon

    mu = 1.3
    eps = _gdp_mu_to_epsilon(mu, 1e-5)
    plain = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    assert plain == pytest.approx(1e-5, rel=1e-6)


def test_calibrating_below_the_rdp_floor_says_why():
    with pytest.raises(ValueError) as err:
        calibrate(0.01, 1e-5, 0.1, 100, "rdp")
    assert "smallest this accountant can prove" in str(err.value) and "prv or pld" in str(err.value)


def test_a_secondary_accountant_that_fails_is_recorded_unavailable_and_the_run_goes_on():
    from fedsec.accountants import PrivacyLedger

    # delta 1e-16: rdp (primary) works, prv's floats cannot; the ledger keeps going
    ledger = PrivacyLedger(1e-16, ("rdp", "prv"), "rdp")
    entry = ledger.record(1, 1.0, 0.1, 0.5)
    assert set(entry.epsilon) == {"rdp"} and entry.epsilon["rdp"] > 0
    assert "prv" in entry.unavailable and "delta" in entry.unavailable["prv"].lower()
    ledger.record(2, 1.0, 0.1, 0.5)
    assert ledger.report().epsilon == pytest.approx(epsilon([DpEvent(1.0, 0.1, 2)], 1e-16, "rdp"))
    assert PrivacyLedger.from_dict(ledger.to_dict()).to_dict() == ledger.to_dict()
    # the primary's failure is not hidden
    with pytest.raises(ValueError):
        PrivacyLedger(1e-16, ("rdp", "prv"), "prv").record(1, 1.0, 0.1, 0.5)


def test_a_small_sigma_gives_numbers_quickly_without_warnings_or_a_traceback(capsys):
    """sigma 0.01-0.1 (epsilons in the hundreds to tens of thousands): GDP is infinite rather
    than an overflow, PRV's far-tail overflows stay inside the backend (its NaNs refuse), PLD's
    grid grows as 1 / sigma^2 (a fixed 1e-3 grid took 90 s at sigma 0.01), and the CLI prints
    one answer."""
    import time
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert gdp_epsilon([DpEvent(0.01, 0.1, 30)], 1e-5) == math.inf
        history = [DpEvent(0.1, 0.1, 30)]
        pld = epsilon(history, 1e-5, "pld")
        with pytest.raises(ValueError, match="prv accountant failed here .FloatingPointError.*use another "
                                             "accountant .rdp or pld."):
            epsilon(history, 1e-5, "prv")  # NaNs in its far tail: refused, not printed
        prv = epsilon([DpEvent(0.15, 0.1, 30)], 1e-5, "prv")
        began = time.perf_counter()
        tiny = epsilon([DpEvent(0.01, 0.1, 30)], 1e-5, "pld")
        seconds = time.perf_counter() - began
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert pld == pytest.approx(579.98, rel=1e-4)
    assert prv == pytest.approx(epsilon([DpEvent(0.15, 0.1, 30)], 1e-5, "pld"), rel=1e-3)  # two methods agree
    # the grown grid: the 0.1-grid value (59,889.0) to 1e-4, below RDP's 164,352
    assert tiny == pytest.approx(59889.0, rel=1e-4) and tiny < epsilon([DpEvent(0.01, 0.1, 30)], 1e-5, "rdp")
    assert seconds < 30  # 90 s on the fixed grid; about 0.8 s here
    assert main(["privacy", "epsilon", "--noise-multiplier", "0.01", "--sample-rate", "0.1", "--rounds", "30"]) == 0
    out = capsys.readouterr().out
    assert "epsilon 164360 at delta 1e-05 (rdp)" in out  # 164,351.9 rounded up and "GDP/CLT approximation inf" in out


def test_the_ledger_computes_its_other_accountants_only_up_to_epsilon_100():
    from fedsec.accountants.ledger import SIDE_BY_SIDE_UP_TO

    ledger = PrivacyLedger(1e-5, ("rdp", "prv", "pld"), "rdp")
    entry = ledger.record(1, 0.8, 0.1, 1.0)
    assert set(entry.epsilon) == {"rdp", "prv", "pld"} and entry.unavailable is None
    far = PrivacyLedger(1e-5, ("rdp", "prv", "pld"), "pld").record(1, 0.05, 0.5, 1.0)
    assert far.epsilon["pld"] > SIDE_BY_SIDE_UP_TO and set(far.epsilon) == {"pld"}
    assert far.epsilon["pld"] == pytest.approx(epsilon([DpEvent(0.05, 0.5)], 1e-5, "pld"))
    assert set(far.unavailable) == {"rdp", "prv"}
    assert all("above 100" in why for why in far.unavailable.values())


def test_the_record_level_report_keeps_a_failing_or_far_accountant_out_instead_of_failing():
    """A record-level run's report computes every accountant at the end: one that fails (PRV at
    delta 1e-16) is recorded unavailable instead of failing the finished run, and above epsilon
    100 the others are not computed, as in the user-level ledger."""
    from fedsec.accountants.record import RecordLedger

    ledger = RecordLedger(1e-16, 1.0, {0: 0.1, 1: 0.2}, "rdp")
    ledger.record(1, {0: 3, 1: 2})
    eps, unavailable = ledger.epsilons(("rdp", "prv", "pld"))
    assert set(eps) == {"rdp", "pld"} and set(unavailable) == {"prv"} and "delta" in unavailable["prv"].lower()
    assert eps["rdp"] == pytest.approx(max(epsilon([DpEvent(1.0, 0.1, 3)], 1e-16, "rdp"),
                                           epsilon([DpEvent(1.0, 0.2, 2)], 1e-16, "rdp")))
    far = RecordLedger(1e-5, 0.1, {0: 0.1}, "pld")
    far.record(1, {0: 30})
    eps, unavailable = far.epsilons(("rdp", "prv", "pld"))
    assert eps == {"pld": pytest.approx(epsilon([DpEvent(0.1, 0.1, 30)], 1e-5, "pld"))}
    assert set(unavailable) == {"rdp", "prv"} and all("above 100" in w for w in unavailable.values())
