"""Accountant backends: epsilon of a composed sampled-Gaussian history, and calibration.

A history is a list of `DpEvent`s, each `steps` rounds of the Poisson-subsampled
Gaussian mechanism with noise multiplier sigma and sample rate q (the shape Opacus
keeps in `accountant.history`). Three backends turn it into epsilon at a delta:

    rdp  Opacus' RDPAccountant (Mironov 2017; subsampled RDP of Mironov et al. 2019),
         safe and 6-14% looser than the tight value in the federated regime
    prv  Opacus' PRVAccountant (Gopi et al. 2021), the upper end of its error bound
    pld  Google's dp-accounting PLDAccountant (privacy loss distributions), the
         independent cross-check; PRV and PLD agree within about 0.5%

The GDP / central-limit approximation (`gdp_epsilon`) is here to be shown beside
them, never as a guarantee: it under-estimates epsilon for FL-style q and T.

Every function is pure: a history in, a number out. Nothing here reads training state.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fedsec.registry import register, registry

ACCOUNTANTS = ("rdp", "prv", "pld")  # the built-ins, computed side by side in every ledger


@dataclass(frozen=True)
class DpEvent:
    """`steps` rounds of the Poisson-subsampled Gaussian mechanism (one round = one step)."""

    noise_multiplier: float
    sample_rate: float
    steps: int = 1

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


def compress(history: Sequence[DpEvent]) -> list[DpEvent]:
    """Merge consecutive events with the same (sigma, q): one segment per run of rounds."""
    out: list[DpEvent] = []
    for e in history:
        if e.steps == 0:
            continue
        if out and (out[-1].noise_multiplier, out[-1].sample_rate) == (e.noise_multiplier, e.sample_rate):
            out[-1] = DpEvent(e.noise_multiplier, e.sample_rate, out[-1].steps + e.steps)
        else:
            out.append(e)
    return out


MAX_DELTA = 0.5  # at delta >= 1/2 an (epsilon, delta) guarantee says nothing (and backends go negative)


def epsilon(history: Sequence[DpEvent], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` after composing `history`; inf if any step had no noise.

    Raises ValueError, with the reason, where the backend cannot give a sound number
    (delta outside (0, 1/2), a grid too large for memory, a numerical failure, or a
    negative or NaN result): fedsec prints no epsilon it cannot prove.
    """
    table = registry("accountant")
    if accountant not in table:
        raise ValueError(f"unknown accountant {accountant!r}; use one of {', '.join(table)}")
    if not 0 < delta < MAX_DELTA:
        raise ValueError(f"delta must be in (0, {MAX_DELTA:g}), got {delta}: at delta >= 1/2 a guarantee "
                         "means nothing")
    segments = compress(history)
    if not segments:
        return 0.0
    if any(e.noise_multiplier == 0 for e in segments):
        return math.inf
    try:
        eps = float(table[accountant](segments, delta))
    except (RuntimeError, ArithmeticError, MemoryError) as err:  # the backend's own failure
        others = " or ".join(a for a in ACCOUNTANTS if a != accountant)
        raise ValueError(f"the {accountant} accountant failed here ({type(err).__name__}: {err}); "
                         f"use another accountant ({others})") from None
    if math.isnan(eps) or eps < 0:
        raise ValueError(f"the {accountant} accountant returned epsilon {eps:g} at delta {delta:g}, which no "
                         "mechanism has: numerically unreliable here; use another accountant")
    return eps


@contextlib.contextmanager
def _backend_numerics(kind: str) -> Iterator[None]:
    """Opacus' numerics for `kind`: tightness warnings silenced, PRV's NaNs raised (_opacus)."""
    invalid = "raise" if kind == "prv" else "warn"
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore", invalid=invalid):
        warnings.simplefilter("ignore", UserWarning)
        yield


def _opacus(kind: str, segments: list[DpEvent], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in segments]
    # "optimal order is the largest alpha" (RDP), and log(0) and exp overflowing inside PRV's
    # domain search at a small sigma (the privacy loss's far tail), are warnings about
    # tightness, not validity: the bound returned is still safe. A NaN inside PRV's sums (inf
    # x 0 in the far tail, sigma about 0.1 and below) is not: it raises, and epsilon() refuses
    with _backend_numerics(kind):
        if kind == "rdp":
            return _rdp_epsilon(history, delta)
        acc = PRVAccountant()
        acc.history = history
        domain = _prv_domain(history, delta)  # sized once; a hopeless grid is refused before it is built
        _check_prv_grid(domain.size)
        acc._get_domain = lambda **_: domain
        return acc.get_epsilon(delta=delta)


