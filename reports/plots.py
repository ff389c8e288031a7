"""Figures drawn from run and sweep directories only (never from live objects).

Each function takes a directory, reads the files a run or sweep leaves behind
(result.json, metrics.jsonl, privacy_ledger.json, a sweep's results.json) and
returns a matplotlib Figure, or None when the directory holds nothing to draw
(a non-private sweep has no privacy-utility curve; a run without a ledger has
no epsilon curve). Seeds are aggregated as mean and standard deviation. The
figures are meant to survive black-and-white printing: curves differ by marker
and line style as well as colour.

    privacy_utility(sweep_dir)    epsilon (log) vs a utility metric (default: the
                                  sweep's headline, fedsec.utility: accuracy where the
                                  data has closed answers, else the held-out loss),
                                  with the non-private, local-only and untuned
                                  references (metric="exposure" or "extraction_rate":
                                  the canaries' memorization against epsilon); a grid
                                  sweep draws one curve per mechanism (or other axis
                                  that leaves epsilon in place)
    epsilon_over_rounds(run_dir)  epsilon spent after each round, per accountant
    training_curves(run_dir)      global test accuracy (where measured) and loss per
                                  round, and the spread over clients' own test sets
    variant_curves(sweep_dir)     a utility per round, one curve per variant (mean
                                  and spread over seeds), all on one figure
    attack_grid(sweep_dir)        malicious-client grids: attack x defense heatmaps at
                                  the largest fraction of malicious clients
    attack_fractions(sweep_dir)   each metric over the fraction of malicious clients,
                                  one curve per defense, one panel per attack
    dp_robustness(sweep_dir)      a sweep crossing privacy with attacks and aggregators:
                                  per attack, a privacy x aggregator heatmap of the
                                  headline utility (mean +- sd over seeds)
    dp_detection(sweep_dir)       the same grid's detection rates (malicious and honest
                                  updates dropped), labelled as not covered by the DP
                                  guarantee where the runs are private
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

from fedsec import utility
from fedsec.accountants import format_epsilon

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import matplotlib.ticker  # noqa: E402

STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")]
# privacy-utility series, clear of the reference lines' blue, orange and gray
SERIES_COLORS = ["black", "tab:red", "tab:green", "tab:purple", "tab:brown", "tab:olive"]
METRIC_LABELS = {"final_accuracy": "global test accuracy", "preference_accuracy": "preference accuracy",
                 "likelihood_accuracy": "likelihood accuracy", "refusal_rate": "harmless (refusal) rate",
                 "attack_success_rate": "backdoor attack success", "true_positive_rate": "malicious updates dropped",
                 "false_positive_rate": "honest updates dropped",
                 "exposure": "canary exposure (bits)", "extraction_rate": "canaries extracted",
                 "mia_auc": "membership inference AUC (loss)",
                 "mia_reference_auc": "membership inference AUC (reference-calibrated)",
                 "mia_blind_auc": "blind baseline AUC (text alone, no model)"}
# what a malicious-client grid shows besides the sweep's headline utility, where measured
GRID_METRICS = ("refusal_rate", "attack_success_rate", "true_positive_rate")
BOUNDED = ("refusal_rate", "attack_success_rate", "clean_target_rate", "true_positive_rate",
           "false_positive_rate", "extraction_rate", "mia_auc", "mia_reference_auc", "mia_blind_auc")


def label(metric: str) -> str:
    """A metric's axis label."""
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    try:
        return utility.describe(metric).label
    except KeyError:
        return metric


def bounded(metric: str) -> bool:
    """Whether the metric is a share, drawn on a 0..1 axis."""
    if metric in BOUNDED:
        return True
    try:
        return utility.describe(metric).bounded
    except KeyError:
        return False


def headline_metric(rows: list[dict]) -> str | None:
    """The results column a sweep's figures speak of (fedsec.utility.headline)."""
    best = utility.headline(rows)
    return best.key if best else None


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


def grid_axes(rows: list[dict]) -> list[str]:
    """A grid sweep's axes: the results columns between `variant` and `seed` ([] if none)."""
    keys = list(rows[0]) if rows else []
    if "variant" not in keys or "seed" not in keys:
        return []
    return keys[keys.index("variant") + 1:keys.index("seed")]


