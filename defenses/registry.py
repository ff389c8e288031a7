"""Aggregators by name: the table a YAML file picks from (`defense.aggregator`).

Each entry is a frozen dataclass of the rule's parameters that validates them,
states its assumption on f (the attackers per round it must tolerate) in
`check(n, f)`, and calls the pure function in `fedsec.defenses.robust`:

    defense:
      aggregator: trimmed_mean
      f: 2                     # attackers per round the rule must tolerate
      params: {beta: 0.2}

Under user-level DP only `mean` and `norm_bound` (which is clipping) keep the
epsilon certified: every other rule's sensitivity is not proven here, so a DP
run with it is labelled "not certified" (fedsec.privacy).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch

from fedsec.defenses import robust
from fedsec.defenses.robust import Aggregated
from fedsec.registry import register, registry


@dataclass(frozen=True)
class Context:
    """What some rules need beyond the deltas and weights."""

    generator: torch.Generator  # FLAME's noise
    reference: torch.Tensor | None = None  # FLTrust: the server's update on its root set
    center: torch.Tensor | None = None  # centered clipping: the previous round's aggregate
    histories: torch.Tensor | None = None  # FoolsGold: each client's summed updates


class Rule:
    """rule(deltas [n, d], weights [n], ctx, f) -> Aggregated."""

    needs_reference = False  # FLTrust: the server trains on its root set each round
    needs_histories = False  # FoolsGold: per-client update histories (kept on disk)
    needs_center = False  # centered clipping: the previous aggregate
    dp_certified = False  # a proven sensitivity bound under user-level DP (set by the registration)
    diagnostics = True  # the round row reports the rule's output (who it excluded, its scores)

    def check(self, n: int, f: int) -> str | None:
        """Why n clients per round with f attackers violate the rule's assumption, or None."""
        return None if 2 * f < n else f"needs f < n / 2 (n {n}, f {f})"


@register("aggregator", "mean", dp_certified=True)
@dataclass(frozen=True)
class Mean(Rule):
    diagnostics = False  # FedAvg's mean excludes nobody: its rows carry no defense field

    def check(self, n: int, f: int) -> str | None:
        return None if f == 0 else "tolerates no attacker (f must be 0); pick a robust rule"

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        return robust.mean(deltas, weights)


@register("aggregator", "median")
@dataclass(frozen=True)
class Median(Rule):
    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        return robust.median(deltas, weights)


@register("aggregator", "trimmed_mean")
@dataclass(frozen=True)
class TrimmedMean(Rule):
    beta: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 0.5:
            raise ValueError("beta: must be in [0, 0.5), the fraction trimmed from each end")

    def check(self, n: int, f: int) -> str | None:
        k = int(self.beta * n)
        if 2 * k >= n or k < f:
            return f"needs f <= floor(beta n) < n / 2 (beta {self.beta}, n {n}, f {f}); raise beta"
        return None

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        return robust.trimmed_mean(deltas, weights, self.beta)


@register("aggregator", "krum")
@dataclass(frozen=True)
class Krum(Rule):
    m: int = 1  # Multi-Krum averages the m best-scored deltas

    def __post_init__(self) -> None:
        if self.m < 1:
            raise ValueError("m: must be >= 1 (1 is Krum)")

    def check(self, n: int, f: int) -> str | None:
        if n < 2 * f + 3:
            return f"needs n >= 2f + 3 (n {n}, f {f})"
        return None if self.m <= n else f"m {self.m} exceeds the {n} clients per round"

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        return robust.multi_krum(deltas, weights, f, min(self.m, deltas.shape[0]))


@register("aggregator", "bulyan")
@dataclass(frozen=True)
class Bulyan(Rule):
    def check(self, n: int, f: int) -> str | None:
        return None if n >= 4 * f + 3 else f"needs n >= 4f + 3 (n {n}, f {f})"

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        return robust.bulyan(deltas, weights, f)