@functools.lru_cache(maxsize=256)
def _rdp_per_round(sample_rate: float, noise_multiplier: float, invalid: str) -> np.ndarray:
    """Opacus' RDP curve of one round at RDPAccountant's default orders (read-only), computed
    under numpy's `invalid` setting of the caller (`_backend_numerics`: PRV raises on a NaN)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    curve = analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                 orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Opacus' RDPAccountant.get_epsilon for `history` ((sigma, q, steps) each), bit for bit.

    Opacus' compute_rdp is `steps` times the one-round curve, so each (q, sigma)'s curve is
    computed once per process (`_rdp_per_round`): a ledger asks again every round, and the
    curve was most of the time of RDP and of PRV's grid sizing (a test checks equality)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    invalid = np.geterr()["invalid"]
    rdp = sum([_rdp_per_round(q, sigma, invalid) * steps for sigma, q, steps in history])
    eps, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


# The PRV grid holds 2 L / mesh points (float64, a few arrays of it): past this many the
# accountant would need gigabytes (sigma 0.3, q 0.01, 100,000 rounds: 4.7e8 points, 23 GB)
MAX_PRV_POINTS = 3e7


# Opacus' PRVAccountant.get_epsilon defaults: the epsilon error, and delta's error as a share of delta
PRV_EPS_ERROR, PRV_DELTA_ERROR = 0.01, 1e-3


def _prv_domain(history: Sequence[tuple[float, float, int]], delta: float):
    """The grid Opacus' PRVAccountant.get_epsilon builds for `history` (its `_get_domain` with
    `compute_safe_domain_size`, Gopi et al. 2021 remark 5.6), its RDP bounds from
    `_rdp_epsilon`; a test checks it is Opacus' grid. The Domain only records the size."""
    from opacus.accountants.analysis.prv import Domain

    eps_error, delta_error = PRV_EPS_ERROR, delta * PRV_DELTA_ERROR
    total = sum(steps for _, _, steps in history)
    size = _rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        size = max(size, _rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)))
    size = max(size, eps_error) + 3
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    return Domain.create_aligned(-size, size, mesh)


def prv_grid_points(segments: list[DpEvent], delta: float) -> int:
    """The number of points of the grid the PRV accountant would build for `segments`."""
    with _backend_numerics("prv"):
        return _prv_domain([(e.noise_multiplier, e.sample_rate, e.steps) for e in segments], delta).size


def _check_prv_grid(points: int) -> None:
    if points > MAX_PRV_POINTS:
        raise ValueError(f"the prv accountant would build a grid of {points:.3g} points (about "
                         f"{points * 48 / 2 ** 30:.0f} GiB) for this history; use rdp or pld")


# Below this sigma the PLD grid grows as 1 / sigma^2, as the range of one round's privacy
# loss does (about 1 / (2 sigma^2) wide): a fixed 1e-3 grid over sigma 0.01's range (q 0.1,
# 30 rounds) took 90 s; a 0.4 one takes about 0.3 s and proves 59,889 against the 0.1 grid's
# 59,889.0 (a coarser pessimistic grid is a looser upper bound, never a smaller one)
PLD_FIXED_GRID_SIGMA = 0.2


def _pld(segments: list[DpEvent], delta: float) -> float:
    """PLD epsilon; the grid is pessimistic, so a coarser one is a (looser) upper bound.

    A grid of 1e-3 in privacy-loss space costs a tenth of the default 1e-4 and agrees
    with it to 1e-4 at the epsilons of FL runs; below epsilon 2 (where a coarse grid's
    slack is relatively large) the default grid is used. Below sigma PLD_FIXED_GRID_SIGMA
    the grid is 1e-3 x (PLD_FIXED_GRID_SIGMA / sigma)^2.
    """
    sigma = min(e.noise_multiplier for e in segments)
    eps = _pld_at(segments, delta, 1e-3 * max(1.0, (PLD_FIXED_GRID_SIGMA / sigma) ** 2))
    return eps if eps >= 2 else _pld_at(segments, delta, 1e-4)


def _pld_at(segments: list[DpEvent], delta: float, interval: float) -> float:
    """dp-accounting's PLDAccountant for `segments` at this grid, bit for bit: its
    composition, with each (sigma, q)'s one-round PLD discretised once per process
    (`_pld_per_round`: most of the time, and the same every round of a ledger)."""
    from dp_accounting.pld import privacy_loss_distribution

    pld = privacy_loss_distribution.identity(value_discretization_interval=interval)
    for e in segments:
        pld = pld.compose(_pld_per_round(e.noise_multiplier, e.sample_rate, interval).self_compose(e.steps))
    return pld.get_epsilon_for_delta(delta)


