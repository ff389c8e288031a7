"""Robust aggregators in the round loop: every rule by name, DP labelling, resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from fedsec.defenses.registry import AGGREGATORS
from fedsec.errors import ConfigError
from fedsec.loop import run_experiment
from fedsec.results import RunResult
from fedsec.rundir import RunDir

SMALL = {"benchmark": {"num_clients": 8, "examples_per_client": 6, "size_alpha": 0, "test_size": 6,
                       "client_test_size": 0, "num_probes": 0, "root_size": 6}}
ROUNDS = {"rounds": 2, "clients_per_round": 7, "local_only_clients": 0}
PARAMS = {"trimmed_mean": {"beta": 0.15}, "krum": {"m": 3}, "norm_bound": {"max_norm": 0.05},
          "centered_clip": {"tau": 0.05}}


def _config(tmp_path, aggregator, **sections):
    defense = {"aggregator": aggregator, "f": 0 if aggregator == "mean" else 1,
               "params": PARAMS.get(aggregator, {})}
    sections = {"data": SMALL, "federation": ROUNDS, "training": {"local_steps": 1},
                "eval": {"clients": False}, "defense": defense, **sections}
    return tiny_config(tmp_path, **sections)


def _rows(run_dir):
    return RunDir(run_dir).read_metrics()  # a DP run's not-covered part merged back in


def _final(run_dir) -> torch.Tensor:
    return torch.load(sorted((run_dir / "checkpoints").glob("round_*.pt"))[-1], weights_only=True)["global"]


@pytest.mark.parametrize("aggregator", sorted(AGGREGATORS))
def test_every_aggregator_runs_by_name_and_reports_its_diagnostics(tmp_path, aggregator):
    out = tmp_path / "run"
    result = run_experiment(_config(tmp_path, aggregator), out=out, progress=False, log=lambda _: None)
    assert result.finished and bool(torch.isfinite(_final(out)).all())
    # the summary names the server's rule beside the algorithm (it said "fedavg" for every rule)
    from fedsec.console import summary_lines

    label = "fedavg" if aggregator == "mean" else f"fedavg with {aggregator}"
    assert result.aggregator == aggregator and RunResult.read(out).aggregator == aggregator
    assert any(line.startswith("global test loss:") and f"-> {label} " in line for line in summary_lines(result))
    rounds = [r for r in _rows(out) if r.get("phase") == "federated" and r["round"] > 0]
    if aggregator == "mean":
        assert all(r["defense"] is None for r in rounds)
        return
    for r in rounds:
        assert r["defense"]["aggregator"] == aggregator and "skipped" not in r["defense"]
        assert set(r["defense"]["excluded"]) <= set(r["clients"])
    if aggregator == "krum":  # Multi-Krum m = 3 of 7: 4 excluded every round
        assert all(len(r["defense"]["excluded"]) == 4 for r in rounds)
    if aggregator == "foolsgold":  # histories on disk, one file per client and round
        assert sorted((out / "foolsgold").glob("client_*_r0001.pt"))


def test_mean_by_name_equals_the_default_run_bit_for_bit(tmp_path):
    a = run_experiment(_config(tmp_path / "a", "mean"), out=tmp_path / "a" / "run", progress=False,
                       log=lambda _: None)
    cfg = tiny_config(tmp_path / "b", data=SMALL, federation=ROUNDS, training={"local_steps": 1},
                      eval={"clients": False})
    b = run_experiment(cfg, out=tmp_path / "b" / "run", progress=False, log=lambda _: None)
    assert torch.equal(_final(tmp_path / "a" / "run"), _final(tmp_path / "b" / "run"))
    assert a.final == b.final


@pytest.mark.parametrize("aggregator,certified", [("median", False), ("norm_bound", True)])
def test_dp_with_a_robust_rule_is_labelled_not_certified(tmp_path, aggregator, certified):
    privacy = {"mode": "user", "noise_multiplier": 1.0, "clip_norm": 0.1, "delta": 1e-3}
    out = tmp_path / "run"
    result = run_experiment(_config(tmp_path, aggregator, privacy=privacy), out=out, progress=False,
                            log=lambda _: None)
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert result.privacy["certified"] is certified and ledger["certified"] is certified
    if certified:  # norm bounding at 0.05 is clipping to min(C, M) = 0.05: the ledger says so
        assert result.privacy["epsilon"] > 0
        assert all(e["clip_norm"] == 0.05 for e in ledger["entries"])
    else:
        assert result.privacy["epsilon"] is None
        assert "median has no proven sensitivity bound" in result.privacy["reason"]
        rounds = [r for r in _rows(out) if r.get("phase") == "federated" and r["round"] > 0]
        assert all(r["defense"]["aggregator"] == "median" for r in rounds)


@pytest.mark.parametrize("aggregator", ["foolsgold", "centered_clip", "flame"])
def test_stateful_rules_resume_exactly(tmp_path, aggregator):
    rounds = {**ROUNDS, "rounds": 3}
    full = _config(tmp_path / "a", aggregator, federation=rounds)
    run_experiment(full, out=tmp_path / "full", progress=False, log=lambda _: None)
    part = _config(tmp_path / "b", aggregator, federation=rounds)
    run_experiment(part, out=tmp_path / "part", progress=False, log=lambda _: None, stop_after=1)
    run_experiment(part, out=tmp_path / "part", resume=True, progress=False, log=lambda _: None)
    assert torch.equal(_final(tmp_path / "full"), _final(tmp_path / "part"))


def test_rule_assumptions_are_checked_against_clients_per_round(tmp_path):
    with pytest.raises(ConfigError, match="4f \\+ 3"):
        tiny_config(tmp_path, data=SMALL, federation=ROUNDS, defense={"aggregator": "bulyan", "f": 2})
    with pytest.raises(ConfigError, match="params.beta"):
        tiny_config(tmp_path, defense={"aggregator": "trimmed_mean", "params": {"beta": 0.6}})
