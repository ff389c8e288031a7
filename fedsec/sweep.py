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
Started again, a sweep skips finished runs and resumes unfinished ones. It writes
results.csv and results.json (one row per run) and summary.csv (mean and standard
deviation across seeds per variant), which the report builder can read.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from accountants import format_epsilon
from fedsec.config import ConfigError, load_config, read_yaml
from fedsec.rundir import CONFIG, RunDir, atomic_write_text


@dataclass(frozen=True)
class SweepRun:
    variant: str
    seed: int
    overrides: tuple[str, ...]
    out: Path


def expand(spec_path: str | Path) -> tuple[Path, list[SweepRun], Path | None, dict]:
    """(sweep directory, runs, base config file or None, inline base mapping)."""
    spec = read_yaml(spec_path)
    for key in spec:
        if key not in ("name", "base", "set", "seeds", "variants", "epsilons", "privacy_mode", "output_dir"):
            raise ConfigError(f"sweep.{key}", spec[key], "unknown key; use name, base, set, seeds, "
                              "variants, epsilons, privacy_mode, output_dir")
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
    variants = {**variants, **_epsilon_variants(spec.get("epsilons"), mode)}
    if not variants:
        raise ConfigError("sweep.variants", None, "give variants (name -> list of key=value) or epsilons")
    root = Path(spec.get("output_dir", "runs")) / name
    runs = [SweepRun(str(v), seed, tuple(common + _overrides(o, f"sweep.variants.{v}") + [f"seed={seed}"]),
                     root / f"{v}-s{seed}")
            for v, o in variants.items() for seed in seeds]
    return root, runs, base_file, base_raw


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


def run_sweep(spec_path: str | Path, progress: bool = True,
              log: Callable[[str], None] = print) -> Path:
    from tqdm import tqdm

    from fedsec.config import ExperimentConfig, apply_override, from_mapping
    from fedsec.loop import run_experiment

    root, runs, base_file, base_raw = expand(spec_path)
    configs = []
    for run in runs:  # validate every run before starting any
        if base_file is not None:
            cfg = load_config(base_file, list(run.overrides))
        else:
            raw = base_raw
            for assignment in run.overrides:
                raw = apply_override(raw, assignment)
            cfg = from_mapping(ExperimentConfig, raw)
        configs.append(cfg)
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
        if (run.out / "result.json").is_file():
            log(f"[sweep] {run.variant} seed {run.seed}: finished earlier, skipped")
        else:
            resume = (run.out / CONFIG).is_file()
            log(f"[sweep] {run.variant} seed {run.seed}: {'resuming' if resume else 'starting'}")
            run_experiment(cfg, out=run.out, resume=resume, progress=False,
                           log=lambda line: log("    " + line))
        bar.update(1)
    bar.close()
    write_tables(root, runs)
    return root


def write_tables(root: Path, runs: list[SweepRun]) -> None:
    rows = []
    for run in runs:
        result = json.loads((run.out / "result.json").read_text(encoding="utf-8"))
        final, untuned, local = result["final"] or {}, result["untuned"] or {}, result["local_only"]
        pref, pref_before = final.get("preference") or {}, untuned.get("preference") or {}
        privacy = result.get("privacy") or {}
        rows.append({
            "variant": run.variant, "seed": run.seed, "run_dir": str(run.out),
            "untuned_accuracy": untuned.get("accuracy"), "final_accuracy": final.get("accuracy"),
            "final_loss": final.get("loss"),
            "local_only_accuracy": local["mean_accuracy"] if local else None,
            "preference_accuracy": pref.get("preference_accuracy"),
            "reward_margin": pref.get("reward_margin"),
            "likelihood_accuracy": pref.get("likelihood_accuracy"),
            "untuned_likelihood_accuracy": pref_before.get("likelihood_accuracy"),
            "refusal_rate": final.get("refusal_rate"),
            "epsilon": privacy.get("epsilon"), "delta": privacy.get("delta"),
            "accountant": privacy.get("accountant"),
            "certified": privacy.get("certified") if privacy else None,
            "noise_multiplier": privacy.get("noise_multiplier"),
            "clip_norm": privacy.get("clip_norm"), "sample_rate": privacy.get("sample_rate"),
        })
    atomic_write_text(root / "results.json", json.dumps(rows, indent=2) + "\n")
    _write_csv(root / "results.csv", rows)
    summary = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        entry = {"variant": variant, "seeds": len(mine)}
        for key in ("epsilon", "noise_multiplier", "certified"):  # the same for every seed
            entry[key] = mine[0][key]
        for key in ("final_accuracy", "local_only_accuracy", "untuned_accuracy", "preference_accuracy",
                    "likelihood_accuracy", "untuned_likelihood_accuracy"):
            values = [r[key] for r in mine if r[key] is not None]
            entry[f"{key}_mean"] = statistics.fmean(values) if values else None
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        summary.append(entry)
    _write_csv(root / "summary.csv", summary)


def _write_csv(path: Path, rows: list[dict]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def summary_table(root: Path) -> str:
    with (Path(root) / "summary.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))

    def cell(row, key):
        mean, std = row[f"{key}_mean"], row[f"{key}_std"]
        return "" if mean == "" else f"{float(mean):.3f} ± {float(std):.3f}"

    def privacy(row):
        if row["certified"] == "":
            return "non-private", ""
        sigma = f"{float(row['noise_multiplier']):.3f}"
        if row["certified"] != "True":
            return "not certified", sigma
        return format_epsilon(float(row["epsilon"])), sigma

    dp = any(row["certified"] != "" for row in rows)
    pref = any(row.get("preference_accuracy_mean", "") != "" for row in rows)
    heads = ["variant", "seeds", *(["epsilon", "sigma"] if dp else []), "final accuracy",
             "local-only accuracy", "untuned",
             *(["preference accuracy", "likelihood accuracy", "untuned likelihood accuracy"] if pref else [])]
    keys = ["final_accuracy", "local_only_accuracy", "untuned_accuracy",
            *(["preference_accuracy", "likelihood_accuracy", "untuned_likelihood_accuracy"] if pref else [])]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for row in rows:
        cells = [row["variant"], row["seeds"], *(privacy(row) if dp else ()), *(cell(row, k) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
