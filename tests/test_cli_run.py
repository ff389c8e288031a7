from __future__ import annotations

import json
import subprocess
import sys

import yaml

from conftest import TINY


def test_cli_run_stop_and_resume_end_to_end(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs"),
                                      "federation": {"rounds": 2, "clients_per_round": 2,
                                                     "local_only_clients": 2}}))
    out = tmp_path / "runs" / "one"
    cmd = [sys.executable, "-m", "fedsec", "run", str(config), "--out", str(out), "--no-progress"]
    first = subprocess.run(cmd + ["--stop-after", "1"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "round   1/2" in first.stdout and "--resume" in first.stdout
    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout and "round   2/2" in second.stdout
    assert f"run directory: {out}" in second.stdout
    assert "global test accuracy: untuned" in second.stdout
    assert "local-only (2 clients" in second.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and result["rounds_done"] == 2
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_sweep_runs_skips_finished_and_writes_tables(tmp_path):
    import csv

    from fedsec.sweep import run_sweep

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
