"""Every correlated-noise mechanism (built-in or plugin), at its default parameters: a
factorization fedsec can account, whose noise is C^-1 z and resumes exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from fedsec.defenses.correlated import Participation, accounting, sensitivity
from fedsec.registry import registry

MECHANISMS = registry("dp_mechanism")


def _build(name: str):
    return MECHANISMS[name]()


@pytest.mark.parametrize("name", list(MECHANISMS))
@pytest.mark.parametrize("rounds", [1, 2, 3, 5, 8, 13])
def test_the_matrix_is_square_lower_triangular_with_a_nonnegative_gram(name, rounds):
    c = np.asarray(_build(name).matrix(rounds), dtype=np.float64)
    assert c.shape == (rounds, rounds) and not np.triu(c, 1).any() and (np.diag(c) > 0).all()
    assert (c.T @ c >= -1e-12).all()  # what makes the row-sum sensitivity exact (fedsec.defenses.correlated)
    found = accounting(_build(name), rounds, Participation("every_round", rounds))
    assert found.sensitivity == pytest.approx(float(np.linalg.norm(c.sum(axis=1))))  # one client, every round
    assert found.prefix[-1] == pytest.approx(found.sensitivity)
    assert all(a <= b + 1e-12 for a, b in zip(found.prefix, found.prefix[1:]))  # a longer release moves more
    one = sensitivity(c, Participation("separated", rounds, max_participations=1, min_separation=1))
    assert one.value == pytest.approx(float(np.linalg.norm(c, axis=0).max()))  # one round: the largest column


def _run(noise, draws: list[torch.Tensor], calls: list[int]) -> list[torch.Tensor]:
    out = []
    for z in draws:
        before = len(calls)
        out.append(noise.next(lambda z=z: (calls.append(1), z.clone())[1]).clone())
        assert len(calls) == before + 1  # one fresh draw per round: the z of that round's row
    return out


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_the_noise_is_c_inverse_z(name):
    rounds, dim = 11, 5
    g = torch.Generator().manual_seed(3)
    z = [torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(rounds)]
    w = torch.stack(_run(_build(name).noise(rounds, dim), z, []))
    c = torch.as_tensor(np.asarray(_build(name).matrix(rounds), dtype=np.float64))
    torch.testing.assert_close(c @ w, torch.stack(z), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_a_checkpointed_noise_state_resumes_exactly(name):
    rounds, dim = 9, 4
    g = torch.Generator().manual_seed(5)
    z = [torch.randn(dim, generator=g) for _ in range(rounds)]
    whole = _run(_build(name).noise(rounds, dim), z, [])
    first = _build(name).noise(rounds, dim)
    head = _run(first, z[:4], [])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # the checkpoint's format: tensors and plain values
    buffer.seek(0)
    resumed = _build(name).noise(rounds, dim)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(whole, head + _run(resumed, z[4:], [])):
        assert torch.equal(a, b)
