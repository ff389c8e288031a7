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
                                  (metric="exposure" or "extraction_rate": the
                                  canaries' memorization against epsilon)
    epsilon_over_rounds(run_dir)  epsilon spent after each round, per accountant
    training_curves(run_dir)      global test accuracy and loss per round, and the
                                  spread over clients' own test sets
    attack_grid(sweep_dir)        malicious-client grids: attack x defense heatmaps at
                                  the largest fraction of malicious clients
    attack_fractions(sweep_dir)   each metric over the fraction of malicious clients,
                                  one curve per defense, one panel per attack
    audit_bounds(sweep_dir)       the privacy audit's empirical lower bound on epsilon
                                  against the accountant's epsilon, with y = x (a point
                                  above it would refute the privacy claim)
    save(fig, stem)               stem.png and stem.svg
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

from fedsec.accountants import format_epsilon

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import matplotlib.ticker  # noqa: E402

STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")]
METRIC_LABELS = {"final_accuracy": "global test accuracy", "preference_accuracy": "preference accuracy",
                 "likelihood_accuracy": "likelihood accuracy", "refusal_rate": "harmless (refusal) rate",
                 "attack_success_rate": "backdoor attack success", "true_positive_rate": "malicious updates dropped",
                 "false_positive_rate": "honest updates dropped",
                 "exposure": "canary exposure (bits)", "extraction_rate": "canaries extracted",
                 "mia_auc": "membership inference AUC (loss)",
                 "mia_reference_auc": "membership inference AUC (reference-calibrated)"}
# what a malicious-client grid shows, in this order, where the sweep measured it
GRID_METRICS = ("final_accuracy", "refusal_rate", "attack_success_rate", "true_positive_rate")


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


def privacy_utility(sweep_dir: Path, metric: str = "final_accuracy", title: str | None = None):
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
    kind = "Memorization" if metric in ("exposure", "extraction_rate") else (
        "Membership inference" if metric.startswith("mia_") else "Privacy-utility")
    ax.set_title(f"{kind}: {title or Path(sweep_dir).name}")
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


@dataclass(frozen=True)
class AttackGrid:
    """A malicious-client sweep, from its results rows: metric -> (attack, defense, fraction)
    -> the metric over seeds. Runs without malicious clients are every attack's 0 point."""

    attacks: list[str]
    defenses: list[str]
    fractions: list[float]  # of all clients, ascending, 0 first when the sweep has clean runs
    cells: dict[str, dict[tuple[str, str, float], Stat]]

    def get(self, metric: str, attack: str, defense: str, fraction: float) -> Stat | None:
        return self.cells.get(metric, {}).get((attack, defense, fraction))


def attack_grid_data(rows: list[dict]) -> AttackGrid | None:
    """None when no run of the sweep had malicious clients."""
    rows = [r for r in rows if r.get("malicious_count") is not None and r.get("num_clients")]
    attacked = [r for r in rows if r["malicious_count"] > 0]
    if not attacked:
        return None
    attacks = list(dict.fromkeys(r["attack_kind"] for r in attacked))
    defenses = list(dict.fromkeys(r["aggregator"] for r in rows))
    groups: dict[tuple[str, str, float], list[dict]] = {}
    seen: set[tuple] = set()
    for r in rows:
        fraction = round(r["malicious_count"] / r["num_clients"], 6)
        kinds = attacks if r["malicious_count"] == 0 else [r["attack_kind"]]
        for kind in kinds:  # a clean run is the 0 point of every attack, counted once per seed
            key = (kind, r["aggregator"], fraction)
            if (key, r["seed"], r["run_dir"]) not in seen:
                seen.add((key, r["seed"], r["run_dir"]))
                groups.setdefault(key, []).append(r)
    cells = {}
    for metric in GRID_METRICS:
        cells[metric] = {k: st for k, mine in groups.items() if (st := aggregate(r.get(metric) for r in mine))}
    fractions = sorted({k[2] for k in groups})
    return AttackGrid(attacks, defenses, fractions, {m: c for m, c in cells.items() if c})


