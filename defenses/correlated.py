"""Noise correlated across rounds: DP-FTRL's tree aggregation and banded matrix factorization.

DP-FedAvg adds fresh noise to each round's clipped sum and needs amplification by
sampling to reach a useful epsilon. A federation of a few organisations that all take
part in every round gets none. Matrix-factorization mechanisms add to round t's sum the
noise w_t = (C^-1 z)_t (or, for the tree, a combination of tree nodes' noise) instead,
where z is i.i.d. Gaussian. The server then releases x~ = x + C^-1 z, which determines
C x + z and is determined by it: one Gaussian mechanism on C x, whose sensitivity is
what one user can move C x by. Everything the server computes from x~ (its optimizer,
learning rates, momentum) is post-processing. With C lower-triangular the guarantee
holds when each round's sum depends on the earlier releases (Denisov et al. 2022).

Sensitivity. A user who takes part in the rounds of a set P, each clipped delta of
norm at most 1 (the unit clip; everything scales with C), changes C x by sum_{t in P}
C[:, t] u_t. Its squared norm is sum_{s,t in P} G[s, t] <u_s, u_t> with G = C^T C, so

    sens(P)^2 <= sum_{s,t in P} |G[s, t]|,

with equality when G >= 0 entrywise (both mechanisms here: C >= 0) and the u_t are
aligned. The mechanism's sensitivity is the max over the participation patterns the
run allows (`Participation`): every round (one pattern), k fixed cohorts in a cyclic
order (k patterns), or at most m participations at least b rounds apart (many:
bounded, exactly where G vanishes beyond b-1 off the diagonal, as for b-banded C;
Choquette-Choo et al. 2023).

The two factorizations:

- `tree`: DP-FTRL's binary tree (Kairouz et al. 2021). The prefix sum of rounds 0..t-1
  is the sum of the dyadic nodes of [0, t); each node carries its own noise, so round
  t's noise is the difference of consecutive prefix noises. Only nodes some prefix
  uses are released (the rows of C); `restart` starts a new tree every so many rounds.
- `banded_mf`: C lower-triangular Toeplitz with b bands of the square root of the
  prefix-sum matrix, c_k = binom(2k, k) / 4^k (Kalinin and Lampert 2024's banded square
  root, BSR); w_t = (z_t - sum_{k=1}^{b-1} c_k w_{t-k}) / c_0 by forward substitution
  over the last b - 1 noises.

Both are entries of the `dp_mechanism` registry (`MatrixMechanism`), and so is a
researcher's own factorization: a frozen dataclass whose fields are `privacy.params`,
with `matrix(rounds)` (C) and, where the generic forward substitution over every past
round keeps too much, its own `noise(rounds, dim)`. fedsec derives the sensitivity and
the epsilon from C; tests/contracts checks that the noise is C^-1 z and resumes exactly.

`noise_multiplier` z of these mechanisms is that of the one Gaussian mechanism: each
z coordinate has standard deviation z * clip * sens, and the epsilon after t rounds is
the Gaussian mechanism's at multiplier z * sens / sens_t, where sens_t is the
sensitivity of the first t rounds' releases (`prefix_sensitivities`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch

from fedsec.registry import register


@dataclass(frozen=True)
class Participation:
    """Which rounds one user may take part in, over `rounds` rounds (0-based).

    every_round: all of them. cyclic: fixed cohorts in turn, a user every `period`-th
    round (from its cohort's offset). separated: at most `max_participations`, at
    least `min_separation` rounds apart (any offsets)."""

    kind: str
    rounds: int
    period: int = 1
    max_participations: int | None = None
    min_separation: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("every_round", "cyclic", "separated"):
            raise ValueError(f"unknown participation {self.kind!r}; use every_round, cyclic or separated")
        if self.rounds < 1 or self.period < 1:
            raise ValueError("rounds and period must be >= 1")
        if self.kind == "separated" and not (self.max_participations and self.min_separation):
            raise ValueError("separated participation needs max_participations and min_separation >= 1")

    def patterns(self) -> list[list[int]]:
        """The rounds of each maximal pattern (every_round, cyclic); separated has too many to list."""
        if self.kind == "every_round":
            return [list(range(self.rounds))]
        if self.kind == "cyclic":
            return [list(range(offset, self.rounds, self.period)) for offset in range(min(self.period, self.rounds))]
        raise ValueError("separated participation is bounded, not enumerated (see sensitivity)")


def tree_nodes(rounds: int, restart: int | None = None) -> list[tuple[int, int]]:
    """The (first round, length) of every tree node a prefix sum uses, in the order they
    complete. With `restart` a new tree begins every `restart` rounds."""
    period = restart or rounds
    nodes = []
    for base in range(0, rounds, period):
        length = min(period, rounds - base)
        used = set()
        for t in range(1, length + 1):
            used.update(_dyadic(t))
        nodes += sorted(((base + a, n) for a, n in used), key=lambda node: (node[0] + node[1], -node[1]))
    return nodes


def _dyadic(t: int) -> list[tuple[int, int]]:
    """The dyadic intervals (start, length) whose union is [0, t), largest first."""
    out, start = [], 0
    for level in range(t.bit_length() - 1, -1, -1):
        if t >> level & 1:
            out.append((start, 1 << level))
            start += 1 << level
    return out


def tree_matrix(rounds: int, restart: int | None = None) -> np.ndarray:
    """C of the tree: one row per used node, C[node, t] = 1 if round t lies in it."""
    nodes = tree_nodes(rounds, restart)
    c = np.zeros((len(nodes), rounds))
    for row, (start, length) in enumerate(nodes):
        c[row, start: start + length] = 1.0
    return c


def banded_sqrt_coefficients(bands: int) -> np.ndarray:
    """c_0..c_{bands-1} of the square root of the prefix-sum matrix: binom(2k, k) / 4^k."""
    if bands < 1:
        raise ValueError(f"bands must be >= 1, got {bands}")
    c = np.ones(bands)
    for k in range(1, bands):
        c[k] = c[k - 1] * (2 * k - 1) / (2 * k)  # binom(2k, k) / 4^k, by its ratio
    return c


def banded_matrix(rounds: int, bands: int) -> np.ndarray:
    """C: rounds x rounds lower-triangular Toeplitz, c_k on the k-th subdiagonal (k < bands)."""
    coefficients = banded_sqrt_coefficients(min(bands, rounds))
    c = np.zeros((rounds, rounds))
    for k, value in enumerate(coefficients):
        c += value * np.eye(rounds, k=-k)
    return c


class Noise(Protocol):
    """A correlated-noise state: round after round, the next noise vector."""

    def next(self, draw: Callable[[], torch.Tensor]) -> torch.Tensor: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class MatrixMechanism:
    """A correlated-noise mechanism given by its factorization C (module note). Subclasses
    are frozen dataclasses registered with `@fedsec.register("dp_mechanism", name)`;
    their fields are the mechanism's `privacy.params`, checked in __post_init__ (raise
    ValueError("field: what is wrong"))."""

    def matrix(self, rounds: int) -> np.ndarray:
        """C for a run of `rounds` rounds: square, lower-triangular, C^T C >= 0."""
        raise NotImplementedError

    def noise(self, rounds: int, dim: int) -> Noise:
        """The rounds' noises C^-1 z, one per round from one fresh draw each."""
        return MatrixNoise(self.matrix(rounds), dim)

    def describe(self) -> str:
        """A few words on the shape, for the console and `fedsec privacy`."""
        params = ", ".join(f"{f.name} {getattr(self, f.name)}" for f in dataclasses.fields(self))
        return params or "no parameters"


