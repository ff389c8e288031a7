"""Figures drawn from run and sweep directories only (never from live objects).

Each function takes a directory, reads the files a run or sweep leaves behind
(result.json, metrics.jsonl, privacy_ledger.json, a sweep's results.json) and
returns a matplotlib Figure, or None when the directory holds nothing to draw
(a non-private sweep has no privacy-utility curve; a run without a ledger has
no epsilon curve). Seeds are aggregated as mean and standard deviation. The
figures are meant to survive black-and-white printing: curves differ by marker
and line style as well as colour.

    privacy_utility(sweep_dir)    epsilon (log) vs a utility metric, with the
                                  non-private, local-only and untuned references
    epsilon_over_rounds(run_dir)  epsilon spent after each round, per accountant
    training_curves(run_dir)      global test accuracy and loss per round, and the
                                  spread over clients' own test sets
    save(fig, stem)               stem.png and stem.svg
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

from accountants import format_epsilon

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import matplotlib.ticker  # noqa: E402

STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")]
METRIC_LABELS = {"final_accuracy": "global test accuracy", "preference_accuracy": "preference accuracy",
                 "likelihood_accuracy": "likelihood accuracy", "refusal_rate": "refusal rate"}


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int


def aggregate(values) -> Stat | None:
    """Mean and sample standard deviation (0 for one value) of the non-missing values."""
    values = [float(v) for v in values if v is not None and v != ""]
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                len(values))


def sweep_rows(sweep_dir: Path) -> list[dict]:
    path = Path(sweep_dir) / "results.json"
    return read_json(path) if path.is_file() else []


@dataclass(frozen=True)
class PrivacyUtility:
    """What the privacy-utility figure draws, computed from a sweep's results."""

    curve: list[tuple[str, float, Stat]]  # (variant, epsilon, metric over seeds), by epsilon
    non_private: Stat | None
    local_only: Stat | None
    untuned: Stat | None


def privacy_utility_data(rows: list[dict], metric: str = "final_accuracy") -> PrivacyUtility:
    """Certified DP runs become the curve; runs without privacy give the references.

    Runs marked not certified (no noise, SCAFFOLD) have no epsilon and are left out of
    the curve: fedsec never places a run at an epsilon it cannot prove.
    """
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    curve, plain = [], []
    for variant, mine in by_variant.items():
        if mine[0].get("certified") is True:
            stat = aggregate(r.get(metric) for r in mine)
            eps = aggregate(r.get("epsilon") for r in mine)
            if stat is not None and eps is not None:
                curve.append((variant, eps.mean, stat))
        elif mine[0].get("certified") is None:
            plain.extend(mine)
    curve.sort(key=lambda c: c[1])
    return PrivacyUtility(curve, aggregate(r.get(metric) for r in plain),
                          aggregate(r.get("local_only_accuracy") for r in rows)
                          if metric == "final_accuracy" else None,
                          aggregate(r.get(f"untuned_{metric.removeprefix('final_')}") for r in rows))


def privacy_utility(sweep_dir: Path, metric: str = "final_accuracy"):
    """Epsilon (log scale) vs `metric`, mean and spread over seeds, with reference lines."""
    data = privacy_utility_data(sweep_rows(sweep_dir), metric)
    if not data.curve:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    eps = [c[1] for c in data.curve]
    means = [c[2].mean for c in data.curve]
    stds = [c[2].std for c in data.curve]
    ax.errorbar(eps, means, yerr=stds, marker="o", linestyle="-", color="black", capsize=3,
                label=f"user-level DP ({max(c[2].n for c in data.curve)} seed(s))")
    refs = [(data.non_private, "non-private FL", "--", "tab:blue"),
            (data.local_only, "local-only", ":", "tab:orange"),
            (data.untuned, "untuned model", "-.", "tab:gray")]
    for stat, label, style, color in refs:
        if stat is not None:
            ax.axhline(stat.mean, linestyle=style, color=color, label=f"{label} ({stat.mean:.3f})")
            if stat.std > 0:
                ax.axhspan(stat.mean - stat.std, stat.mean + stat.std, color=color, alpha=0.12)
    ax.set_xscale("log")
    ax.set_xticks(eps, [format_epsilon(e) for e in eps])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (log scale)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"Privacy-utility: {Path(sweep_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def epsilon_by_round(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """accountant -> [(round, epsilon so far)] from the run's privacy ledger ({} if none)."""
    path = Path(run_dir) / "privacy_ledger.json"
    if not path.is_file():
        return {}
    ledger = read_json(path)
    if not ledger.get("certified"):
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    if ledger.get("kind") == "record":
        for row in ledger["rounds"]:
            series.setdefault(ledger["primary"], []).append((row["round"], row["epsilon"]))
        return series
    for entry in ledger["entries"]:
        for accountant, eps in (entry["epsilon"] or {}).items():
            series.setdefault(accountant, []).append((entry["round"], eps))
    return series


def epsilon_over_rounds(run_dir: Path):
    series = epsilon_by_round(run_dir)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, points), (marker, style) in zip(sorted(series.items()), STYLES):
        rounds, eps = zip(*points)
        ax.plot(rounds, eps, marker=marker, linestyle=style, markersize=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.set_title(f"Privacy spent: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Curves:
    rounds: list[int]
    accuracy: list[float | None]
    loss: list[float | None]
    client_rounds: list[int]
    client_min: list[float]
    client_mean: list[float]
    client_max: list[float]


def training_curve_data(run_dir: Path) -> Curves:
    rows = [r for r in read_metrics(run_dir) if r.get("phase") == "federated" and r.get("global_eval")]
    rounds = [r["round"] for r in rows]
    acc = [r["global_eval"].get("accuracy") for r in rows]
    loss = [r["global_eval"].get("loss") for r in rows]
    c_rounds, c_min, c_mean, c_max = [], [], [], []
    for r in rows:
        per = (r.get("client_eval") or {}).get("per_client") or {}
        accs = [v["accuracy"] for v in per.values() if v.get("accuracy") is not None]
        if accs:
            c_rounds.append(r["round"])
            c_min.append(min(accs))
            c_mean.append(statistics.fmean(accs))
            c_max.append(max(accs))
    return Curves(rounds, acc, loss, c_rounds, c_min, c_mean, c_max)


def training_curves(run_dir: Path):
    data = training_curve_data(run_dir)
    if not data.rounds:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True)
    if any(a is not None for a in data.accuracy):
        top.plot(data.rounds, [math.nan if a is None else a for a in data.accuracy], marker="o",
                 color="black", label="global test set")
    if data.client_rounds:
        top.fill_between(data.client_rounds, data.client_min, data.client_max, color="tab:blue",
                         alpha=0.2, label="clients' own test sets (min-max)")
        top.plot(data.client_rounds, data.client_mean, marker="s", linestyle="--", color="tab:blue",
                 label="clients' mean")
    top.set_ylabel("accuracy")
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    bottom.plot(data.rounds, [math.nan if v is None else v for v in data.loss], marker="o",
                color="black")
    bottom.set_yscale("log")
    bottom.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    bottom.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    bottom.set_ylabel("global test loss (log)")
    bottom.set_xlabel("round (0 = untuned model)")
    bottom.grid(alpha=0.3)
    top.set_title(f"Training: {Path(run_dir).name}")
    fig.tight_layout()
    return fig


def save(fig, stem: Path) -> list[Path]:
    """Write stem.png (150 dpi) and stem.svg; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
