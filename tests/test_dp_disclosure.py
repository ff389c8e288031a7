"""What a DP run publishes: only what the mechanism releases; the rest in one labelled place.

And the rounds the mechanism must survive: an empty Poisson round (noise alone, charged),
a lost round redone under reproducible noise (charged again).
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import tiny_config

from fedsec.accountants.backends import DpEvent, epsilon
from fedsec.disclosure import COVERED_PRIVACY, COVERED_ROW, HEADER, UNCOVERED
from fedsec.loop import run_experiment
from fedsec.results import RunResult
from fedsec.rundir import RunDir

# what must never appear in a DP run's published files or console lines
HIDDEN_KEYS = {"clients", "rejected", "failed", "train_loss", "client_eval", "clipped", "unclipped",
               "median_norm", "clients_sampled", "local_only", "membership", "memorization", "steps", "seconds",
               "compute", "tokens_per_s", "peak_memory_bytes"}


def _keys(value) -> set[str]:
    """Every key anywhere in a JSON value."""
    if isinstance(value, dict):
        return set(value) | set().union(*(_keys(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_keys(v) for v in value)) if value else set()
    return set()


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["user", "record"])
def test_a_dp_run_publishes_only_what_the_mechanism_releases(tmp_path, mode):
    privacy = ({"mode": "user", "noise_multiplier": 0.8, "clip_norm": 0.5, "adaptive_clipping": True,
                "clip_count_stddev": 1.0} if mode == "user" else
               {"mode": "record", "noise_multiplier": 1.0, "clip_norm": 1.0})
    cfg = tiny_config(tmp_path, privacy=privacy,
                      data={"benchmark": {"num_clients": 4, "examples_per_client": 8, "test_size": 9,
                                          "client_test_size": 2, "num_probes": 2, "canaries_per_client": 1}},
                      federation={"rounds": 2, "clients_per_round": 2, "local_only_clients": 1},
                      eval={"batch_size": 16, "mia": True, "mia_examples": 10, "canaries": True})
    lines = []
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lines.append)
    run = tmp_path / "run"
    published = {"metrics": _rows(run / "metrics.jsonl"), "result": json.loads((run / "result.json").read_text()),
                 "ledger": json.loads((run / "privacy_ledger.json").read_text())}
    assert not (_keys(published) & HIDDEN_KEYS), _keys(published) & HIDDEN_KEYS
    for row in published["metrics"]:
        assert set(row) <= set(COVERED_ROW) and row["phase"] == "federated"
        assert row.get("privacy") is None or set(row["privacy"]) <= set(COVERED_PRIVACY)
    assert [r["round"] for r in published["metrics"]] == [0, 1, 2]
    assert published["metrics"][-1]["global_eval"]["accuracy"] is not None  # the model's utility is there
    # the console: no client ids, counts or losses on any line, the not-covered place named at the end
    assert not any(" clients " in line or "clipped" in line or "train loss" in line for line in lines)
    # the attacker's instruments, kept, in the place that says what it is
    hidden = run / UNCOVERED
    assert (hidden / "README.txt").read_text().startswith("NOT COVERED BY THE DP GUARANTEE")
    assert HEADER in (hidden / "README.txt").read_text()
    rows = _rows(hidden / "metrics.jsonl")
    federated = [r for r in rows if r["phase"] == "federated" and r["round"] >= 1]
    assert [r["round"] for r in federated] == [1, 2] and all("clients" in r and "train_loss" in r
                                                            for r in federated)
    assert any(r["phase"] == "local_only_final" for r in rows)
    extra = json.loads((hidden / "result.json").read_text())
    assert extra["local_only"]["per_client"] and "auc" in next(iter(extra["membership"].values()))
    assert "memorization" in extra["final"]
    if mode == "user":
        assert all(set(r["privacy"]) == {"clipped", "unclipped", "median_norm"} for r in federated)
    else:
        assert "steps" in json.loads((hidden / "record_ledger_steps.json").read_text())
    # the Python result keeps everything (the researcher's own process); merged, the files give it back
    assert result.local_only is not None and result.membership is not None
    from dataclasses import asdict

    from fedsec.rundir import read_result

    assert read_result(run) == json.loads(json.dumps(asdict(result)))
    assert RunResult.read(run) == result
    merged = RunDir(run).read_metrics()
    assert all("clients" in r for r in merged if r["phase"] == "federated" and r["round"] >= 1)


def test_a_run_without_dp_keeps_everything_in_its_main_files(tmp_path):
    cfg = tiny_config(tmp_path, federation={"rounds": 1, "clients_per_round": 2, "local_only_clients": 0})
    run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    assert not (tmp_path / "run" / UNCOVERED).exists()
    assert "clients" in _rows(tmp_path / "run" / "metrics.jsonl")[-1]


def test_an_empty_poisson_round_releases_noise_alone_and_is_charged(tmp_path):
    # q N = 1 of 4 clients: a round is empty with probability 0.75^4 = 0.32; one SGD step each,
    # so the batched cohort path (which read records[0]) trains the sampled clients
    rounds = 6
    cfg = tiny_config(tmp_path, privacy={"mode": "user", "noise_multiplier": 1.0, "clip_norm": 0.5,
                                         "reproducible": True},
                      federation={"rounds": rounds, "clients_per_round": 1, "local_only_clients": 0},
                      training={"local_steps": 1, "batch_size": 4, "lr": 1e-3},
                      eval={"batch_size": 16, "every": 100})
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    sampled = [r["clients"] for r in RunDir(tmp_path / "run").read_metrics()
               if r["phase"] == "federated" and r["round"] >= 1]
    assert len(sampled) == rounds and [] in sampled and any(sampled)  # empty and non-empty rounds both ran
    ledger = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == list(range(1, rounds + 1))
    assert result.privacy["epsilon"] == pytest.approx(epsilon([DpEvent(1.0, 0.25, rounds)], 1e-5, "rdp"),
                                                      rel=1e-9)


def test_an_empty_round_aggregate_is_the_noise_alone(tmp_path):
    import torch

    from fedsec.pipeline import build_pipeline
    from fedsec.privacy import UserLevelDp, plan_privacy
    from fedsec.seeding import torch_generator

    cfg = tiny_config(tmp_path, privacy={"mode": "user", "noise_multiplier": 1.0, "clip_norm": 0.5})
    plan = plan_privacy(cfg, 4)
    dp = UserLevelDp(cfg, plan, root=5)
    batch = build_pipeline(cfg, tmp_path, 1000, dp)([], 0)
    aggregate, rejected, info = batch.aggregate, batch.rejected, dp.record(batch)
    noise = torch.randn(1000, generator=torch_generator(5, "dp-noise", 0), dtype=torch.float64) * 0.5
    assert torch.allclose(aggregate.double(), noise / plan.expected_clients, rtol=1e-6)
    assert rejected == () and len(dp.ledger.entries) == 1 and info["hidden"]["median_norm"] is None
    assert math.isfinite(info["epsilon"]["rdp"])


def test_a_lost_round_redone_under_reproducible_noise_is_charged_again(tmp_path):
    # nothing verifies that the redo is bit-identical to the release: it is a second release
    dp = {"mode": "user", "noise_multiplier": 0.8, "clip_norm": 0.5, "reproducible": True}
    cfg = tiny_config(tmp_path, privacy=dp, federation={"rounds": 4, "clients_per_round": 2})
    run_experiment(cfg, out=tmp_path / "cut", stop_after=3, progress=False, log=lambda _: None)
    (tmp_path / "cut" / "checkpoints" / "round_0003.pt").write_bytes(b"torn")
    lines = []
    resumed = run_experiment(cfg, out=tmp_path / "cut", resume=True, progress=False, log=lines.append)
    assert any("charged to the privacy ledger a second time" in line for line in lines)
    assert resumed.privacy["released_again"] == 1
    assert resumed.privacy["epsilon"] == pytest.approx(epsilon([DpEvent(0.8, 0.5, 5)], 1e-5, "rdp"), rel=1e-9)


def test_an_audit_of_a_record_level_run_is_refused_in_one_line(tmp_path):
    from fedsec.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, privacy={"mode": "record", "noise_multiplier": 1.0, "clip_norm": 1.0},
                    audit={"canaries": 8})
    assert err.value.field == "audit.canaries" and "privacy.mode user" in str(err.value)
    assert "\n" not in str(err.value)


def test_the_audit_verdict_states_its_confidence():
    from fedsec.console import audit_exceedance

    line = audit_exceedance(0.95)
    assert "confidence 0.95" in line and "at most 5% of runs" in line and "not proof" in line
    assert "0.0025" in line  # twice in a row, for a correct implementation