@dataclass(frozen=True)
class PrivacyUtility:
    """What the privacy-utility figure draws, computed from a sweep's results."""

    curves: dict[str, list[tuple[str, float, Stat]]]  # series -> (variant, epsilon, metric over seeds), by epsilon
    non_private: Stat | None
    local_only: Stat | None
    untuned: Stat | None

    @property
    def curve(self) -> list[tuple[str, float, Stat]]:
        """Every certified point of every series, by epsilon."""
        return sorted((p for c in self.curves.values() for p in c), key=lambda p: p[1])


SINGLE_SERIES = "user-level DP"


def _epsilon_axes(cells: dict[str, tuple[dict, float]], axes: list[str]) -> set[str]:
    """The grid axes along which epsilon moves: two cells that differ in that axis alone
    have epsilons more than 5% apart (a privacy budget axis, a noise axis), where the
    other axes (mechanism, aggregator, clip) leave it at the same calibrated target."""
    moving = set()
    for axis in axes:
        others = [a for a in axes if a != axis]
        groups: dict[tuple, list[float]] = {}
        for levels, eps in cells.values():
            groups.setdefault(tuple(levels[a] for a in others), []).append(eps)
        if any(max(g) > 1.05 * min(g) for g in groups.values() if len(g) > 1):
            moving.add(axis)
    return moving


def without_attacks(rows: list[dict], key: str = "malicious_count") -> list[dict]:
    """The runs without attackers, where a sweep has both: its privacy comparisons (the
    non-private reference, the curves) stay like for like, and the attacked runs have the
    attack pages (`attack_grid`, `dp_robustness`)."""
    clean = [r for r in rows if not r.get(key)]
    return clean if clean and len(clean) < len(rows) else rows


def privacy_utility_data(rows: list[dict], metric: str | None = None) -> PrivacyUtility:
    """Certified DP runs become curves; runs without privacy give the references.
    `metric` defaults to the rows' headline utility. Where some runs have attackers, only
    those without are drawn (`without_attacks`).

    A grid sweep draws one curve per level of the axes that leave epsilon where it is
    (mechanism x budget: one curve per mechanism, along the budget); a sweep of plain
    variants draws one curve. Runs marked not certified (no noise, SCAFFOLD) have no
    epsilon and are left out: fedsec never places a run at an epsilon it cannot prove.
    """
    metric = metric or headline_metric(rows) or "final_loss"
    axes = grid_axes(rows)
    rows = without_attacks(rows)
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    points, cells, plain = [], {}, []
    for variant, mine in by_variant.items():
        if mine[0].get("certified") is True:
            stat = aggregate(r.get(metric) for r in mine)
            eps = aggregate(r.get("epsilon") for r in mine)
            if stat is not None and eps is not None:
                points.append((variant, eps.mean, stat))
                cells[variant] = ({a: mine[0].get(a) for a in axes}, eps.mean)
        elif mine[0].get("certified") is None:
            plain.extend(mine)
    series_axes = [a for a in axes if a not in _epsilon_axes(cells, axes)]
    curves: dict[str, list[tuple[str, float, Stat]]] = {}
    for point in points:  # series in the sweep's order, each along epsilon
        levels = cells[point[0]][0]
        named = [str(levels[a]) for a in series_axes if levels[a] is not None]
        if named:
            name = ", ".join(named)
        elif axes and all(levels[a] is None for a in axes):  # a plain variant beside a grid: by its name
            name = point[0]
        else:
            name = SINGLE_SERIES
        curves.setdefault(name, []).append(point)
    curves = {name: sorted(curve, key=lambda p: p[1]) for name, curve in curves.items()}
    local = f"local_only_{metric.removeprefix('final_')}" if metric.startswith("final_") else None
    return PrivacyUtility(curves, aggregate(r.get(metric) for r in plain),
                          aggregate(r.get(local) for r in rows) if local else None,
                          aggregate(r.get(f"untuned_{metric.removeprefix('final_')}") for r in rows))


