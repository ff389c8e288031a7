"""Correlated-noise mechanisms (fedsec.defenses.correlated): factorizations, sensitivities
and noise against hand-computed small cases, brute force, and the noise's covariance."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fedsec.defenses.correlated import (
    BandedNoise,
    Participation,
    TreeNoise,
    banded_matrix,
    banded_sqrt_coefficients,
    prefix_sensitivities,
    sensitivity,
    tree_matrix,
    tree_nodes,
)


def test_a_three_round_tree_releases_the_nodes_its_prefixes_use():
    # prefixes [0,1) = (0,1); [0,2) = (0,2); [0,3) = (0,2) + (2,1); node (1,1) is never used
    assert tree_nodes(3) == [(0, 1), (0, 2), (2, 1)]
    assert tree_matrix(3).tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    every, cyclic = Participation("every_round", 3), Participation("cyclic", 3, period=2)
    once = Participation("separated", 3, max_participations=1, min_separation=1)
    assert sensitivity(tree_matrix(3), every).value == pytest.approx(math.sqrt(1 + 4 + 1))  # C 1 = (1, 2, 1)
    assert sensitivity(tree_matrix(3), cyclic).value == pytest.approx(math.sqrt(3))  # rounds {0, 2}: (1, 1, 1)
    assert sensitivity(tree_matrix(3), once) == (pytest.approx(math.sqrt(2)), True)  # column 0: (1, 1, 0)
    # a restart every 2 rounds: two trees, [0, 2) and [2, 3)
    assert tree_nodes(3, restart=2) == [(0, 1), (0, 2), (2, 1)]
    assert tree_nodes(4, restart=2) == [(0, 1), (0, 2), (2, 1), (2, 2)]


def test_the_banded_square_root_squares_to_the_prefix_sum_matrix_and_a_4x4_band_is_as_computed():
    assert banded_sqrt_coefficients(5).tolist() == [1.0, 0.5, 0.375, 0.3125, 0.2734375]  # binom(2k,k)/4^k
    full = banded_matrix(7, 7)
    assert np.allclose(full @ full, np.tril(np.ones((7, 7))))  # the square root of prefix sums
    c = banded_matrix(4, 2)
    assert c.tolist() == [[1, 0, 0, 0], [0.5, 1, 0, 0], [0, 0.5, 1, 0], [0, 0, 0.5, 1]]
    every = Participation("every_round", 4)
    assert sensitivity(c, every) == (pytest.approx(math.sqrt(1 + 3 * 1.5 ** 2)), True)  # C 1 = (1, 1.5, 1.5, 1.5)
    # columns 2 apart are orthogonal: two participations >= 2 apart give two diagonals of G, 1.25 each
    apart = Participation("separated", 4, max_participations=2, min_separation=2)
    assert sensitivity(c, apart) == (pytest.approx(math.sqrt(2.5)), True)


@pytest.mark.parametrize("make", [lambda n: tree_matrix(n), lambda n: banded_matrix(n, 3),
                                  lambda n: np.tril(np.ones((n, n)))])
@pytest.mark.parametrize("m,b", [(1, 1), (2, 2), (3, 2), (2, 4)])
def test_the_separated_bound_never_falls_below_brute_force_and_meets_it_where_exact(make, m, b):
    n = 7
    c = make(n)
    g = c.T @ c
    patterns = [p for k in range(1, m + 1) for p in itertools.combinations(range(n), k)
                if all(y - x >= b for x, y in itertools.pairwise(p))]
    brute = max(math.sqrt(g[np.ix_(p, p)].sum()) for p in patterns)
    bound = sensitivity(c, Participation("separated", n, max_participations=m, min_separation=b))
    assert bound.value >= brute - 1e-12
    if bound.exact:
        assert bound.value == pytest.approx(brute)
    cyclic = sensitivity(c, Participation("cyclic", n, period=b))
    assert cyclic.value == pytest.approx(max(math.sqrt(g[np.ix_(p, p)].sum())
                                             for p in (range(o, n, b) for o in range(b))))


def test_the_rounds_so_far_have_a_growing_sensitivity_up_to_the_whole_runs():
    c = banded_matrix(6, 3)
    part = Participation("every_round", 6)
    sens = prefix_sensitivities(c, part)
    assert sens[-1] == pytest.approx(sensitivity(c, part).value) and (np.diff(sens) > 0).all()
    assert sens[0] == pytest.approx(1.0)  # round 0 alone: c_0 = 1
    assert sens[1] ** 2 == pytest.approx(1 + 1.5 ** 2)  # C[:2, :2] 1 = (1, 1.5)
    tree = prefix_sensitivities(tree_matrix(4), Participation("every_round", 4))
    assert (tree ** 2).tolist() == pytest.approx([1, 1 + 4, 1 + 4 + 1, 1 + 4 + 1 + 16])  # nodes as they complete
    # one participation and no correlation (C = I): the Gaussian mechanism itself, sensitivity 1
    once = Participation("separated", 5, max_participations=1, min_separation=5)
    assert sensitivity(banded_matrix(5, 1), once) == (1.0, True)


def test_banded_noise_is_c_inverse_z_and_resumes_from_its_state():
    c = banded_matrix(5, 3)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    noise = BandedNoise(banded_sqrt_coefficients(3), 4)
    w = torch.stack([noise.next(lambda t=t: z[t]) for t in range(5)])
    assert torch.allclose(torch.from_numpy(c) @ w, z)  # C w = z
    resumed = BandedNoise(banded_sqrt_coefficients(3), 4)
    again = BandedNoise(banded_sqrt_coefficients(3), 4)
    for t in range(3):
        again.next(lambda t=t: z[t])
    resumed.load_state_dict(again.state_dict())
    assert torch.equal(resumed.next(lambda: z[3]), w[3]) and torch.equal(resumed.next(lambda: z[4]), w[4])


def test_tree_noise_is_the_difference_of_consecutive_prefix_noises():
    draws = iter(torch.eye(8, dtype=torch.float64))  # node k's noise: basis vector k, to read them off
    noise = TreeNoise(8)
    w = torch.stack([noise.next(lambda: next(draws)) for _ in range(4)])
    # nodes drawn: round 0 (0,1)=e0; round 1 (0,2)=e1; round 2 (2,1)=e2; round 3 (0,4)=e3
    assert w[0].tolist()[:4] == [1, 0, 0, 0]
    assert w[1].tolist()[:4] == [-1, 1, 0, 0]  # prefix 2 (0,2) minus prefix 1 (0,1)
    assert w[2].tolist()[:4] == [0, 0, 1, 0]  # (0,2)+(2,1) minus (0,2)
    assert w[3].tolist()[:4] == [0, -1, -1, 1]  # (0,4) minus (0,2)+(2,1)
    assert torch.equal(w.sum(0)[:4], torch.tensor([0, 0, 0, 1], dtype=torch.float64))  # prefix 4 = node (0,4)


@pytest.mark.parametrize("mechanism", ["tree", "banded_mf"])
def test_the_released_noise_has_the_covariance_the_factorization_says(mechanism):
    """Across 20,000 coordinates (independent draws), the empirical covariance of the
    rounds' noises is sigma^2 (C^T C)^-1 for banded_mf and, for the tree, the prefix
    differences' covariance from the nodes."""
    rounds, dim, sigma = 5, 20_000, 1.5
    g = torch.Generator().manual_seed(7)
    if mechanism == "banded_mf":
        noise, c = BandedNoise(banded_sqrt_coefficients(3), dim), banded_matrix(rounds, 3)
        w = torch.stack([noise.next(lambda: sigma * torch.randn(dim, generator=g, dtype=torch.float64))
                         for _ in range(rounds)])
        inverse = np.linalg.inv(c)
        expected = sigma ** 2 * inverse @ inverse.T
    else:
        noise, c = TreeNoise(dim), tree_matrix(rounds)
        w = torch.stack([noise.next(lambda: sigma * torch.randn(dim, generator=g, dtype=torch.float64))
                         for _ in range(rounds)])
        nodes = tree_nodes(rounds)
        prefix = np.zeros((rounds + 1, len(nodes)))  # which nodes make up each prefix's noise
        for t in range(1, rounds + 1):
            for a, n in [(a, n) for a, n in nodes if (a, n) in _dyadic_set(t)]:
                prefix[t, nodes.index((a, n))] = 1.0
        d = prefix[1:] - prefix[:-1]
        expected = sigma ** 2 * d @ d.T
    empirical = np.cov(w.numpy())
    # each entry's standard error is about sigma^2 sqrt(2 / dim) ~ 0.02; 6 of them is far out
    assert np.abs(empirical - expected).max() < 6 * sigma ** 2 * math.sqrt(2 / dim) * 2


