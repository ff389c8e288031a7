"""`fedsec report DIR`: a PDF of a run or a sweep, built from its directory alone.

The report holds a title page (experiment, date, fedsec version, git revision,
model, dataset, clients, rounds), a summary of findings computed from the run
files, the config, one table row per run, the figures of fedsec.reports.plots and the
privacy ledger. Every number in it is read from a file in the directory: each
run's result.json, config.resolved.yaml, env.json, metrics.jsonl and
privacy_ledger.json. Next to the PDF go the figures (PNG and SVG) and the tables
(CSV), in `<name>_files/`.

Layout is reportlab's platypus; text uses DejaVu (shipped with matplotlib),
embedded as a TrueType subset, so the PDF renders the same everywhere.
"""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedsec import utility
from fedsec.accountants import format_epsilon, format_lower_bound
from fedsec.configfile import load_yaml
from fedsec.disclosure import HEADER, UNCOVERED, guarantee_statement, predates_centred_count
from fedsec.errors import ConfigError
from fedsec.reports import plots
from fedsec.sweeps import defense_label, federation_size, utility_columns

RESULT, CONFIG, ENV, LEDGER = "result.json", "config.resolved.yaml", "env.json", "privacy_ledger.json"


@dataclass(frozen=True)
class RunFiles:
    """One run directory as the report sees it (any file may be missing)."""

    path: Path
    variant: str
    seed: int | None
    result: dict | None
    config: dict
    env: dict

    @property
    def privacy(self) -> dict:
        return (self.result or {}).get("privacy") or {}


def _read(path: Path, kind: str):
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    return load_yaml(text) if kind == "yaml" else plots.json.loads(text)


def load_run(path: Path, variant: str | None = None, seed: int | None = None) -> RunFiles:
    config = _read(path / CONFIG, "yaml") or {}
    return RunFiles(path, variant or path.name, seed if seed is not None else config.get("seed"),
                    _read(path / RESULT, "json"), config, _read(path / ENV, "json") or {})


def collect(directory: Path) -> tuple[str, list[RunFiles]]:
    """("sweep" | "run", the runs) of a sweep directory (results.json) or one run directory."""
    directory = Path(directory)
    rows = plots.sweep_rows(directory)
    if rows:
        # cells of a grid that are one experiment share a run directory (its name is in run_dir)
        return "sweep", [load_run(directory / Path(r["run_dir"]).name, r["variant"], r["seed"])
                         for r in rows]
    if (directory / CONFIG).is_file():
        return "run", [load_run(directory)]
    raise ConfigError("report DIR", str(directory), "is neither a sweep directory (results.json) nor "
                      f"a run directory ({CONFIG}); give a directory under runs/")


# ---------------------------------------------------------------------------
# What the report says: tables and findings, pure functions of the run files.


def run_table(runs: list[RunFiles]) -> list[dict]:
    """One row per run; every value is read from that run's files. Its utility columns
    are those of the sweep tables (fedsec.sweeps.utility_columns: final, untuned and
    local-only accuracy, loss and perplexity, benchmarks' and plugins' metrics)."""
    rows = []
    for run in runs:
        res, p = run.result or {}, run.privacy
        local = res.get("local_only") or {}
        rows.append({
            "variant": run.variant, "seed": run.seed,
            "algorithm": res.get("algorithm") or run.config.get("federation", {}).get("algorithm"),
            "defense": defense_label(run.config),
            "rounds": res.get("rounds_done"),
            "privacy": p.get("mode", "user") if p else "off",
            "epsilon": format_epsilon(p["epsilon"]) if p.get("certified") else None,
            "delta": p.get("delta"), "sigma": p.get("noise_multiplier"), "clip_norm": p.get("clip_norm"),
            "sample_rate": p.get("sample_rate"),
            "certified": p.get("certified") if p else None,
            **utility_columns(res.get("final") or {}, res.get("untuned") or {}, local or None),
            "audit_bound": (res.get("audit") or {}).get("epsilon_lower_bound"),
            "audit_bound_fdp": (res.get("audit") or {}).get("fdp_epsilon_lower_bound"),
            "audit": _audit_cell(res.get("audit")),
            "finished": res.get("finished", False),
            "noise": p.get("noise") if p else None, "stopped": res.get("stopped"),
            "attackers": len((res.get("attack") or {}).get("malicious", [])),
        })
    return rows


HEADLINE_METRICS = ("accuracy", "macro_f1", "exact_match", "pass_at_1", "harmless_rate", "mean_score")


