"""Every server optimizer (built-in or plugin), built from the federation defaults."""

from __future__ import annotations

import io

import pytest
import torch

from fedsec.config import FederationConfig
from fedsec.registry import registry
from fedsec.server import make_server_optimizer, server_step, takes_noise

OPTIMIZERS = registry("server_optimizer")


def _build(name: str):
    return make_server_optimizer(FederationConfig(algorithm=name))


def _deltas(steps: int = 5, d: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(d, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_keeps_the_shape_and_dtype_and_leaves_its_inputs_alone(name):
    x, d = torch.ones(12), _deltas(1)[0]
    before = (x.clone(), d.clone())
    out = _build(name).step(x, d)
    assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())
    assert torch.equal(x, before[0]) and torch.equal(d, before[1])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_zero_first_update_leaves_the_model_where_it_is(name):
    x = torch.linspace(-1, 1, 12)
    torch.testing.assert_close(_build(name).step(x, torch.zeros(12)), x, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_first_step_moves_the_model_along_the_clients_update(name):
    x, d = torch.zeros(12), _deltas(1)[0]
    assert float((_build(name).step(x, d) - x) @ d) > 0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_checkpointed_optimizer_resumes_exactly(name):
    deltas = _deltas()
    whole, x = _build(name), torch.zeros(12)
    for d in deltas:  # as the loop calls it under DP (a noise-aware step is told the noise level)
        x = server_step(whole, x, d, 0.05)
    first, y = _build(name), torch.zeros(12)
    for d in deltas[:3]:
        y = server_step(first, y, d, 0.05)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # the checkpoint's format: tensors and plain values
    buffer.seek(0)
    resumed = _build(name)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for d in deltas[3:]:
        y = server_step(resumed, y, d, 0.05)
    torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_noise_level_the_loop_passes_gives_a_finite_step(name):
    """The loop tells a step that takes noise_std 0.0 without DP, the level under user-level DP,
    and None where none is known (record-level or correlated noise): each gives a finite step
    of the same shape that leaves its inputs alone. A step that does not take it is called
    as it always was, whatever the level."""
    for level in (0.0, 0.05, None):
        optimizer, plain, x = _build(name), _build(name), torch.zeros(12)
        for d in _deltas(3):
            before = (x.clone(), d.clone())
            out = server_step(optimizer, x, d, level)
            assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())
            assert torch.equal(x, before[0]) and torch.equal(d, before[1])
            if not takes_noise(optimizer):
                torch.testing.assert_close(out, plain.step(x, d), rtol=0, atol=0)
            x = out
