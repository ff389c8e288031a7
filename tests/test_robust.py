"""Robust aggregators: a shared contract, hand-computed cases, and resistance to attacks."""

from __future__ import annotations

import math

import pytest
import torch

from fedsec.defenses import robust
from fedsec.defenses.robust import (
    bulyan,
    centered_clip,
    flame,
    fltrust,
    foolsgold,
    foolsgold_weights,
    geometric_median,
    krum_scores,
    mean,
    median,
    multi_krum,
    norm_bound,
    pairwise_sq_distances,
    trimmed_mean,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# Each rule with parameters that suit n = 11 clients (f = 2 attackers at most).
RULES = {
    "mean": lambda x, w, **_: mean(x, w),
    "median": lambda x, w, **_: median(x, w),
    "trimmed_mean": lambda x, w, **_: trimmed_mean(x, w, beta=0.2),
    "krum": lambda x, w, **_: multi_krum(x, w, f=2, m=1),
    "multi_krum": lambda x, w, **_: multi_krum(x, w, f=2, m=5),
    "bulyan": lambda x, w, **_: bulyan(x, w, f=2),
    "geometric_median": lambda x, w, **_: geometric_median(x, w, ftol=1e-13, max_iter=1000),
    "norm_bound": lambda x, w, **_: norm_bound(x, w, max_norm=100.0),
    "centered_clip": lambda x, w, center=None, **_: centered_clip(x, w, tau=100.0, iters=5, center=center),
    "fltrust": lambda x, w, reference=None, **_: fltrust(x, w, reference=reference),
    "flame": lambda x, w, **_: flame(x, w, generator=_gen(), noise_lambda=0.0),
}


def _honest(n=11, d=40, seed=0, spread=0.1):
    g = _gen(seed)
    center = torch.randn(d, generator=g)
    return center, center + spread * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("name", sorted(RULES))
def test_identical_clients_give_their_update(name):
    u = torch.randn(40, generator=_gen(1))
    x = u.repeat(11, 1)
    out = RULES[name](x, torch.ones(11), reference=u)
    torch.testing.assert_close(out.vector, u, rtol=1e-5, atol=1e-6)
    assert out.weights.shape == (11,)


# FoolsGold is left out of the identical-clients contract on purpose: identical
# update histories are exactly the sybils it exists to zero out (tested below).
WITH_HISTORY = {**RULES, "foolsgold": lambda x, w, **_: foolsgold(x, w, histories=x)}


@pytest.mark.parametrize("name", sorted(WITH_HISTORY))
def test_permuting_clients_changes_nothing(name):
    _, x = _honest()
    w = torch.arange(1, 12, dtype=torch.float64)
    perm = torch.randperm(11, generator=_gen(2))
    ref = x.mean(0)
    a = WITH_HISTORY[name](x, w, reference=ref)
    b = WITH_HISTORY[name](x[perm], w[perm], reference=ref)
    torch.testing.assert_close(a.vector, b.vector, rtol=1e-5, atol=1e-6)
    # FoolsGold's logit amplifies the float32 Gram's rounding, which depends on the row order
    # (2e-6 on an AMD EPYC); the other rules' weights agree to 1e-8
    torch.testing.assert_close(a.weights[perm], b.weights, rtol=1e-5, atol=1e-5 if name == "foolsgold" else 1e-8)
    assert a.vector.shape == (40,) and bool(torch.isfinite(a.vector).all())


@pytest.mark.parametrize("name", ["mean", "geometric_median", "norm_bound", "centered_clip"])
def test_integer_weights_equal_repeated_clients(name):
    """Where a rule weighs clients, weight 3 means the same as the client sent three times."""
    _, x = _honest(n=5)
    w = torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0])
    repeated = torch.cat([x[i].repeat(int(w[i]), 1) for i in range(5)])
    a = RULES[name](x, w)
    b = RULES[name](repeated, torch.ones(repeated.shape[0]))
    torch.testing.assert_close(a.vector, b.vector, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Small cases computed by hand from the papers' definitions.


def test_krum_scores_of_five_points_by_hand():
    # points on a line (2-D, y = 0): 0, 1, 2, 4, 10; f = 1 -> n - f - 2 = 2 nearest others
    x = torch.tensor([[0.0, 0], [1, 0], [2, 0], [4, 0], [10, 0]])
    scores = krum_scores(pairwise_sq_distances(x), f=1)
    # 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 4 = 5; 4: 4 + 9 = 13; 10: 36 + 64 = 100
    torch.testing.assert_close(scores, torch.tensor([5.0, 2, 5, 13, 100], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    out = multi_krum(x, f=1, m=1)
    assert out.info["selected"] == [1]
    torch.testing.assert_close(out.vector, x[1])
    three = multi_krum(x, f=1, m=3)  # scores 2, 5, 5: points 1, 0 and 2
    assert three.info["selected"] == [0, 1, 2]
    torch.testing.assert_close(three.vector, torch.tensor([1.0, 0]))


def test_median_and_trimmed_mean_of_known_columns():
    x = torch.tensor([[1.0, 10], [2, 20], [3, -30], [4, 40], [100, 50]])
    torch.testing.assert_close(median(x).vector, torch.tensor([3.0, 20]))
    torch.testing.assert_close(median(x[:4]).vector, torch.tensor([2.5, 15.0]))  # even n: middle two
    # beta = 0.2, n = 5: drop 1 from each end -> column 0: 2, 3, 4; column 1: 10, 20, 40
    out = trimmed_mean(x, beta=0.2)
    torch.testing.assert_close(out.vector, torch.tensor([3.0, 70 / 3]))
    # client 4 (100, 50) is trimmed in both columns, client 1 (2, 20) kept in both
    assert float(out.weights[4]) == 0 and float(out.weights[1]) == pytest.approx(1 / 3)
    assert float(out.weights.sum()) == pytest.approx(1.0)


def test_weiszfeld_converges_to_the_geometric_median_of_a_symmetric_set():
    # the four corners of a square and one far point on the diagonal's extension: the
    # geometric median of the corners is the centre; with 3 points at (0,0) and one
    # each at (1,0) and (0,1) it is (0,0) (a point holding half the weight or more)
    square = torch.tensor([[1.0, 1], [1, -1], [-1, 1], [-1, -1]])
    out = geometric_median(square)
    torch.testing.assert_close(out.vector, torch.zeros(2), atol=1e-6, rtol=0)
    heavy = torch.tensor([[0.0, 0], [1, 0], [0, 1]])
    out = geometric_median(heavy, torch.tensor([3.0, 1, 1]), nu=1e-9, max_iter=500, ftol=1e-12)
    assert float(out.vector.norm()) < 1e-3
    # an asymmetric set: compare with scipy's minimizer of sum_i ||v - x_i||
    from scipy.optimize import minimize

    pts = torch.tensor([[0.0, 0], [4, 0], [0, 3], [5, 5], [1, 1]])
    best = minimize(lambda v: sum(((v - p.numpy()) ** 2).sum() ** 0.5 for p in pts), [1.0, 1.0],
                    method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12}).x
    out = geometric_median(pts, nu=1e-9, max_iter=1000, ftol=1e-14)
    torch.testing.assert_close(out.vector.double(), torch.tensor(best), atol=1e-4, rtol=0)


def test_bulyan_by_hand():
    # n = 7, f = 1: theta = 5 by repeated Krum, beta = 3 closest to the median per coordinate
    x = torch.tensor([[0.0], [1], [2], [3], [4], [50], [-60]])
    out = bulyan(x, f=1)
    assert out.info["selected"] == [0, 1, 2, 3, 4]  # the two outliers never win Krum
    torch.testing.assert_close(out.vector, torch.tensor([2.0]))  # median 2, closest 1, 2, 3
    with pytest.raises(ValueError, match="4f \\+ 3"):
        bulyan(x[:6], f=1)


def test_norm_bound_and_centered_clip_by_hand():
    x = torch.tensor([[3.0, 4], [0, 1]])  # norms 5 and 1
    out = norm_bound(x, max_norm=2.0)
    torch.testing.assert_close(out.vector, torch.tensor([(1.2 + 0) / 2, (1.6 + 1) / 2]))
    # one iteration from 0 with tau 2: steps (1.2, 1.6) and (0, 1) averaged
    cc = centered_clip(x, tau=2.0, iters=1)
    torch.testing.assert_close(cc.vector, torch.tensor([0.6, 1.3]))


def test_fltrust_by_hand():
    g0 = torch.tensor([1.0, 0])
    x = torch.tensor([[2.0, 0], [0, 3], [-1, 0], [1, 1]])
    # trust: cos 1, 0, -1 -> 0, 1/sqrt2; rescaled to |g0| = 1: (1, 0) and (1, 1)/sqrt2
    out = fltrust(x, reference=g0)
    t = 1 / math.sqrt(2)
    expected = (torch.tensor([1.0, 0]) + t * torch.tensor([t, t])) / (1 + t)
    torch.testing.assert_close(out.vector, expected)
    assert out.info["trust"][1] == 0 and out.info["trust"][2] == 0


def test_flame_drops_the_minority_direction_and_adds_its_noise():
    _, honest = _honest(n=8, spread=0.05)
    evil = -honest[:3] * 3  # opposite direction, larger norm
    x = torch.cat([honest, evil])
    out = flame(x, generator=_gen(), noise_lambda=0.0)
    admitted = out.info["admitted"]  # HDBSCAN may call an honest edge point noise, never an attacker
    assert set(admitted) <= set(range(8)) and len(admitted) >= 11 // 2 + 1
    clip = out.info["clip_bound"]
    kept = honest[admitted]
    expected = (kept * (clip / kept.norm(dim=1, keepdim=True)).clamp(max=1)).mean(0)
    torch.testing.assert_close(out.vector, expected, rtol=1e-5, atol=1e-6)
    noisy = flame(x, generator=_gen(5), noise_lambda=0.1)
    noise = noisy.vector - out.vector
    assert float(noise.std()) == pytest.approx(0.1 * out.info["clip_bound"], rel=0.3)


def test_foolsgold_weights_sybils_down():
    g = _gen(3)
    honest = torch.randn(5, 30, generator=g)  # independent directions
    sybil = torch.randn(30, generator=g)
    sybils = sybil + 0.01 * torch.randn(3, 30, generator=g)  # three near-copies
    alpha = foolsgold_weights(torch.cat([honest, sybils]))
    assert bool((alpha[5:] < 0.05).all()) and bool((alpha[:5] > 0.5).all())
    assert float(alpha.max()) <= 1 and float(alpha.min()) >= 0
    # all histories identical: everyone looks like a sybil
    assert float(foolsgold_weights(sybil.repeat(4, 1)).max()) == 0
    x = torch.cat([honest, sybils])
    out = foolsgold(x, histories=x)
    assert float(out.weights[5:].sum()) < 0.05


# ---------------------------------------------------------------------------
# Each rule resists what it claims to.


ATTACKS = {
    "sign_flip_x10": lambda honest, f: -10 * honest[:f],
    "scaled_x50": lambda honest, f: 50 * honest[:f],
}
RESISTANT = ["median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median",
             "centered_clip", "fltrust", "flame"]


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("name", RESISTANT)
def test_rule_stays_near_the_honest_mean_under_attack_while_the_mean_does_not(name, attack):
    center, honest = _honest(n=9, d=40, spread=0.1)  # honest deltas around `center`
    f = 2
    x = torch.cat([ATTACKS[attack](honest, f), honest])  # 11 clients, 2 of them attackers
    w = torch.ones(11)
    honest_mean = honest.mean(0)
    plain = float((mean(x, w).vector - honest_mean).norm())
    kwargs = {"reference": center + 0.1 * torch.randn(40, generator=_gen(7)),  # FLTrust's root update
              "center": honest_mean + 0.05 * torch.randn(40, generator=_gen(8))}  # CC: last aggregate
    if name == "centered_clip":
        out = centered_clip(x, w, tau=1.0, iters=3, center=kwargs["center"])
    else:
        out = RULES[name](x, w, **kwargs)
    robust_err = float((out.vector - honest_mean).norm())
    spread = 0.1 * math.sqrt(40)  # an honest delta's typical distance from the centre
    assert plain > 3 * spread  # the attack moves the mean far
    assert robust_err < spread, (name, robust_err, plain)


def test_gram_distances_equal_direct_distances_in_chunks(monkeypatch):
    monkeypatch.setattr(robust, "CHUNK", 7)  # several column chunks
    x = 100 + torch.randn(6, 30, generator=_gen(4))  # far from the origin: centring matters
    direct = torch.cdist(x.double(), x.double()) ** 2
    torch.testing.assert_close(pairwise_sq_distances(x), direct, rtol=1e-5, atol=1e-4)


def test_rules_refuse_too_many_attackers():
    x = torch.randn(6, 4, generator=_gen())
    with pytest.raises(ValueError, match="2f \\+ 3"):
        multi_krum(x, f=2)
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(x, beta=0.5)


def _by_sorting(x: torch.Tensor, name: str, f: int = 0, beta: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The coordinate-wise rules from a full sort of each column (float64): (aggregate, shares)."""
    n, d = x.shape
    values, order = x.double().sort(0)
    share = torch.zeros(n, dtype=torch.float64)
    if name == "median":
        middle = [n // 2] if n % 2 else [n // 2 - 1, n // 2]
        for p in middle:
            share.index_add_(0, order[p], torch.full((d,), 1 / len(middle), dtype=torch.float64))
        return values[middle].mean(0), share / d
    k = math.floor(beta * n)
    share.index_add_(0, order[k: n - k].reshape(-1), torch.ones((n - 2 * k) * d, dtype=torch.float64))
    return values[k: n - k].mean(0), share / (d * (n - 2 * k))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [7, 10])
def test_coordinate_wise_rules_by_selection_equal_a_full_sort(monkeypatch, threads, n):
    """Median and trimmed mean read from numpy's row sorts of transposed column blocks (several
    blocks here, on one and on two threads): the aggregate and each client's share of the
    coordinates equal those of a full sort of every column (continuous values: no ties)."""
    monkeypatch.setattr(robust, "SELECT_BLOCK", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x = torch.randn(n, 1000, generator=_gen(n))
    x[0] *= 50
    for name, out in [("median", median(x)), ("trimmed_mean", trimmed_mean(x, beta=0.2))]:
        vector, share = _by_sorting(x, name)
        torch.testing.assert_close(out.vector, vector.float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(out.weights, share, rtol=0, atol=1e-12)
    # Bulyan: per coordinate the mean of the beta selected values closest to their median
    out = bulyan(x, f=1)
    chosen = torch.tensor(out.info["selected"])
    block = x[chosen].double()
    theta = len(chosen)
    centre = block.sort(0).values[(theta - 1) // 2: theta // 2 + 1].mean(0)  # the middle one or two
    closest = (block - centre).abs().topk(out.info["beta"], dim=0, largest=False).indices
    torch.testing.assert_close(out.vector, block.gather(0, closest).mean(0).float(), rtol=0, atol=1e-6)
    used = torch.zeros(n, dtype=torch.float64).index_add_(0, chosen[closest.reshape(-1)],
                                                          torch.ones(closest.numel(), dtype=torch.float64))
    torch.testing.assert_close(out.weights, used / used.sum(), rtol=0, atol=1e-12)


def test_tied_values_share_their_positions_equally():
    """10 clients, 50 coordinates. Columns 0-9: clients 0-2 hold 1, the others 0; columns 10-19:
    all 0; columns 20-49: client 5 holds -2, the others 0. The median (positions 4 and 5 of 10)
    is 0 everywhere, held by 7, 10 and 9 clients: each holder gets 1/7, 1/10, 1/9 of a column."""
    x = torch.zeros(10, 50)
    x[:3, :10] = 1.0
    x[5, 20:] = -2.0
    out = median(x)
    assert torch.equal(out.vector, torch.zeros(50))
    by_hand = torch.full((10,), 10 / 7 + 1 + 30 / 9, dtype=torch.float64)
    by_hand[:3] = 1 + 30 / 9  # holding 1 in columns 0-9
    by_hand[5] = 10 / 7 + 1  # holding -2 in columns 20-49
    torch.testing.assert_close(out.weights, by_hand / 50, rtol=0, atol=1e-12)
    # trimmed mean, k = 2 per side, 6 positions kept: columns 0-9 keep 1 of the three 1s (1/3 each)
    # and 5 of the seven 0s (5/7 each); columns 10-19 6 of 10 zeros; columns 20-49 6 of 9 zeros
    trimmed = trimmed_mean(x, beta=0.2)
    by_hand = torch.full((10,), 10 * 5 / 7 + 10 * 6 / 10 + 30 * 6 / 9, dtype=torch.float64)
    by_hand[:3] = 10 / 3 + 10 * 6 / 10 + 30 * 6 / 9
    by_hand[5] = 10 * 5 / 7 + 10 * 6 / 10
    torch.testing.assert_close(trimmed.weights, by_hand / (50 * 6), rtol=0, atol=1e-12)
    torch.testing.assert_close(trimmed.vector, torch.cat([torch.full((10,), 1 / 6), torch.zeros(40)]))
