"""Privacy guards: DP randomness from the OS unless asked, a ledger that refuses changed
privacy parameters, the epsilon budget, and released rounds charged again."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from fedsec.accountants.backends import DpEvent, epsilon
from fedsec.errors import ConfigError
from fedsec.loop import run_experiment

DP = {"mode": "user", "noise_multiplier": 0.8, "clip_norm": 0.5}
FED = {"rounds": 4, "clients_per_round": 2}


def _final(run) -> torch.Tensor:
    return torch.load(sorted((run / "checkpoints").glob("round_*.pt"))[-1])["global"]


def _run(cfg, out, **kw):
    lines = []
    result = run_experiment(cfg, out=out, progress=False, log=lines.append, **kw)
    return result, lines


@pytest.mark.parametrize("mode", ["user", "record"])
def test_dp_noise_comes_from_the_os_unless_reproducible_is_asked_for_with_a_warning(tmp_path, mode):
    privacy = {**DP, "mode": mode} if mode == "user" else {"mode": "record", "noise_multiplier": 1.0,
                                                           "clip_norm": 1.0}
    fed = {"rounds": 2, "clients_per_round": 2}
    fresh = tiny_config(tmp_path, privacy=privacy, federation=fed)
    a, lines_a = _run(fresh, tmp_path / "a")
    b, _ = _run(fresh, tmp_path / "b")
    # same seed, same config: the noise differs (it cannot be recomputed from the seed) ...
    assert not torch.equal(_final(tmp_path / "a"), _final(tmp_path / "b"))
    assert a.privacy["noise"] == "os" and not any("warning" in line for line in lines_a)
    # ... and the accounting does not depend on it
    assert a.privacy["epsilon"] == pytest.approx(b.privacy["epsilon"], rel=1e-9)
    seeded = tiny_config(tmp_path, privacy={**privacy, "reproducible": True}, federation=fed)
    c, lines_c = _run(seeded, tmp_path / "c")
    _run(seeded, tmp_path / "d")
    assert torch.equal(_final(tmp_path / "c"), _final(tmp_path / "d"))
    assert c.privacy["noise"] == "seed"
    warning = [line for line in lines_c if "warning" in line]
    assert len(warning) == 1 and "seed 3" in warning[0] and "subtract" in warning[0]


def test_a_resumed_run_whose_privacy_parameters_changed_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, privacy={"mode": "user", "epsilon": 8.0, "clip_norm": 0.5}, federation=FED)
    _run(cfg, tmp_path / "run", stop_after=2)
    stored = tmp_path / "run" / "config.resolved.yaml"
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p != stored}
    # the run's recorded config edited to a new target: the config check passes, the ledger does not
    stored.write_text(stored.read_text().replace("epsilon: 8.0", "epsilon: 4.0"))
    changed = tiny_config(tmp_path, privacy={"mode": "user", "epsilon": 4.0, "clip_norm": 0.5}, federation=FED)
    with pytest.raises(ConfigError) as err:
        _run(changed, tmp_path / "run", resume=True)
    assert err.value.field == "privacy.noise_multiplier" and "ledger recorded" in str(err.value)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p != stored}
    assert after == before  # nothing of the run was touched
    stored.write_text(stored.read_text().replace("clip_norm: 0.5", "clip_norm: 0.25").replace("epsilon: 4.0",
                                                                                              "epsilon: 8.0"))
    clipped = tiny_config(tmp_path, privacy={"mode": "user", "epsilon": 8.0, "clip_norm": 0.25}, federation=FED)
    with pytest.raises(ConfigError) as err:
        _run(clipped, tmp_path / "run", resume=True)
    assert err.value.field == "privacy.clip_norm"


def test_the_epsilon_budget_stops_before_the_round_that_would_exceed_it(tmp_path):
    q, delta = 2 / 4, 1e-5
    eps = [epsilon([DpEvent(0.8, q, k)], delta, "rdp") for k in (1, 2, 3)]
    budget = (eps[1] + eps[2]) / 2  # room for two rounds, not three
    cfg = tiny_config(tmp_path, privacy={**DP, "epsilon_budget": budget}, federation=FED)
    result, lines = _run(cfg, tmp_path / "stop")
    assert result.finished and result.rounds_done == 2
    assert result.stopped.startswith("round 3 would take epsilon to")
    assert result.privacy["epsilon"] == pytest.approx(eps[1], rel=1e-9) and result.privacy["epsilon"] <= budget
    ledger = json.loads((tmp_path / "stop" / "privacy_ledger.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == [1, 2]
    assert (tmp_path / "stop" / "adapter" / "adapter_model.safetensors").is_file()
    assert any(line.startswith("fedsec: stopping before round 3") for line in lines)
    from fedsec.reports.pdf import collect, findings, run_table

    said = " ".join(findings(run_table(collect(tmp_path / "stop")[1])))
    assert "ended after round 2, at its epsilon budget: round 3 would take epsilon to" in said
    assert "drew their noise from the seed" not in said  # OS noise here
    # warn: the run goes on, and says so once
    warn = tiny_config(tmp_path, privacy={**DP, "epsilon_budget": budget, "on_budget": "warn"}, federation=FED)
    result, lines = _run(warn, tmp_path / "warn")
    assert result.rounds_done == 4 and result.stopped is None
    assert result.privacy["epsilon"] > budget
    assert sum("privacy.epsilon_budget" in line for line in lines) == 1


def test_a_released_round_redone_with_fresh_noise_is_charged_again(tmp_path, capsys):
    cfg = tiny_config(tmp_path, privacy=DP, federation=FED)
    whole, _ = _run(cfg, tmp_path / "whole")
    _run(cfg, tmp_path / "cut", stop_after=3)
    newest = tmp_path / "cut" / "checkpoints" / "round_0003.pt"
    newest.write_bytes(b"torn")  # lost after round 3 was written out: round 3 will be computed again
    resumed, lines = _run(cfg, tmp_path / "cut", resume=True)
    assert any("charged to the privacy ledger a second time" in line for line in lines)
    q = 2 / 4
    assert whole.privacy["epsilon"] == pytest.approx(epsilon([DpEvent(0.8, q, 4)], 1e-5, "rdp"), rel=1e-9)
    assert resumed.privacy["epsilon"] == pytest.approx(epsilon([DpEvent(0.8, q, 5)], 1e-5, "rdp"), rel=1e-9)
    assert resumed.privacy["released_again"] == 1
    ledger = json.loads((tmp_path / "cut" / "privacy_ledger.json").read_text())
    assert [e["round"] for e in ledger["released_again"]] == [3]
