"""Empirical lower bounds on epsilon: what an attacker demonstrably achieved.

An accountant's epsilon is an upper bound: no attacker can do better. An audit runs
an attack and turns its success into a lower bound that holds with a chosen
confidence: if the bound exceeds the accountant's epsilon, the implementation (or the
accounting) is wrong. Pure functions of counts; the experiments produce the counts.

One run (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training
run"): m canaries, each included independently with probability 1/2; the auditor
scores them and guesses "in" for its top k and "out" for its bottom k (r = 2k
guesses, or any r), v of them right. Under (eps, delta)-DP

    P[V >= v] <= beta + 2 m delta alpha,    q = e^eps / (1 + e^eps),
    beta  = P[Bin(r, q) >= v],
    alpha = max_{i=1..v} P[v - i <= Bin(r, q) < v] / i,

and the bound is the largest eps whose p-value is still below 1 - confidence: every
smaller eps is rejected by the observation.

The same game under f-DP (Mahloujifar, Melis & Chaudhuri 2024, "Auditing f-differential
privacy in one run"): instead of the (eps, delta) pair, test the whole trade-off curve
of the Gaussian mechanism that is exactly (eps, delta)-DP (mu-GDP, mu = `gdp_mu`). Going
from the last correct guess back to the first, the curve bounds how much probability
the adversary's wrong guesses must carry for the right ones it made (`fdp_rejects`);
the observation rejects the claim when the two together exceed what r guesses of m
allow. Tighter than the (eps, delta) test (it uses the whole curve), but it tests a
Gaussian-DP claim: it refutes an (eps, delta) claim only where the mechanism's
guarantee is that Gaussian curve (every client in every round, or correlated noise:
one Gaussian mechanism). For a Poisson-subsampled run it says how far the run is from
the Gaussian mechanism of its epsilon, not that the accountant is wrong.

Many runs (Jagielski, Ullman & Oprea 2020): a distinguishing test run on models
trained with and without one target; its false positive and false negative rates,
bounded above with Clopper-Pearson intervals, give
eps >= max(ln((1 - delta - FPR) / FNR), ln((1 - delta - FNR) / FPR)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The probability, under (eps, delta)-DP, of v or more correct of r guesses."""
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    alpha, mass = 0.0, 0.0
    for i in range(1, v + 1):  # mass = P[v - i <= Bin < v]
        mass += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, mass / i)
    return min(1.0, beta + 2 * m * delta * alpha)


@dataclass(frozen=True)
class AuditBound:
    epsilon_lower_bound: float  # 0 when the observation rejects no epsilon > 0
    confidence: float
    canaries: int
    guesses: int
    correct: int
    delta: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def one_run_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95,
                  tol: float = 1e-6) -> AuditBound:
    """The largest epsilon that r guesses with v right reject at `confidence` (bisection
    to `tol`; the p-value grows with epsilon)."""
    if not (m >= 1 and 1 <= r <= m and 0 <= v <= r):
        raise ValueError(f"need 1 <= guesses <= canaries and 0 <= correct <= guesses (m {m}, r {r}, v {v})")
    if not (0 <= delta < 1 and 0 < confidence < 1):
        raise ValueError(f"need 0 <= delta < 1 and 0 < confidence < 1 (delta {delta}, confidence {confidence})")
    level = 1.0 - confidence
    if v == 0 or one_run_p_value(m, r, v, 0.0, delta) >= level:
        return AuditBound(0.0, confidence, m, r, v, delta)
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # a guard: beta -> 1 as epsilon grows, so this is not reached
            return AuditBound(math.inf, confidence, m, r, v, delta)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if one_run_p_value(m, r, v, mid, delta) < level else (lo, mid)
    return AuditBound(lo, confidence, m, r, v, delta)