def benchmark_rows(runs: list[RunFiles]) -> list[dict]:
    """eval.benchmarks of each finished run: per benchmark and metric, the untuned model's
    value (before round 1) and the final one, read from metrics.jsonl ([] when none ran)."""
    rows = []
    for run in runs:
        path = run.path / "metrics.jsonl"
        if not (run.result or {}).get("finished") or not path.is_file():
            continue
        seen: dict[str, list[tuple[int, dict]]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            row = plots.json.loads(line)
            for name, metrics in ((row.get("global_eval") or {}).get("benchmarks") or {}).items():
                seen.setdefault(name, []).append((row.get("round", 0), metrics))
        for name, evals in seen.items():
            first, last = evals[0], evals[-1]
            for metric in HEADLINE_METRICS:
                if metric in last[1]:
                    rows.append({"variant": run.variant, "seed": run.seed, "benchmark": name, "metric": metric,
                                 "untuned": first[1].get(metric) if first[0] == 0 else None,
                                 "final": last[1][metric], "round": last[0], "n": last[1].get("n")})
    return rows


def _audit_cell(audit: dict | None) -> str | None:
    """'v/r <kind>': the audit's correct guesses out of its guesses."""
    return f"{audit['correct']}/{audit['guesses']} {audit.get('kind', 'secret')}" if audit else None


def audit_findings(runs: list[RunFiles]) -> list[str]:
    """The privacy audit against the accountant, run by run; a bound above the accountant's
    epsilon is reported as the bug it is."""
    audited = [(r, r.result["audit"]) for r in runs if r.result and (r.result.get("audit") or {})]
    if not audited:
        return []
    out = []
    plain = [a["epsilon_lower_bound"] for r, a in audited if a["accountant_epsilon"] is None]
    plain_fdp = [a["fdp_epsilon_lower_bound"] for r, a in audited
                 if a["accountant_epsilon"] is None and a.get("fdp_epsilon_lower_bound") is not None]
    kind = audited[0][1].get("kind", "secret")
    if plain:
        out.append(f"Privacy audit ({kind} canaries, {audited[0][1]['canaries']} per run): runs without a "
                   f"certified epsilon show epsilon >= {_span(plain)}"
                   + (f" (f-DP test of the Gaussian curve: {_span(plain_fdp)})" if plain_fdp else "") + ".")
    certified = [(r, a) for r, a in audited if a["accountant_epsilon"] is not None]
    # each run's bound holds at its confidence c, so a correct implementation exceeds in about
    # (1 - c) of runs: over R runs the report flags only what exceeds at the corrected 1 - (1 - c) / R
    flagged = [(r, a) for r, a in certified if a["bound_exceeds_accountant"]]
    broken = [(r, a) for r, a in flagged if corrected_bound(a, len(certified)) > a["accountant_epsilon"]]
    if flagged and len(certified) > 1:
        c = flagged[0][1]["confidence"]
        out.append(f"Audit: {len(flagged)} of {len(certified)} DP runs exceed the accountant's epsilon at "
                   f"confidence {c:g} each (a correct implementation does so in up to {1 - c:.0%} of runs); "
                   f"corrected for {len(certified)} runs (Bonferroni, confidence {1 - (1 - c) / len(certified):.4g} "
                   f"each), {len(broken)} still do.")
    for r, a in broken:
        out.append(f"AUDIT VIOLATION in {r.variant} (seed {r.seed}): the lower bound "
                   f"{format_lower_bound(corrected_bound(a, len(certified)))} (confidence "
                   f"{1 - (1 - a['confidence']) / len(certified):.4g}) exceeds the accountant's epsilon "
                   f"{format_epsilon(a['accountant_epsilon'])}; its privacy claim does not hold.")
    if certified and not broken and max(comparable_bound(a) for _, a in certified) == 0:
        out.append(f"On all {len(certified)} DP run(s) the audit's bound is 0: under the noise the guesses "
                   "are too close to chance to prove any epsilon.")
    elif certified and not broken:
        r, a = max(certified, key=lambda ra: comparable_bound(ra[1]) / ra[1]["accountant_epsilon"])
        test = "f-DP" if comparable_bound(a) > a["epsilon_lower_bound"] else "(eps, delta)"
        out.append(f"On all {len(certified)} DP run(s) the audit's bound stays below the accountant's epsilon; "
                   f"closest: epsilon >= {format_lower_bound(comparable_bound(a))} ({test} test) against "
                   f"{format_epsilon(a['accountant_epsilon'])} ({r.variant}: "
                   f"{comparable_bound(a) / a['accountant_epsilon']:.0%} of it).")
    return out


def _section(csv_path: Path, rows: list[dict], heading: str, text: str, styles, columns=None) -> list:
    """A table of the report with its heading and explanation, its rows also written as CSV."""
    from reportlab.lib.units import cm
    from reportlab.platypus import Paragraph

    write_csv(csv_path, rows)
    return [Paragraph(heading, styles["h"]), Paragraph(text, styles["body"]),
            _table(rows, styles, columns, width=17.4 * cm)]


def _slug(key: str) -> str:
    """A results column as a file name: benchmark:fpb:accuracy -> benchmark_fpb_accuracy."""
    return re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_")


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return format_lower_bound(low) + (f" to {format_lower_bound(high)}" if high > low else "")


def comparable_bound(audit: dict, confidence: float | None = None) -> float:
    """The bound an accountant's epsilon must stay above: the (epsilon, delta) test's, and the
    f-DP test's where the run's guarantee is the Gaussian curve it tests (at `confidence`,
    default the audit's own)."""
    from fedsec.accountants import audit as bounds

    counts = (audit["canaries"], audit["guesses"], audit["correct"], audit["delta"])
    if confidence is None or confidence == audit["confidence"]:
        plain, fdp = audit["epsilon_lower_bound"], audit.get("fdp_epsilon_lower_bound")
    else:
        plain = bounds.one_run_bound(*counts, confidence).epsilon_lower_bound
        fdp = bounds.one_run_fdp_bound(*counts, confidence).epsilon_lower_bound if audit["delta"] > 0 else None
    return bounds.comparable_bound(plain, fdp, bool(audit.get("gaussian_mechanism")))


def corrected_bound(audit: dict, runs: int) -> float:
    """The run's comparable bound at confidence 1 - (1 - c) / runs (Bonferroni over `runs`
    audited runs)."""
    if runs <= 1:
        return comparable_bound(audit)
    return comparable_bound(audit, 1 - (1 - audit["confidence"]) / runs)


def _mean(values) -> float | None:
    stat = plots.aggregate(values)
    return stat.mean if stat else None


def findings(rows: list[dict]) -> list[str]:
    """Sentences of the summary, each computed from the table rows, on the runs' headline
    utility (fedsec.utility.headline: accuracy where the data has closed answers, else
    the held-out loss)."""
    out: list[str] = []
    unfinished = [r for r in rows if not r["finished"]]
    done = [r for r in rows if r["finished"]]
    by_variant: dict[str, list[dict]] = {}
    for r in done:
        by_variant.setdefault(r["variant"], []).append(r)
    head = utility.headline(done)
    seeds = max((len(m) for m in by_variant.values()), default=0)
    if done:
        out.append(f"{len(done)} finished run(s) in {len(by_variant)} variant(s), up to {seeds} seed(s) each"
                   + (f"; {head.label} values are means over seeds." if head else "."))
    if head is None:
        return out + _notes(done, unfinished)
    name, key = head.label, head.key
    untuned = _mean(r.get(head.untuned) for r in done)
    compared = plots.without_attacks(done, "attackers")  # like for like: attacks have their own sentences
    by_variant = {v: mine for v, mine in by_variant.items() if mine[0] in compared}
    plain = [r for r in compared if r["certified"] is None]
    plain_stat = plots.aggregate(r.get(key) for r in plain)
    plain_value = plain_stat.mean if plain_stat else None
    local_stat = plots.aggregate(r.get(head.local_only) for r in done)
    local = local_stat.mean if local_stat else None
    private = sorted(((_mean(r["epsilon"] for r in mine), v, mine) for v, mine in by_variant.items()
                      if mine[0]["certified"]), key=lambda t: t[0])
    sign = 1.0 if head.higher_is_better else -1.0  # a gain is a rise in accuracy, a fall in loss
    if private and plain_value is not None:
        for eps, variant, mine in private:
            stat = plots.aggregate(r.get(key) for r in mine)
            if stat is None:
                continue
            reference, under = _baseline(mine, plain, key)
            ref_stat = plots.aggregate(r.get(key) for r in reference)
            value, gap = stat.mean, ref_stat.mean - stat.mean
            text = (f"At epsilon {format_epsilon(eps)} (delta {mine[0]['delta']:g}, {variant}) the {name} is "
                    f"{_spread(stat)}, {abs(gap):.3f} {'below' if gap >= 0 else 'above'} non-private{under} "
                    f"({_spread(ref_stat, len({r['variant'] for r in reference if r.get(key) is not None}))})")
            gain = sign * (ref_stat.mean - untuned) if untuned is not None else None
            if gain is not None and gain > 0 and sign * (value - untuned) >= 0:
                text += f"; it keeps {sign * (value - untuned) / gain:.0%} of the non-private gain"
                text += f" over the untuned model ({untuned:.3f})"
            elif untuned is not None and sign * (value - untuned) < 0:
                text += (f", and {abs(untuned - value):.3f} {'below' if value < untuned else 'above'} the "
                         f"untuned model ({untuned:.3f}): "
                         "at this epsilon the noise costs more than federated training gains")
            out.append(text + ".")
        shown = {r["variant"] for r in plain} | {v for _, v, _ in private}  # the variants compared above
        single = [v for v, mine in by_variant.items() if v in shown and len(mine) == 1]
        if single:
            who = "Every variant compared here" if len(single) == len(shown) else ", ".join(single)
            out.append(f"{who} ran one seed: each such number is one draw (of the data, the client sample "
                       "and, under DP, the noise) with no spread, and one draw can land far from the "
                       "variant's mean; run more seeds before reading a difference as an effect.")
    elif len(by_variant) > 0:
        out += _ranking(by_variant, key, name, sign)
    if local is not None:
        text = (f"Clients training alone (local-only) reach "
                f"{_spread(local_stat, len({r['variant'] for r in done if r.get(head.local_only) is not None}))}")
        if plain_value is not None:
            where = "below" if plain_value >= local else "above"
            text += f", {abs(plain_value - local):.3f} {where} the non-private federated runs"
        out.append(text + ".")
    if untuned is not None:
        out.append(f"The untuned model scores {untuned:.3f}.")
    return out + _notes(done, unfinished)


def _baseline(mine: list[dict], plain: list[dict], key: str) -> tuple[list[dict], str]:
    """The non-private runs a private variant is compared with, like for like: those under the
    same server defense where the sweep ran it without DP (a DP x defense grid), else all of
    them. Returns (the runs, the words naming the defense where the sweep's non-private runs
    span several)."""
    measured = [r for r in plain if r.get(key) is not None]
    same = [r for r in measured if r.get("defense") == mine[0].get("defense")]
    if not same or len({r.get("defense") for r in measured}) == 1:
        return measured, ""
    return same, f" under {mine[0]['defense']}"


def _spread(stat, variants: int = 1) -> str:
    """A mean with its seeds' standard deviation where there are several seeds; over the runs of
    several variants (a grid's non-private cells) it says so, not seeds."""
    if stat.n <= 1:
        return f"{stat.mean:.3f}"
    over = f"{stat.n} seeds" if variants <= 1 else f"{stat.n} runs of {variants} variants"
    return f"{stat.mean:.3f} ± {stat.std:.3f} over {over}"


def _ranking(by_variant: dict[str, list[dict]], key: str, name: str, sign: float) -> list[str]:
    """The best and the weakest variant by their mean over seeds, with the seeds' spread: a tie is
    said to be one, and a gap within the spread (or between single draws) is not called a ranking."""
    scored = [(stat, v) for v, mine in by_variant.items() if (stat := plots.aggregate(r.get(key) for r in mine))]
    scored.sort(key=lambda t: -sign * t[0].mean)
    if not scored:
        return []

    def shown(stat) -> str:
        return _spread(stat) if stat.n > 1 else f"{stat.mean:.3f} (one seed)"

    (best, top), (worst, bottom) = scored[0], scored[-1]
    if len(scored) == 1:
        return [f"The one variant, {top}, has {name} {shown(best)}."]
    if f"{best.mean:.3f}" == f"{worst.mean:.3f}":
        return [f"Every variant has {name} {best.mean:.3f}: it does not tell them apart here."]
    text = f"The best variant is {top} with {name} {shown(best)}; the weakest is {bottom} with {shown(worst)}"
    if best.n == 1 or worst.n == 1:
        text += ": a single draw on at least one side, no spread to weigh the gap against; run more seeds first"
    elif abs(best.mean - worst.mean) <= best.std + worst.std:
        text += ": the gap is within the seeds' spread"
    return [text + "."]


def _notes(done: list[dict], unfinished: list[dict]) -> list[str]:
    """What the summary says of certification, seeded noise, budgets and unfinished runs."""
    out: list[str] = []
    skipped = [r for r in done if r["certified"] is False]
    if skipped:
        out.append(f"{len(skipped)} run(s) carry no epsilon: their privacy is not certified "
                   "(see the table); no epsilon is claimed for them.")
    seeded = [r for r in done if r["certified"] and r["noise"] == "seed"]
    if seeded:
        out.append(f"{len(seeded)} DP run(s) drew their noise from the seed (privacy.reproducible): their epsilon "
                   "holds only while that seed stays secret.")
    for r in done:
        if r["stopped"]:
            out.append(f"{r['variant']} (seed {r['seed']}) ended after round {r['rounds']}, at its epsilon budget: "
                       f"{r['stopped']}.")
    if unfinished:
        out.append(f"{len(unfinished)} run(s) are unfinished and left out of these numbers.")
    return out


GRID_COLUMNS = {"refusal_rate": "harmless rate",
                "attack_success_rate": "backdoor success", "clean_target_rate": "target on clean",
                "true_positive_rate": "malicious dropped", "false_positive_rate": "honest dropped"}


def grid_table(directory: Path) -> list[dict]:
    """A malicious-client sweep's summary.csv, one row per cell: its axes, the attack's
    size and each metric as mean ± std over seeds ([] when no run had malicious clients)."""
    path = Path(directory) / "summary.csv"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows, fields = list(reader), reader.fieldnames or []
    if not any(r.get("malicious_count") not in (None, "", "0") for r in rows):
        return []
    axes = fields[1:fields.index("seeds")]
    best = utility.headline({k.removesuffix("_mean"): (v or None) for k, v in r.items() if k.endswith("_mean")}
                            for r in rows)
    columns = ({best.key: best.short} if best else {}) | GRID_COLUMNS
    out = []
    for r in rows:
        count = r["num_clients"] or "?"
        row = {"cell": r["variant"], **{a: r[a] for a in axes},
               "malicious": f"{r['malicious_count']} of {count}", "seeds": r["seeds"]}
        for key, head in columns.items():
            if any(x.get(f"{key}_mean") for x in rows):
                mean, std = r.get(f"{key}_mean"), r.get(f"{key}_std")
                row[head] = f"{float(mean):.3f} ± {float(std):.3f}" if mean else None
        out.append(row)
    return out


# the metric each attack aims at (update attacks: the clean utility)
TARGETED = {"backdoor": "attack_success_rate", "alignment_poison": "refusal_rate",
            "preference_flip": "refusal_rate"}


def _grid_columns(grid: list[dict]) -> list[str]:
    """A grid's axes name its cells, so the cell column is left out where there are axes."""
    columns = list(grid[0])
    has_axes = columns[1] != "malicious"
    return [c for c in columns if c != "cell" or not has_axes]


def claims(rows: list[dict], runs: list[RunFiles]) -> list[dict]:
    """The report's claims page: each comparison the summary makes, as paired differences over
    seeds (a variant's seed s against the reference's seed s), mean +- sd, how many seeds
    agree in sign with the mean (a claim that holds only on the mean says so), and the
    command that reproduces it (the first run's, from env.json, at its git revision)."""
    done = plots.without_attacks([r for r in rows if r["finished"]], "attackers")
    head = utility.headline(done)
    if head is None:
        return []
    env = runs[0].env if runs else {}
    words = [Path(w).name if i == 0 else w for i, w in enumerate(env.get("command") or [])]
    reproduce = (" ".join(words) or "-") + (f" (git {env['git_revision'][:10]})" if env.get("git_revision") else "")
    by_variant: dict[str, dict] = {}
    for r in done:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    plain_variants = [mine for mine in by_variant.values() if next(iter(mine.values()))["certified"] is None]
    out = []

    def paired(mine: dict, reference) -> list[float]:
        return [mine[s][head.key] - reference(s) for s in sorted(mine, key=str)
                if mine[s].get(head.key) is not None and reference(s) is not None]

    for variant, mine in by_variant.items():
        first = next(iter(mine.values()))
        if first["certified"] is not True:
            continue
        at = f"{variant} (epsilon {first['epsilon']})"
        # like for like, as the summary: the non-private variant under the same defense where there is one
        plain = next((p for p in plain_variants if next(iter(p.values())).get("defense") == first.get("defense")),
                     plain_variants[0] if plain_variants else None)
        comparisons = []
        if plain:  # named by its variant where the sweep has several non-private ones
            versus = "non-private" if len(plain_variants) == 1 else next(iter(plain.values()))["variant"]
            comparisons.append((versus, lambda s, plain=plain: (plain.get(s) or {}).get(head.key)))
        comparisons.append(("the untuned model", lambda s, mine=mine: (mine.get(s) or {}).get(head.untuned)))
        for name, reference in comparisons:
            diffs = paired(mine, reference)
            if not diffs:
                continue
            stat = plots.aggregate(diffs)
            agree = sum((d > 0) == (stat.mean > 0) for d in diffs if d != 0)
            out.append({"claim": f"{at}: {head.label} minus {name}'s",
                        "value": f"{stat.mean:+.3f} +- {stat.std:.3f}", "seeds": stat.n,
                        "holds": "every seed" if agree == stat.n else f"the mean only ({agree} of {stat.n} seeds)",
                        "reproduce": reproduce})
    audits = [(r.result or {}).get("audit") or {} for r in runs if (r.result or {}).get("finished")]
    audited = [a for a in audits if a.get("accountant_epsilon")]
    if audited:
        ratios = [comparable_bound(a) / a["accountant_epsilon"] for a in audited]
        out.append({"claim": "audited epsilon / accountant's epsilon (the tests that apply to the run)",
                    "value": f"max {max(ratios):.2f}", "seeds": len(audited),
                    "holds": "below 1 in every run" if max(ratios) < 1 else "NOT below 1 in every run",
                    "reproduce": reproduce})
    return out


def grid_findings(data: plots.AttackGrid | None) -> list[str]:
    """Per attack at the largest fraction: what it does to the plain mean against the clean
    run, and the defense that holds up best, each on the metric the attack targets."""
    if data is None or 0.0 not in data.fractions:
        return []
    top, out = data.fractions[-1], []
    for attack in data.attacks:
        metric = TARGETED.get(attack)
        if metric not in data.cells:
            metric = next((m for m in data.metrics if m not in plots.GRID_METRICS), None)  # the headline
        if metric is None:
            continue
        label = plots.label(metric)
        # higher is the attacker's win for the backdoor's success, and a loss
        worse_up = metric == "attack_success_rate" or (
            metric not in plots.BOUNDED and utility.describe(metric).higher_is_better is False)
        # a defense without a clean run of its own (a grid whose one clean run is under the plain
        # mean) is compared on its attacked value, beside the clean run there is
        own = {d: data.get(metric, attack, d, 0.0) for d in data.defenses}
        shared = next((own[d] for d in data.defenses if own[d] is not None), None)
        scores = {d: (a.mean, (own[d] or shared).mean, own[d] is not None) for d in data.defenses
                  if (a := data.get(metric, attack, d, top)) is not None and (own[d] or shared) is not None}
        if not scores:
            continue
        first = data.defenses[0] if data.defenses[0] in scores else next(iter(scores))
        attacked, clean, _ = scores[first]
        text = (f"{attack} at {top:.0%} malicious clients: {label} {attacked:.3f} under {first} "
                f"against {clean:.3f} without attackers")
        best = (min if worse_up else max)(scores, key=lambda d: scores[d][0])
        if best != first:
            text += f"; {best} holds it at {scores[best][0]:.3f}"
            text += f" (its clean run: {scores[best][1]:.3f})" if scores[best][2] else ""
        elif len(scores) > 1:
            others = ", ".join(f"{d} {scores[d][0]:.3f}" for d in scores if d != first)
            text += f"; no other defense does better ({others})"
        out.append(text + ".")
    return out


def dp_robustness_findings(data: plots.DpRobustness | None) -> tuple[list[str], list[str]]:
    """What the DP x robustness grid answers, in numbers: per attack, what it costs the
    plain mean (clean minus attacked headline) at each privacy setting (does clipping and
    noise blunt it?), and per detecting rule the share of malicious updates it dropped at
    each setting (do they blind it?). Returns (the summary's sentences, the sentences for
    the page of what the DP guarantee does not cover): a DP run releases its model, not
    which updates its rule dropped, so the detection rates at private settings go there."""
    if data is None:
        return [], []
    metric = next((m for m in data.cells if m not in plots.DETECTION), None)
    if metric is None:
        return [], []
    out, hidden, name = [], [], plots.label(metric)
    private = {p for (_, p, _), certified in data.certified.items() if certified is not None}

    def show(st: plots.Stat) -> str:
        return f"{st.mean:.3f}" + (f" +- {st.std:.3f}" if st.n > 1 else "")

    mean = "mean" if "mean" in data.aggregators else data.aggregators[0]
    for attack in [a for a in data.attacks if a != "no attack"]:
        costs = []
        for p in data.privacy:
            hit, clean = data.get(metric, attack, p, mean), data.get(metric, "no attack", p, mean)
            if hit is not None and clean is not None:
                costs.append(f"{p}: {show(clean)} -> {show(hit)}")
        if costs:
            out.append(f"{attack} against the {mean} ({name}, clean -> attacked): " + "; ".join(costs) + ".")
        for rule in [a for a in data.aggregators if a != mean]:
            for where, levels in ((out, [p for p in data.privacy if p not in private]),
                                  (hidden, [p for p in data.privacy if p in private])):
                caught = [(p, st) for p in levels if (st := data.get("true_positive_rate", attack, p, rule))]
                if caught:
                    where.append(f"{rule} under {attack} dropped " + ", ".join(
                        f"{show(st)} of the malicious updates ({p})" for p, st in caught) + ".")
    if hidden:
        hidden.append(f"These detection rates of DP runs are read from {UNCOVERED}/; a rule other than the "
                      "mean or norm_bound gets the mean's noise but no certified epsilon.")
    return out, hidden


def stale_findings(runs: list[RunFiles]) -> list[str]:
    """Runs whose epsilon was accounted by an older fedsec for a weaker mechanism."""
    stale = [r for r in runs if predates_centred_count(r.privacy, _read(r.path / LEDGER, "json"))]
    if not stale:
        return []
    return [f"UNDERSTATED EPSILON in {', '.join(sorted({r.variant for r in stale}))}: adaptive clipping in these "
            "runs released the uncentred clip count (sensitivity 1, before fedsec fixed it), so the real "
            "multiplier is (z_delta^-2 + sigma_b^-2)^(-1/2), below the accounted z, and the printed epsilon is "
            "too small. Re-run them."]


def uncovered_rows(runs: list[RunFiles]) -> list[dict]:
    """One row per DP run from its not_covered_by_dp_guarantee/result.json ([] when none has one)."""
    rows = []
    for run in runs:
        path = run.path / UNCOVERED / RESULT
        if not path.is_file():
            continue
        hidden = _read(path, "json") or {}
        final = hidden.get("final") or {}
        membership = hidden.get("membership") or {}
        rows.append({"variant": run.variant, "seed": run.seed,
                     "epsilon": format_epsilon(run.privacy["epsilon"]) if run.privacy.get("certified") else None,
                     "local_only_accuracy": (hidden.get("local_only") or {}).get("mean_accuracy"),
                     "local_only_loss": (hidden.get("local_only") or {}).get("mean_loss"),
                     "exposure": (final.get("memorization") or {}).get("exposure_mean"),
                     "extraction_rate": (final.get("memorization") or {}).get("extraction_rate"),
                     "mia_auc": (membership.get("loss") or {}).get("auc"),
                     "mia_reference_auc": (membership.get("reference") or {}).get("auc"),
                     "mia_blind_auc": (membership.get("blind") or {}).get("auc")})
    return [r for r in rows if any(v is not None for k, v in r.items() if k not in ("variant", "seed", "epsilon"))]


def _uncovered_page(directory: Path, kind: str, runs: list[RunFiles], files: Path, styles,
                    sentences: list[str] = (), extra_figures: list = ()) -> list:
    """The report's page of what the DP guarantee does not cover (nothing without DP runs):
    the hidden table and figures, and the `sentences` and `extra_figures` (name, figure)
    other sections keep off their pages (the DP runs' detection rates)."""
    from reportlab.lib.units import cm
    from reportlab.platypus import PageBreak, Paragraph, Spacer

    rows = uncovered_rows(runs)
    hidden_sweep = directory / UNCOVERED if kind == "sweep" else None
    figures = [(name, fig) for name, fig in extra_figures if fig is not None]
    if hidden_sweep is not None and hidden_sweep.is_dir():
        for name, metric in (("exposure", "exposure"), ("extraction", "extraction_rate"),
                             ("mia", "mia_reference_auc")):
            fig = plots.privacy_utility(hidden_sweep, metric, title=directory.name)
            if fig is not None:
                figures.append((f"privacy_{name}", fig))
    if not rows and not figures and not sentences:
        return []
    story = [PageBreak(), Paragraph("Not covered by the DP guarantee", styles["h"]),
             Paragraph(HEADER + " Read from each DP run's " + UNCOVERED + "/ folder.", styles["body"])]
    story += [Paragraph(sentence, styles["body"]) for sentence in sentences]
    if rows:
        write_csv(files / "not_covered_by_dp_guarantee.csv", rows)
        columns = ["variant", "seed", "epsilon"] + [c for c in ("local_only_accuracy", "local_only_loss", "exposure",
                                                                "extraction_rate", "mia_auc", "mia_reference_auc")
                                                     if any(r[c] is not None for r in rows)]
        story.append(_table(rows, styles, columns, width=17.4 * cm))
    for name, fig in figures:
        story += [Spacer(1, 0.3 * cm), _figure(fig, files / name)]
    return story


def _figure(fig, path: Path):
    """The figure saved at `path` (.png, .svg) as a flowable 16 cm wide, or less where a tall
    figure (a grid of panels) would not fit a page: scaled to 22 cm high, proportions kept."""
    from reportlab.lib.units import cm
    from reportlab.platypus import Image

    width, height = fig.get_size_inches()
    png, _ = plots.save(fig, path)
    scale = min(16 * cm / width, 22 * cm / height)
    return Image(str(png), width=width * scale, height=height * scale)


def ledger_rows(run: RunFiles) -> list[dict]:
    """The run's privacy ledger as table rows (empty without one)."""
    ledger = _read(run.path / LEDGER, "json")
    if not ledger:
        return []
    def up(eps):  # printed epsilons round up
        return None if eps is None else format_epsilon(eps, 4)

    if ledger.get("kind") == "record":
        return [{"round": r["round"], f"worst epsilon ({ledger['primary']})": up(r["epsilon"])}
                for r in ledger["rounds"]]
    rows = []
    for e in ledger["entries"]:
        row = {"round": e["round"], "sigma": e["noise_multiplier"], "q": e["sample_rate"], "C": e["clip_norm"]}
        if e.get("count_stddev") is not None:  # adaptive clipping: the two releases that make up sigma
            row.update({"update sigma": e["update_noise_multiplier"], "count std": e["count_stddev"],
                        "count sens.": e["count_sensitivity"]})
        for name, eps in (e["epsilon"] or {}).items():
            row[f"epsilon {name}"] = up(eps)
        for name in e.get("unavailable") or {}:
            row[f"epsilon {name}"] = "unavailable"
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


# ---------------------------------------------------------------------------
# The PDF.


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.3g}"
    return str(value)


