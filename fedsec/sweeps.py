"""Sweeps: named variants of one base experiment, each over several seeds.

A sweep file holds

    name: algorithms
    base: experiments/quickstart.yaml     # or an inline mapping
    set: [federation.rounds=6]            # overrides for every run (optional)
    seeds: [0, 1, 2]
    variants:                             # name -> overrides
      fedavg: [federation.algorithm=fedavg]
      fedadam: [federation.algorithm=fedadam]

and expands into one run per (variant, seed) under runs/<name>/<variant>-s<seed>/.
A DP sweep may list `epsilons: [0.5, 1, 2, 4, 8, .inf]` instead of (or beside)
variants: each becomes a variant `eps<value>` with privacy.mode=user (or the sweep's
`privacy_mode: record`) and that target epsilon (.inf: clipping without noise,
reported as not certified); variants given explicitly (the non-private baseline)
come first.
A grid crosses named axes into cells, each cell a variant named by its levels:

    grid:                                 # axis -> level -> overrides, crossed in order
      attack:  {sign_flip: [attack.kind=sign_flip], alie: [attack.kind=alie]}
      fraction: {"0": [attack.kind=none, attack.fraction=0], "0.3": [attack.fraction=0.3]}
      defense: {mean: [defense.aggregator=mean], krum: [defense.aggregator=krum, defense.f=2]}

gives cells sign_flip-0-mean, sign_flip-0-krum, ..., alie-0.3-krum (later axes'
overrides win, so the "0" level above makes every attack's 0% cell the clean run).
Cells that resolve to the same experiment share one run, so the clean run is trained
once per defense and seed however many attacks the grid holds.
Started again, a sweep skips finished runs and resumes unfinished ones. It writes
results.csv and results.json (one row per run) and summary.csv (mean and standard
deviation across seeds per variant), which the report builder can read.
"""

from __future__ import annotations

import copy
import csv
import json
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedsec.accountants import format_epsilon
from fedsec.config import ConfigError, load_config, read_yaml
from fedsec.disclosure import HEADER, UNCOVERED
from fedsec.rundir import CONFIG, RunDir, atomic_write_text, read_result
from fedsec.utility import describe, evaluation_values, perplexity

# Every key a sweep file may hold, what it means (docs/sweeps.md; `fedsec sweep --help`).
SWEEP_KEYS = {
    "name": "the sweep's name: its directory is <output_dir>/<name> (required)",
    "base": "the experiment every run starts from: a YAML path (relative to the sweep file) or an "
            "inline config mapping",
    "set": "key=value overrides applied to every run, before the variant's",
    "seeds": "the seeds each variant runs with (default [0]); tables give mean and std over them",
    "variants": "variant name -> list of key=value overrides; one run per variant and seed",
    "epsilons": "target epsilons, each a variant eps<value> with user-level DP calibrated to it "
                "(.inf: clipping without noise, not certified); explicit variants come first",
    "privacy_mode": "user (DP-FedAvg, the default) or record (DP-SGD inside each client) for epsilons",
    "grid": "axis -> {level -> list of key=value}: the axes crossed into cells named by their levels "
            "(later axes' overrides win); cells that are one experiment share one run",
    "output_dir": "where the sweep directory goes (default runs)",
}


@dataclass(frozen=True)
class SweepRun:
    variant: str
    seed: int
    overrides: tuple[str, ...]
    out: Path
    cell: tuple[tuple[str, str], ...] = ()  # grid sweeps: (axis, level) per axis


