"""Every evaluation metric (built-in or plugin), on the tiny model and the embedded benchmark."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from fedsec.metrics import MetricContext, checked
from fedsec.registry import registry

METRICS = registry("metric")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from fedsec.setup import prepare

    setup = prepare(tiny_config(tmp_path_factory.mktemp("metric")))
    vector = torch.randn(setup.adapter.layout.numel, generator=torch.Generator().manual_seed(0)) * 0.01
    setup.adapter.set(vector)  # a trained-looking adapter, not the zero-initialised B
    return MetricContext(setup.model, setup.tokenizer, setup.data, setup.cfg, 3)


def _value(name, ctx):
    entry = METRICS.entry(name)
    return checked(name, entry.obj(ctx, **entry.params))


@pytest.mark.parametrize("name", list(METRICS))
def test_the_metric_is_a_finite_number_or_a_mapping_of_them(name, ctx):
    value = _value(name, ctx)
    values = value.values() if isinstance(value, dict) else [value]
    assert values and all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("name", list(METRICS))
def test_the_same_model_gives_the_same_value_and_stays_untouched(name, ctx):
    before = [p.detach().clone() for p in ctx.model.parameters()]
    assert _value(name, ctx) == _value(name, ctx)
    assert all(torch.equal(a, p) for a, p in zip(before, ctx.model.parameters()))


@pytest.mark.parametrize("name", list(METRICS))
def test_the_declared_coverage_is_a_flag(name):
    assert isinstance(METRICS.entry(name).options["covered"], bool)


def test_what_a_metric_may_return():
    assert checked("m", 3) == 3.0 and checked("m", torch.tensor(0.5)) == 0.5
    assert checked("m", {"a": 1, "b": 2.5}) == {"a": 1.0, "b": 2.5}
    for bad in (float("nan"), "0.5", True, None, {"a": float("inf")}):
        with pytest.raises(ValueError, match="finite number"):
            checked("m", bad)


def test_the_adapter_norm_is_the_norm_of_the_trainable_parameters(ctx):
    from fedsec.metrics import adapter_norm

    want = torch.cat([p.detach().flatten() for p in ctx.model.parameters() if p.requires_grad]).double().norm()
    assert adapter_norm(ctx) == pytest.approx(float(want), rel=1e-12)