def _styles():
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    fonts = Path(plots.matplotlib.get_data_path()) / "fonts" / "ttf"
    for name, file in (("DejaVu", "DejaVuSans.ttf"), ("DejaVu-Bold", "DejaVuSans-Bold.ttf"),
                       ("DejaVuMono", "DejaVuSansMono.ttf")):
        if name not in pdfmetrics.getRegisteredFontNames():
            pdfmetrics.registerFont(TTFont(name, str(fonts / file)))
    base = getSampleStyleSheet()
    return {
        "title": ParagraphStyle("t", parent=base["Title"], fontName="DejaVu-Bold", fontSize=20),
        "h": ParagraphStyle("h", parent=base["Heading2"], fontName="DejaVu-Bold"),
        "body": ParagraphStyle("b", parent=base["BodyText"], fontName="DejaVu", fontSize=10, leading=14),
        "mono": ParagraphStyle("m", parent=base["Code"], fontName="DejaVuMono", fontSize=7, leading=8.5),
        "cell": ParagraphStyle("c", parent=base["BodyText"], fontName="DejaVu", fontSize=7, leading=8.5),
    }


HEADERS = {"sample_rate": "q", "clip_norm": "C", "sigma": "sigma", "final_accuracy": "final acc",
           "local_only_accuracy": "local-only acc", "untuned_accuracy": "untuned acc",
           "audit": "audit guesses", "audit_bound": "audit eps >=", "audit_bound_fdp": "f-DP eps >=",
           "certified": "certified", "algorithm": "algorithm"}


