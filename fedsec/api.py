"""fedsec from Python: the four calls the CLI and the sweep are built on.

    import fedsec

    cfg = fedsec.load_config("experiments/quickstart.yaml", ["federation.rounds=3"])
    result = fedsec.run(cfg, out="runs/x")          # or fedsec.run("exp.yaml", overrides=[...])
    result.run_dir, result.final["accuracy"], result.privacy
    swept = fedsec.sweep("experiments/demo_dp.yaml")  # its tables, a path to its directory
    swept.variant("eps8")["final_accuracy_mean"], swept.runs[0]["run_dir"]
    pdf = fedsec.report(swept)                        # its report.pdf

`run` runs on the configured engine (`engine: inprocess` here, `engine: flower` on
Flower SuperNodes) and returns the typed `fedsec.results.RunResult`. Bad input
raises `fedsec.errors.ConfigError` naming the field, the value and the fix (the CLI
prints it as its one line). Heavy modules load on first use, so `import fedsec` is
quick.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedsec.config import ExperimentConfig
from fedsec.config import load_config as _load_config
from fedsec.errors import ConfigError
from fedsec.results import RunResult, SweepResult


def load_config(path: str | Path | Mapping | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The validated, frozen experiment of a YAML file (or of its content as a mapping of
    sections) with `key=value` overrides applied (no path: every default)."""
    return _load_config(path, list(overrides))


def run(config: str | Path | Mapping | ExperimentConfig, overrides: Sequence[str] = (),
        out: str | Path | None = None,
        resume: bool = False, stop_after: int | None = None, progress: bool = True,
        log: Callable[[str], None] = print) -> RunResult:
    """Run (or with `resume`, continue) one experiment on its engine; returns its result.

    `config` is a YAML path, the YAML's content as a mapping of sections ({"model": {"name":
    "tiny"}, ...}), or an ExperimentConfig (then `overrides` must be empty).
    `out` is the run directory (default: <output_dir>/<name>-<timestamp>); `stop_after`
    ends after that many rounds, leaving a checkpoint `resume=True` continues; `log`
    receives the round lines (and, on Flower, the server's log).
    """
    if isinstance(config, ExperimentConfig):
        if overrides:
            raise ConfigError("overrides", list(overrides), "apply overrides to a YAML path, or build the "
                              "config with dataclasses.replace")
        cfg = config
    else:
        cfg = load_config(config, overrides)
    if stop_after is not None and stop_after < 1:
        raise ConfigError("stop_after", stop_after, "must be >= 1")
    if cfg.engine == "flower":
        if importlib.util.find_spec("flwr") is None:
            raise ConfigError("engine", "flower", "Flower is not installed; pip install 'fedsec[flower]'")
        from fedsec.engine.deploy import run_on_flower

        return run_on_flower(cfg, out=out, resume=resume, stop_after=stop_after, echo=log, progress=progress)
    from fedsec.loop import run_experiment

    return run_experiment(cfg, out=out, resume=resume, stop_after=stop_after, progress=progress, log=log)


def sweep(spec: str | Path | Mapping, progress: bool = True, log: Callable[[str], None] = print,
          out: str | Path | None = None) -> SweepResult:
    """Run every run of a sweep file (skipping finished ones), write its tables; returns
    them (`fedsec.results.SweepResult`: per run, per variant), a path to the sweep directory.
    `spec` is the file's path or its content as a mapping ({"name": ..., "base": {...} or a
    path relative to the working directory, "seeds": [...], "variants": {...}, ...}); `out`
    the sweep directory (default <output_dir>/<name>)."""
    from fedsec.sweeps import run_sweep

    return SweepResult.read(run_sweep(spec, progress=progress, log=log, out=out))


def report(directory: str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    """Build the PDF report of a run or sweep directory; returns the PDF's path (an
    existing one is kept unless `force`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError("report DIR", str(directory), "no such directory; give a run or sweep directory")
    from fedsec.reports.pdf import build_report

    return build_report(directory, Path(out) if out is not None else None, force=force)
