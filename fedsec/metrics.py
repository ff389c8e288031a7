"""Evaluation metrics by name: a researcher's own measure of the global model.

    @fedsec.register("metric", "answer_length")
    def answer_length(ctx, *, max_new_tokens: int = 32) -> float: ...

    eval:
      metrics: {answer_length: {max_new_tokens: 16}}

At every evaluation (eval.every, and the untuned model at round 0) each configured
metric is called with a `MetricContext`: the model with the global adapter in place,
the tokenizer, the federation's data and the round. It returns a finite number or a
mapping of names to finite numbers, written to the round's row under
`global_eval.metrics.<name>`. `higher_is_better=True` (or False, or {key: bool}) at
registration lets the tables and reports weigh it (fedsec.utility.declared_direction).

Under DP a metric is published only if it is registered `covered=True`: its author
claims it reads the released model and nothing of the clients' data beyond what the
mechanism releases (the global test set, a public file), so its value is
post-processing. Every other metric may read client data (`ctx.data.clients`), and
its values go to the run's not-covered place (`global_eval.metrics_uncovered`, moved
by fedsec.disclosure) and the report's page for them. Without DP both are in the
main files. The table's one built-in is `adapter_norm`; fedsec's other measures
(accuracy, preference, refusal, canaries, benchmarks) are still computed in
fedsec.round_eval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedsec.registry import register, registry, typed_params


@dataclass(frozen=True)
class MetricContext:
    """What a metric sees: the global model as evaluated this round, and the run's data."""

    model: Any  # the PEFT model with the global adapter in place (do not train it)
    tokenizer: Any
    data: Any  # fedsec.data.FederatedData: clients, global_test, preference_test, probes
    cfg: Any  # the ExperimentConfig
    round: int | None  # rounds done (0: the untuned model; None: outside the rounds, the local-only baselines)


def measure(ctx: MetricContext, configured: Mapping[str, Mapping[str, Any]]) -> tuple[dict, dict]:
    """Every configured metric on `ctx`: (covered values, uncovered values), each name -> value."""
    table = registry("metric")
    covered, uncovered = {}, {}
    for name, params in configured.items():
        entry = table.entry(name)
        value = entry.obj(ctx, **typed_params(entry, params, f"eval.metrics.{name}"))
        (covered if entry.options["covered"] else uncovered)[name] = checked(name, value)
    return covered, uncovered


def checked(name: str, value: Any) -> float | dict[str, float]:
    """A metric's value as it is written: a finite float, or a mapping of names to them."""
    def number(x: Any, where: str) -> float:
        try:
            f = float(x) if not isinstance(x, (bool, str)) else math.nan  # ints, floats, 0-d tensors
        except (TypeError, ValueError):
            f = math.nan
        if not math.isfinite(f):
            raise ValueError(f"metric {name} returned {where}{x!r}; return a finite number or "
                             "a mapping of names to finite numbers")
        return f

    if isinstance(value, Mapping):
        return {str(k): number(v, f"{k} = ") for k, v in value.items()}
    return number(value, "")


@register("metric", "adapter_norm", covered=True)
def adapter_norm(ctx: MetricContext) -> float:
    """The L2 norm of the trainable adapter parameters of the global model (it reads the
    released model only): how far the federation has moved it, and under DP how much of
    it is noise."""
    squares = sum(float(p.detach().double().pow(2).sum()) for p in ctx.model.parameters() if p.requires_grad)
    return squares ** 0.5
