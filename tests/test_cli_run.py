from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import TINY


def test_cli_run_stop_and_resume_end_to_end(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs"),
                                      "federation": {"rounds": 3, "clients_per_round": 2,
                                                     "local_only_clients": 2}}))
    out = tmp_path / "runs" / "one"
    cmd = [sys.executable, "-m", "fedsec", "run", str(config), "--set", "federation.rounds=2", "--out", str(out),
           "--no-progress"]
    first = subprocess.run(cmd + ["--stop-after", "1"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "round   1/2" in first.stdout and "--resume" in first.stdout
    # the printed hint, run as printed (it keeps the --set the run was started with)
    hint = shlex.split(first.stdout.split("continue with: ")[1].strip().splitlines()[0])
    assert hint[:2] == ["fedsec", "run"] and "federation.rounds=2" in hint and hint[-1] == "--resume"
    second = subprocess.run([sys.executable, "-m", "fedsec", *hint[1:]], capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout and "round   2/2" in second.stdout
    assert f"run directory: {out}" in second.stdout
    assert "global test accuracy: untuned" in second.stdout
    assert "local-only (2 clients" in second.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and result["rounds_done"] == 2
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_a_reader_that_stops_early_ends_the_cli_quietly():
    """fedsec datasets | head, fedsec config ... | head: the reader closes the pipe after a few
    lines, and fedsec ends with SIGPIPE's status and no traceback (it printed one)."""
    proc = subprocess.Popen([sys.executable, "-m", "fedsec", "datasets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # gone before fedsec writes (its imports take a second): every write fails
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_ctrl_c_prints_the_command_that_continues_the_run_or_the_sweep(tmp_path, capsys, monkeypatch):
    """A run stopped by Ctrl-C (here in its second round) names the command that resumes it:
    its config, its --set, --resume (the newest run of its name), which, run as printed,
    finishes it; a sweep names itself, which resumes its run and prints its table."""
    import fedsec.loop
    from fedsec.cli import main

    monkeypatch.chdir(tmp_path)  # the sweep's runs/
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs")}))
    real = fedsec.loop.play_round

    def ctrl_c_in_round_two(setup, state, clients, round_idx, *args):
        if round_idx == 1:
            raise KeyboardInterrupt
        return real(setup, state, clients, round_idx, *args)

    monkeypatch.setattr(fedsec.loop, "play_round", ctrl_c_in_round_two)
    assert main(["run", str(config), "--set", "federation.rounds=3", "--no-progress"]) == 130
    hint = shlex.split(capsys.readouterr().err.strip().splitlines()[-1].split(
        "fedsec: interrupted; continue with: ")[1])
    assert hint == ["fedsec", "run", str(config), "--set", "federation.rounds=3", "--resume"]
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"name": "ctrl-c", "base": str(config), "seeds": [0], "variants": {"a": []}}))
    assert main(["sweep", str(spec), "--no-progress"]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"fedsec: interrupted; continue with: fedsec sweep {shlex.quote(str(spec))} (")
    monkeypatch.setattr(fedsec.loop, "play_round", real)
    assert main([*hint[1:], "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "round   3/3" in out and "round   1/3" not in out
    assert main(["sweep", str(spec), "--no-progress"]) == 0  # the sweep's command, as printed
    out = capsys.readouterr().out
    assert "a seed 0: resuming" in out and "sweep directory: runs/ctrl-c" in out and "| a | 1 |" in out


def test_sweep_runs_skips_finished_and_writes_tables(tmp_path):
    import csv

    from fedsec.sweeps import run_sweep

    spec = tmp_path / "sweep.yaml"
    base = {**TINY, "federation": {"rounds": 1, "clients_per_round": 2}}
    spec.write_text(yaml.safe_dump({"name": "s", "base": base, "seeds": [0, 1],
                                    "output_dir": str(tmp_path / "runs"),
                                    "variants": {"avg": ["federation.algorithm=fedavg"],
                                                 "adam": ["federation.algorithm=fedadam"]}},
                                   sort_keys=False))
    lines = []
    root = run_sweep(spec, progress=False, log=lines.append)
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert [(r["variant"], r["seed"]) for r in rows] == [("avg", "0"), ("avg", "1"), ("adam", "0"), ("adam", "1")]
    summary = list(csv.DictReader((root / "summary.csv").open()))
    accs = [float(r["final_accuracy"]) for r in rows[:2]]
    assert abs(float(summary[0]["final_accuracy_mean"]) - sum(accs) / 2) < 1e-9
    again = []
    run_sweep(spec, progress=False, log=again.append)
    assert sum("skipped" in line for line in again) == 4


def test_sweep_out_puts_the_sweep_where_it_is_told(tmp_path, monkeypatch, capsys):
    """fedsec sweep SPEC --out DIR, as fedsec run --out: the same sweep file into another
    directory, without editing its output_dir."""
    from fedsec.cli import main
    from fedsec.sweeps import expand

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "one.yaml"
    spec.write_text(yaml.safe_dump({"name": "s1", "base": {**TINY, "federation": {"rounds": 1, "clients_per_round": 2}},
                                    "variants": {"avg": [], "adam": ["federation.algorithm=fedadam"]}}))
    elsewhere = tmp_path / "elsewhere"
    root, runs, _, _ = expand(spec, out=elsewhere)
    assert root == elsewhere and {r.out for r in runs} == {elsewhere / "avg-s0", elsewhere / "adam-s0"}
    assert expand(spec)[0] == Path("runs") / "s1"  # the file's default
    assert main(["sweep", str(spec), "--out", str(elsewhere), "--no-progress"]) == 0
    assert f"sweep directory: {elsewhere}" in capsys.readouterr().out
    assert (elsewhere / "avg-s0" / "result.json").is_file() and (elsewhere / "results.csv").is_file()
    assert not (tmp_path / "runs").exists()


def test_dp_sweep_over_epsilons_writes_epsilon_and_sigma(tmp_path):
    import csv
    import math

    from fedsec.accountants import DpEvent, epsilon
    from fedsec.sweeps import run_sweep, summary_table

    spec = tmp_path / "dp.yaml"
    base = {**TINY, "federation": {"rounds": 2, "clients_per_round": 2, "sampling": "poisson",
                                   "local_only_clients": 1},
            "privacy": {"delta": 1e-3, "clip_norm": 0.05}}
    spec.write_text(yaml.safe_dump({"name": "dp", "base": base, "seeds": [0],
                                    "output_dir": str(tmp_path / "runs"),
                                    "variants": {"non-private": []},
                                    "epsilons": [20, 5, math.inf]}, sort_keys=False))
    root = run_sweep(spec, progress=False, log=lambda _: None)
    rows = {r["variant"]: r for r in csv.DictReader((root / "results.csv").open())}
    assert list(rows) == ["non-private", "eps20", "eps5", "epsinf"]
    assert rows["non-private"]["epsilon"] == "" and rows["non-private"]["certified"] == ""
    for name, target in (("eps20", 20), ("eps5", 5)):
        eps, sigma = float(rows[name]["epsilon"]), float(rows[name]["noise_multiplier"])
        assert rows[name]["certified"] == "True" and eps <= target
        assert eps == epsilon([DpEvent(sigma, 0.5, 2)], 1e-3, "rdp")
    assert float(rows["eps5"]["noise_multiplier"]) > float(rows["eps20"]["noise_multiplier"])
    assert rows["epsinf"]["certified"] == "False" and rows["epsinf"]["epsilon"] == ""
    table = summary_table(root)
    assert "| non-private | 1 | non-private |" in table and "| epsinf | 1 | not certified | 0.000 |" in table
    # one seed: each value alone, no "± 0.000" spread that one run cannot have
    assert "±" not in table and f"| {float(rows['eps20']['final_loss']):.3f} |" in table
    # a DP run's local-only baseline is not covered by its guarantee: only in the not-covered tables
    from fedsec.disclosure import HEADER, UNCOVERED

    assert rows["non-private"]["local_only_accuracy"] != "" and rows["eps5"]["local_only_accuracy"] == ""
    hidden = {r["variant"]: r for r in csv.DictReader((root / UNCOVERED / "results.csv").open())}
    assert hidden["eps5"]["local_only_accuracy"] != "" and hidden["eps5"]["final_accuracy"] == rows["eps5"][
        "final_accuracy"]
    assert (root / UNCOVERED / "README.txt").read_text().strip() == HEADER


def test_cache_model_builds_what_it_names_and_refuses_other_names(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    import pytest

    from fedsec.cli import main

    monkeypatch.setenv("FEDSEC_CACHE", str(tmp_path / "cache"))
    assert main(["cache-model", "tiny"]) == 0
    path = Path(capsys.readouterr().out.strip().removeprefix("cached: "))
    assert (tmp_path / "cache") in path.parents and (path / "config.json").is_file()
    with pytest.raises(SystemExit) as stop:  # argparse's one-line usage error
        main(["cache-model", "some/hub-id"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'some/hub-id'" in err[0] and "tiny" in err[0]


def test_every_sweep_key_is_documented_in_docs_and_in_sweep_help(capsys):
    from pathlib import Path

    import pytest

    from fedsec.cli import main
    from fedsec.sweeps import SWEEP_KEYS

    docs = (Path(__file__).resolve().parents[1] / "docs" / "sweeps.md").read_text(encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    shown = capsys.readouterr().out
    for key in SWEEP_KEYS:
        assert f"| `{key}` |" in docs and f"\n  {key} " in shown


def test_the_cli_keeps_the_kernels_packages_offline_advice_out_of_the_output(caplog):
    """`fedsec run` and `sweep` quiet the `kernels` package (bitsandbytes' kernel loader), which
    warns on every command run offline that it skipped the hub's publisher check; its errors
    still show."""
    import logging

    from fedsec.cli import _quiet_libraries

    hub = logging.getLogger("kernels._internals.hf_hub")  # where the warning comes from
    root = logging.getLogger("kernels")
    level = root.level
    try:
        _quiet_libraries()
        with caplog.at_level(logging.NOTSET):  # the capture takes every level the loggers let through
            hub.warning("Skipping publisher trust check for 'kernels-community/x' because the Hub is offline.")
            hub.error("a kernel failed to load")
        assert [r.getMessage() for r in caplog.records] == ["a kernel failed to load"]
    finally:
        root.setLevel(level)
