"""The `fedsec` command line.

  fedsec run CONFIG [--set key=value ...] [--out DIR] [--resume]
  fedsec sweep SPEC                               variants x seeds, with a results table
  fedsec config [CONFIG] [--set key=value ...]   print the resolved config, annotated
  fedsec datasets                                 list the datasets known by name
  fedsec privacy epsilon|calibrate ...            epsilon of a DP setting, or sigma for a target
  fedsec report DIR [-o report.pdf]               a PDF report of a run or sweep directory
  fedsec audit bound --canaries M --guesses R --correct V --delta D
                                                  empirical epsilon lower bound (one-run audit)
  fedsec lm-eval DIR TASK ... [--include-path P]  a run's adapter on lm-evaluation-harness tasks

Bad input of any kind ends with one line on stderr naming the field, the value and
the fix, and exit status 2; nothing existing is overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
from collections.abc import Sequence

from fedsec import __version__
from fedsec.errors import FedsecError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"fedsec: error: {message} (see '{self.prog} --help')\n")


SWEEP_EXAMPLE = """\
  name: my_dp
  base: my_experiment.yaml
  seeds: [0, 1, 2]
  set: [federation.rounds=20]
  variants:
    non-private: []
  epsilons: [8, 2]"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedsec", description=(
        "Federated fine-tuning of LLMs (SFT and DPO on LoRA adapters) with the instruments to measure "
        "what it costs and risks. One YAML file is one experiment; results go to a run directory."))
    parser.add_argument("--version", action="version", version=f"fedsec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run one experiment from a YAML file",
                         description="Run a federated experiment; prints a progress bar, one line "
                                     "per round, then the run directory and headline numbers.")
    run.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set federation.rounds=10 (repeatable)")
    run.add_argument("--out", help="run directory (default: <output_dir>/<name>-<timestamp>); "
                                   "must not exist unless --resume")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out (default: the newest run of this name) "
                          "from its last checkpoint")
    run.add_argument("--stop-after", type=int, metavar="N",
                     help="stop after round N, leaving a checkpoint to --resume from")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--engine", choices=("inprocess", "flower"),
                     help="where clients train (overrides the config's engine): inprocess, or flower "
                          "(a local Flower deployment, or flower.superlink)")

    show = sub.add_parser("config", help="print a resolved config with every field explained")
    show.add_argument("config", nargs="?", help="experiment YAML (default: all defaults)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    from fedsec.sweeps import SWEEP_KEYS

    keys = "\n".join(textwrap.fill(v, 96, initial_indent=f"  {k:<13} ", subsequent_indent=" " * 16)
                     for k, v in SWEEP_KEYS.items())
    sweep = sub.add_parser("sweep", help="run named variants x seeds of one experiment",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Expand a sweep file into runs under runs/<name>/, skip "
                                       "finished runs, resume unfinished ones, and write "
                                       "results.csv/json and summary.csv.",
                           epilog=f"sweep file keys:\n{keys}\n\nexample:\n{SWEEP_EXAMPLE}\n"
                                  "More in docs/sweeps.md.")
    sweep.add_argument("spec", help="sweep YAML, e.g. experiments/algorithms.yaml")
    sweep.add_argument("--out", help="the sweep directory (default: <output_dir>/<name> from the file)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("datasets", help="list the datasets fedsec knows by name")

    cache = sub.add_parser("cache-model", help="convert and cache a base model once (e.g. on a SuperNode)",
                           description="Build the model's cached copy (SmolLM2: de-quantize the GGUF, about "
                                       "80 s) under $FEDSEC_CACHE, so later loads, and Flower ClientApps, only "
                                       "read it.")
    cache.add_argument("model", nargs="?", default="smollm2-135m-instruct", choices=("smollm2-135m-instruct", "tiny"),
                       help="the models fedsec builds itself (default smollm2-135m-instruct); hub ids and folders "
                            "are loaded by transformers as they are")

    privacy = sub.add_parser("privacy", help="epsilon of a DP setting, or the noise for a target",
                             description="Accounting for user-level DP: DP-FedAvg's Poisson-subsampled "
                                         "Gaussian mechanism, one event per round, or a correlated-noise "
                                         "mechanism (tree, banded_mf) as one Gaussian mechanism at its "
                                         "sensitivity.")
    which = privacy.add_subparsers(dest="privacy_command", metavar="epsilon|calibrate",
                                   parser_class=_Parser)
    eps = which.add_parser("epsilon", help="epsilon after ROUNDS rounds at a noise multiplier")
    eps.add_argument("--noise-multiplier", type=float, required=True, metavar="Z",
                     help="noise std / clip norm")
    cal = which.add_parser("calibrate", help="the smallest noise multiplier reaching a target epsilon")
    cal.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    for p in (eps, cal):
        p.add_argument("--sample-rate", type=float, metavar="Q",
                       help="dp_fedavg: probability that a client takes part in a round (required)")
        p.add_argument("--mechanism", default="dp_fedavg",
                       help="dp_fedavg (default), or a dp_mechanism (noise correlated across rounds): "
                            "tree, banded_mf or a plugin's")
        p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="the correlated mechanism's parameter (privacy.params), e.g. bands=8 for "
                            "banded_mf, restart=64 for tree; repeatable")
        p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                       help="import this module first (its @fedsec.register entries); repeatable")
        p.add_argument("--period", type=int, default=1, metavar="K",
                       help="tree, banded_mf: a client takes part every K-th round (cyclic cohorts; "
                            "default 1: every round)")
        p.add_argument("--rounds", type=int, required=True, help="number of rounds (DP events)")
        p.add_argument("--delta", type=float, default=1e-5, help="target delta (default 1e-5)")
        p.add_argument("--accountant", choices=("rdp", "prv", "pld"), default="rdp",
                       help="rdp, prv (Opacus) or pld (dp-accounting); default rdp")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    audit = sub.add_parser("audit", help="empirical lower bounds on epsilon from an attack's success",
                           description="Privacy auditing: turn an attack's success into a lower "
                                       "bound on epsilon that holds with a chosen confidence.")
    audits = audit.add_subparsers(dest="audit_command", metavar="bound", parser_class=_Parser)
    bound = audits.add_parser("bound", help="the one-run bound of Steinke, Nasr & Jagielski (2023)",
                              description="M canaries, each included with probability 1/2; the "
                                          "auditor made R guesses (in or out), V of them right.")
    bound.add_argument("--canaries", type=int, required=True, metavar="M", help="canaries, m")
    bound.add_argument("--guesses", type=int, required=True, metavar="R", help="guesses made, r <= m")
    bound.add_argument("--correct", type=int, required=True, metavar="V", help="correct guesses, v <= r")
    bound.add_argument("--delta", type=float, required=True, metavar="D", help="the DP delta, in [0, 1)")
    bound.add_argument("--confidence", type=float, default=0.95, help="confidence of the bound (default 0.95)")
    bound.add_argument("--json", action="store_true", help="print one JSON object")

    report = sub.add_parser("report", help="a PDF report of a run or sweep directory",
                            description="Build a PDF (title, findings, tables, figures, privacy "
                                        "ledger, config) from a run or sweep directory, with the "
                                        "figures (PNG, SVG) and tables (CSV) next to it.")
    report.add_argument("directory", help="a run directory or a sweep directory under runs/")
    report.add_argument("-o", "--output", help="PDF path (default: DIR/report.pdf)")
    report.add_argument("--force", action="store_true", help="replace an existing report")

    lm_eval = sub.add_parser("lm-eval", help="a finished run's adapter on lm-evaluation-harness tasks",
                             description="Evaluate the run's base model + final adapter (quantized as the run "
                                         "was) on lm-eval tasks by name (needs the lmeval extra; tasks by name "
                                         "download their data). Prints {task: {metric: value}} and writes it to "
                                         "DIR/lm_eval.json.")
    lm_eval.add_argument("directory", help="a finished run directory (with adapter/)")
    lm_eval.add_argument("tasks", nargs="+", help="lm-eval task names")
    lm_eval.add_argument("--include-path", help="a folder of local task YAML files (only those are indexed)")
    lm_eval.add_argument("--limit", type=int, help="at most this many documents per task")
    lm_eval.add_argument("--force", action="store_true", help="replace an existing lm_eval.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "config":
            return _config(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "datasets":
            return _datasets()
        if args.command == "cache-model":
            from fedsec.models import resolve_model_path
            from fedsec.progress import showing

            with showing(True):  # the conversion's line
                print(f"cached: {resolve_model_path(args.model)}")
            return 0
        if args.command == "privacy":
            return _privacy(args)
        if args.command == "report":
            return _report(args)
        if args.command == "lm-eval":
            return _lm_eval(args)
        if args.command == "audit":
            return _audit(args)
        build_parser().print_help()
        return EXIT_USAGE
    except FedsecError as err:
        print(f"fedsec: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fedsec: interrupted{_continue_with(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # its reader went away (fedsec datasets | head): end quietly, as a shell tool does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # else the interpreter's final flush raises it again
        return 128 + 13  # SIGPIPE's status


def _continue_with(args) -> str:
    """How to pick up what Ctrl-C stopped: a run resumes from its last checkpoint (the newest
    run of its name, or its --out), a sweep skips its finished runs and resumes the others."""
    import shlex

    if args.command == "run":
        return f"; continue with: {_resume_command(args, args.out)}"
    if args.command == "sweep":
        where = ["--out", str(args.out)] if args.out else []
        return (f"; continue with: {shlex.join(['fedsec', 'sweep', str(args.spec), *where])} (it skips the "
                "finished runs and resumes the unfinished one)")
    return ""


def _audit(args) -> int:
    import json

    from fedsec.accountants import format_lower_bound
    from fedsec.accountants.audit import one_run_bound, one_run_fdp_bound
    from fedsec.errors import ConfigError

    if args.audit_command is None:
        raise ConfigError("fedsec audit", None, "name a command: bound")
    if args.canaries < 1:
        raise ConfigError("--canaries", args.canaries, "must be >= 1")
    if not 1 <= args.guesses <= args.canaries:
        raise ConfigError("--guesses", args.guesses, f"must be in [1, --canaries = {args.canaries}]")
    if not 0 <= args.correct <= args.guesses:
        raise ConfigError("--correct", args.correct, f"must be in [0, --guesses = {args.guesses}]")
    if not 0 <= args.delta < 1:
        raise ConfigError("--delta", args.delta, "must be in [0, 1), e.g. 1e-5")
    if not 0 < args.confidence < 1:
        raise ConfigError("--confidence", args.confidence, "must be in (0, 1), e.g. 0.95")
    counts = (args.canaries, args.guesses, args.correct, args.delta, args.confidence)
    result = one_run_bound(*counts)
    fdp = one_run_fdp_bound(*counts).epsilon_lower_bound if args.delta > 0 else None
    if args.json:
        print(json.dumps({**result.as_dict(), "fdp_epsilon_lower_bound": fdp}))
        return 0
    print(f"epsilon >= {format_lower_bound(result.epsilon_lower_bound, 4)} with confidence {args.confidence:g} "
          f"({args.correct} of {args.guesses} guesses right on {args.canaries} canaries, delta {args.delta:g})")
    if fdp is not None:
        print(f"  f-DP test of the Gaussian curve (Mahloujifar et al. 2024): epsilon >= {format_lower_bound(fdp, 4)}, "
              "for mechanisms whose guarantee is that curve (every client every round, correlated noise)")
    return 0


def _lm_eval(args) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from fedsec.config import ConfigError, load_config

    run = Path(args.directory)
    if not (run / "config.resolved.yaml").is_file() or not (run / "adapter").is_dir():
        raise ConfigError("lm-eval DIR", args.directory, "is not a finished run directory (config.resolved.yaml "
                          "and adapter/); give one under runs/")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit", args.limit, "must be >= 1")
    out = run / "lm_eval.json"
    if out.exists() and not args.force:
        raise ConfigError("lm-eval DIR", str(out), "exists; pass --force to replace it")
    cfg = load_config(run / "config.resolved.yaml")
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, init_from=str(run / "adapter")))
    _quiet_libraries()
    from fedsec.evalsuite.lmeval import evaluate_tasks
    from fedsec.models import load_model
    from fedsec.rundir import atomic_write_text

    model, tokenizer = load_model(cfg)
    results = evaluate_tasks(model, tokenizer, args.tasks, args.include_path, args.limit, cfg.eval.batch_size)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def _report(args) -> int:
    from fedsec.api import report

    out = report(args.directory, args.output, force=args.force)
    print(f"report: {out}")
    print(f"figures and tables: {out.parent / (out.stem + '_files')}")
    return 0


def _resume_command(args, run_dir: str | None) -> str:
    """The command that continues this run: the same config and overrides (a resumed run
    must have the config it started with), its directory (None: the newest run of its
    name), --resume; quoted for a shell."""
    import shlex

    words = ["fedsec", "run", str(args.config)]
    for assignment in args.overrides:
        words += ["--set", assignment]
    if args.engine:
        words += ["--engine", args.engine]
    return shlex.join([*words, *(["--out", str(run_dir)] if run_dir is not None else []), "--resume"])


def _run(args) -> int:
    from fedsec.api import load_config, run
    from fedsec.console import summary_lines
    from fedsec.errors import ConfigError

    overrides = list(args.overrides) + ([f"engine={args.engine}"] if args.engine else [])
    cfg = load_config(args.config, overrides)
    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError("--stop-after", args.stop_after, "must be >= 1")
    _quiet_libraries()
    result = run(cfg, out=args.out, resume=args.resume, stop_after=args.stop_after,
                 progress=not args.no_progress)
    if not result.finished:
        print(f"stopped after round {result.rounds_done}; continue with: {_resume_command(args, result.run_dir)}")
        return 0
    for line in summary_lines(result):
        print(line)
    return 0


def _sweep(args) -> int:
    from fedsec.api import sweep
    from fedsec.sweeps import summary_table

    _quiet_libraries()
    root = sweep(args.spec, progress=not args.no_progress, out=args.out).directory
    print(f"sweep directory: {root}")
    print(summary_table(root))
    import json

    from fedsec.disclosure import UNCOVERED
    from fedsec.sweeps import UNCOVERED_METRICS

    hidden = root / UNCOVERED / "results.json"
    rows = json.loads(hidden.read_text(encoding="utf-8")) if hidden.is_file() else []
    if any(r["certified"] is not None and any(r.get(k) is not None for k in UNCOVERED_METRICS) for r in rows):
        print(f"\nNOT COVERED BY THE DP GUARANTEE ({root / UNCOVERED}): the DP runs' local-only baselines, "
              "detection rates, canary exposure and membership inference")
        print(summary_table(root / UNCOVERED))
    return 0


def _config(args) -> int:
    from fedsec.config import ExperimentConfig, load_config

    cfg = load_config(args.config, args.overrides)
    _print_annotated(cfg, ExperimentConfig, 0)
    return 0


def _print_annotated(obj, cls, depth: int) -> None:
    import yaml

    from fedsec.config import to_mapping

    pad = "  " * depth
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(value):
            print(f"{pad}{f.name}:  # {help_text}")
            _print_annotated(value, type(value), depth + 1)
            continue
        shown = yaml.safe_dump(to_mapping(value), default_flow_style=True).strip()
        shown = shown.removesuffix("\n...").removesuffix("...").strip()
        print(f"{pad}{f.name}: {shown}  # {help_text}")


def _privacy(args) -> int:
    import json
    import math

    from fedsec.accountants import DpEvent, calibrate, epsilon, format_epsilon, gdp_epsilon
    from fedsec.errors import ConfigError

    if args.privacy_command is None:
        raise ConfigError("fedsec privacy", None, "name a command: epsilon or calibrate")
    if args.rounds < 1:
        raise ConfigError("--rounds", args.rounds, "must be >= 1")
    if not 0 < args.delta < 0.5:
        raise ConfigError("--delta", args.delta, "must be in (0, 0.5) (at delta >= 1/2 a guarantee means "
                          "nothing), e.g. 1e-5")
    from fedsec.registry import load_plugins

    load_plugins(args.plugin)
    if args.mechanism != "dp_fedavg":
        return _privacy_correlated(args)
    if args.param:
        raise ConfigError("--param", args.param[0], "dp_fedavg takes no parameters; give --mechanism first")
    if args.sample_rate is None:
        raise ConfigError("--sample-rate", None, "dp_fedavg needs the sample rate q (clients per round / clients)")
    if not 0 < args.sample_rate <= 1:
        raise ConfigError("--sample-rate", args.sample_rate, "must be in (0, 1]")
    if args.privacy_command == "calibrate":
        if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
            raise ConfigError("--epsilon", args.epsilon, "must be a finite number > 0")
        try:
            sigma = calibrate(args.epsilon, args.delta, args.sample_rate, args.rounds, args.accountant)
        except ValueError as err:
            raise ConfigError("--epsilon", args.epsilon, str(err)) from None
    else:
        sigma = args.noise_multiplier
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ConfigError("--noise-multiplier", sigma, "must be a finite number >= 0")
    history = [DpEvent(sigma, args.sample_rate, args.rounds)]
    try:
        eps = epsilon(history, args.delta, args.accountant)
    except ValueError as err:
        raise ConfigError("--accountant", args.accountant, f"{err}") from None
    gdp = gdp_epsilon(history, args.delta)
    if args.json:
        print(json.dumps({"epsilon": eps, "noise_multiplier": sigma, "accountant": args.accountant,
                          "delta": args.delta, "sample_rate": args.sample_rate, "rounds": args.rounds,
                          "target_epsilon": getattr(args, "epsilon", None),
                          "gdp_approximation_not_a_guarantee": gdp}))
        return 0
    if args.privacy_command == "calibrate":
        print(f"noise multiplier {sigma:.10g} reaches epsilon {format_epsilon(eps, 5)} <= {args.epsilon:g} "
              f"at delta {args.delta:g} ({args.accountant})")
    else:
        print(f"epsilon {format_epsilon(eps, 5)} at delta {args.delta:g} ({args.accountant})")
    print(f"  Poisson-subsampled Gaussian: noise multiplier {sigma:g}, sample rate {args.sample_rate:g}, "
          f"{args.rounds} rounds")
    print(f"  GDP/CLT approximation {gdp:.4f} (not a guarantee: it can under-estimate epsilon)")
    return 0


def _privacy_correlated(args) -> int:
    """`fedsec privacy` for tree and banded_mf (rounds and delta already checked): the whole run
    is one Gaussian mechanism with multiplier z at the factorization's sensitivity
    (fedsec.defenses.correlated)."""
    import dataclasses
    import json
    import math

    from fedsec.accountants import DpEvent, calibrate, epsilon, format_epsilon
    from fedsec.defenses.correlated import Participation, Sensitivity, accounting
    from fedsec.errors import ConfigError

    if args.period < 1:
        raise ConfigError("--period", args.period, "must be >= 1")
    if args.sample_rate is not None:
        raise ConfigError("--sample-rate", args.sample_rate, f"{args.mechanism} is accounted without sampling; "
                          "give --period (a client every K-th round) instead")
    mechanism = _mechanism_from_flags(args)
    part = (Participation("every_round", args.rounds) if args.period == 1
            else Participation("cyclic", args.rounds, period=args.period))
    try:
        found = accounting(mechanism, args.rounds, part)
    except ValueError as err:
        raise ConfigError("--rounds", args.rounds, str(err)) from None
    sens = Sensitivity(found.sensitivity, found.exact)
    if args.privacy_command == "calibrate":
        if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
            raise ConfigError("--epsilon", args.epsilon, "must be a finite number > 0")
        try:
            z = calibrate(args.epsilon, args.delta, 1.0, 1, args.accountant)
        except ValueError as err:
            raise ConfigError("--epsilon", args.epsilon, str(err)) from None
    else:
        z = args.noise_multiplier
        if not (z >= 0 and math.isfinite(z)):
            raise ConfigError("--noise-multiplier", z, "must be a finite number >= 0")
    try:
        eps = epsilon([DpEvent(z, 1.0)], args.delta, args.accountant)
    except ValueError as err:
        raise ConfigError("--accountant", args.accountant, f"{err}") from None
    shape = mechanism.describe()
    who = "every round" if args.period == 1 else f"every {args.period}th round (cyclic cohorts)"
    if args.json:
        print(json.dumps({"epsilon": eps, "noise_multiplier": z, "accountant": args.accountant, "delta": args.delta,
                          "mechanism": args.mechanism, "rounds": args.rounds, "period": args.period,
                          "params": dataclasses.asdict(mechanism), "sensitivity": sens.value,
                          "sensitivity_exact": sens.exact, "noise_std_per_clip_norm": z * sens.value}))
        return 0
    lead = (f"noise multiplier {z:.10g} reaches epsilon {format_epsilon(eps, 5)} <= {args.epsilon:g}"
            if args.privacy_command == "calibrate" else f"epsilon {format_epsilon(eps, 5)}")
    print(f"{lead} at delta {args.delta:g} ({args.accountant})")
    print(f"  {args.mechanism} ({shape}), a client in {who} of {args.rounds}: sensitivity {sens.value:.6g} x C "
          f"({'exact' if sens.exact else 'an upper bound'}); each noise draw has std {z * sens.value:.6g} x C")
    print("  one Gaussian mechanism with multiplier z at that sensitivity (no amplification by sampling)")
    return 0


def _mechanism_from_flags(args):
    """--mechanism and its --param KEY=VALUE flags -> the registered MatrixMechanism."""
    from fedsec.config import PrivacyConfig
    from fedsec.configfile import load_yaml
    from fedsec.errors import ConfigError

    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--param", item, "give KEY=VALUE, e.g. --param bands=8")
        params[key.strip()] = load_yaml(value)
    try:
        return PrivacyConfig(mode="user", mechanism=args.mechanism, params=params, epsilon=1.0).matrix_mechanism
    except ConfigError as err:
        field = {"mechanism": "--mechanism"}.get(err.field, err.field.replace("params.", "--param "))
        raise ConfigError(field, err.value, err.fix) from None


def _datasets() -> int:
    from fedsec.data.loaders import KNOWN_DATASETS

    print("embedded                                     generated finance-sentiment benchmark "
          "(no download; default)")
    for spec in KNOWN_DATASETS.values():
        mapping = ", ".join(f"{k}<-{v}" for k, v in spec.fields.items())
        print(f"{spec.name:<44} {spec.task:<11} {mapping}  # {spec.note}")
    print("\nAny local .json/.jsonl/.parquet/.csv file works too: set data.source to its path and "
          "map columns with data.fields (prompt, response, system, messages, user).")
    return 0


def _quiet_libraries() -> None:
    """Keep the run's output readable: library progress bars and advice off."""
    import logging
    import warnings

    # importing peft imports bitsandbytes, which on CPUs with AVX512-BF16 asks the `kernels`
    # package for its 4-bit kernel; offline (as make and the tests run) that package warns, on
    # every command, that it skipped the hub's publisher check. Its errors still show.
    logging.getLogger("kernels").setLevel(logging.ERROR)

    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