def _table(rows: list[dict], styles, columns: list[str] | None = None, width: float | None = None,
           headers: dict[str, str] | None = None):
    from reportlab.lib import colors
    from reportlab.platypus import Paragraph, Table, TableStyle

    columns = columns or list(rows[0])
    def show(column: str, value) -> str:
        if "epsilon" in column and isinstance(value, float):
            return format_epsilon(value, 4)  # rounded up: never below the proven value
        return _fmt(value)

    cells = [[show(c, r.get(c)) for c in columns] for r in rows]
    heads = [(headers or {}).get(c) or HEADERS.get(c, c) for c in columns]
    widths = None
    if width is not None:  # the longest word or value of each column, in points, + cell padding
        from reportlab.pdfbase.pdfmetrics import stringWidth

        size = styles["cell"].fontSize
        need = [max([stringWidth(w, "DejaVu-Bold", size) for w in h.split()] +
                    [stringWidth(row[i], "DejaVu", size) for row in cells]) + 1
                for i, h in enumerate(heads)]
        scale = min(1.0, (width - 7 * len(need)) / sum(need))
        widths = [n * scale + 7 for n in need]
    data = [[Paragraph(f"<b>{h}</b>", styles["cell"]) for h in heads]]
    data += [[Paragraph(v, styles["cell"]) for v in row] for row in cells]
    table = Table(data, colWidths=widths, repeatRows=1)
    table.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.4, colors.black),
                               ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#dddddd")),
                               ("LEFTPADDING", (0, 0), (-1, -1), 3),
                               ("RIGHTPADDING", (0, 0), (-1, -1), 3),
                               ("VALIGN", (0, 0), (-1, -1), "TOP")]))
    return table