@register("aggregator", "geometric_median")
@dataclass(frozen=True)
class GeometricMedian(Rule):
    nu: float = 1e-6
    max_iter: int = 100
    ftol: float = 1e-7

    def __post_init__(self) -> None:
        if not (self.nu > 0 and self.max_iter >= 1 and self.ftol >= 0):
            raise ValueError("nu, max_iter, ftol: need nu > 0, max_iter >= 1, ftol >= 0")

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        return robust.geometric_median(deltas, weights, self.nu, self.max_iter, self.ftol)


@register("aggregator", "norm_bound", dp_certified=True)
@dataclass(frozen=True)
class NormBound(Rule):
    max_norm: float = 1.0
    # dp_certified: it is clipping; under DP the clip norm becomes min(C, max_norm)

    def __post_init__(self) -> None:
        if not self.max_norm > 0:
            raise ValueError("max_norm: must be > 0")

    def check(self, n: int, f: int) -> str | None:
        return None  # bounds each client's influence; no assumption on f

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        return robust.norm_bound(deltas, weights, self.max_norm)


@register("aggregator", "centered_clip")
@dataclass(frozen=True)
class CenteredClip(Rule):
    tau: float = 1.0
    iters: int = 3
    needs_center = True

    def __post_init__(self) -> None:
        if not (self.tau > 0 and self.iters >= 1):
            raise ValueError("tau, iters: need tau > 0 and iters >= 1")

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        return robust.centered_clip(deltas, weights, self.tau, self.iters, ctx.center)


@register("aggregator", "fltrust")
@dataclass(frozen=True)
class FLTrust(Rule):
    needs_reference = True

    def check(self, n: int, f: int) -> str | None:
        return None  # trust comes from the server's root set, not from a majority

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        return robust.fltrust(deltas, weights, ctx.reference)


@register("aggregator", "flame")
@dataclass(frozen=True)
class Flame(Rule):
    noise_lambda: float = 0.001

    def __post_init__(self) -> None:
        if self.noise_lambda < 0:
            raise ValueError("noise_lambda: must be >= 0")

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        return robust.flame(deltas, weights, ctx.generator, self.noise_lambda)


@register("aggregator", "foolsgold")
@dataclass(frozen=True)
class FoolsGold(Rule):
    kappa: float = 1.0
    needs_histories = True

    def __post_init__(self) -> None:
        if not self.kappa > 0:
            raise ValueError("kappa: must be > 0")

    def check(self, n: int, f: int) -> str | None:
        return None  # aimed at sybils (many similar attackers), not at a minority bound

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        return robust.foolsgold(deltas, weights, ctx.histories, self.kappa)


def plugin_rule(name: str, fn, params: dict, dp_certified: bool) -> type[Rule]:
    """A plugin's function fn(deltas, weights, **params) -> [d] as a rule: a frozen
    dataclass of its keyword parameters (typed from fn's annotations)."""
    hints = inspect.get_annotations(fn, eval_str=True)
    fields = [(key, hints.get(key, type(default)), dataclasses.field(default=default))
              for key, default in params.items()]

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        out = fn(deltas, weights, **{fld.name: getattr(self, fld.name) for fld in dataclasses.fields(self)})
        if not (hasattr(out, "shape") and tuple(out.shape) == (deltas.shape[1],)):
            raise ValueError(f"aggregator {name} returned shape {tuple(getattr(out, 'shape', ()))}, "
                             f"not [{deltas.shape[1]}]")
        return Aggregated(out.to(deltas.dtype), weights.clone().float())

    def check(self, n: int, f: int) -> str | None:
        return None  # a plugin states no assumption on f

    return dataclasses.make_dataclass(f"Plugin_{name}", fields, bases=(Rule,), frozen=True,
                                      namespace={"__call__": __call__, "check": check, "plugin": fn,
                                                 "dp_certified": dp_certified,
                                                 "__doc__": inspect.getdoc(fn) or f"plugin aggregator {name}"})


AGGREGATORS = registry("aggregator")  # name -> rule class, plugins' included