def expand(spec_path: str | Path | Mapping, out: str | Path | None = None
           ) -> tuple[Path, list[SweepRun], Path | None, dict]:
    """(sweep directory, runs, base config file or None, inline base mapping). `spec_path` is
    a sweep file, or its content as a mapping (a notebook's; a `base` path is then relative to
    the working directory). `out`: the sweep directory (default <output_dir>/<name>)."""
    if isinstance(spec_path, Mapping):
        spec, spec_path = copy.deepcopy(dict(spec_path)), Path("sweep.yaml")  # the caller's mapping stays as it was
    elif isinstance(spec_path, (str, Path)):
        spec = read_yaml(spec_path)
    else:
        raise ConfigError("sweep", type(spec_path).__name__, "give a sweep file's path or its content as a mapping "
                          "of sweep keys (name, base, set, seeds, variants, epsilons, grid)")
    for key in spec:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"sweep.{key}", spec[key], f"unknown key; use {', '.join(SWEEP_KEYS)} "
                              "(docs/sweeps.md)")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("sweep.name", name, "give the sweep a name")
    base = spec.get("base", {})
    base_file, base_raw = None, {}
    if isinstance(base, str):
        base_file = (Path(spec_path).parent / base) if not Path(base).exists() else Path(base)
        if not base_file.is_file():
            raise ConfigError("sweep.base", base, "no such file")
    elif isinstance(base, dict):
        base_raw = base
    else:
        raise ConfigError("sweep.base", base, "a YAML file path or an inline config mapping")
    common = _overrides(spec.get("set", []), "sweep.set")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError("sweep.seeds", seeds, "a non-empty list of integers >= 0")
    variants = spec.get("variants") or {}
    if not isinstance(variants, dict):
        raise ConfigError("sweep.variants", variants, "a mapping of variant name -> list of key=value")
    mode = spec.get("privacy_mode", "user")
    if mode not in ("user", "record"):
        raise ConfigError("sweep.privacy_mode", mode, "user (DP-FedAvg) or record (DP-SGD in clients)")
    variants = {str(v): (_overrides(o, f"sweep.variants.{v}"), ()) for v, o in variants.items()}
    variants.update((v, (o, ())) for v, o in _epsilon_variants(spec.get("epsilons"), mode).items())
    for v, cell in _grid_cells(spec.get("grid")):
        if v in variants:
            raise ConfigError("sweep.grid", v, "a cell has the name of a variant; rename one of them")
        variants[v] = ([o for _, _, level in cell for o in level], tuple((axis, level) for axis, level, _ in cell))
    if not variants:
        raise ConfigError("sweep.variants", None, "give variants (name -> list of key=value), epsilons "
                          "or a grid")
    root = Path(out) if out is not None else Path(spec.get("output_dir", "runs")) / name
    # seed by seed: a sweep stopped part-way has its first seeds' whole grid, not a few cells' spread
    runs = [SweepRun(v, seed, tuple(common + o + [f"seed={seed}"]), root / f"{v}-s{seed}", cell)
            for seed in seeds for v, (o, cell) in variants.items()]
    return root, runs, base_file, base_raw


def _grid_cells(grid) -> list[tuple[str, list[tuple[str, str, list[str]]]]]:
    """[(cell name, [(axis, level, overrides) per axis])], the axes crossed in order."""
    import itertools
    import re

    if grid is None:
        return []
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("sweep.grid", grid, "a mapping of axis -> {level: [key=value, ...]}")
    axes = []
    for axis, levels in grid.items():
        if not isinstance(levels, dict) or not levels:
            raise ConfigError(f"sweep.grid.{axis}", levels, "a mapping of level name -> list of key=value")
        if str(axis) in RESERVED or str(axis) in METRICS:
            raise ConfigError("sweep.grid", axis, f"'{axis}' names a column of the results table; "
                              "call the axis something else")
        named = []
        for level, overrides in levels.items():
            level = format(level, "g") if isinstance(level, float) else str(level)
            if not re.fullmatch(r"[A-Za-z0-9_.+]+", level):
                raise ConfigError(f"sweep.grid.{axis}", level, "level names go into directory names: "
                                  "use letters, digits, _ . +")
            named.append((str(axis), level, _overrides(overrides, f"sweep.grid.{axis}.{level}")))
        axes.append(named)
    return [("-".join(level for _, level, _ in cell), list(cell)) for cell in itertools.product(*axes)]


def _epsilon_variants(epsilons, mode: str = "user") -> dict[str, list[str]]:
    if epsilons is None:
        return {}
    if (not isinstance(epsilons, list) or not epsilons
            or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0 for e in epsilons)):
        raise ConfigError("sweep.epsilons", epsilons, "a list of numbers > 0, e.g. [1, 4, 8, .inf]")
    return {f"eps{e:g}": [f"privacy.mode={mode}", f"privacy.epsilon={e!r}", "privacy.noise_multiplier=null"]
            for e in epsilons}