def build_report(directory: Path, out: Path | None = None, force: bool = False) -> Path:
    """Write the PDF (default DIR/report.pdf) and its figures and tables; returns its path.
    Every value is read from the directory, plugin metrics' directions too (result.json's
    metric_directions), never from this process's registry."""
    directory = Path(directory)
    kind, runs = collect(directory)
    recorded: dict = {}
    for run in runs:
        recorded.update((run.result or {}).get("metric_directions") or {})
    with utility.recorded_directions(recorded):
        return _build(directory, kind, runs, out, force)


def _build(directory: Path, kind: str, runs: list[RunFiles], out: Path | None, force: bool) -> Path:
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import cm
    from reportlab.platypus import (
        PageBreak,
        Paragraph,
        Preformatted,
        SimpleDocTemplate,
        Spacer,
    )

    out = Path(out) if out is not None else directory / "report.pdf"
    if out.exists() and not force:
        raise ConfigError("-o", str(out), "already exists; choose another path or pass --force")
    files = out.parent / f"{out.stem}_files"
    files.mkdir(parents=True, exist_ok=True)
    styles = _styles()
    table = run_table(runs)
    write_csv(files / "runs.csv", table)

    first = runs[0]
    cfg, env = first.config, first.env
    data_cfg = cfg.get("data", {})
    clients = federation_size(first.path, cfg)
    name = directory.name if kind == "sweep" else cfg.get("name", directory.name)
    story = [Paragraph(f"fedsec report: {name}", styles["title"]), Spacer(1, 0.4 * cm)]
    facts = [("directory", str(directory)), ("kind", f"{kind} of {len(runs)} run(s)" if kind == "sweep" else kind),
             ("report date", time.strftime("%Y-%m-%d %H:%M %Z")),
             ("fedsec version", (env.get("versions") or {}).get("fedsec", "-")),
             ("git revision", env.get("git_revision", "-")), ("run started", env.get("started", "-")),
             ("model", cfg.get("model", {}).get("name", "-")),
             ("task", cfg.get("task", "-")), ("dataset", data_cfg.get("source", "-")),
             ("clients", clients if clients is not None else "see config"),
             ("rounds", cfg.get("federation", {}).get("rounds", "-")),
             ("clients per round", cfg.get("federation", {}).get("clients_per_round", "-"))]
    story.append(_table([{"field": k, "value": v} for k, v in facts], styles))
    story += [Spacer(1, 0.5 * cm), Paragraph("Summary", styles["h"])]
    grid = grid_table(directory) if kind == "sweep" else []
    dp_grid, hidden_findings = None, []
    story += [Paragraph(sentence, styles["body"]) for sentence in findings(table)]
    story += [Paragraph(sentence, styles["body"]) for sentence in audit_findings(runs)]
    story += [Paragraph(sentence, styles["body"]) for sentence in stale_findings(runs)]
    if grid:
        rows = plots.sweep_rows(directory)
        story += [Paragraph(sentence, styles["body"])
                  for sentence in grid_findings(plots.attack_grid_data(rows))]
        dp_grid = plots.dp_robustness_data(rows, plots.sweep_rows(directory / UNCOVERED))
        public, hidden_findings = dp_robustness_findings(dp_grid)
        story += [Paragraph(sentence, styles["body"]) for sentence in public]
    claimed = claims(table, runs)
    if claimed:
        story += [PageBreak(), *_section(files / "claims.csv", claimed, "Claims",
                                         "Each comparison as paired differences over seeds (a variant's seed s "
                                         "against the reference's seed s), mean +- sd; 'holds' says whether every "
                                         "seed agrees with the mean's sign, and the last column how to reproduce "
                                         "it.", styles)]
    story += [PageBreak(), Paragraph("Runs", styles["h"])]
    head = utility.headline(table)
    shown = [head.key, head.local_only, head.untuned] if head else []
    headers = dict(zip(shown, (f"{w} {head.short}" for w in ("final", "local-only", "untuned")))) if head else {}
    several = len({r["defense"] for r in table}) > 1  # the server's rule where the runs differ in it
    columns = ["variant", "seed", "algorithm", *(["defense"] if several else []), "rounds", "privacy", "epsilon",
               "sigma", "clip_norm", "sample_rate", "certified", *shown]
    # local-only and untuned values only where measured (a DPO run's untuned model has no preference accuracy)
    columns = [c for c in columns
               if not c.startswith(("local_only", "untuned")) or any(r.get(c) is not None for r in table)]
    if any(row["audit"] for row in table):
        columns += ["audit", "audit_bound"] + (["audit_bound_fdp"] if any(
            row.get("audit_bound_fdp") is not None for row in table) else [])
    story.append(_table(table, styles, columns, width=17.4 * cm, headers=headers))
    benchmarks = benchmark_rows(runs)
    if benchmarks:
        story += [Spacer(1, 0.5 * cm), *_section(files / "benchmarks.csv", benchmarks, "Benchmarks",
                                                 "eval.benchmarks of each run: the untuned model (before round "
                                                 "1) and the final global adapter, from metrics.jsonl.", styles)]
    if grid:
        story += [PageBreak(), *_section(files / "grid.csv", grid, "Malicious-client grid",
                                         "One row per cell, mean ± standard deviation over seeds. Dropped: the "
                                         "share of sampled malicious (honest) updates the defense excluded, "
                                         "scored against the known identities.", styles, _grid_columns(grid))]

    # (name, draw): each figure is drawn when its turn comes and closed once saved, so a
    # grid of many variants never holds more than one open (matplotlib warns past 20)
    figures = []
    if kind == "sweep":
        figures.append(("privacy_utility", lambda: plots.privacy_utility(directory)))
        if head is not None and head.key != "final_loss":  # the loss always, beside the headline
            figures.append(("privacy_utility_loss", lambda: plots.privacy_utility(directory, "final_loss")))
        # and every other utility the full evaluation measured: each benchmark's metrics, the
        # registered metrics, the harmless rate on the probes (AdvBench); perplexity is the loss again
        rows = plots.sweep_rows(directory)
        for extra in [u.key for u in utility.present(rows)] + ["refusal_rate"]:
            drawn = (head.key if head else None, "final_loss", "final_perplexity")
            if extra not in drawn and any(r.get(extra) is not None for r in rows):
                figures.append((f"privacy_utility_{_slug(extra)}",
                                lambda extra=extra: plots.privacy_utility(directory, extra)))
        figures.append(("variants_by_round", lambda: plots.variant_curves(directory)))
        figures.append(("audit_bounds", lambda: plots.audit_bounds(directory)))
        figures.append(("attack_grid", lambda: plots.attack_grid(directory)))
        figures.append(("dp_robustness", lambda: plots.dp_robustness(directory)))
        if head is not None and head.key != "final_loss":  # an attack that derails training shows in the loss
            figures.append(("dp_robustness_loss", lambda: plots.dp_robustness(directory, "final_loss")))
        if dp_grid is None or all(v is None for v in dp_grid.certified.values()):
            figures.append(("dp_detection", lambda: plots.dp_detection(directory)))  # else on the uncovered page
        figures.append(("attack_fractions", lambda: plots.attack_fractions(directory)))
    done = [r for r in runs if r.result and r.result.get("finished")]
    seen = set()
    for run in done:  # one training curve per experiment (its first seed), up to 8
        if run.path not in seen and len(seen) < 8:
            seen.add(run.path)
            figures.append((f"training_{run.variant}", lambda path=run.path: plots.training_curves(path)))
    private = next((r for r in done if r.privacy.get("certified")), None)
    if private is not None:
        figures.append((f"epsilon_{private.variant}", lambda: plots.epsilon_over_rounds(private.path)))
    heading = [PageBreak(), Paragraph("Figures", styles["h"])]
    for fig_name, draw in figures:
        fig = draw()
        if fig is not None:  # a figure without data to draw is left out
            story += heading + [_figure(fig, files / fig_name), Spacer(1, 0.3 * cm)]
            heading = []

    if private is not None:
        ledger = ledger_rows(private)
        write_csv(files / f"ledger_{private.variant}.csv", ledger)
        story += [PageBreak(), Paragraph(f"Privacy ledger: {private.variant}", styles["h"]),
                  Paragraph(guarantee_statement(private.config, private.privacy), styles["body"]),
                  Paragraph(f"{private.privacy.get('accountant', '')} is the accountant of record; "
                            "the others are cross-checks. Each row is one round's mechanism as released: "
                            "sigma is the accounted multiplier (under adaptive clipping made of the update's "
                            "sigma and the centred count's std over its sensitivity 1/2); the number of "
                            "clients sampled is not recorded (the fixed denominator q N keeps it hidden). "
                            "Epsilons are rounded up.", styles["body"]),
                  _table(ledger, styles, width=17.4 * cm)]
    hidden_figures = []
    if dp_grid is not None and any(v is not None for v in dp_grid.certified.values()):
        hidden_figures.append(("dp_detection", plots.dp_detection(directory)))
    story += _uncovered_page(directory, kind, runs, files, styles, hidden_findings, hidden_figures)
    story += [PageBreak(), Paragraph("Config (first run)", styles["h"]),
              Preformatted(yaml.safe_dump(cfg, sort_keys=False), styles["mono"])]

    tmp = out.with_name(out.name + ".tmp")
    SimpleDocTemplate(str(tmp), pagesize=A4, title=f"fedsec report: {name}", author="fedsec",
                      leftMargin=1.8 * cm, rightMargin=1.8 * cm).build(story)
    tmp.replace(out)
    return out
