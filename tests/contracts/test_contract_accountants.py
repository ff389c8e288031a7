"""Every accountant (built-in or plugin): an upper bound on epsilon that is never below
the exact value where one is known, and close enough to it to be of use.

Without subsampling (q = 1) T rounds of the Gaussian mechanism with noise multiplier
sigma are one Gaussian mechanism of sensitivity sqrt(T) / sigma, whose exact
(epsilon, delta) curve is known (Balle & Wang 2018, Thm. 8):

    delta(eps) = Phi(mu / 2 - eps / mu) - e^eps Phi(-mu / 2 - eps / mu),   mu = sqrt(T) / sigma.
"""

from __future__ import annotations

import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedsec.accountants.backends import DpEvent, epsilon
from fedsec.registry import registry

ACCOUNTANTS = registry("accountant")
DELTA = 1e-5


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    def excess(eps: float) -> float:
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta
    return brentq(excess, 0.0, 100.0, xtol=1e-12)


def test_the_exact_curve_has_the_reference_value():
    # REFERENCES.md: q = 1, sigma = 2, T = 50, delta = 1e-5 gives exact epsilon 20.6755
    assert exact_gaussian_epsilon(math.sqrt(50) / 2, DELTA) == pytest.approx(20.6755, abs=1e-4)


@pytest.mark.parametrize("sigma, rounds", [(1.0, 1), (2.0, 50), (8.0, 100)])
@pytest.mark.parametrize("name", list(ACCOUNTANTS))
def test_the_bound_holds_and_is_within_a_fifth_of_the_exact_gaussian(name, sigma, rounds):
    exact = exact_gaussian_epsilon(math.sqrt(rounds) / sigma, DELTA)
    eps = epsilon([DpEvent(sigma, 1.0, rounds)], DELTA, name)
    assert exact * (1 - 1e-3) <= eps <= 1.2 * exact


@pytest.mark.parametrize("name", list(ACCOUNTANTS))
def test_more_rounds_and_less_noise_cost_more_and_sampling_costs_less(name):
    def eps(sigma, q, steps):
        return epsilon([DpEvent(sigma, q, steps)], DELTA, name)

    assert eps(1.0, 0.1, 50) <= eps(1.0, 0.1, 100)
    assert eps(1.5, 0.1, 100) <= eps(1.0, 0.1, 100)
    assert eps(1.0, 0.1, 100) <= eps(1.0, 1.0, 100)
    assert eps(1.0, 0.1, 100) <= epsilon([DpEvent(1.0, 0.1, 100)], DELTA / 10, name)  # smaller delta, larger eps


@pytest.mark.parametrize("name", list(ACCOUNTANTS))
def test_a_history_in_pieces_costs_what_it_costs_in_one(name):
    whole = epsilon([DpEvent(1.2, 0.05, 60)], DELTA, name)
    pieces = epsilon([DpEvent(1.2, 0.05, 20), DpEvent(1.2, 0.05, 40)], DELTA, name)
    assert pieces == pytest.approx(whole, rel=1e-9)
    assert epsilon([], DELTA, name) == 0.0 and epsilon([DpEvent(0.0, 0.1, 3)], DELTA, name) == math.inf
