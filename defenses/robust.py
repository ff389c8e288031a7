"""Robust aggregation rules over stacked client deltas [n, d] (n clients, f attackers).

Each rule is a pure function of the deltas, the clients' weights (example counts)
and whatever else its paper needs (an explicit generator for noise, the server's
reference update, the previous aggregate, the clients' update histories), and
returns `Aggregated`: the aggregate, each client's weight in it, and diagnostics.

    weighted_mean      FedAvg; no robustness (the baseline every rule is measured against)
    median             coordinate-wise median (Yin et al. 2018)
    trimmed_mean       coordinate-wise, drop the k = floor(beta n) largest and smallest
                       (Yin et al. 2018); f <= k < n / 2
    multi_krum         Krum / Multi-Krum (Blanchard et al. 2017): score = sum of squared
                       distances to the n - f - 2 nearest others; average the m best;
                       n >= 2f + 3
    bulyan             theta = n - 2f deltas by repeated Krum, then per coordinate the
                       mean of the theta - 2f values closest to the median (El Mhamdi et
                       al. 2018); n >= 4f + 3
    geometric_median   RFA (Pillutla et al. 2022): smoothed Weiszfeld iterations
    norm_bound         Sun et al. 2019: scale each delta to norm <= M, then the mean
    centered_clip      Karimireddy et al. 2021: v <- v + mean_i (x_i - v) min(1, tau / |x_i - v|)
                       from the previous aggregate
    fltrust            Cao et al. 2021: trust ReLU(cos(x_i, g0)) against the server's own
                       update g0 on a small clean root set; each x_i rescaled to |g0|
    flame              Nguyen et al. 2022: HDBSCAN on cosine distances keeps the majority
                       cluster, clip to the median norm, add N(0, (lambda S)^2)
    foolsgold          Fung et al. 2020: down-weight clients whose update histories point
                       in too similar directions (sybils)

Pairwise rules use one Gram-matrix product over the centred deltas (centring leaves
distances unchanged and keeps float32 cancellation small), accumulated over column
chunks so memory stays O(n^2 + n * chunk) beyond the deltas themselves.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

CHUNK = 1 << 20  # columns per chunk in the Gram and distance computations


def weighted_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FedAvg (McMahan et al. 2017, eq. in Alg. 1): sum_k (n_k / n) * delta_k.

    deltas: [num_clients, dim]; weights: [num_clients], non-negative (example counts).
    """
    if deltas.ndim != 2 or weights.shape != (deltas.shape[0],):
        raise ValueError(f"expected deltas [n, d] and weights [n], got {tuple(deltas.shape)} "
                         f"and {tuple(weights.shape)}")
    w = weights.to(torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    return ((w / w.sum()).to(deltas.dtype) @ deltas)


@dataclass(frozen=True)
class Aggregated:
    """A rule's output. `weights[i]` is client i's weight in the aggregate: its delta's
    coefficient for rules that combine whole deltas (0: excluded), the share of
    coordinates it supplied for coordinate-wise rules. `info`: rule diagnostics."""

    vector: torch.Tensor
    weights: torch.Tensor
    info: dict = field(default_factory=dict)


def _check(deltas: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    if deltas.ndim != 2 or deltas.shape[0] == 0:
        raise ValueError(f"expected deltas [n >= 1, d], got {tuple(deltas.shape)}")
    if weights is None:
        return torch.ones(deltas.shape[0], dtype=torch.float64, device=deltas.device)
    if weights.shape != (deltas.shape[0],) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError("weights must be [n], non-negative, with a positive sum")
    return weights.to(torch.float64)


def _combine(deltas: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """sum_i coef_i x_i in the deltas' dtype (coef in float64)."""
    return coef.to(deltas.dtype) @ deltas


def _inner_products(vectors: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """X X^T (float64) of the rows (minus `center`), one matrix product per column chunk.

    Symmetrized: a BLAS may round (i, j) and (j, i) differently (seen on an AMD EPYC),
    and HDBSCAN refuses an asymmetric distance matrix."""
    g = torch.zeros(vectors.shape[0], vectors.shape[0], dtype=torch.float64, device=vectors.device)
    for start in range(0, vectors.shape[1], CHUNK):
        block = vectors[:, start: start + CHUNK]
        if center is not None:
            block = block - center[start: start + CHUNK]
        g += (block @ block.T).double()
    return (g + g.T) / 2


def gram(deltas: torch.Tensor) -> torch.Tensor:
    """G = X_c X_c^T (float64) of the centred deltas."""
    return _inner_products(deltas, deltas.mean(0))


def pairwise_sq_distances(deltas: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j||^2 for all pairs [n, n] (float64), from one Gram matrix."""
    g = gram(deltas)
    sq = g.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * g).clamp(min=0).fill_diagonal_(0)


def cosine_similarities(vectors: torch.Tensor) -> torch.Tensor:
    """cos(x_i, x_j) [n, n] (float64; a zero vector has cosine 0 with everything)."""
    g = _inner_products(vectors)
    norms = g.diagonal().sqrt()
    return g / torch.outer(norms, norms).clamp(min=1e-300)


def distances_to(deltas: torch.Tensor, point: torch.Tensor | None = None) -> torch.Tensor:
    """||x_i - point|| [n] (float64; point None: the norms), column chunk by column chunk."""
    total = torch.zeros(deltas.shape[0], dtype=torch.float64, device=deltas.device)
    for start in range(0, deltas.shape[1], CHUNK):
        block = deltas[:, start: start + CHUNK]
        if point is not None:
            block = block - point[start: start + CHUNK]
        total += torch.linalg.vector_norm(block, dim=1, dtype=torch.float64) ** 2
    return total.sqrt()


# ---------------------------------------------------------------------------
# Averaging and coordinate-wise rules.


def mean(deltas: torch.Tensor, weights: torch.Tensor | None = None) -> Aggregated:
    w = _check(deltas, weights)
    return Aggregated(weighted_mean(deltas, w), w / w.sum())


# The coordinate-wise rules work on blocks of SELECT_BLOCK columns: a block's transposed copy
# [SELECT_BLOCK, n] (one row per coordinate) stays in cache, and numpy's vectorized sort of each
# short row, on torch's threads, costs a few passes over the deltas where torch's sort along
# the clients' axis cost about 200 (benchmarks/server_pipeline.py). Order statistics are
# read from the sorted rows; each client's share of the coordinates comes from values, not
# sort positions, so tied values share a position (`_window_shares`).
SELECT_BLOCK = 4096


def _by_column_blocks(deltas: torch.Tensor, work, rows: torch.Tensor | None = None) -> np.ndarray:
    """Sum of `work(start, values, ordered)` over the column blocks of deltas[rows]: `values`
    the block transposed ([B, k] numpy, k rows in `rows` order), `ordered` each of its rows
    sorted. `work` writes its part of the aggregate and returns each row's share [k]."""
    x = deltas.detach().cpu().numpy()
    picked = None if rows is None else rows.cpu().numpy()

    def one(start: int) -> np.ndarray:
        block = x[:, start: start + SELECT_BLOCK] if picked is None else x[picked, start: start + SELECT_BLOCK]
        values = np.ascontiguousarray(block.T)
        return work(start, values, np.sort(values, axis=1))

    starts = range(0, x.shape[1], SELECT_BLOCK)
    threads = max(1, min(torch.get_num_threads(), len(starts)))
    if threads == 1:
        parts = [one(start) for start in starts]
    else:
        with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL in sort and compare
            parts = list(pool.map(one, starts))
    return np.sum(parts, axis=0, dtype=np.float64)


def _window_shares(values: np.ndarray, ordered: np.ndarray, lo, hi) -> np.ndarray:
    """How many of each row's sorted positions lo <= p < hi (ints, or one per row) each client
    holds, summed over the rows ([k] float64). A value strictly inside the window holds one
    position; the positions a value at the window's edge has inside it are shared equally
    among all its copies (ties across the edge), so no tie is settled by the sort's order."""
    rows, k = np.arange(len(ordered)), ordered.shape[1]
    lo, hi = np.broadcast_to(lo, rows.shape), np.broadcast_to(hi, rows.shape)
    first, last = ordered[rows, lo], ordered[rows, hi - 1]
    inside = (values >= first[:, None]) & (values <= last[:, None])
    shares = inside.sum(0, dtype=np.float64)
    crosses = (((lo > 0) & (ordered[rows, np.maximum(lo - 1, 0)] == first))
               | ((hi < k) & (ordered[rows, np.minimum(hi, k - 1)] == last)))
    if crosses.any():  # rare: re-count those rows exactly
        v, o, a, b, lo_v, hi_v = (values[crosses], ordered[crosses], lo[crosses], hi[crosses],
                                  first[crosses, None], last[crosses, None])
        at_lo, at_hi = v == lo_v, v == hi_v
        lo_in = np.minimum(b, (o <= lo_v).sum(1)) - a  # copies of the first value inside the window
        hi_in = b - np.maximum(a, (o < hi_v).sum(1))
        hi_in = np.where(lo_v[:, 0] == hi_v[:, 0], 0, hi_in)  # one value fills the window: counted once
        exact = (((v > lo_v) & (v < hi_v)).sum(0, dtype=np.float64)
                 + (lo_in / at_lo.sum(1)) @ at_lo + (hi_in / at_hi.sum(1)) @ at_hi)
        shares += exact - inside[crosses].sum(0, dtype=np.float64)
    return shares


def _middle(ordered: np.ndarray) -> np.ndarray:
    """Each sorted row's median (the mean of the two middle values when the length is even)."""
    n = ordered.shape[1]
    return ordered[:, n // 2] if n % 2 else (ordered[:, n // 2 - 1] + ordered[:, n // 2]) / 2


def _middle_shares(values: np.ndarray, ordered: np.ndarray) -> np.ndarray:
    n = ordered.shape[1]
    middle = [n // 2] if n % 2 else [n // 2 - 1, n // 2]  # the one or two positions the median reads
    return sum(_window_shares(values, ordered, p, p + 1) for p in middle) / len(middle)


def median(deltas: torch.Tensor, weights: torch.Tensor | None = None) -> Aggregated:
    """Coordinate-wise median (Yin et al. 2018); client weights are not used."""
    _check(deltas, weights)
    out = np.empty(deltas.shape[1], dtype=_numpy_dtype(deltas))

    def work(start, values, ordered):
        out[start: start + len(values)] = _middle(ordered)
        return _middle_shares(values, ordered)

    share = _by_column_blocks(deltas, work)
    return Aggregated(_back(out, deltas), _back(share / deltas.shape[1], deltas, torch.float64))


def trimmed_mean(deltas: torch.Tensor, weights: torch.Tensor | None = None, beta: float = 0.1) -> Aggregated:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018): per coordinate drop the
    k = floor(beta n) largest and k smallest values, average the rest (summed in float64).
    Needs 2k < n; tolerates f <= k attackers. Client weights are not used."""
    _check(deltas, weights)
    n, d = deltas.shape
    k = math.floor(beta * n)
    if not 0 <= beta < 0.5 or 2 * k >= n:
        raise ValueError(f"trimmed_mean needs 0 <= beta < 1/2 and 2 floor(beta n) < n (beta {beta}, n {n})")
    out = np.empty(d, dtype=_numpy_dtype(deltas))

    def work(start, values, ordered):
        out[start: start + len(values)] = ordered[:, k: n - k].mean(1, dtype=np.float64)
        return _window_shares(values, ordered, k, n - k)

    kept = _by_column_blocks(deltas, work)
    return Aggregated(_back(out, deltas), _back(kept / (d * (n - 2 * k)), deltas, torch.float64),
                      {"trimmed_per_side": k})


def _numpy_dtype(deltas: torch.Tensor):
    return torch.empty(0, dtype=deltas.dtype, device="cpu").numpy().dtype


def _back(array: np.ndarray, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.from_numpy(array).to(device=like.device, dtype=dtype or like.dtype)


# ---------------------------------------------------------------------------
# Distance-based selection.


def krum_scores(sq_dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each point: the sum of its squared distances to its
    max(1, n - f - 2) nearest other points (Blanchard et al. 2017, Sec. 4)."""
    n = sq_dist.shape[0]
    nearest = max(1, n - f - 2)
    others = sq_dist + torch.diag(torch.full((n,), math.inf, dtype=sq_dist.dtype, device=sq_dist.device))
    return others.topk(min(nearest, n - 1), dim=1, largest=False).values.sum(1) if n > 1 else sq_dist[0]


def multi_krum(deltas: torch.Tensor, weights: torch.Tensor | None = None, f: int = 0,
               m: int = 1) -> Aggregated:
    """Multi-Krum: the (weighted) mean of the m deltas with the lowest Krum scores
    (m = 1: Krum, which returns one client's delta). Needs n >= 2f + 3."""
    w = _check(deltas, weights)
    n = deltas.shape[0]
    if n < 2 * f + 3 or not 1 <= m <= n:
        raise ValueError(f"krum needs n >= 2f + 3 and 1 <= m <= n (n {n}, f {f}, m {m})")
    scores = krum_scores(pairwise_sq_distances(deltas), f)
    chosen = scores.argsort(stable=True)[:m]
    coef = torch.zeros(n, dtype=torch.float64, device=deltas.device)
    coef[chosen] = w[chosen] / w[chosen].sum()
    return Aggregated(_combine(deltas, coef), coef, {"selected": sorted(chosen.tolist()),
                                                     "scores": scores.tolist()})


def bulyan(deltas: torch.Tensor, weights: torch.Tensor | None = None, f: int = 0) -> Aggregated:
    """Bulyan (El Mhamdi et al. 2018): select theta = n - 2f deltas by repeated Krum
    (each time on the remaining set), then per coordinate average the beta = theta - 2f
    selected values closest to their median. Needs n >= 4f + 3. Weights not used."""
    _check(deltas, weights)
    n, d = deltas.shape
    if n < 4 * f + 3:
        raise ValueError(f"bulyan needs n >= 4f + 3 (n {n}, f {f})")
    sq = pairwise_sq_distances(deltas)
    remaining, selected = list(range(n)), []
    for _ in range(n - 2 * f):
        sub = sq[remaining][:, remaining]
        best = remaining[int(krum_scores(sub, f).argsort(stable=True)[0])]
        selected.append(best)
        remaining.remove(best)
    chosen = torch.tensor(sorted(selected), device=deltas.device)
    theta, beta = len(selected), len(selected) - 2 * f
    out = np.empty(d, dtype=_numpy_dtype(deltas))
    span = np.arange(beta)

    def work(start, values, ordered):
        # the beta values closest to the median are a window of the sorted row: the one whose
        # farther end is nearest the median (its first such window on a tie)
        centre = _middle(ordered)[:, None]
        first = np.maximum(centre - ordered[:, : theta - beta + 1], ordered[:, beta - 1:] - centre).argmin(1)
        window = np.take_along_axis(ordered, first[:, None] + span, 1)
        out[start: start + len(values)] = window.mean(1, dtype=np.float64)
        return _window_shares(values, ordered, first, first + beta)

    used = torch.zeros(n, dtype=torch.float64, device=deltas.device)
    used[chosen] = _back(_by_column_blocks(deltas, work, chosen), deltas, torch.float64)
    return Aggregated(_back(out, deltas), used / (d * beta), {"selected": chosen.tolist(), "beta": beta})


# ---------------------------------------------------------------------------
# Geometric median and clipping rules.


def geometric_median(deltas: torch.Tensor, weights: torch.Tensor | None = None, nu: float = 1e-6,
                     max_iter: int = 100, ftol: float = 1e-7) -> Aggregated:
    """RFA (Pillutla et al. 2022, Alg. 2): smoothed Weiszfeld from the weighted mean,
    v <- sum_i b_i x_i / sum_i b_i with b_i = w_i / max(nu, ||v - x_i||), until the
    objective sum_i w_i ||v - x_i|| improves by less than ftol (relative)."""
    w = _check(deltas, weights)
    w = w / w.sum()
    v = _combine(deltas, w)
    objective = float((w * distances_to(deltas, v)).sum())
    coef, iterations = w, 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        b = w / distances_to(deltas, v).clamp(min=nu)
        coef = b / b.sum()
        v = _combine(deltas, coef)
        new = float((w * distances_to(deltas, v)).sum())
        done = abs(objective - new) <= ftol * max(new, 1e-300)
        objective = new
        if done:
            break
    return Aggregated(v, coef, {"iterations": iterations, "objective": objective})


def _clip_factors(norms: torch.Tensor, bound: float) -> torch.Tensor:
    return torch.where(norms > bound, bound / norms.clamp(min=1e-300), torch.ones_like(norms))


def norm_bound(deltas: torch.Tensor, weights: torch.Tensor | None = None, max_norm: float = 1.0) -> Aggregated:
    """Norm bounding (Sun et al. 2019): x_i / max(1, ||x_i|| / M), then the weighted mean."""
    w = _check(deltas, weights)
    if not max_norm > 0:
        raise ValueError(f"norm_bound needs max_norm > 0, got {max_norm}")
    scale = _clip_factors(distances_to(deltas), max_norm)
    coef = w / w.sum() * scale
    return Aggregated(_combine(deltas, coef), coef, {"clipped": int((scale < 1).sum())})


def centered_clip(deltas: torch.Tensor, weights: torch.Tensor | None = None, tau: float = 1.0,
                  iters: int = 3, center: torch.Tensor | None = None) -> Aggregated:
    """Centered clipping (Karimireddy et al. 2021): from `center` (the previous round's
    aggregate; zeros if none), `iters` times v <- v + sum_i w_i (x_i - v) min(1, tau / ||x_i - v||)
    with w normalized to sum 1."""
    w = _check(deltas, weights)
    w = w / w.sum()
    if not tau > 0 or iters < 1:
        raise ValueError(f"centered_clip needs tau > 0 and iters >= 1 (tau {tau}, iters {iters})")
    v = (torch.zeros(deltas.shape[1], dtype=deltas.dtype, device=deltas.device) if center is None
         else center.to(deltas.device, deltas.dtype))
    for _ in range(iters):
        scale = _clip_factors(distances_to(deltas, v), tau)
        coef = w * scale
        v = v + _combine(deltas, coef) - float(coef.sum()) * v
    return Aggregated(v, coef, {"clipped_last_iter": int((scale < 1).sum())})


def fltrust(deltas: torch.Tensor, weights: torch.Tensor | None = None,
            reference: torch.Tensor | None = None) -> Aggregated:
    """FLTrust (Cao et al. 2021): trust_i = ReLU(cos(x_i, g0)) against the server's
    update g0 on its clean root set; each x_i rescaled to ||g0||; the trust-weighted
    mean. No positive trust at all gives the zero update. Client weights not used."""
    _check(deltas, weights)
    if reference is None or reference.shape != deltas.shape[1:]:
        raise ValueError("fltrust needs the server's reference update g0 of the deltas' size")
    both = cosine_similarities(torch.cat([reference[None], deltas]))
    trust = both[0, 1:].clamp(min=0)
    norms = distances_to(deltas)
    ref_norm = float(reference.double().norm())
    if float(trust.sum()) == 0:
        return Aggregated(torch.zeros_like(reference), trust, {"trust": trust.tolist()})
    coef = trust / trust.sum() * ref_norm / norms.clamp(min=1e-300)
    return Aggregated(_combine(deltas, coef), coef, {"trust": trust.tolist()})


def flame(deltas: torch.Tensor, weights: torch.Tensor | None = None,
          generator: torch.Generator | None = None, noise_lambda: float = 0.001) -> Aggregated:
    """FLAME (Nguyen et al. 2022, Alg. 1): HDBSCAN over pairwise cosine distances with
    min_cluster_size n/2 + 1 admits the majority cluster; every delta is clipped to
    the median norm S of all deltas; the admitted ones are averaged; N(0, (lambda S)^2 I)
    is added (FLAME's own noise: it certifies no differential privacy)."""
    from sklearn.cluster import HDBSCAN

    _check(deltas, weights)
    n = deltas.shape[0]
    distance = (1 - cosine_similarities(deltas)).clamp(min=0).fill_diagonal_(0).numpy()
    if n < 3:
        admitted = torch.ones(n, dtype=torch.bool, device=deltas.device)
    else:
        labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                         allow_single_cluster=True, copy=True).fit(distance).labels_
        labels = torch.as_tensor(labels, device=deltas.device)
        found = bool((labels >= 0).any())
        admitted = (labels == int(torch.bincount(labels[labels >= 0]).argmax()) if found
                    else torch.ones(n, dtype=torch.bool, device=deltas.device))
    norms = distances_to(deltas)
    bound = float(norms.median()) if n % 2 else float(norms.sort().values[n // 2 - 1: n // 2 + 1].mean())
    coef = torch.where(admitted, _clip_factors(norms, bound), torch.zeros_like(norms)) / int(admitted.sum())
    out = _combine(deltas, coef)
    if noise_lambda > 0:
        if generator is None:
            raise ValueError("flame adds noise: pass its generator")
        out = out + (noise_lambda * bound * torch.randn(out.shape, generator=generator, dtype=torch.float64,
                                                        device=generator.device)).to(out.device, out.dtype)
    return Aggregated(out, coef, {"admitted": torch.nonzero(admitted)[:, 0].tolist(), "clip_bound": bound})


def foolsgold_weights(histories: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """FoolsGold's learning-rate weights alpha_i in [0, 1] (Fung et al. 2020, Alg. 1)
    from the clients' summed update histories [n, d]."""
    n = histories.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.float64, device=histories.device)
    cs = cosine_similarities(histories).fill_diagonal_(-math.inf)
    top = cs.max(1).values
    # pardoning: a client less similar to anyone than j is to someone keeps cs_ij * v_i / v_j
    ratio = top[:, None] / top[None, :]
    cs = torch.where(top[:, None] < top[None, :], cs * ratio, cs).fill_diagonal_(-math.inf)
    alpha = (1 - cs.max(1).values).clamp(0, 1)
    if float(alpha.max()) == 0:
        return alpha  # every history points the same way: all look like sybils
    alpha = alpha / alpha.max()
    alpha = torch.where(alpha == 1, torch.full_like(alpha, 0.99), alpha)
    logit = kappa * (torch.log(alpha / (1 - alpha)) + 0.5)
    return torch.where(torch.isinf(logit) & (logit > 0), torch.ones_like(logit), logit).clamp(0, 1)


def foolsgold(deltas: torch.Tensor, weights: torch.Tensor | None = None,
              histories: torch.Tensor | None = None, kappa: float = 1.0) -> Aggregated:
    """FoolsGold: sum_i a_i w_i x_i / sum_i a_i w_i with a_i = foolsgold_weights(histories)
    (each client's history includes this round's delta). All a_i = 0: the zero update."""
    w = _check(deltas, weights)
    if histories is None or histories.shape != deltas.shape:
        raise ValueError("foolsgold needs each client's update history, the deltas' shape")
    alpha = foolsgold_weights(histories, kappa)
    total = float((alpha * w).sum())
    coef = alpha * w / total if total > 0 else torch.zeros_like(w)
    return Aggregated(_combine(deltas, coef), coef, {"alpha": alpha.tolist()})
