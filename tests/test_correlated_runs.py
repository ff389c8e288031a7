"""Correlated-noise DP in runs (privacy.mechanism tree, banded_mf): the noise the server
adds, the ledger's one Gaussian mechanism, noise 0 against the plain run, resume, and the
one-line refusals of a sampling the accounting does not cover."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

import fedsec
from fedsec.accountants import DpEvent, epsilon
from fedsec.defenses.correlated import (
    BandedNoise,
    MatrixMechanism,
    MatrixNoise,
    banded_matrix,
    banded_sqrt_coefficients,
    tree_matrix,
)
from fedsec.defenses.dp import gaussian_noise
from fedsec.errors import ConfigError
from fedsec.loop import run_experiment
from fedsec.pipeline import build_pipeline
from fedsec.privacy import UserLevelDp, plan_privacy
from fedsec.seeding import torch_generator

_EQUAL = {"benchmark": {"num_clients": 4, "examples_per_client": 8, "size_alpha": 0, "test_size": 9,
                        "client_test_size": 2, "num_probes": 2}, "max_length": 160}
_QUIET = dict(progress=False, log=lambda _: None)


def _final(run_dir) -> dict:
    return torch.load(sorted((run_dir / "checkpoints").glob("round_*.pt"))[-1], weights_only=False)


def test_the_server_adds_c_inverse_z_and_the_ledger_is_one_gaussian_mechanism(tmp_path):
    cfg = tiny_config(tmp_path, privacy={"mode": "user", "mechanism": "banded_mf", "params": {"bands": 3},
                                         "noise_multiplier": 2.0, "clip_norm": 0.5, "delta": 1e-3},
                      federation={"rounds": 5, "clients_per_round": 4})
    plan = plan_privacy(cfg, 4)
    c = plan.correlated
    assert plan.sample_rate == 1.0 and plan.expected_clients == 4 and c.participation.kind == "every_round"
    coefficients = banded_sqrt_coefficients(3)
    ones = sum(v * np.eye(5, k=-k) for k, v in enumerate(coefficients)) @ np.ones(5)
    assert c.sensitivity == pytest.approx(float(np.linalg.norm(ones)))  # every round: ||C 1||
    dp, dim = UserLevelDp(cfg, plan, root=5), 1000
    reference = BandedNoise(coefficients, dim)
    for t in range(5):
        batch = build_pipeline(cfg, tmp_path, dim, dp)([], t)  # nobody's update: the noise alone
        stream = torch_generator(5, "dp-noise", t)
        expected = reference.next(lambda s=stream: gaussian_noise(dim, 2.0 * 0.5 * c.sensitivity, s, torch.float32))
        assert torch.equal(batch.aggregate, expected / plan.expected_clients)
        dp.record(batch)
        entry = dp.ledger.entries[-1]
        assert entry.mechanism == "banded_mf" and entry.sample_rate == 1.0
        assert entry.noise_multiplier == pytest.approx(2.0 * c.sensitivity / c.prefix[t])
        assert entry.sensitivity == pytest.approx(0.5 * c.prefix[t])
        assert entry.noise_stddev == pytest.approx(2.0 * 0.5 * c.sensitivity)
        one_gaussian = epsilon([DpEvent(entry.noise_multiplier, 1.0)], 1e-3, "rdp")
        assert entry.epsilon["rdp"] == pytest.approx(one_gaussian)  # not a composition of 5 rounds
    assert dp.ledger.entries[-1].epsilon["pld"] == pytest.approx(epsilon([DpEvent(2.0, 1.0)], 1e-3, "pld"))
    other = tiny_config(tmp_path, privacy={**cfg.privacy.__dict__, "params": {"bands": 2}},
                        federation={"rounds": 5, "clients_per_round": 4})
    with pytest.raises(ConfigError) as err:  # the ledger's own check, under the config's
        UserLevelDp(other, plan_privacy(other, 4), root=5).load_state_dict(dp.state_dict(), 5)
    assert err.value.field == "privacy.params (the sensitivity so far)"


def test_a_target_epsilon_calibrates_the_one_gaussian_mechanism_and_cyclic_cohorts_lower_the_sensitivity(tmp_path):
    every = tiny_config(tmp_path, privacy={"mode": "user", "mechanism": "tree", "epsilon": 4.0, "delta": 1e-3},
                        federation={"rounds": 8, "clients_per_round": 4})
    plan = plan_privacy(every, 4)
    assert epsilon([DpEvent(plan.noise_multiplier, 1.0)], 1e-3, "rdp") == pytest.approx(4.0, rel=1e-3)
    assert plan.correlated.sensitivity ** 2 == pytest.approx(92.0)  # the 8-round tree, every round
    cyclic = tiny_config(tmp_path, privacy={"mode": "user", "mechanism": "tree", "epsilon": 4.0, "delta": 1e-3},
                         federation={"rounds": 8, "clients_per_round": 1, "sampling": "cyclic"})
    part = plan_privacy(cyclic, 4).correlated
    assert part.participation.kind == "cyclic" and part.participation.period == 4 and part.exact
    g = tree_matrix(8).T @ tree_matrix(8)
    assert part.sensitivity ** 2 == pytest.approx(max(g[np.ix_(p, p)].sum() for p in ([0, 4], [1, 5], [2, 6], [3, 7])))


def test_correlated_noise_0_with_an_infinite_clip_equals_the_plain_run(tmp_path):
    common = dict(data=_EQUAL, federation={"rounds": 2, "clients_per_round": 4, "local_only_clients": 0})
    plain = tiny_config(tmp_path / "a", **common)
    for mechanism in ("tree", "banded_mf"):
        dp = tiny_config(tmp_path / mechanism, **common, privacy={"mode": "user", "mechanism": mechanism,
                                                                  "noise_multiplier": 0.0, "clip_norm": math.inf})
        b = run_experiment(dp, out=tmp_path / f"dp-{mechanism}", **_QUIET)
        assert b.privacy["certified"] is False and "no noise" in b.privacy["reason"]
    run_experiment(plain, out=tmp_path / "plain", **_QUIET)
    for mechanism in ("tree", "banded_mf"):
        assert torch.equal(_final(tmp_path / "plain")["global"], _final(tmp_path / f"dp-{mechanism}")["global"])


@pytest.mark.parametrize("mechanism", ["tree", "banded_mf"])
def test_a_resumed_correlated_run_gives_the_same_adapter_and_ledger(tmp_path, mechanism):
    privacy = {"mode": "user", "mechanism": mechanism, "reproducible": True, "noise_multiplier": 1.0,
               "delta": 1e-3, "clip_norm": 0.05, "params": {"bands": 2} if mechanism == "banded_mf" else {}}
    cfg = tiny_config(tmp_path, privacy=privacy, federation={"rounds": 4, "clients_per_round": 4,
                                                             "local_only_clients": 0})
    whole = run_experiment(cfg, out=tmp_path / "whole", **_QUIET)
    run_experiment(cfg, out=tmp_path / "parts", stop_after=3, **_QUIET)  # the tree's (0,2) node spans the cut
    resumed = run_experiment(cfg, out=tmp_path / "parts", resume=True, **_QUIET)
    assert resumed.privacy == whole.privacy and whole.privacy["certified"]
    ledgers = [json.loads((tmp_path / d / "privacy_ledger.json").read_text()) for d in ("whole", "parts")]
    assert ledgers[0] == ledgers[1] and ledgers[0]["entries"][-1]["mechanism"] == mechanism
    assert torch.equal(_final(tmp_path / "whole")["global"], _final(tmp_path / "parts")["global"])


@pytest.mark.parametrize("privacy,federation,field", [
    ({"participation": "cyclic"}, {"clients_per_round": 2}, "privacy.participation"),  # sampling is not cyclic
    ({}, {"clients_per_round": 3, "sampling": "cyclic"}, "federation.clients_per_round"),  # 3 does not divide 4
    ({"participation": "separated", "max_participations": 1, "min_separation": 2},
     {"clients_per_round": 2, "sampling": "cyclic", "rounds": 4}, "privacy.max_participations"),  # 2 each
    ({"participation": "separated", "max_participations": 4, "min_separation": 3},
     {"clients_per_round": 2, "sampling": "cyclic", "rounds": 4}, "privacy.min_separation"),  # back every 2
    ({"adaptive_clipping": True}, {}, "privacy.adaptive_clipping"),
])
def test_a_participation_the_sampling_breaks_is_refused_before_the_run(tmp_path, privacy, federation, field):
    def make():
        return tiny_config(tmp_path, privacy={"mode": "user", "mechanism": "banded_mf", "noise_multiplier": 1.0,
                                              "delta": 1e-3, **privacy},
                           federation={"rounds": 2, "clients_per_round": 4, **federation})

    with pytest.raises(ConfigError) as err:
        run_experiment(make(), out=tmp_path / "r", **_QUIET)
    assert err.value.field == field and "\n" not in str(err.value)
    assert not (tmp_path / "r").exists()


def test_fedsec_privacy_accounts_a_correlated_mechanism_as_one_gaussian_at_its_sensitivity(capsys):
    from fedsec.cli import main

    assert main(["privacy", "epsilon", "--mechanism", "banded_mf", "--param", "bands=2", "--rounds", "4",
                 "--noise-multiplier", "1.0", "--delta", "1e-3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sensitivity"] == pytest.approx(math.sqrt(7.75)) and out["sensitivity_exact"]  # C 1 = (1, 1.5, 1.5, 1.5)
    assert out["epsilon"] == pytest.approx(epsilon([DpEvent(1.0, 1.0)], 1e-3, "rdp"))
    assert main(["privacy", "calibrate", "--mechanism", "tree", "--rounds", "3", "--period", "2", "--epsilon", "4",
                 "--delta", "1e-3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sensitivity"] == pytest.approx(math.sqrt(3)) and out["epsilon"] <= 4.0  # rounds {0, 2}: (1, 1, 1)
    assert main(["privacy", "epsilon", "--mechanism", "tree", "--rounds", "3", "--sample-rate", "0.5",
                 "--noise-multiplier", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sample-rate" in err[0] and "--period" in err[0]


@fedsec.register("dp_mechanism", "dense_bands_test")
@dataclasses.dataclass(frozen=True)
class DenseBands(MatrixMechanism):
    """A researcher's mechanism: the banded square root as a dense matrix, with the generic
    forward-substitution noise (no noise() of its own)."""

    bands: int = 2

    def __post_init__(self) -> None:
        if self.bands < 1:
            raise ValueError("bands: must be >= 1")

    def matrix(self, rounds: int) -> np.ndarray:
        return banded_matrix(rounds, self.bands)


def test_a_plugin_mechanism_is_accounted_and_noised_from_its_matrix_alone(tmp_path):
    def cfg(mechanism, **privacy):
        return tiny_config(tmp_path, privacy={"mode": "user", "mechanism": mechanism, "params": {"bands": 2},
                                              "reproducible": True, "noise_multiplier": 1.0, "delta": 1e-3,
                                              "clip_norm": 0.05, **privacy},
                           federation={"rounds": 3, "clients_per_round": 4, "local_only_clients": 0})

    plugin = run_experiment(cfg("dense_bands_test"), out=tmp_path / "plugin", **_QUIET)
    builtin = run_experiment(cfg("banded_mf"), out=tmp_path / "builtin", **_QUIET)
    assert plugin.privacy["certified"] and plugin.privacy["epsilon"] == builtin.privacy["epsilon"]
    assert plugin.privacy["mechanism_params"] == {"bands": 2}
    ledgers = [json.loads((tmp_path / d / "privacy_ledger.json").read_text())["entries"] for d in ("plugin", "builtin")]
    assert [e["sensitivity"] for e in ledgers[0]] == [e["sensitivity"] for e in ledgers[1]]
    # with 2 bands the generic substitution does the built-in's arithmetic: the same adapter, bit for bit
    assert torch.equal(_final(tmp_path / "plugin")["global"], _final(tmp_path / "builtin")["global"])
    for params, field in (({"bands": 0}, "privacy.params.bands"), ({"band": 2}, "privacy.params.band")):
        with pytest.raises(ConfigError) as err:
            cfg("dense_bands_test", params=params)
        assert err.value.field == field and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # the factorization cannot change midway
        run_experiment(cfg("banded_mf", params={"bands": 3}), out=tmp_path / "builtin", resume=True, **_QUIET)
    assert err.value.field == "--resume" and "'bands: 2' became 'bands: 3'" in str(err.value)


def test_the_generic_noise_equals_the_banded_recursion():
    rounds, dim = 7, 3
    g = torch.Generator().manual_seed(1)
    z = [torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(rounds)]
    generic, banded = MatrixNoise(banded_matrix(rounds, 3), dim), BandedNoise(banded_sqrt_coefficients(3), dim)
    for zt in z:
        torch.testing.assert_close(generic.next(lambda zt=zt: zt), banded.next(lambda zt=zt: zt),
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="covers 7 rounds"):
        generic.next(lambda: z[0])


def test_without_correlation_every_round_is_dp_fedavg_at_q_1_with_the_same_epsilon(tmp_path):
    """banded_mf with one band is C = I: each round's noise is independent with std z C sqrt(T)
    (sensitivity sqrt(T) for a client in all T rounds), which is DP-FedAvg at sample rate 1
    with multiplier z sqrt(T) per round: the same epsilon by every accountant."""
    rounds, z = 6, 0.8
    fed = {"rounds": rounds, "clients_per_round": 4, "sampling": "poisson"}
    mf = plan_privacy(tiny_config(tmp_path, privacy={"mode": "user", "mechanism": "banded_mf", "params": {"bands": 1},
                                                     "noise_multiplier": z, "delta": 1e-3},
                                  federation={**fed, "sampling": "auto"}), 4)
    avg = plan_privacy(tiny_config(tmp_path, privacy={"mode": "user", "noise_multiplier": z * math.sqrt(rounds),
                                                      "delta": 1e-3}, federation=fed), 4)
    assert mf.correlated.sensitivity == pytest.approx(math.sqrt(rounds)) and avg.sample_rate == 1.0
    for accountant in ("rdp", "pld"):
        one = epsilon([DpEvent(mf.noise_multiplier, 1.0)], 1e-3, accountant)
        composed = epsilon([DpEvent(avg.noise_multiplier, 1.0)] * rounds, 1e-3, accountant)
        assert one == pytest.approx(composed, rel=1e-3)
