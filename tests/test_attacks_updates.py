"""Byzantine update attacks: the papers' formulas on small vectors, and their effect on
the plain mean versus a robust rule."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from fedsec.attacks import updates as attack
from fedsec.defenses import robust


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sign_flip_scaling_and_ipm_by_hand():
    x = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(attack.sign_flip(x), torch.tensor([-1.0, 2.0, -0.5]))
    torch.testing.assert_close(attack.sign_flip(x, 3.0), torch.tensor([-3.0, 6.0, -1.5]))
    # model replacement with n = 10 clients and server lr eta = 1: gamma = n / eta = 10
    torch.testing.assert_close(attack.scaling(x, 10 / 1.0), torch.tensor([10.0, -20.0, 5.0]))
    honest = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # mean (2, 4)
    torch.testing.assert_close(attack.ipm(honest, 0.5), torch.tensor([-1.0, -2.0]))


def test_gaussian_attack_has_the_stated_spread():
    z = attack.gaussian(20_000, 3.0, _gen(1))
    assert stats.kstest(z.double().numpy() / 3.0, "norm").pvalue > 0.01


def test_alie_by_hand():
    # n = 5 clients, f = 2 attackers: s = floor(5/2 + 1) - 2 = 1, z_max = Phi^-1((5 - 1)/5)
    honest = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])  # mean (2, 1), population std (1.633, 0)
    z = stats.norm.ppf(0.8)
    expected = torch.tensor([2 - z * (8 / 3) ** 0.5, 1.0])
    torch.testing.assert_close(attack.alie(honest, n=5, f=2), expected.float())
    with pytest.raises(ValueError):
        attack.alie(honest, n=5, f=0)


def test_min_max_and_min_sum_by_hand():
    # honest 1-D deltas 0, 1, 5: mu = 2, p = mu / |mu| = 1, m = 2 - gamma
    honest = torch.tensor([[0.0], [1.0], [5.0]])
    # Min-Max: max(|2 - g|, |1 - g|, |3 + g|) <= max pairwise distance 5  ->  g <= 2, m = 0
    torch.testing.assert_close(attack.min_max(honest, tol=1e-9), torch.tensor([0.0]), atol=1e-6, rtol=0)
    # Min-Sum: (2-g)^2 + (1-g)^2 + (3+g)^2 = 14 + 3 g^2 <= max_i sum_j (x_i - x_j)^2 = 41 -> g <= 3
    torch.testing.assert_close(attack.min_sum(honest, tol=1e-9), torch.tensor([-1.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("direction", ["unit", "std", "sign"])
def test_min_max_sits_on_its_constraint(direction):
    honest = torch.randn(6, 30, generator=_gen(2)) + 1
    m = attack.min_max(honest, direction, tol=1e-7)
    bound = float(torch.cdist(honest, honest).max())
    far = float(torch.cdist(m[None], honest).max())
    assert far <= bound * (1 + 1e-5) and far >= bound * (1 - 1e-3)  # the largest gamma that fits


# Attacks against 8 honest deltas with 3 attackers, and a rule that each one does not move.
D, HONEST, F = 200, 8, 3


def _round():
    g = _gen(3)
    center = torch.randn(D, generator=g)
    honest = center + 0.3 * torch.randn(HONEST, D, generator=g)
    reference = center + 0.1 * torch.randn(D, generator=g)  # FLTrust's clean root update
    return honest, reference


def _malicious(name, honest):
    own = honest[:F]  # a malicious client's own honest delta, for the attacks that transform it
    n = HONEST + F
    return {
        "sign_flip": lambda: attack.sign_flip(own),
        "scaling": lambda: attack.scaling(own, n / 1.0),
        "gaussian": lambda: torch.stack([attack.gaussian(D, 3.0, _gen(10 + i)) for i in range(F)]),
        "alie": lambda: attack.alie(honest, n, F).repeat(F, 1),
        "ipm": lambda: attack.ipm(honest, 5.0).repeat(F, 1),
        "min_max": lambda: attack.min_max(honest).repeat(F, 1),
        "min_sum": lambda: attack.min_sum(honest).repeat(F, 1),
    }[name]()


# The stealthy attacks send one vector from every attacker: FoolsGold's sybil test.
RESISTS = {"sign_flip": "fltrust", "scaling": "norm_bound", "gaussian": "fltrust", "alie": "foolsgold",
           "ipm": "foolsgold", "min_max": "foolsgold", "min_sum": "foolsgold"}


def _rule(name, x, honest, reference):
    if name == "fltrust":
        return robust.fltrust(x, reference=reference).vector
    if name == "norm_bound":
        return robust.norm_bound(x, max_norm=float(honest.norm(dim=1).median())).vector
    return robust.foolsgold(x, histories=x).vector  # one round: the history is the delta


@pytest.mark.parametrize("name", sorted(RESISTS))
def test_attack_moves_the_mean_but_not_the_rule_that_resists_it(name):
    honest, reference = _round()
    x = torch.cat([_malicious(name, honest), honest])
    moved_mean = float((robust.mean(x).vector - robust.mean(honest).vector).norm())
    clean, attacked = _rule(RESISTS[name], honest, honest, reference), _rule(RESISTS[name], x, honest, reference)
    moved_rule = float((attacked - clean).norm())
    assert moved_mean > 0.5  # the honest mean itself is ~0.3 * sqrt(200 / 8) = 1.5 from the centre
    assert moved_rule < moved_mean / 2, (name, moved_rule, moved_mean)