class MatrixNoise:
    """C^-1 z for any square lower-triangular C, by forward substitution: round t's noise
    w_t = (z_t - sum_{j<t} C[t, j] w_j) / C[t, t]. State: every past noise that a later
    row still needs (all of them for a dense C: rounds x dim floats, secret)."""

    def __init__(self, c: np.ndarray, dim: int):
        self.c, self.dim = np.asarray(c, dtype=np.float64), dim
        self.history: list[torch.Tensor] = []  # w_0 .. w_{t-1}

    def next(self, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        t = len(self.history)
        if t >= self.c.shape[0]:
            raise ValueError(f"the factorization covers {self.c.shape[0]} rounds; round {t + 1} has no row")
        w = draw().clone()
        for j, previous in enumerate(self.history):
            if self.c[t, j] != 0.0:
                w.sub_(previous, alpha=float(self.c[t, j]))
        w.div_(float(self.c[t, t]))
        self.history.append(w)
        return w

    def state_dict(self) -> dict:
        return {"history": [h.clone() for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [h.clone() for h in state["history"]]


@register("dp_mechanism", "tree")
@dataclass(frozen=True)
class Tree(MatrixMechanism):
    """DP-FTRL's binary-tree aggregation (Kairouz et al. 2021); `restart`: a new tree every
    so many rounds (None: one tree for the run)."""

    restart: int | None = None

    def __post_init__(self) -> None:
        if self.restart is not None and (not isinstance(self.restart, int) or self.restart < 1):
            raise ValueError("restart: must be null (one tree) or an integer >= 1")

    def matrix(self, rounds: int) -> np.ndarray:
        return tree_matrix(rounds, self.restart)

    def noise(self, rounds: int, dim: int) -> Noise:
        return TreeNoise(dim, self.restart)

    def describe(self) -> str:
        return f"restart every {self.restart} rounds" if self.restart else "one tree"


@register("dp_mechanism", "banded_mf")
@dataclass(frozen=True)
class BandedMf(MatrixMechanism):
    """The banded square root of the prefix-sum matrix (Kalinin and Lampert 2024), `bands`
    b bands: noises b or more rounds apart are independent."""

    bands: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.bands, int) or isinstance(self.bands, bool) or self.bands < 1:
            raise ValueError("bands: must be an integer >= 1, e.g. 4")

    def matrix(self, rounds: int) -> np.ndarray:
        return banded_matrix(rounds, self.bands)

    def noise(self, rounds: int, dim: int) -> Noise:
        return BandedNoise(banded_sqrt_coefficients(self.bands), dim)

    def describe(self) -> str:
        return f"bands {self.bands}"


class Sensitivity(NamedTuple):
    """A mechanism's unit sensitivity (clip norm 1) for a participation, and whether it
    is the exact max (else a proven upper bound)."""

    value: float
    exact: bool


def sensitivity(c: np.ndarray, participation: Participation) -> Sensitivity:
    """max over the allowed patterns P of sqrt(sum_{s,t in P} |G[s, t]|), G = C^T C (module note)."""
    g = np.abs(c.T @ c)
    nonnegative = bool((c.T @ c >= -1e-12).all())
    if participation.kind != "separated":
        worst = max(float(g[np.ix_(p, p)].sum()) for p in participation.patterns())
        return Sensitivity(math.sqrt(worst), nonnegative)
    m, b = participation.max_participations, participation.min_separation
    n = g.shape[0]
    # each chosen round s contributes at most its row's diagonal plus its m - 1 largest
    # entries at rounds >= b away; then the best set of <= m rounds >= b apart (dynamic programme)
    far = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) >= b
    row = np.array([g[s, s] + np.sort(g[s][far[s]])[::-1][: m - 1].sum() for s in range(n)])
    best = _best_separated(row, m, b)
    exact = m == 1 or not bool((g[far] > 1e-12).any())  # one column, or separated columns orthogonal
    return Sensitivity(math.sqrt(best), exact)


def _best_separated(values: np.ndarray, m: int, b: int) -> float:
    """max of sum(values[P]) over sets P of at most m indices at least b apart."""
    n = len(values)
    # best[j][i]: the best sum with j picks among indices >= i
    best = np.zeros((m + 1, n + b + 1))
    for i in range(n - 1, -1, -1):
        for j in range(1, m + 1):
            best[j, i] = max(best[j, i + 1], values[i] + best[j - 1, i + b])
    return float(best[m, 0])


def prefix_sensitivities(c: np.ndarray, participation: Participation) -> np.ndarray:
    """sens_t for t = 1..rounds: the sensitivity of what the first t rounds release, which
    gives the epsilon after t rounds. Both factorizations here release one row per round
    (C square lower-triangular: the tree's nodes in the order they complete), so that is
    C[:t, :t]. every_round and cyclic: with G >= 0 the squared sensitivity of rounds P is
    sum_i (sum_{j in P} C[i, j])^2, so every prefix at once from one product, O(rounds^2 k).
    separated: the whole run's bound for every prefix (a bound on each, conservative)."""
    n = c.shape[1]
    if c.shape != (n, n) or np.triu(c, 1).any():
        raise ValueError("prefix sensitivities need a square lower-triangular C (one release per round)")
    if participation.kind == "separated":
        return np.full(n, sensitivity(c, participation).value)
    if not (c.T @ c >= -1e-12).all():
        raise ValueError("prefix sensitivities need C^T C >= 0")
    patterns = participation.patterns()
    member = np.zeros((n, len(patterns)))
    for k, rounds in enumerate(patterns):
        member[rounds, k] = 1.0
    row_sums = c @ member  # [rounds, patterns]: what one client of each pattern adds to each released row
    return np.sqrt(np.cumsum(row_sums ** 2, axis=0).max(axis=1))


@dataclass(frozen=True)
class Accounting:
    """A mechanism's sensitivities for a participation, at clip norm 1 (`accounting`)."""

    sensitivity: float  # the whole run's
    exact: bool  # the max over the participation's patterns (else a proven upper bound)
    prefix: tuple[float, ...]  # sens_t, t = 1..rounds
    seconds: float  # what computing them took


MAX_ROUNDS = 5000  # C is rounds x rounds (200 MB of float64 at the bound); the separated bound is O(rounds^3)


@functools.lru_cache(maxsize=32)
def accounting(mechanism: MatrixMechanism, rounds: int, participation: Participation) -> Accounting:
    """The sensitivities a run's epsilon rests on, computed once per (mechanism with its
    parameters, rounds, participation) in a process: O(rounds^2 k) for every_round and
    cyclic (k patterns), O(rounds^3) for separated."""
    if rounds > MAX_ROUNDS:
        raise ValueError(f"{rounds} rounds: the factorization is computed for at most {MAX_ROUNDS}")
    started = time.perf_counter()
    c = np.asarray(mechanism.matrix(rounds), dtype=np.float64)
    if c.shape != (rounds, rounds) or np.triu(c, 1).any() or not (np.diag(c) > 0).all():
        raise ValueError(f"{type(mechanism).__name__}.matrix({rounds}) must be {rounds} x {rounds}, "
                         f"lower-triangular with a positive diagonal; it is {c.shape}")
    prefix = prefix_sensitivities(c, participation)
    if participation.kind == "separated":
        whole = sensitivity(c, participation)
    else:  # C >= 0: the row-sum form is the exact max (prefix_sensitivities)
        whole = Sensitivity(float(prefix[-1]), True)
    return Accounting(whole.value, whole.exact, tuple(float(v) for v in prefix), time.perf_counter() - started)


class BandedNoise:
    """The noise of banded_mf, one round at a time: w_t = (z_t - sum_{k>=1} c_k w_{t-k}) / c_0,
    so the rounds' noises are C^-1 z. State: the last bands - 1 noises (checkpointed:
    secret, like the noise itself)."""

    def __init__(self, coefficients: np.ndarray, dim: int):
        self.c = [float(v) for v in coefficients]
        self.dim = dim
        self.history: list[torch.Tensor] = []  # newest first, at most bands - 1

    def next(self, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Round t's noise from one fresh Gaussian draw z_t = `draw()` (already scaled)."""
        w = draw().clone()
        for k, previous in enumerate(self.history, start=1):
            w.sub_(previous, alpha=self.c[k])
        w.div_(self.c[0])
        self.history = [w, *self.history][: len(self.c) - 1]
        return w

    def state_dict(self) -> dict:
        return {"history": [h.clone() for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [h.clone() for h in state["history"]]


class TreeNoise:
    """The noise of the tree mechanism, one round at a time: round t's noise is the noise of
    prefix [0, t+1) minus that of [0, t), each the sum of its dyadic nodes' noise. State:
    the noise of the nodes of the current prefix (checkpointed: secret)."""

    def __init__(self, dim: int, restart: int | None = None):
        self.dim, self.restart = dim, restart
        self.round = 0
        self.nodes: dict[tuple[int, int], torch.Tensor] = {}

    def next(self, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Round t's noise; `draw()` gives a fresh scaled Gaussian vector per new node."""
        period = self.restart or (1 << 62)
        base, t = self.round - self.round % period, self.round % period
        before = {(base + a, n) for a, n in _dyadic(t)} if t else set()
        after = {(base + a, n) for a, n in _dyadic(t + 1)}
        fresh = {node: draw() for node in sorted(after - set(self.nodes))}
        nodes = {**{k: v for k, v in self.nodes.items() if k in before}, **fresh}
        w = torch.zeros_like(next(iter(fresh.values())))  # every round completes at least one new node
        for node in after:
            w.add_(nodes[node])
        for node in before:
            w.sub_(nodes[node])
        self.nodes = {k: nodes[k] for k in after}
        self.round += 1
        return w

    def state_dict(self) -> dict:
        return {"round": self.round, "nodes": [[a, n, v.clone()] for (a, n), v in self.nodes.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        self.nodes = {(int(a), int(n)): v.clone() for a, n, v in state["nodes"]}