def _dyadic_set(t: int) -> set:
    from fedsec.defenses.correlated import _dyadic

    return set(_dyadic(t))


# Reference values computed with Google's jax-privacy 2.0.0 (dev-only here; float64),
# jax_privacy.matrix_factorization: toeplitz.minsep_sensitivity_squared (exact for
# non-negative, non-increasing Toeplitz coefficients, arXiv:2405.13763 Thm 2),
# sensitivity.fixed_epoch_sensitivity and sensitivity.single_participation_sensitivity,
# on toeplitz.optimal_max_error_strategy_coefs(bands) (the banded square root's c_k) and
# on the tree's used-node matrix (rows ordered by the round each node completes).
JAX_PRIVACY_MINSEP = [  # (rounds, bands, min_sep, max_participations) -> sensitivity^2
    ((12, 4, 4, 3), 4.46484375), ((12, 4, 2, 6), 14.00390625), ((12, 3, 3, None), 5.5625),
    ((16, 4, 1, None), 68.97265625)]
JAX_PRIVACY_FIXED_EPOCH = [  # (mechanism, rounds, rounds per epoch = cyclic period) -> sensitivity^2
    (("banded_mf", 12, 4), 4.46484375), (("tree", 12, 4), 12.0), (("banded_mf", 16, 4), 5.953125),
    (("tree", 16, 4), 30.0)]


