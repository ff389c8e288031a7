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
