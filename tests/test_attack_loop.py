"""Malicious clients in the round loop: fixed identities, attacked updates, detection."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from fedsec.attacks.clients import detection, malicious_clients
from fedsec.errors import ConfigError
from fedsec.loop import run_experiment

DATA = {"benchmark": {"num_clients": 8, "examples_per_client": 6, "size_alpha": 0, "test_size": 6,
                      "client_test_size": 0, "num_probes": 0}}
FED = {"rounds": 3, "clients_per_round": 6, "local_only_clients": 0}


def _config(tmp_path, attack, defense=None):
    return tiny_config(tmp_path, data=DATA, federation=FED, training={"local_steps": 1},
                       eval={"clients": False}, attack=attack, defense=defense or {})


def _rounds(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("phase") == "federated" and r["round"] > 0]


def _final(run_dir):
    return torch.load(sorted((run_dir / "checkpoints").glob("round_*.pt"))[-1], weights_only=True)["global"]


def test_identities_are_fixed_by_the_seed():
    a = malicious_clients(10, 3, seed=7)
    assert a == malicious_clients(10, 3, seed=7) and len(set(a)) == 3 and list(a) == sorted(a)
    assert malicious_clients(10, 3, seed=8) != a or malicious_clients(10, 3, seed=9) != a
    assert malicious_clients(10, 0, seed=7) == ()
    assert detection((1, 4), (0, 1, 2, 4), rejected=(4,), excluded=[2]) == {
        "malicious": [1, 4], "true_positives": [4], "false_positives": [2], "missed": [1], "honest": 2}


def test_krum_catches_sign_flipping_attackers_the_mean_lets_through(tmp_path):
    attack = {"kind": "sign_flip", "malicious": 2, "params": {"scale": 50.0}}
    mean = run_experiment(_config(tmp_path / "a", attack), out=tmp_path / "mean", progress=False,
                          log=lambda _: None)
    krum = run_experiment(_config(tmp_path / "b", attack, {"aggregator": "krum", "f": 1}),
                          out=tmp_path / "krum", progress=False, log=lambda _: None)
    bad = malicious_clients(8, 2, seed=3)  # tiny_config's seed
    assert mean.attack == {"kind": "sign_flip", "malicious": list(bad)} == krum.attack
    for r in _rounds(tmp_path / "mean"):
        assert r["attack"]["malicious"] == [c for c in r["clients"] if c in bad]
        assert r["attack"]["true_positives"] == []  # the mean drops nobody
    caught = [r["attack"] for r in _rounds(tmp_path / "krum") if r["attack"]["malicious"]]
    assert caught and all(a["true_positives"] == a["malicious"] for a in caught)
    clean = run_experiment(_config(tmp_path / "c", {"kind": "none"}), out=tmp_path / "clean", progress=False,
                           log=lambda _: None)
    honest = _final(tmp_path / "clean")
    # the attack drags the mean far from the clean run; Krum stays near it
    assert float((_final(tmp_path / "mean") - honest).norm()) > 5 * float((_final(tmp_path / "krum") - honest).norm())
    assert clean.attack is None


def test_an_attacked_run_resumes_exactly(tmp_path):
    attack = {"kind": "gaussian", "fraction": 0.25, "params": {"std": 0.01}}
    run_experiment(_config(tmp_path / "a", attack), out=tmp_path / "full", progress=False, log=lambda _: None)
    cfg = _config(tmp_path / "b", attack)
    run_experiment(cfg, out=tmp_path / "part", progress=False, log=lambda _: None, stop_after=1)
    run_experiment(cfg, out=tmp_path / "part", resume=True, progress=False, log=lambda _: None)
    assert torch.equal(_final(tmp_path / "full"), _final(tmp_path / "part"))


def test_bad_attack_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="attack.kind"):
        _config(tmp_path, {"kind": "signflip"})
    with pytest.raises(ConfigError, match="did you mean 'scale'"):
        _config(tmp_path, {"kind": "sign_flip", "params": {"scal": 2}})
    with pytest.raises(ConfigError, match="attack.params.direction"):
        _config(tmp_path, {"kind": "min_max", "params": {"direction": "up"}})
    with pytest.raises(ConfigError, match="attack.malicious"):
        run_experiment(_config(tmp_path, {"kind": "ipm", "malicious": 9}), out=tmp_path / "x", progress=False,
                       log=lambda _: None)
    assert not (tmp_path / "x").exists()  # refused before any directory is made