def fdp_rejects(m: int, r: int, v: int, mu: float, level: float) -> bool:
    """Whether v right of r guesses on m canaries reject mu-GDP at significance `level`
    (Mahloujifar et al. 2024, their bound for a capped number of guesses).

    `right` and `wrong` are the probability masses the adversary's right and wrong guesses
    must carry; walking back over the right guesses, each needs at least
    f^-1(right) = Phi(Phi^-1(right) - mu) of wrong mass (the GDP curve), and each wrong
    mass added lifts the right mass by i / (r - i). The claim falls when the masses sum to
    more than r / m."""
    from scipy.stats import norm

    right, wrong = level * v / m, level * (r - v) / m
    for i in range(v - 1, -1, -1):
        floor = float(norm.cdf(norm.ppf(right) - mu))
        if floor <= wrong:  # nothing moves again
            break
        right = min(right + i / (r - i) * (floor - wrong), 1.0)
        wrong = floor
    return right + wrong > r / m


def one_run_fdp_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95,
                      tol: float = 1e-6) -> AuditBound:
    """The largest epsilon whose Gaussian curve (mu-GDP, exactly (epsilon, delta)-DP) the
    guesses reject at `confidence` (bisection to `tol`: a larger epsilon is a weaker claim)."""
    from fedsec.accountants.backends import gdp_mu

    if not (m >= 1 and 1 <= r <= m and 0 <= v <= r):
        raise ValueError(f"need 1 <= guesses <= canaries and 0 <= correct <= guesses (m {m}, r {r}, v {v})")
    if not (0 < delta < 1 and 0 < confidence < 1):
        raise ValueError(f"need 0 < delta < 1 and 0 < confidence < 1 (delta {delta}, confidence {confidence})")
    level = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return fdp_rejects(m, r, v, gdp_mu(eps, delta), level)

    if v == 0 or not rejected(0.0):
        return AuditBound(0.0, confidence, m, r, v, delta)
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            return AuditBound(math.inf, confidence, m, r, v, delta)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return AuditBound(lo, confidence, m, r, v, delta)


def guess_and_count(scores, included, guesses: int) -> tuple[int, int]:
    """The auditor's game: guess 'in' for the ceil(r/2) highest scores and 'out' for the
    floor(r/2) lowest (r = guesses), abstain on the rest; (r, correct guesses)."""
    if len(scores) != len(included) or not 1 <= guesses <= len(scores):
        raise ValueError(f"need one score per canary and 1 <= guesses <= canaries ({guesses}, {len(scores)})")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    top, bottom = order[len(order) - (guesses + 1) // 2:], order[: guesses // 2]
    return guesses, sum(bool(included[i]) for i in top) + sum(not included[i] for i in bottom)


def clopper_pearson_upper(k: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound on a binomial rate from k of n."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1 (k {k}, n {n})")
    return 1.0 if k == n else float(stats.beta.ppf(confidence, k + 1, n - k))


def many_runs_bound(false_positives: int, negatives: int, false_negatives: int, positives: int,
                    delta: float, confidence: float = 0.95) -> float:
    """Jagielski et al.'s bound from a test's errors over many runs; both rates are bounded
    at (1 + confidence) / 2 so the pair holds jointly at `confidence`."""
    each = (1 + confidence) / 2
    fpr = clopper_pearson_upper(false_positives, negatives, each)
    fnr = clopper_pearson_upper(false_negatives, positives, each)
    candidates = [0.0]
    for a, b in ((fpr, fnr), (fnr, fpr)):
        if b > 0 and 1 - delta - a > 0:
            candidates.append(math.log((1 - delta - a) / b))
    return max(candidates)


def comparable_bound(plain: float, fdp: float | None, gaussian: bool) -> float:
    """The audited epsilon an accountant's must stay above: the (epsilon, delta) test's bound,
    and the f-DP test's too where the run's guarantee is the Gaussian curve that test
    assumes (`gaussian`: every client every round, or correlated noise)."""
    return max(plain, fdp if gaussian and fdp is not None else 0.0)
