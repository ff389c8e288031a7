"""Byzantine update attacks: what a malicious client sends instead of its honest delta.

Pure functions of the attacker's own delta or of the round's honest deltas [m, d]
(the omniscient attacker the papers assume), with an explicit generator where
they draw noise:

    sign_flip    -s x                       (the client's own delta, reversed)
    gaussian     N(0, sigma^2 I)
    scaling      gamma x, gamma = n / eta   (model replacement, Bagdasaryan et al.
                                            2020: X = gamma (X_mal - G) + G, so the
                                            server's mean step lands on X_mal)
    alie         mu - z_max sigma           (Baruch et al. 2019, "A Little Is Enough":
                                            per-coordinate mean and standard deviation
                                            of the honest deltas, s = floor(n/2 + 1) - f,
                                            z_max = Phi^-1((n - s) / n))
    ipm          -eps mu                    (Xie et al. 2020, inner-product manipulation)
    min_max      mu - gamma p, the largest gamma with max_i ||m - x_i|| <= max_ij ||x_i - x_j||
    min_sum      mu - gamma p, the largest gamma with sum_i ||m - x_i||^2 <= max_i sum_j ||x_i - x_j||^2
                                           (Shejwalkar & Houmansadr 2021; p = mu / ||mu||,
                                            the per-coordinate std, or sign(mu); gamma by
                                            bisection, the constraint being convex in gamma)
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from fedsec.defenses.robust import pairwise_sq_distances
from fedsec.registry import register
from fedsec.results import AttackContext


def sign_flip(own: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return -scale * own


def gaussian(dim: int, std: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(dim, generator=generator, dtype=torch.float64, device=generator.device) * std).float()


def scaling(own: torch.Tensor, factor: float) -> torch.Tensor:
    """Model replacement's boosted delta: factor = n / eta replaces the global model."""
    return factor * own


def alie(honest: torch.Tensor, n: int, f: int) -> torch.Tensor:
    """A Little Is Enough: mu - z_max sigma per coordinate, for n clients of which f attack."""
    if not 0 < f < n or honest.shape[0] < 2:
        raise ValueError(f"alie needs 0 < f < n and >= 2 honest deltas (n {n}, f {f})")
    s = math.floor(n / 2 + 1) - f
    z_max = NormalDist().inv_cdf((n - s) / n)
    mu, sigma = honest.mean(0), honest.std(0, unbiased=False)
    return mu - z_max * sigma


def ipm(honest: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Inner-product manipulation: -eps times the honest mean."""
    return -epsilon * honest.mean(0)


def _direction(honest: torch.Tensor, kind: str) -> torch.Tensor:
    mu = honest.mean(0)
    if kind == "unit":
        return mu / mu.norm().clamp(min=1e-30)
    if kind == "std":
        return honest.std(0, unbiased=False)
    if kind == "sign":
        return torch.sign(mu)
    raise ValueError(f"direction must be unit, std or sign, got {kind!r}")


def _largest_gamma(feasible, tol: float) -> float:
    """The largest gamma >= 0 with feasible(gamma), for a feasible set [0, gamma*]."""
    lo, hi = 0.0, 1.0
    while feasible(hi):
        lo, hi = hi, hi * 2
        if hi > 1e12:
            return lo
    while hi - lo > tol * max(1.0, lo):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def _min_max_or_sum(honest: torch.Tensor, direction: str, tol: float, use_max: bool) -> tuple[torch.Tensor, float]:
    mu, p = honest.mean(0), _direction(honest, direction)
    pairwise = pairwise_sq_distances(honest)
    bound = float(pairwise.max()) if use_max else float(pairwise.sum(1).max())

    def feasible(gamma: float) -> bool:
        dist = ((honest - (mu - gamma * p)).double() ** 2).sum(1)
        return float(dist.max() if use_max else dist.sum()) <= bound

    gamma = _largest_gamma(feasible, tol)
    return mu - gamma * p, gamma


def min_max(honest: torch.Tensor, direction: str = "unit", tol: float = 1e-5) -> torch.Tensor:
    """Min-Max: as far along -p as possible while no farther from any honest delta than
    the two farthest honest deltas are from each other."""
    return _min_max_or_sum(honest, direction, tol, use_max=True)[0]


def min_sum(honest: torch.Tensor, direction: str = "unit", tol: float = 1e-5) -> torch.Tensor:
    """Min-Sum: as far along -p as possible while its summed squared distance to the honest
    deltas is at most the largest such sum of an honest delta."""
    return _min_max_or_sum(honest, direction, tol, use_max=False)[0]


# The built-in update attacks in the registry, each fn(own, honest, ctx, **params)
# (fedsec.registry); `shared`: one vector a round, sent by every attacker.

@register("update_attack", "sign_flip")
def _sign_flip(own: torch.Tensor, honest: torch.Tensor, ctx: AttackContext, *, scale: float = 1.0):
    """The attacker's own delta, reversed and scaled: -scale x."""
    return sign_flip(own, scale)


@register("update_attack", "gaussian")
def _gaussian(own: torch.Tensor, honest: torch.Tensor, ctx: AttackContext, *, std: float = 1.0):
    """Noise N(0, std^2 I) in place of the update."""
    return gaussian(own.numel(), std, ctx.generator)


@register("update_attack", "scaling")
def _scaling(own: torch.Tensor, honest: torch.Tensor, ctx: AttackContext, *, factor: float | None = None):
    """Model replacement: the own delta boosted by `factor` (null: n / server_lr)."""
    return scaling(own, factor if factor is not None else ctx.clients / ctx.server_lr)


@register("update_attack", "alie", shared=True, min_honest=2)
def _alie(own: torch.Tensor, honest: torch.Tensor, ctx: AttackContext):
    """A Little Is Enough: mu - z_max sigma of the honest deltas."""
    return alie(honest, ctx.clients, ctx.attackers)


@register("update_attack", "ipm", shared=True, min_honest=2)
def _ipm(own: torch.Tensor, honest: torch.Tensor, ctx: AttackContext, *, epsilon: float = 0.1):
    """Inner-product manipulation: -epsilon times the honest mean."""
    return ipm(honest, epsilon)


@register("update_attack", "min_max", shared=True, min_honest=2)
def _min_max(own: torch.Tensor, honest: torch.Tensor, ctx: AttackContext, *, direction: str = "unit"):
    """Min-Max along -direction (unit, std or sign) of the honest deltas."""
    return min_max(honest, direction)


@register("update_attack", "min_sum", shared=True, min_honest=2)
def _min_sum(own: torch.Tensor, honest: torch.Tensor, ctx: AttackContext, *, direction: str = "unit"):
    """Min-Sum along -direction (unit, std or sign) of the honest deltas."""
    return min_sum(honest, direction)