def attack_grid(sweep_dir: Path):
    """Attack (rows, with the clean runs on top) x defense (columns) heatmaps of each
    metric at the largest fraction of malicious clients, each cell annotated."""
    data = attack_grid_data(sweep_rows(sweep_dir))
    if data is None:
        return None
    top = data.fractions[-1]
    metrics = [m for m in GRID_METRICS if m in data.cells]
    clean = 0.0 in data.fractions
    labels = (["no attack"] if clean else []) + data.attacks
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 0.5 * len(labels) + 2.2),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        grid = []
        for label in labels:
            attack, fraction = (data.attacks[0], 0.0) if label == "no attack" else (label, top)
            grid.append([(st.mean if (st := data.get(metric, attack, d, fraction)) else math.nan)
                         for d in data.defenses])
        image = ax.imshow(grid, cmap="Greys", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                text = "-" if math.isnan(value) else f"{value:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if not math.isnan(value) and value > 0.55 else "black")
        ax.set_xticks(range(len(data.defenses)), data.defenses, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{Path(sweep_dir).name}: attack x defense at {top:.0%} malicious clients", fontsize=10)
    fig.tight_layout()
    return fig


def attack_fractions(sweep_dir: Path, metric: str | None = None):
    """The metric (default: the first the sweep measured of accuracy, harmless rate, attack
    success) over the fraction of malicious clients; one panel per attack, one curve per
    defense, mean and standard deviation over seeds."""
    data = attack_grid_data(sweep_rows(sweep_dir))
    if data is None or len(data.fractions) < 2:
        return None
    metrics = [metric] if metric else [m for m in GRID_METRICS[:3] if m in data.cells]
    fig, axes = plt.subplots(len(metrics), len(data.attacks), figsize=(3.2 * len(data.attacks) + 0.6,
                                                                      2.6 * len(metrics) + 0.6),
                             squeeze=False, sharex=True)
    for i, m in enumerate(metrics):
        for j, attack in enumerate(data.attacks):
            ax = axes[i][j]
            for k, defense in enumerate(data.defenses):
                points = [(f, st) for f in data.fractions if (st := data.get(m, attack, defense, f))]
                if not points:
                    continue
                marker, style = STYLES[k % len(STYLES)]
                ax.errorbar([100 * f for f, _ in points], [st.mean for _, st in points],
                            yerr=[st.std for _, st in points], marker=marker, linestyle=style,
                            capsize=3, label=defense)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(attack, fontsize=9)
            if j == 0:
                ax.set_ylabel(METRIC_LABELS.get(m, m), fontsize=8)
            if i == len(metrics) - 1:
                ax.set_xlabel("malicious clients (%)", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class AuditBounds:
    points: list[tuple[str, float, Stat]]  # (variant, accountant epsilon, bound over seeds), by epsilon
    non_private: Stat | None  # the bound where no epsilon is claimed


def audit_bounds_data(rows: list[dict]) -> AuditBounds | None:
    """None when no run of the sweep was audited."""
    audited = [r for r in rows if r.get("audit_bound") is not None]
    if not audited:
        return None
    points, plain = [], []
    for variant in dict.fromkeys(r["variant"] for r in audited):
        mine = [r for r in audited if r["variant"] == variant]
        if mine[0].get("certified") is True:
            points.append((variant, aggregate(r["epsilon"] for r in mine).mean,
                           aggregate(r["audit_bound"] for r in mine)))
        elif mine[0].get("certified") is None:
            plain.extend(mine)
    points.sort(key=lambda p: p[1])
    return AuditBounds(points, aggregate(r["audit_bound"] for r in plain))


def audit_bounds(sweep_dir: Path):
    """Accountant epsilon (x) vs the audit's lower bound (y), mean and spread over seeds,
    the line y = x, and the non-private runs' bound as a reference line."""
    data = audit_bounds_data(sweep_rows(sweep_dir))
    if data is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 4.2))
    top = max([p[1] for p in data.points] + [p[2].mean + p[2].std for p in data.points]
              + ([data.non_private.mean] if data.non_private else []) + [1.0]) * 1.1
    ax.plot([0, top], [0, top], color="gray", linestyle=":", label="y = x (the accountant's claim)")
    if data.points:
        ax.errorbar([p[1] for p in data.points], [p[2].mean for p in data.points],
                    yerr=[p[2].std for p in data.points], marker="o", linestyle="-", color="black",
                    capsize=3, label=f"DP runs ({max(p[2].n for p in data.points)} seed(s))")
    if data.non_private is not None:
        ax.axhline(data.non_private.mean, linestyle="--", color="tab:blue",
                   label=f"non-private ({data.non_private.mean:.2f})")
    ax.set_xlim(0, top)
    ax.set_ylim(-0.03 * top, top)  # a bound of 0 stays visible
    ax.set_xlabel("accountant's epsilon")
    ax.set_ylabel("empirical lower bound on epsilon")
    ax.set_title(f"Privacy audit: {Path(sweep_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, stem: Path) -> list[Path]:
    """Write stem.png (150 dpi) and stem.svg; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    # not with_suffix: a grid cell's name ("alie-0.3-mean") has dots of its own
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
