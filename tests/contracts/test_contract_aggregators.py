"""Every aggregator (built-in or plugin), at its default parameters, over 11 clients."""

from __future__ import annotations

import pytest
import torch

from fedsec.defenses.registry import Context
from fedsec.registry import registry

AGGREGATORS = registry("aggregator")
N, D = 11, 40


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clients(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    deltas = torch.randn(D, generator=g) + 0.1 * torch.randn(N, D, generator=g)
    return deltas, torch.arange(1, N + 1, dtype=torch.float32)


def _aggregate(name: str, deltas: torch.Tensor, weights: torch.Tensor, seed: int = 0):
    ctx = Context(_gen(seed), reference=deltas.mean(0), center=None, histories=deltas)
    return AGGREGATORS[name]()(deltas, weights, ctx, 0)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_the_aggregate_has_the_delta_shape_and_is_finite(name):
    deltas, weights = _clients()
    out = _aggregate(name, deltas, weights)
    assert out.vector.shape == (D,) and out.vector.dtype == deltas.dtype
    assert bool(torch.isfinite(out.vector).all())
    assert out.weights.shape == (N,) and bool((out.weights >= 0).all())


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_the_same_round_and_stream_give_the_same_aggregate(name):
    deltas, weights = _clients()
    torch.testing.assert_close(_aggregate(name, deltas, weights).vector,
                               _aggregate(name, deltas.clone(), weights.clone()).vector, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_the_order_of_the_clients_does_not_matter(name):
    deltas, weights = _clients(1)
    perm = torch.randperm(N, generator=_gen(2))
    a, b = _aggregate(name, deltas, weights), _aggregate(name, deltas[perm], weights[perm])
    torch.testing.assert_close(a.vector, b.vector, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_when_every_client_agrees_the_aggregate_lies_along_their_update_and_not_beyond(name):
    """a u with 0 <= a <= 1 (the rule may shrink it: clipping, FoolsGold's sybil weights, to
    zero), off it only by the rule's own noise (FLAME's lambda S): within 1% of |u|."""
    u = torch.randn(D, generator=_gen(3))
    out = _aggregate(name, u.repeat(N, 1), torch.ones(N)).vector
    a = float(out @ u / (u @ u))
    assert -1e-2 <= a <= 1 + 1e-2
    assert float((out - a * u).norm()) <= 1e-2 * float(u.norm())


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_the_rule_states_its_assumption_on_f_as_none_or_a_reason(name):
    rule = AGGREGATORS[name]()
    assert rule.check(N, 0) is None  # no attacker is always admissible
    reason = rule.check(N, N)
    assert reason is None or (isinstance(reason, str) and reason)
    assert isinstance(AGGREGATORS.entry(name).options["dp_certified"], bool)
