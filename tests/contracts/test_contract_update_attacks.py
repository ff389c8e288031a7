"""Every update attack (built-in or plugin), at its default parameters, in a round of 7
clients of which 2 attack."""

from __future__ import annotations

import pytest
import torch

from fedsec.registry import registry
from fedsec.results import AttackContext

ATTACKS = registry("update_attack")
D = 30


def _round(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    honest = torch.randn(D, generator=g) + 0.1 * torch.randn(5, D, generator=g)
    own = torch.randn(D, generator=g)
    return own, honest


def _send(name: str, own: torch.Tensor, honest: torch.Tensor, seed: int = 0) -> torch.Tensor:
    ctx = AttackContext(torch.Generator().manual_seed(seed), clients=7, attackers=2, server_lr=1.0)
    entry = ATTACKS.entry(name)
    return entry.obj(own, honest, ctx, **entry.params)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_attack_sends_a_finite_delta_of_the_adapter_shape(name):
    own, honest = _round()
    sent = _send(name, own, honest)
    assert isinstance(sent, torch.Tensor) and sent.shape == own.shape
    assert bool(torch.isfinite(sent).all())


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_same_round_and_stream_give_the_same_vector(name):
    own, honest = _round()
    torch.testing.assert_close(_send(name, own, honest), _send(name, own.clone(), honest.clone()),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_attack_leaves_the_honest_deltas_untouched(name):
    own, honest = _round()
    before = (own.clone(), honest.clone())
    _send(name, own, honest)
    assert torch.equal(own, before[0]) and torch.equal(honest, before[1])


@pytest.mark.parametrize("name", [n for n in ATTACKS if ATTACKS.entry(n).options["shared"]])
def test_a_shared_attack_does_not_depend_on_the_attackers_own_delta(name):
    own, honest = _round()
    torch.testing.assert_close(_send(name, own, honest), _send(name, -3 * own, honest), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_declared_options_have_their_types(name):
    options = ATTACKS.entry(name).options
    assert isinstance(options["shared"], bool) and isinstance(options["min_honest"], int)
    assert name not in registry("data_attack")  # attack.kind names one or the other
