"""The utility a run measured, as the sweep tables, the report and its figures read it.

Every run measures the held-out loss of the global test set's reference answers (the
mean token NLL) and so its perplexity, exp(loss); accuracy exists only where the data
has closed answers (the embedded benchmark), preference accuracy only for DPO, and
benchmark or plugin metrics only where eval.benchmarks or eval.metrics ask for them.
`evaluation_values` flattens one evaluation (a metrics.jsonl `global_eval`, a
result.json `final`) into results-table columns; `present` lists the utilities a set
of rows holds, best known first, and `headline` picks the one a summary speaks of.

    column                       from
    final_accuracy               global_eval.accuracy
    preference_accuracy          global_eval.preference.preference_accuracy
    likelihood_accuracy          global_eval.preference.likelihood_accuracy
    benchmark:<task>:<metric>    global_eval.benchmarks.<task>.<metric> (headline metrics)
    metric:<name>[:<key>]        global_eval.metrics.<name> (eval.metrics plugins)
    final_loss, final_perplexity global_eval.loss, exp(loss)

The untuned model's value of a column is `untuned_<column>`, the local-only clients'
mean `local_only_<column>` (accuracy, loss and perplexity).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Utility:
    key: str  # the results-table column of the final model's value
    label: str
    higher_is_better: bool | None  # None: not known (a plugin's metric that declares none)
    bounded: bool  # a share, within [0, 1]

    @property
    def untuned(self) -> str:
        return "untuned_" + self.key.removeprefix("final_")

    @property
    def local_only(self) -> str:
        return "local_only_" + self.key.removeprefix("final_")

    @property
    def short(self) -> str:
        """The label without its qualifier, for table headers ("accuracy", "loss")."""
        return self.label.removeprefix("global ").removeprefix("held-out ")


ACCURACY = Utility("final_accuracy", "global accuracy", True, True)
LOSS = Utility("final_loss", "held-out loss", False, False)
PERPLEXITY = Utility("final_perplexity", "held-out perplexity", False, False)
PREFERENCE = (Utility("preference_accuracy", "preference accuracy", True, True),
              Utility("likelihood_accuracy", "likelihood accuracy", True, True))
# eval.benchmarks' metrics a table carries (fedsec.evalsuite scorers), all shares but the judge's score
BENCHMARK_METRICS = {"accuracy": True, "macro_f1": True, "exact_match": True, "pass_at_1": True,
                     "harmless_rate": True, "mean_score": False}


def describe(key: str) -> Utility:
    """The utility a results column holds (any column `evaluation_values` writes)."""
    for known in (ACCURACY, LOSS, PERPLEXITY, *PREFERENCE):
        if key == known.key:
            return known
    if key.startswith("benchmark:"):
        _, task, metric = key.split(":", 2)
        return Utility(key, f"{task} {metric.replace('_', ' ')}", True, BENCHMARK_METRICS.get(metric, False))
    if key.startswith("metric:"):
        return Utility(key, key.removeprefix("metric:").replace(":", " "), declared_direction(key), False)
    raise KeyError(f"{key} is not a utility column")


def declared_direction(key: str) -> bool | None:
    """Whether a higher value of an eval.metrics column is better, as its registration declares
    (`higher_is_better`; a mapping gives each key of a metric returning several). Inside
    `recorded_directions` (a report) as the runs' result.json recorded it, else from this
    process's registry; None where the metric declares nothing or is not known."""
    name, _, part = key.removeprefix("metric:").partition(":")
    recorded = _RECORDED.get()
    if recorded is not None:
        declared = recorded.get(name)
    else:
        from fedsec.registry import registry

        table = registry("metric")
        declared = table.entry(name).options.get("higher_is_better") if name in table else None
    return declared.get(part) if isinstance(declared, Mapping) else declared


def metric_directions(names: Iterable[str]) -> dict[str, bool | dict[str, bool]]:
    """The declared directions of these metrics (eval.metrics' names), for result.json: a
    report reads them there, never from a live registry."""
    from fedsec.registry import registry

    table = registry("metric")
    declared = {name: table.entry(name).options.get("higher_is_better") for name in names if name in table}
    return {name: dict(d) if isinstance(d, Mapping) else d for name, d in declared.items() if d is not None}


_RECORDED: ContextVar[Mapping[str, Any] | None] = ContextVar("recorded_directions", default=None)


@contextmanager
def recorded_directions(directions: Mapping[str, Any]) -> Iterator[None]:
    """Within: metrics' directions are the runs' recorded ones (result.json's
    metric_directions), as `fedsec report` reads them."""
    token = _RECORDED.set(dict(directions))
    try:
        yield
    finally:
        _RECORDED.reset(token)


def evaluation_values(evaluation: Mapping | None) -> dict[str, float]:
    """One evaluation's utilities as results-table columns (only those it measured)."""
    e = evaluation or {}
    out: dict[str, float] = {}
    if e.get("accuracy") is not None:
        out[ACCURACY.key] = e["accuracy"]
    for utility in PREFERENCE:
        value = (e.get("preference") or {}).get(utility.key)
        if value is not None:
            out[utility.key] = value
    for task, metrics in (e.get("benchmarks") or {}).items():
        for metric in BENCHMARK_METRICS:
            if isinstance(metrics.get(metric), (int, float)):
                out[f"benchmark:{task}:{metric}"] = float(metrics[metric])
    for name, value in (e.get("metrics") or {}).items():
        if isinstance(value, Mapping):
            out.update((f"metric:{name}:{k}", float(v)) for k, v in value.items())
        else:
            out[f"metric:{name}"] = float(value)
    loss = e.get("loss")
    if loss is not None and math.isfinite(loss):
        out[LOSS.key] = loss
        out[PERPLEXITY.key] = perplexity(loss)
    return out


def perplexity(loss: float) -> float:
    """exp of a token-mean NLL, capped below exp's overflow (~709)."""
    return math.exp(min(loss, 700.0))


def _order(key: str) -> tuple[int, str]:
    rank = {ACCURACY.key: 0, PREFERENCE[0].key: 1, PREFERENCE[1].key: 2, LOSS.key: 6, PERPLEXITY.key: 7}
    if key in rank:
        return rank[key], ""
    return (3 if key.startswith("benchmark:") else 4), key


def present(rows: Iterable[Mapping]) -> list[Utility]:
    """The utility columns with a value in some row, in the order tables show them."""
    keys = {k for row in rows for k, v in row.items() if v is not None and _is_utility(k)}
    return [describe(k) for k in sorted(keys, key=_order)]


def headline(rows: Iterable[Mapping]) -> Utility | None:
    """The utility a summary and its figures speak of: the first with a known direction
    (accuracy, preference accuracy, a benchmark's metric; the held-out loss otherwise)."""
    return next((u for u in present(rows) if u.higher_is_better is not None), None)


def _is_utility(key: str) -> bool:
    return key in (ACCURACY.key, LOSS.key, PERPLEXITY.key, *(u.key for u in PREFERENCE)) or \
        key.startswith(("benchmark:", "metric:"))


def better(utility: Utility, a: float, b: float) -> bool:
    """Whether a is the better value of the utility (higher, or lower for a loss)."""
    return a < b if utility.higher_is_better is False else a > b