@functools.lru_cache(maxsize=8)  # a few MB each at most (PLD_FIXED_GRID_SIGMA); a ledger needs one or two
def _pld_per_round(noise_multiplier: float, sample_rate: float, interval: float):
    """One round's PLD as PLDAccountant builds it (add-or-remove neighbours); compose and
    self_compose return new distributions, so the cached one is never changed."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, value_discretization_interval=interval, sampling_prob=sample_rate)


# The built-in accountants in the registry (fedsec.registry), each fn(history, delta) -> epsilon.

@register("accountant", "rdp")
def _rdp(segments: list[DpEvent], delta: float) -> float:
    """Opacus' RDPAccountant (Mironov 2017; Mironov et al. 2019): safe, 6-14% loose in FL."""
    return _opacus("rdp", segments, delta)


@register("accountant", "prv")
def _prv(segments: list[DpEvent], delta: float) -> float:
    """Opacus' PRVAccountant (Gopi et al. 2021): the upper end of its error bound."""
    return _opacus("prv", segments, delta)


register("accountant", "pld")(_pld)


def calibrate(target_epsilon: float, delta: float, sample_rate: float, rounds: int,
              accountant: str = "rdp", tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to within the bisection) whose epsilon is <= target.

    Bisection as Opacus' get_noise_multiplier: grow sigma until epsilon <= target, then
    shrink the bracket keeping the upper end, so the answer never overshoots the target.
    Stops when the epsilon reached is within `tolerance` of the target.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")

    def eps(sigma: float) -> float:
        return epsilon([DpEvent(sigma, sample_rate, rounds)], delta, accountant)

    low, high = 0.0, 1.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(_unreachable(target_epsilon, delta, sample_rate, rounds, accountant, eps_high))
        eps_high = eps(high)
    while target_epsilon - eps_high > tolerance and high - low > 1e-6 * high:
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


def _unreachable(target: float, delta: float, sample_rate: float, rounds: int, accountant: str,
                 floor: float) -> str:
    """Why no noise multiplier reaches `target`: the accountant's own floor, not the noise."""
    why = f"no noise multiplier reaches epsilon {target:g} at delta {delta:g} with the {accountant} accountant " \
          f"(q {sample_rate:g}, {rounds} rounds): even sigma near 1e6 gives epsilon {floor:.3g}"
    if accountant == "rdp":
        why += (", the smallest this accountant can prove at this delta (its largest RDP order bounds "
                "epsilon below by about log(1/delta) / order); use accountant prv or pld, or a larger epsilon")
    else:
        why += "; use a larger epsilon"
    return why


def gdp_epsilon(history: Sequence[DpEvent], delta: float) -> float:
    """The Gaussian-DP / CLT approximation (Dong, Roth, Su 2019; Bu et al. 2020).

    mu = q sqrt(T (e^{1/sigma^2} - 1)) for T rounds of Poisson-subsampled Gaussians,
    then the epsilon of mu-GDP at delta. An APPROXIMATION that can under-estimate the
    true epsilon (15-18% for q = 0.05-0.1, T = 100-200): never a guarantee.
    """
    segments = compress(history)
    if any(e.noise_multiplier == 0 for e in segments):
        return math.inf
    try:
        mu_sq = sum(e.sample_rate ** 2 * e.steps * math.expm1(e.noise_multiplier ** -2) for e in segments)
    except OverflowError:  # e^{1/sigma^2} past float range (sigma below about 0.027): mu is infinite
        return math.inf
    if mu_sq == 0:
        return 0.0
    return _gdp_mu_to_epsilon(math.sqrt(mu_sq), delta)


def gdp_delta(mu: float, eps: float) -> float:
    """delta(eps) of mu-GDP, the Gaussian mechanism with sensitivity / sigma = mu (Dong et al.
    2019, Cor. 2.13): Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    from scipy.stats import norm

    if mu <= 0:
        return 0.0
    # e^eps Phi(-eps/mu - mu/2) in log space: e^eps alone overflows for large mu
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(min(eps + norm.logcdf(-eps / mu - mu / 2), 0.0)))


def gdp_mu(eps: float, delta: float) -> float:
    """The mu whose Gaussian mechanism is exactly (eps, delta)-DP: gdp_delta(mu, eps) = delta
    (delta grows with mu; bisection to 1e-12 relative)."""
    if not (eps >= 0 and 0 < delta < 1):
        raise ValueError(f"need eps >= 0 and 0 < delta < 1 (eps {eps}, delta {delta})")
    low, high = 0.0, 1.0
    while gdp_delta(high, eps) < delta:
        low, high = high, 2 * high
    while high - low > 1e-12 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if gdp_delta(mid, eps) < delta else (low, mid)
    return (low + high) / 2


def _gdp_mu_to_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon with delta(epsilon) <= delta for mu-GDP (Dong et al. 2019, Cor. 2.13)."""

    def delta_of(eps: float) -> float:
        return gdp_delta(mu, eps)

    low, high = 0.0, 1.0
    while delta_of(high) > delta:
        high *= 2
        if high > 1e12:
            return math.inf
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (low, mid) if delta_of(mid) <= delta else (mid, high)
    return high