def _overrides(value, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(field, value, "a list of key=value strings, e.g. [federation.rounds=6]")
    return list(value)


def run_sweep(spec_path: str | Path | Mapping, progress: bool = True,
              log: Callable[[str], None] = print, out: str | Path | None = None) -> Path:
    from tqdm import tqdm

    from fedsec.api import run as run_one
    from fedsec.config import apply_override, from_raw
    from fedsec.progress import showing as progress_bars

    root, runs, base_file, base_raw = expand(spec_path, out)
    configs = []
    for run in runs:  # validate every run before starting any
        if base_file is not None:
            cfg = load_config(base_file, list(run.overrides))
        else:
            raw = base_raw
            for assignment in run.overrides:
                raw = apply_override(raw, assignment)
            cfg = from_raw(raw)
        configs.append(cfg)
    runs = _share_identical(runs, configs)
    for run, cfg in zip(runs, configs):  # a finished run counts only if it ran this config
        if (run.out / "result.json").is_file():
            try:
                RunDir.reopen(run.out, cfg)
            except ConfigError as err:
                raise ConfigError("sweep run", str(run.out), f"finished under another config: "
                                  f"{err.fix.split(';')[0]}; rename the sweep or move that directory") \
                    from None
    root.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(runs), desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    for run, cfg in zip(runs, configs):
        if run.out.name != f"{run.variant}-s{run.seed}":
            log(f"[sweep] {run.variant} seed {run.seed}: the same experiment as {run.out.name}, shared")
        elif (run.out / "result.json").is_file():
            log(f"[sweep] {run.variant} seed {run.seed}: finished earlier, skipped")
        else:
            resume = (run.out / CONFIG).is_file()
            log(f"[sweep] {run.variant} seed {run.seed}: {'resuming' if resume else 'starting'}")
            # on its engine: here, or each run on its own local Flower deployment (or flower.superlink);
            # no round bar under the sweep's, but the setup's bars (minutes of frozen prefix)
            with progress_bars(progress):
                run_one(cfg, out=run.out, resume=resume, progress=False, log=lambda line: log("    " + line))
        bar.update(1)
        # the tables of the runs finished so far: a sweep stopped halfway can be reported on
        write_tables(root, [r for r in runs if (r.out / "result.json").is_file()])
    bar.close()
    write_tables(root, runs)
    return root


def _share_identical(runs: list[SweepRun], configs: list) -> list[SweepRun]:
    """Runs whose configs are equal point to the first one's directory (a grid's clean
    cells, repeated across attacks)."""
    import dataclasses

    from fedsec.config import dump_config

    first: dict[str, Path] = {}
    return [dataclasses.replace(run, out=first.setdefault(dump_config(cfg), run.out))
            for run, cfg in zip(runs, configs)]


# columns of the results tables besides the metrics (a grid axis may not take these names)
RESERVED = ("variant", "seed", "seeds", "run_dir", "attack_kind", "malicious_count", "num_clients",
            "aggregator", "reward_margin", "epsilon", "delta", "accountant", "certified",
            "noise_multiplier", "clip_norm", "sample_rate")
# the fixed metric columns; eval.benchmarks' and eval.metrics' columns (fedsec.utility) join them
METRICS = ("final_accuracy", "local_only_accuracy", "untuned_accuracy", "final_loss", "untuned_loss",
           "local_only_loss", "final_perplexity", "untuned_perplexity", "local_only_perplexity",
           "preference_accuracy",
           "likelihood_accuracy", "untuned_likelihood_accuracy", "refusal_rate", "untuned_refusal_rate",
           "attack_success_rate", "clean_target_rate", "true_positive_rate", "false_positive_rate",
           "exposure", "untuned_exposure", "extraction_rate", "audit_bound", "audit_bound_fdp", "mia_auc",
           "mia_reference_auc", "mia_blind_auc",
           "answer_extraction", "held_out_answer_extraction")


# measured on what a DP run's guarantee does not cover (fedsec.disclosure): for DP runs they go
# to the sweep's not_covered_by_dp_guarantee/ tables, not the main ones
UNCOVERED_METRICS = ("local_only_accuracy", "local_only_loss", "local_only_perplexity",
                     "true_positive_rate", "false_positive_rate", "exposure",
                     "untuned_exposure", "extraction_rate", "mia_auc", "mia_reference_auc", "mia_blind_auc",
                     "answer_extraction",
                     "held_out_answer_extraction")


def defense_label(cfg: Mapping) -> str:
    """A run's defense as tables name it (from a resolved config): the server's rule, "+realign"
    where the server also re-aligns on its own refusals, and, under task dpo, a preference loss
    other than DPO's with its parameters ("mean+cdpo(label_smoothing=0.2)": the clients' own
    defense against flipped pairs), so that runs differing in it are never pooled."""
    defense = cfg.get("defense") or {}
    label = defense.get("aggregator", "mean") + ("+realign" if defense.get("realign_steps") else "")
    dpo = cfg.get("dpo") or {}
    if cfg.get("task") == "dpo" and dpo.get("loss", "dpo") != "dpo":
        params = ", ".join(f"{key}={value}" for key, value in sorted((dpo.get("params") or {}).items()))
        label += f"+{dpo['loss']}" + (f"({params})" if params else "")
    return label


def federation_size(run_dir: Path, cfg: dict) -> int | None:
    """The run's number of clients: federation.json (written by every run since it was
    added), else, for older runs, the embedded benchmark's configured count."""
    path = Path(run_dir) / "federation.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["num_clients"]
    data = cfg.get("data", {})
    return data.get("benchmark", {}).get("num_clients") if data.get("source", "embedded") == "embedded" else None


def write_tables(root: Path, runs: list[SweepRun]) -> None:
    """results.csv/json: one row per run (variant x seed); summary.csv: one row per variant
    (a grid's cell), each metric's mean and standard deviation over the seeds.

    For DP runs the metrics the guarantee does not cover (UNCOVERED_METRICS) are left
    empty there; the same tables with them filled in are in not_covered_by_dp_guarantee/."""
    from fedsec.attacks.clients import detection_rates
    from fedsec.config import read_yaml

    axes = list(dict.fromkeys(axis for run in runs for axis, _ in run.cell))
    order = {v: k for k, v in enumerate(dict.fromkeys(run.variant for run in runs))}
    runs = sorted(runs, key=lambda run: order[run.variant])  # the tables by variant, its seeds together
    rows = []
    for run in runs:
        result = read_result(run.out)
        final, untuned, local = result["final"] or {}, result["untuned"] or {}, result["local_only"]
        backdoor = final.get("backdoor") or {}
        privacy = result.get("privacy") or {}
        cfg = read_yaml(run.out / CONFIG)
        rounds = [r.get("attack") for r in RunDir(run.out).read_metrics() if r.get("phase") == "federated"]
        detected = detection_rates([a for a in rounds if a])
        rows.append({
            "variant": run.variant, **{a: dict(run.cell).get(a) for a in axes}, "seed": run.seed,
            "run_dir": str(run.out), "attack_kind": cfg["attack"]["kind"],
            "malicious_count": len((result.get("attack") or {}).get("malicious", [])),
            "num_clients": federation_size(run.out, cfg),
            "aggregator": defense_label(cfg),
            **utility_columns(final, untuned, local),
            "reward_margin": (final.get("preference") or {}).get("reward_margin"),
            "refusal_rate": final.get("refusal_rate"), "untuned_refusal_rate": untuned.get("refusal_rate"),
            "attack_success_rate": backdoor.get("attack_success_rate"),
            "clean_target_rate": backdoor.get("clean_target_rate"),
            "exposure": (final.get("memorization") or {}).get("exposure_mean"),
            "untuned_exposure": (untuned.get("memorization") or {}).get("exposure_mean"),
            "extraction_rate": (final.get("memorization") or {}).get("extraction_rate"),
            "audit_bound": (result.get("audit") or {}).get("epsilon_lower_bound"),
            "audit_bound_fdp": (result.get("audit") or {}).get("fdp_epsilon_lower_bound"),
            "mia_auc": ((result.get("membership") or {}).get("loss") or {}).get("auc"),
            "mia_reference_auc": ((result.get("membership") or {}).get("reference") or {}).get("auc"),
            "mia_blind_auc": ((result.get("membership") or {}).get("blind") or {}).get("auc"),
            "answer_extraction": ((result.get("membership") or {}).get("answer_extraction") or {}).get("members"),
            "held_out_answer_extraction": ((result.get("membership") or {}).get("answer_extraction")
                                           or {}).get("non_members"),
            "true_positive_rate": detected["true_positive_rate"],
            "false_positive_rate": detected["false_positive_rate"],
            "epsilon": privacy.get("epsilon"), "delta": privacy.get("delta"),
            "accountant": privacy.get("accountant"),
            "certified": privacy.get("certified") if privacy else None,
            "noise_multiplier": privacy.get("noise_multiplier"),
            "clip_norm": privacy.get("clip_norm"), "sample_rate": privacy.get("sample_rate"),
        })
    extra = list(dict.fromkeys(k for r in rows for k in r if k.startswith(EXTRA)))  # every row has each column
    rows = [{**r, **{k: r.get(k) for k in extra}} for r in rows]
    covered = [{**r, **{k: None for k in UNCOVERED_METRICS}} if r["certified"] is not None else r for r in rows]
    _write_results(root, covered, axes)
    if any(r["certified"] is not None for r in rows):
        hidden = root / UNCOVERED
        hidden.mkdir(exist_ok=True)
        atomic_write_text(hidden / "README.txt", HEADER + "\n")
        _write_results(hidden, rows, axes)


# the columns of eval.benchmarks and eval.metrics (fedsec.utility), final and untuned
EXTRA = ("benchmark:", "metric:", "untuned_benchmark:", "untuned_metric:")


def utility_columns(final: dict, untuned: dict, local: dict | None) -> dict:
    """The run's utility columns (fedsec.utility): the final model's, the untuned model's
    (`untuned_` + column) and the local-only clients' mean accuracy, loss and perplexity; for
    DPO the preference and likelihood accuracies (the untuned model has no preference
    accuracy: as its own reference its implicit reward is 0 on every pair)."""
    after, before = evaluation_values(final), evaluation_values(untuned)
    local_loss = (local or {}).get("mean_loss")
    out = {"untuned_accuracy": before.get("final_accuracy"), "final_accuracy": after.get("final_accuracy"),
           "final_loss": after.get("final_loss"), "untuned_loss": before.get("final_loss"),
           "final_perplexity": after.get("final_perplexity"), "untuned_perplexity": before.get("final_perplexity"),
           "local_only_accuracy": (local or {}).get("mean_accuracy"), "local_only_loss": local_loss,
           "local_only_perplexity": perplexity(local_loss) if local_loss is not None else None,
           "preference_accuracy": after.get("preference_accuracy"),
           "likelihood_accuracy": after.get("likelihood_accuracy"),
           "untuned_likelihood_accuracy": before.get("likelihood_accuracy")}
    for key, value in after.items():
        if key.startswith(EXTRA):
            out[key] = value
            out["untuned_" + key] = before.get(key)
    return out


def metric_columns(rows: list[dict]) -> list[str]:
    """The metric columns of these rows: the fixed ones, then benchmarks' and plugins'."""
    return [*METRICS, *dict.fromkeys(k for r in rows for k in r if k.startswith(EXTRA))]


def _write_results(root: Path, rows: list[dict], axes: list[str]) -> None:
    """results.json/csv (the rows) and summary.json/csv (`summarize`)."""
    atomic_write_text(root / "results.json", json.dumps(rows, indent=2) + "\n")
    _write_csv(root / "results.csv", rows)
    summary = summarize(rows, axes)
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write_csv(root / "summary.csv", summary)


def summarize(rows: list[dict], axes: list[str]) -> list[dict]:
    """One row per variant (a grid's cell, with its `axes`), in the rows' order: its seeds,
    the settings every seed shares, and each metric's mean and standard deviation over the
    seeds (None where no seed has it; std 0 for one seed)."""
    summary = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        entry = {"variant": variant, **{axis: mine[0][axis] for axis in axes}, "seeds": len(mine)}
        for key in ("attack_kind", "malicious_count", "num_clients", "aggregator", "epsilon",
                    "noise_multiplier", "certified"):  # the same for every seed
            entry[key] = mine[0][key]
        for key in metric_columns(rows):
            values = [r[key] for r in mine if r[key] is not None]
            entry[f"{key}_mean"] = statistics.fmean(values) if values else None
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        summary.append(entry)
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


HEADINGS = {"final_accuracy": "final accuracy", "local_only_accuracy": "local-only accuracy",
            "untuned_accuracy": "untuned", "final_loss": "held-out loss", "untuned_loss": "untuned loss",
            "local_only_loss": "local-only loss", "final_perplexity": "perplexity",
            "untuned_perplexity": "untuned perplexity", "local_only_perplexity": "local-only perplexity",
            "preference_accuracy": "preference accuracy",
            "likelihood_accuracy": "likelihood accuracy",
            "untuned_likelihood_accuracy": "untuned likelihood accuracy",
            "refusal_rate": "harmless rate", "untuned_refusal_rate": "untuned harmless rate",
            "attack_success_rate": "backdoor success", "clean_target_rate": "target on clean inputs",
            "true_positive_rate": "malicious dropped", "false_positive_rate": "honest dropped",
            "exposure": "exposure (bits)", "untuned_exposure": "untuned exposure",
            "extraction_rate": "extracted", "audit_bound": "audit epsilon >=",
            "audit_bound_fdp": "audit epsilon >= (f-DP)",
            "mia_auc": "MIA AUC (loss)", "mia_reference_auc": "MIA AUC (reference)",
            "mia_blind_auc": "blind baseline AUC (no model)",
            "answer_extraction": "training answers extracted", "held_out_answer_extraction": "held-out reproduced"}


LOSS_DETAIL = ("untuned_loss", "local_only_loss", "final_perplexity", "untuned_perplexity",
               "local_only_perplexity")


def heading(key: str) -> str:
    """A metric column's table heading."""
    if key in HEADINGS:
        return HEADINGS[key]
    untuned = key.startswith("untuned_")
    return ("untuned " if untuned else "") + describe(key.removeprefix("untuned_")).label


def summary_table(root: Path) -> str:
    """summary.csv as a Markdown table: mean ± std over seeds of each metric the sweep
    measured (the value alone for a single seed: one run has no spread to show), one
    row per variant (grid cell), its axes first."""
    with (Path(root) / "summary.csv").open(encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows, fields = list(reader), reader.fieldnames or []
    axes = fields[1:fields.index("seeds")]

    def cell(row, key):
        mean, std = row[f"{key}_mean"], row[f"{key}_std"]
        if mean == "":
            return ""
        return f"{float(mean):.3f}" if row["seeds"] == "1" else f"{float(mean):.3f} ± {float(std):.3f}"

    def privacy(row):
        if row["certified"] == "":
            return "non-private", ""
        sigma = f"{float(row['noise_multiplier']):.3f}"
        if row["certified"] != "True":
            return "not certified", sigma
        return format_epsilon(float(row["epsilon"])), sigma

    dp = any(row["certified"] != "" for row in rows)
    extra = [f.removesuffix("_mean") for f in fields if f.startswith(EXTRA) and f.endswith("_mean")]
    keys = [k for k in [*METRICS, *extra] if any(row.get(f"{k}_mean", "") != "" for row in rows)]
    if "final_accuracy" in keys:  # the loss beside accuracy; its references and perplexity stay in summary.csv
        keys = [k for k in keys if k not in LOSS_DETAIL]
    heads = ["variant", *axes, "seeds", *(["epsilon", "sigma"] if dp else []), *(heading(k) for k in keys)]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for row in rows:
        cells = [row["variant"], *(row[a] for a in axes), row["seeds"], *(privacy(row) if dp else ()),
                 *(cell(row, k) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