def privacy_utility(sweep_dir: Path, metric: str | None = None, title: str | None = None):
    """Epsilon (log scale) vs `metric` (default: the sweep's headline utility), mean and
    spread over seeds, one curve per series (privacy_utility_data), with reference lines."""
    rows = sweep_rows(sweep_dir)
    metric = metric or headline_metric(rows)
    if metric is None:
        return None
    data = privacy_utility_data(rows, metric)
    if not data.curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, curve) in enumerate(data.curves.items()):
        marker, style = STYLES[i % len(STYLES)]
        seeds = max(c[2].n for c in curve)
        ax.errorbar([c[1] for c in curve], [c[2].mean for c in curve], yerr=[c[2].std for c in curve],
                    marker=marker, linestyle=style, color=SERIES_COLORS[i % len(SERIES_COLORS)], capsize=3,
                    label=f"{name} ({seeds} seed(s))")
    refs = [(data.non_private, "non-private FL", "--", "tab:blue"),
            (data.local_only, "local-only", ":", "tab:orange"),
            (data.untuned, "untuned model", "-.", "tab:gray")]
    for stat, name, style, color in refs:
        if stat is not None:
            ax.axhline(stat.mean, linestyle=style, color=color, label=f"{name} ({stat.mean:.3f})")
            if stat.std > 0:
                ax.axhspan(stat.mean - stat.std, stat.mean + stat.std, color=color, alpha=0.12)
    ticks = {format_epsilon(c[1]): c[1] for c in data.curve}  # near-equal epsilons share a tick
    ax.set_xscale("log")
    ax.set_xticks(list(ticks.values()), list(ticks))
    ax.minorticks_off()
    ax.set_xlabel("epsilon (log scale)")
    ax.set_ylabel(label(metric))
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
    client_rounds: list[int]  # rounds with clients' own test sets scored, and their spread:
    client_min: list[float]  # of accuracy where measured, else of loss
    client_mean: list[float]
    client_max: list[float]
    client_metric: str = "accuracy"


def training_curve_data(run_dir: Path) -> Curves:
    rows = [r for r in read_metrics(run_dir) if r.get("phase") == "federated" and r.get("global_eval")]
    rounds = [r["round"] for r in rows]
    acc = [r["global_eval"].get("accuracy") for r in rows]
    loss = [r["global_eval"].get("loss") for r in rows]
    per_round = [((r.get("client_eval") or {}).get("per_client") or {}) for r in rows]
    key = "accuracy" if any(v.get("accuracy") is not None for per in per_round for v in per.values()) else "loss"
    c_rounds, c_min, c_mean, c_max = [], [], [], []
    for r, per in zip(rows, per_round):
        values = [v[key] for v in per.values() if v.get(key) is not None and math.isfinite(v[key])]
        if values:
            c_rounds.append(r["round"])
            c_min.append(min(values))
            c_mean.append(statistics.fmean(values))
            c_max.append(max(values))
    return Curves(rounds, acc, loss, c_rounds, c_min, c_mean, c_max, key)


def _loss_axis(ax, values: list[float]) -> None:
    """Log scale where the values span more than a decade, with labelled ticks either way."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))


def training_curves(run_dir: Path):
    """Accuracy (where the data has closed answers) and loss per round, the clients' own
    test sets as a min-max band; a run without accuracy gets the loss panel alone."""
    data = training_curve_data(run_dir)
    if not data.rounds:
        return None
    has_accuracy = any(a is not None for a in data.accuracy)
    if has_accuracy:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True)
    else:
        fig, bottom = plt.subplots(figsize=(6, 3.6))
        top = bottom
    if has_accuracy:
        top.plot(data.rounds, [math.nan if a is None else a for a in data.accuracy], marker="o",
                 color="black", label="global test set")
        top.set_ylabel("accuracy")
        top.grid(alpha=0.3)
    bottom.plot(data.rounds, [math.nan if v is None else v for v in data.loss], marker="o",
                color="black", label="global test set")
    if data.client_rounds:
        band = top if data.client_metric == "accuracy" else bottom
        band.fill_between(data.client_rounds, data.client_min, data.client_max, color="tab:blue",
                          alpha=0.2, label="clients' own test sets (min-max)")
        band.plot(data.client_rounds, data.client_mean, marker="s", linestyle="--", color="tab:blue",
                  label="clients' mean")
    if has_accuracy:
        top.legend(fontsize=8)
    elif data.client_rounds:
        bottom.legend(fontsize=8)
    _loss_axis(bottom, data.loss + (data.client_max if data.client_metric == "loss" else []))
    bottom.set_ylabel("held-out loss (mean token NLL)")
    bottom.set_xlabel("round (0 = untuned model)")
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    top.set_title(f"Training: {Path(run_dir).name}")
    fig.tight_layout()
    return fig


def variant_curve_data(sweep_dir: Path, metric: str) -> dict[str, list[tuple[int, Stat]]]:
    """variant -> [(round, the metric over its seeds)] from each run's metrics.jsonl."""
    series: dict[str, dict[int, list[float]]] = {}
    seen = set()
    for row in sweep_rows(sweep_dir):
        run = Path(sweep_dir) / Path(row["run_dir"]).name
        if (row["variant"], run) in seen:
            continue
        seen.add((row["variant"], run))
        for r in read_metrics(run):
            if r.get("phase") == "federated" and r.get("global_eval"):
                value = utility.evaluation_values(r["global_eval"]).get(metric)
                if value is not None:
                    series.setdefault(row["variant"], {}).setdefault(r["round"], []).append(value)
    return {v: [(k, aggregate(vals)) for k, vals in sorted(by_round.items())] for v, by_round in series.items()}