@pytest.mark.parametrize("case,reference", JAX_PRIVACY_MINSEP)
def test_banded_sensitivities_match_jax_privacy(case, reference):
    rounds, bands, min_sep, most = case
    most = most or math.ceil(rounds / min_sep)
    got = sensitivity(banded_matrix(rounds, bands), Participation("separated", rounds, max_participations=most,
                                                                  min_separation=min_sep))
    assert got.value ** 2 >= reference - 1e-9  # a proven bound never below the exact value
    if min_sep >= bands:  # separated columns orthogonal: exact
        assert got.exact and got.value ** 2 == pytest.approx(reference, rel=1e-12)


@pytest.mark.parametrize("case,reference", JAX_PRIVACY_FIXED_EPOCH)
def test_cyclic_sensitivities_match_jax_privacys_fixed_epoch(case, reference):
    mechanism, rounds, period = case
    c = tree_matrix(rounds) if mechanism == "tree" else banded_matrix(rounds, 4)
    got = sensitivity(c, Participation("cyclic", rounds, period=period))
    assert got.exact and got.value ** 2 == pytest.approx(reference, rel=1e-12)


def test_tree_sensitivities_match_jax_privacy_for_every_round_and_one_participation():
    c = tree_matrix(8)
    assert c.shape == (8, 8) and np.allclose(c, np.tril(c))  # one node completes per round
    assert sensitivity(c, Participation("every_round", 8)).value ** 2 == pytest.approx(92.0)
    once = Participation("separated", 16, max_participations=1, min_separation=1)
    assert sensitivity(tree_matrix(16), once).value ** 2 == pytest.approx(5.0)  # log2(16) + 1 nodes
