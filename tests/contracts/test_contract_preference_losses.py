"""Every preference loss (built-in or plugin), at its default parameters, on a batch of 6 pairs."""

from __future__ import annotations

import pytest
import torch

from fedsec.preference import PairLogps
from fedsec.registry import registry

LOSSES = registry("preference_loss")


def _batch(n: int = 6, dtype=torch.float64, seed: int = 0) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.randint(1, 40, (n,), generator=g).to(dtype)
    rejected_tokens = torch.randint(1, 40, (n,), generator=g).to(dtype)
    ref_chosen = -chosen_tokens * (1 + torch.rand(n, generator=g, dtype=dtype))
    ref_rejected = -rejected_tokens * (1 + torch.rand(n, generator=g, dtype=dtype))
    return PairLogps(ref_chosen + torch.randn(n, generator=g, dtype=dtype),
                     ref_rejected + torch.randn(n, generator=g, dtype=dtype),
                     ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)


def _loss(name: str, pairs: PairLogps) -> torch.Tensor:
    entry = LOSSES.entry(name)
    return entry.obj(pairs, **entry.params)


def _select(pairs: PairLogps, index) -> PairLogps:
    return PairLogps(*(getattr(pairs, f)[index] for f in PairLogps.__dataclass_fields__))


@pytest.mark.parametrize("name", list(LOSSES))
def test_one_finite_loss_per_pair_in_the_inputs_dtype(name):
    for dtype in (torch.float32, torch.float64):
        loss = _loss(name, _batch(dtype=dtype))
        assert isinstance(loss, torch.Tensor) and loss.shape == (6,) and loss.dtype == dtype
        assert bool(torch.isfinite(loss).all())


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_pairs_loss_depends_on_that_pair_alone(name):
    """Record-level DP-SGD and the batched cohort path take each pair's gradient from its own
    loss: a pair's loss is the same alone, in another order and beside other pairs."""
    pairs = _batch()
    whole = _loss(name, pairs)
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    torch.testing.assert_close(_loss(name, _select(pairs, order)), whole[order], rtol=1e-12, atol=1e-12)
    for i in range(6):
        torch.testing.assert_close(_loss(name, _select(pairs, slice(i, i + 1))), whole[i:i + 1],
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_loss_has_a_finite_gradient_with_respect_to_the_policy(name):
    pairs = _batch()
    chosen = pairs.chosen.clone().requires_grad_(True)
    rejected = pairs.rejected.clone().requires_grad_(True)
    loss = _loss(name, PairLogps(chosen, rejected, pairs.ref_chosen, pairs.ref_rejected,
                                 pairs.chosen_tokens, pairs.rejected_tokens))
    loss.sum().backward()
    assert chosen.grad is not None and bool(torch.isfinite(chosen.grad).all())
    assert bool(torch.isfinite(rejected.grad).all())


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_tie_at_the_reference_is_not_rewarded_more_than_preferring_the_chosen_reply(name):
    """At the reference (h = 0), raising the chosen reply's log-probability a little does not
    raise the loss: every preference loss points the policy towards the chosen reply there."""
    n = 4
    zero, tokens = torch.zeros(n, dtype=torch.float64), torch.full((n,), 8.0, dtype=torch.float64)
    chosen = zero.clone().requires_grad_(True)
    _loss(name, PairLogps(chosen, zero, zero, zero, tokens, tokens)).sum().backward()
    assert bool((chosen.grad <= 0).all())


@pytest.mark.parametrize("name", [n for n in LOSSES if not LOSSES.entry(n).options["reference"]])
def test_a_loss_that_declares_no_reference_reads_none(name):
    """reference=False skips the reference pass: such a loss must not depend on the reference
    (the built-ins all read it; a plugin's reference-free loss, SimPO's, is checked here)."""
    pairs = _batch()
    moved = PairLogps(pairs.chosen, pairs.rejected, pairs.ref_chosen + 3.0, pairs.ref_rejected - 2.0,
                      pairs.chosen_tokens, pairs.rejected_tokens)
    assert torch.equal(_loss(name, pairs), _loss(name, moved))