def variant_curves(sweep_dir: Path, metric: str | None = None):
    """`metric` (default: the sweep's headline utility) per round, one curve per variant,
    mean over seeds with a band of one standard deviation; None for fewer than 2 variants."""
    metric = metric or headline_metric(sweep_rows(sweep_dir))
    data = variant_curve_data(sweep_dir, metric) if metric else {}
    if len(data) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (variant, points) in enumerate(data.items()):
        marker, style = STYLES[k % len(STYLES)]
        rounds = [p[0] for p in points]
        means = [p[1].mean for p in points]
        color = colors[k % len(colors)]
        ax.plot(rounds, means, marker=marker, linestyle=style, color=color, markersize=4,
                label=f"{variant} ({max(p[1].n for p in points)} seed(s))")
        if any(p[1].std > 0 for p in points):
            ax.fill_between(rounds, [p[1].mean - p[1].std for p in points],
                            [p[1].mean + p[1].std for p in points], color=color, alpha=0.12)
    if not bounded(metric):
        _loss_axis(ax, [p[1].mean for points in data.values() for p in points])
    ax.set_xlabel("round (0 = untuned model)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(label(metric))
    ax.set_title(f"{label(metric)} by round: {Path(sweep_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
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
    metrics: tuple[str, ...] = ()  # the measured ones, the headline utility first

    def get(self, metric: str, attack: str, defense: str, fraction: float) -> Stat | None:
        return self.cells.get(metric, {}).get((attack, defense, fraction))


def attack_grid_data(rows: list[dict]) -> AttackGrid | None:
    """None when no run of the sweep had malicious clients. A sweep that also crosses
    privacy settings keeps its non-private runs here (see `dp_robustness_data`)."""
    rows = [r for r in rows if r.get("malicious_count") is not None and r.get("num_clients")]
    if len({privacy_label(r, rows) for r in rows}) > 1:  # privacy crossed in: its page is dp_robustness
        rows = [r for r in rows if r.get("certified") is None]
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
    head = headline_metric(rows)
    for metric in ([head] if head else []) + list(GRID_METRICS):
        cells[metric] = {k: st for k, mine in groups.items() if (st := aggregate(r.get(metric) for r in mine))}
    fractions = sorted({k[2] for k in groups})
    cells = {m: c for m, c in cells.items() if c}
    return AttackGrid(attacks, defenses, fractions, cells, tuple(cells))


def attack_grid(sweep_dir: Path):
    """Attack (rows, with the clean runs on top) x defense (columns) heatmaps of each
    metric at the largest fraction of malicious clients, each cell annotated."""
    data = attack_grid_data(sweep_rows(sweep_dir))
    if data is None:
        return None
    top = data.fractions[-1]
    metrics = list(data.metrics)
    clean = 0.0 in data.fractions
    rows = (["no attack"] if clean else []) + data.attacks
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 0.5 * len(rows) + 2.2),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        grid = []
        for name in rows:
            attack, fraction = (data.attacks[0], 0.0) if name == "no attack" else (name, top)
            grid.append([(st.mean if (st := data.get(metric, attack, d, fraction)) else math.nan)
                         for d in data.defenses])
        finite = [v for row in grid for v in row if not math.isnan(v)]
        low, high = (0.0, 1.0) if bounded(metric) else (min(finite), max(finite))
        high = high if high > low else low + 1.0
        image = ax.imshow(grid, cmap="Greys", vmin=low, vmax=high, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                wide = not bounded(metric) and abs(value) >= 100  # a loss keeps two decimals
                text = "-" if math.isnan(value) else (f"{value:.3g}" if wide else f"{value:.2f}")
                dark = not math.isnan(value) and (value - low) / (high - low) > 0.55
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(data.defenses)), data.defenses, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(label(metric), fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{Path(sweep_dir).name}: attack x defense at {top:.0%} malicious clients", fontsize=10)
    fig.tight_layout()
    return fig


def attack_fractions(sweep_dir: Path, metric: str | None = None):
    """The metric (default: the headline utility, the harmless rate and the attack success,
    where measured) over the fraction of malicious clients; one panel per attack, one curve per
    defense, mean and standard deviation over seeds."""
    data = attack_grid_data(sweep_rows(sweep_dir))
    if data is None or len(data.fractions) < 2:
        return None
    metrics = [metric] if metric else [m for m in data.metrics if m != "true_positive_rate"]
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
            if bounded(m):
                ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(attack, fontsize=9)
            if j == 0:
                ax.set_ylabel(label(m), fontsize=8)
            if i == len(metrics) - 1:
                ax.set_xlabel("malicious clients (%)", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def privacy_label(row: dict, rows: list[dict]) -> str:
    """A run's privacy setting as a grid level: non-private, clip only (clipping, no
    noise), or its noise multiplier, named by the epsilon it certifies. A rule without a
    sensitivity bound (Krum, FLAME, ...) gets the same noise as the mean at that target
    but no epsilon of its own: it borrows the label of a certified run with its sigma."""
    if row.get("certified") is None:
        return "non-private"
    sigma = row.get("noise_multiplier")
    if not sigma:
        return "clip only"
    certified = [r["epsilon"] for r in rows if r.get("certified") is True and r.get("epsilon") is not None
                 and r.get("noise_multiplier") is not None and math.isclose(r["noise_multiplier"], sigma)]
    return f"eps {statistics.fmean(certified):.3g} (sigma {sigma:.2f})" if certified else f"sigma {sigma:.2f}"


def attack_label(row: dict) -> str:
    if not row.get("malicious_count"):
        return "no attack"
    return f"{row['attack_kind']} {row['malicious_count'] / row['num_clients']:.0%}"


@dataclass(frozen=True)
class DpRobustness:
    """A sweep crossing privacy settings with attacks and aggregators: metric -> (attack,
    privacy, aggregator) -> the metric over seeds. Levels in display order: no attack
    first; non-private, clip only, then by growing noise; aggregators as the sweep lists them."""

    attacks: list[str]
    privacy: list[str]
    aggregators: list[str]
    cells: dict[str, dict[tuple[str, str, str], Stat]]
    certified: dict[tuple[str, str, str], bool | None]  # None: non-private

    def get(self, metric: str, attack: str, privacy: str, aggregator: str) -> Stat | None:
        return self.cells.get(metric, {}).get((attack, privacy, aggregator))


DETECTION = ("true_positive_rate", "false_positive_rate")


def dp_robustness_data(rows: list[dict], hidden: list[dict] | None = None) -> DpRobustness | None:
    """None unless the sweep has malicious clients and at least two privacy settings.
    `hidden`: the rows with the metrics the DP guarantee does not cover filled in (the
    sweep's not_covered_by_dp_guarantee/results.json); the detection rates come from there."""
    rows = [r for r in rows if r.get("malicious_count") is not None and r.get("num_clients")]
    if not any(r["malicious_count"] > 0 for r in rows):
        return None
    labels = {r["run_dir"]: privacy_label(r, rows) for r in rows}

    def noise(label: str) -> float:
        sigma = next(r.get("noise_multiplier") or 0.0 for r in rows if labels[r["run_dir"]] == label)
        return -1.0 if label == "non-private" else sigma

    privacy = sorted(dict.fromkeys(labels.values()), key=noise)
    if len(privacy) < 2:
        return None
    attacks = sorted(dict.fromkeys(attack_label(r) for r in rows), key=lambda a: a != "no attack")
    aggregators = list(dict.fromkeys(r["aggregator"] for r in rows))
    full = {r["run_dir"]: r for r in (hidden or [])}
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((attack_label(r), labels[r["run_dir"]], r["aggregator"]), []).append(r)
    head = headline_metric(rows)
    cells = {}
    for metric in [m for m in (head, "final_loss", "refusal_rate") if m]:
        cells[metric] = {k: st for k, mine in groups.items() if (st := aggregate(r.get(metric) for r in mine))}
    for metric in DETECTION:  # where the rows leave them empty (DP runs), from the hidden tables
        cells[metric] = {k: st for k, mine in groups.items() if k[0] != "no attack" and (st := aggregate(
            r.get(metric) if r.get(metric) is not None else full.get(r["run_dir"], {}).get(metric)
            for r in mine))}
    cells = {m: c for m, c in cells.items() if c}
    certified = {k: mine[0].get("certified") for k, mine in groups.items()}
    return DpRobustness(attacks, privacy, aggregators, cells, certified)


def _heatmap(ax, grid: list[list[Stat | None]], metric: str, rows: list[str], columns: list[str],
             title: str, marks: list[list[str]] | None = None, scale: tuple[float, float] | None = None) -> None:
    """One annotated heatmap panel: mean over seeds, +- sd below it where seeds > 1. `scale`:
    the colour range (panels of one figure share it), by default [0, 1] for a rate, else the
    panel's own."""
    means = [[st.mean if st else math.nan for st in row] for row in grid]
    finite = [v for row in means for v in row if not math.isnan(v)]
    low, high = scale or ((0.0, 1.0) if bounded(metric) else (min(finite, default=0.0), max(finite, default=1.0)))
    high = high if high > low else low + 1.0
    image = ax.imshow(means, cmap="Greys", vmin=low, vmax=high, aspect="auto")
    for i, row in enumerate(grid):
        for j, st in enumerate(row):
            if st is None:
                ax.text(j, i, "-", ha="center", va="center", fontsize=7)
                continue
            text = f"{st.mean:.2f}" + (f"\n±{st.std:.2f}" if st.n > 1 else "") + (marks[i][j] if marks else "")
            dark = (st.mean - low) / (high - low) > 0.55
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def _hidden_rows(sweep_dir: Path) -> list[dict]:
    from fedsec.disclosure import UNCOVERED

    return sweep_rows(Path(sweep_dir) / UNCOVERED)


def dp_robustness(sweep_dir: Path, metric: str | None = None):
    """Per attack (panels), privacy setting (rows) x aggregator (columns) of `metric`
    (default: the headline utility), mean +- sd over seeds. A cell marked * is a DP run
    without a certified epsilon (its rule has no sensitivity bound): same noise, no claim."""
    rows = sweep_rows(sweep_dir)
    data = dp_robustness_data(rows, _hidden_rows(sweep_dir))
    metric = metric or headline_metric(rows) or "final_loss"
    if data is None or metric not in data.cells:
        return None
    widths = [max(1, sum(any(data.get(metric, a, p, r) for p in data.privacy) for r in data.aggregators))
              for a in data.attacks]
    fig, axes = plt.subplots(1, len(data.attacks), figsize=(0.9 * sum(widths) + 2.2 * len(data.attacks) + 1,
                                                            0.55 * len(data.privacy) + 2.4), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    values = [st.mean for st in data.cells[metric].values()]
    scale = (0.0, 1.0) if bounded(metric) else (min(values), max(values))  # one colour scale for all panels
    for ax, attack in zip(axes[0], data.attacks):  # each panel with the rules its attack was run against
        rules = [a for a in data.aggregators if any(data.get(metric, attack, p, a) for p in data.privacy)]
        grid = [[data.get(metric, attack, p, a) for a in rules] for p in data.privacy]
        marks = [["*" if data.certified.get((attack, p, a)) is False and "sigma" in p else "" for a in rules]
                 for p in data.privacy]
        _heatmap(ax, grid, metric, data.privacy, rules, attack, marks, scale)
    fig.suptitle(f"{Path(sweep_dir).name}: {label(metric)} (* same noise, not certified)", fontsize=9)
    fig.tight_layout()
    return fig


def dp_detection(sweep_dir: Path):
    """The detection rates of the attacked cells: per attack (a row of panels), malicious
    (left) and honest (right) updates each rule dropped, over privacy x aggregator. Under DP these are not
    what the mechanism releases (the title says so)."""
    rows = sweep_rows(sweep_dir)
    data = dp_robustness_data(rows, _hidden_rows(sweep_dir))
    if data is None or not all(m in data.cells for m in DETECTION):
        return None
    attacks = [a for a in data.attacks if a != "no attack"]
    fig, axes = plt.subplots(len(attacks), 2, figsize=(8.2, (0.55 * len(data.privacy) + 2.2) * len(attacks)),
                             squeeze=False)
    for i, attack in enumerate(attacks):
        for j, metric in enumerate(DETECTION):
            grid = [[data.get(metric, attack, p, a) for a in data.aggregators] for p in data.privacy]
            _heatmap(axes[i][j], grid, metric, data.privacy, data.aggregators, f"{attack}: {label(metric)}")
    private = any(v is not None for v in data.certified.values())
    fig.suptitle(f"{Path(sweep_dir).name}: detection" + (" (DP rows: not covered by the DP guarantee)"
                                                         if private else ""), fontsize=9)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class AuditBounds:
    points: list[tuple[str, float, Stat]]  # (variant, accountant epsilon, bound over seeds), by epsilon
    non_private: Stat | None  # the bound where no epsilon is claimed


def audit_bounds_data(rows: list[dict], key: str = "audit_bound") -> AuditBounds | None:
    """None when no run of the sweep was audited. `key`: audit_bound (Steinke et al.'s
    (epsilon, delta) test) or audit_bound_fdp (Mahloujifar et al.'s f-DP test)."""
    audited = [r for r in rows if r.get(key) is not None]
    if not audited:
        return None
    points, plain = [], []
    for variant in dict.fromkeys(r["variant"] for r in audited):
        mine = [r for r in audited if r["variant"] == variant]
        if mine[0].get("certified") is True:
            points.append((variant, aggregate(r["epsilon"] for r in mine).mean,
                           aggregate(r[key] for r in mine)))
        elif mine[0].get("certified") is None:
            plain.extend(mine)
    points.sort(key=lambda p: p[1])
    return AuditBounds(points, aggregate(r[key] for r in plain))


def audit_bounds(sweep_dir: Path):
    """Accountant epsilon (x) vs the audit's lower bounds (y: the (epsilon, delta) test and,
    where computed, the f-DP test), mean and spread over seeds, the line y = x, and the
    non-private runs' bounds as reference lines."""
    rows = sweep_rows(sweep_dir)
    tests = [(audit_bounds_data(rows, key), name, marker, color)
             for key, name, marker, color in (("audit_bound", "(eps, delta) test", "o", "black"),
                                              ("audit_bound_fdp", "f-DP test", "s", "tab:red"))]
    tests = [t for t in tests if t[0] is not None]
    if not tests:
        return None
    fig, ax = plt.subplots(figsize=(5, 4.2))
    top = max([1.0] + [v for data, *_ in tests for v in
                       [p[1] for p in data.points] + [p[2].mean + p[2].std for p in data.points]
                       + ([data.non_private.mean] if data.non_private else [])]) * 1.1
    ax.plot([0, top], [0, top], color="gray", linestyle=":", label="y = x (the accountant's claim)")
    for data, name, marker, color in tests:
        if data.points:
            ax.errorbar([p[1] for p in data.points], [p[2].mean for p in data.points],
                        yerr=[p[2].std for p in data.points], marker=marker, linestyle="-", color=color,
                        capsize=3, label=f"DP runs, {name} ({max(p[2].n for p in data.points)} seed(s))")
        if data.non_private is not None:
            ax.axhline(data.non_private.mean, linestyle="--", color=color,
                       label=f"non-private, {name} ({data.non_private.mean:.2f})")
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
