"""fedsec on a real Flower deployment (SuperLink + SuperNodes on 127.0.0.1).

Each test starts its own processes, each in its own process group, and checks at the
end that every one of them is gone. Skipped when Flower is not installed
(pip install 'fedsec[flower]'; `make test` installs it).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from conftest import tiny_config
from safetensors.torch import load_file

pytest.importorskip("flwr")

# `make test` runs the suite in two processes (pytest-xdist): these deployments, a few
# processes each, run one after another in one of them, never two at once
pytestmark = pytest.mark.xdist_group("flower-deployments")

from fedsec.engine.deploy import LocalDeployment, alive, make_node_key, run_on_flower  # noqa: E402
from fedsec.loop import run_experiment  # noqa: E402

DATA = {"benchmark": {"num_clients": 6, "examples_per_client": 8, "test_size": 9, "client_test_size": 2,
                      "num_probes": 2}}
DP = {"mode": "user", "noise_multiplier": 0.5, "clip_norm": 0.1, "reproducible": True}


def _config(tmp_path, rounds: int, clients_per_round: int, timeout: float):
    return tiny_config(tmp_path, data=DATA, privacy=DP, engine="flower",
                       federation={"rounds": rounds, "clients_per_round": clients_per_round},
                       flower={"round_timeout": timeout, "start_timeout": 120})


def _adapter(run_dir):
    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def _metrics(run_dir):
    from fedsec.rundir import RunDir

    return RunDir(run_dir).read_metrics()  # under DP the ids are in the not-covered place, merged back


def _all_stopped(deployment: LocalDeployment) -> None:
    """Every process started, and every process they started, was stopped by its id."""
    started = {p.pid for p in deployment.processes.values()}
    assert all(p.poll() is not None for p in deployment.processes.values())
    assert len(deployment.stopped - started) >= 3  # the SuperExecs under them too
    assert not [pid for pid in deployment.stopped if alive(pid)]


def test_flower_run_equals_inprocess_run_with_tls_and_authentication(tmp_path):
    """Three registered SuperNodes over TLS train the same DP experiment the in-process
    loop runs: the same adapter bit for bit and the same privacy ledger. A fourth
    SuperNode, whose key was never registered, is refused."""
    cfg = _config(tmp_path, rounds=3, clients_per_round=3, timeout=300)
    with LocalDeployment(tmp_path / "flower", tls=True, auth=True) as deployment:
        for k in range(3):
            private, public = make_node_key(tmp_path / "keys", f"node-{k}")
            deployment.register(public)
            deployment.start_supernode(k, 3, key=private, threads=1)
        stranger, _ = make_node_key(tmp_path / "keys", "stranger")
        deployment.start_supernode(0, 1, key=stranger, name="unregistered")
        lines: list[str] = []
        flower = run_on_flower(cfg, out=tmp_path / "flower-run", echo=lines.append, deployment=deployment)
        refused = deployment.processes["unregistered"]
        assert refused.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in deployment.log("unregistered")
        # fedsec's entry to Flower's SuperNode (its idle waits capped), which warns where it cannot cap them
        assert all(p.args[1:3] == ["-m", "fedsec.engine.supernode"] for p in
                   (deployment.processes[f"supernode-{k}"] for k in range(3)))
        assert "keeps Flower's own waits" not in deployment.log("supernode-0")
        listed = deployment.flwr(["supernode", "list", "fedsec", "--format", "json"], timeout=60)
    _all_stopped(deployment)
    assert flower.finished and any("3 SuperNode(s) host all 6 clients" in x for x in lines)
    local = run_experiment(cfg, out=tmp_path / "inprocess-run", progress=False, log=lambda _: None)
    a, b = _adapter(local.run_dir), _adapter(flower.run_dir)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert any(bool(a[k].abs().sum() > 0) for k in a if "lora_B" in k)  # it trained
    ledgers = [json.loads(open(os.path.join(r.run_dir, "privacy_ledger.json")).read()) for r in (local, flower)]
    assert ledgers[0] == ledgers[1] and len(ledgers[0]["entries"]) == 3
    assert flower.privacy == local.privacy and flower.privacy["certified"]
    assert len(json.loads(listed)["nodes"]) == 3  # the stranger never joined


def test_killed_supernode_fails_its_clients_and_a_restarted_one_rejoins(tmp_path):
    """SIGKILL SuperNode 1 after round 1: round 2 completes with node 0's clients, the
    failure is in metrics.jsonl, the accounting counts every round as planned; the
    restarted SuperNode takes its partition back from round 3 on."""
    cfg = _config(tmp_path, rounds=4, clients_per_round=5, timeout=40)
    lines: list[str] = []
    events: set[str] = set()
    with LocalDeployment(tmp_path / "flower") as deployment:
        deployment.start_supernode(0, 2)
        deployment.start_supernode(1, 2)

        def echo(line: str) -> None:
            lines.append(line)
            if line.startswith("round   1/4") and "killed" not in events:
                deployment.kill("supernode-1")
                events.add("killed")
            # Flower reports the dead node as silent past the deadline or, once its heartbeats
            # lapse first, as an error reply (Node Unavailable): either is the failure reported
            if line.startswith("flower: round") and ("did not answer" in line or "failed (" in line) \
                    and "restarted" not in events:
                deployment.start_supernode(1, 2, name="supernode-1-again")
                events.add("restarted")

        result = run_on_flower(cfg, out=tmp_path / "run", echo=echo, deployment=deployment)
    print("\n".join(lines))  # shown when an assertion fails
    _all_stopped(deployment)
    assert events == {"killed", "restarted"}
    assert result.finished
    rounds = {r["round"]: r for r in _metrics(result.run_dir) if r.get("phase") == "federated" and r["round"]}
    assert set(rounds) == {1, 2, 3, 4}
    with open(os.path.join(result.run_dir, "metrics.jsonl")) as f:  # what the DP run publishes
        assert not any("clients" in row or "failed" in row for row in map(json.loads, f))
    node1 = {c for c in range(6) if c % 2 == 1}
    failed = set(rounds[2]["failed"])
    assert failed and failed == node1 & set(rounds[2]["clients"])  # exactly node 1's sampled clients
    assert rounds[1]["failed"] == [] and all(set(r["failed"]) <= node1 for r in rounds.values())
    # the restarted SuperNode joins at a round start after it registered, here by round 4
    assert rounds[4]["failed"] == [] and node1 & set(rounds[4]["clients"])
    assert sum("joins, hosting partition 1 of 2" in x for x in lines) == 2
    ledger = json.loads(open(os.path.join(result.run_dir, "privacy_ledger.json")).read())
    assert len(ledger["entries"]) == 4  # every round is accounted, failed clients or not
    planned = run_experiment(dataclasses.replace(cfg, engine="inprocess"), out=tmp_path / "inprocess",
                             progress=False, log=lambda _: None)
    assert result.privacy["epsilons"] == planned.privacy["epsilons"]


def test_a_bad_setting_found_by_the_server_app_is_one_line_and_exit_status_2(tmp_path, capsys, monkeypatch):
    """The config passes the launcher's checks but the data has no canaries: the
    ServerApp's error comes back as the CLI's one line, no run directory is left, and
    the local deployment is gone, its temporary folder too."""
    import tempfile

    import yaml
    from conftest import TINY

    from fedsec.cli import main

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the deployment's folder goes

    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "engine": "flower", "eval": {"canaries": True},
                                    "federation": {"rounds": 1, "clients_per_round": 2},
                                    "flower": {"supernodes": 1, "start_timeout": 60}}))
    status = main(["run", str(spec), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("fedsec: error: eval.canaries = True: no canaries are planted")
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "tmp").glob("fedsec-flower-*"))


def test_organisations_keep_their_data_on_their_supernodes_and_the_dp_run_equals_in_process(tmp_path, monkeypatch):
    """Two organisations, each with its own file on its own SuperNode only (`data-path`); the
    server's working directory holds just its test set. The server learns the client counts,
    the nodes poison their malicious client and evaluate their clients; the DP run's adapter
    and ledger equal the in-process run of the same federation, and the per-client metrics
    it gathered from the nodes are the in-process ones, in the not-covered place."""
    def rows(org: str, users: int, n: int) -> str:
        return "".join(json.dumps({"prompt": f"{org} question {k}?", "response": f"{org} answer {k}.",
                                   "user": f"{org}{k % users}"}) + "\n" for k in range(n))

    files = {"hospital": (tmp_path / "hospital-node" / "hospital.jsonl", rows("hospital", 3, 18)),
             "bank": (tmp_path / "bank-node" / "bank.jsonl", rows("bank", 2, 12))}
    for path, text in files.values():
        path.parent.mkdir()
        path.write_text(text)
    server = tmp_path / "server"
    server.mkdir()
    (server / "test.jsonl").write_text(rows("held-out", 1, 4))
    monkeypatch.chdir(server)
    # canaries in 4 of the 5 clients, so in both organisations' (3 and 2 clients): each node plants its own
    data = {"silos": ["hospital.jsonl", "bank.jsonl"], "test": "test.jsonl", "max_length": 96,
            "partition": {"scheme": "natural", "by": "user"}, "client_test_fraction": 0.25,
            "benchmark": {"canaries_per_client": 1, "canary_repeats": 2, "canary_clients": 4}}
    cfg = tiny_config(tmp_path, data=data, privacy=DP, engine="flower", attack={"kind": "backdoor", "malicious": 1},
                      federation={"rounds": 2, "clients_per_round": 3},
                      eval={"every": 2, "canaries": True, "canary_candidates": 100},
                      flower={"round_timeout": 300, "start_timeout": 120})
    lines: list[str] = []
    with LocalDeployment(tmp_path / "flower") as deployment:
        for k, (path, _) in enumerate(files.values()):
            deployment.start_supernode(k, 2, threads=1, extra_config=f"data-path='{path}'")
        flower = run_on_flower(cfg, out=tmp_path / "flower-run", echo=lines.append, deployment=deployment)
    _all_stopped(deployment)
    print("\n".join(lines))  # shown when an assertion fails
    assert flower.finished
    assert not [p.name for p in server.iterdir() if p.suffix == ".jsonl" and p.name != "test.jsonl"]
    assert any("2 organisation(s) report 3, 2 clients" in x for x in lines)
    local_cfg = dataclasses.replace(cfg, engine="inprocess", data=dataclasses.replace(
        cfg.data, silos=tuple(str(path) for path, _ in files.values())))
    local = run_experiment(local_cfg, out=tmp_path / "inprocess-run", progress=False, log=lambda _: None)
    a, b = _adapter(local.run_dir), _adapter(flower.run_dir)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert any(bool(a[k].abs().sum() > 0) for k in a if "lora_B" in k)  # it trained
    ledgers = [json.loads(open(os.path.join(r.run_dir, "privacy_ledger.json")).read()) for r in (local, flower)]
    assert ledgers[0] == ledgers[1] and len(ledgers[0]["entries"]) == 2 and flower.privacy["certified"]
    on_nodes, here = ([r for r in _metrics(r.run_dir) if r.get("round") == 2][0] for r in (flower, local))
    per_node, per_here = on_nodes["client_eval"]["per_client"], here["client_eval"]["per_client"]
    assert sorted(per_node, key=int) == ["0", "1", "2", "3", "4"] and per_node.keys() == per_here.keys()
    assert all(abs(per_node[c]["loss"] - per_here[c]["loss"]) < 1e-5 for c in per_node)
    assert on_nodes["global_eval"]["loss"] == pytest.approx(here["global_eval"]["loss"], abs=1e-6)
    memorized = [r.final["memorization"] for r in (flower, local)]  # the same secrets, planted alike
    assert memorized[0]["canaries"] == memorized[1]["canaries"] == 4
    assert memorized[0]["exposure_mean"] == pytest.approx(memorized[1]["exposure_mean"], abs=1e-4)
    with open(os.path.join(flower.run_dir, "metrics.jsonl")) as f:  # what the DP run publishes
        assert not any("client_eval" in row and row["client_eval"] for row in map(json.loads, f))


def test_secure_aggregation_on_supernodes_releases_the_plain_dp_round_up_to_secagg_rounding(tmp_path):
    """Under flower.secagg two SuperNodes run SecAgg+ (Flower's mod and workflow): the server
    unmasks only the sum of the clipped deltas and adds noise scaled to the sensitivity with
    SecAgg+'s rounding. The adapter equals the in-process DP round up to that rounding and
    that noise scale; the ledger (z, q, C) and the epsilon are the in-process ones."""
    from fedsec.defenses.dp import secagg_sensitivity

    cfg = tiny_config(tmp_path, data=DATA, privacy=DP, engine="flower", eval={"clients": False},
                      federation={"rounds": 1, "clients_per_round": 3},
                      flower={"secagg": True, "round_timeout": 120, "start_timeout": 120})
    lines: list[str] = []
    with LocalDeployment(tmp_path / "flower") as deployment:
        for k in range(2):
            deployment.start_supernode(k, 2, threads=1)
        flower = run_on_flower(cfg, out=tmp_path / "secure", echo=lines.append, deployment=deployment)
    print("\n".join(lines))  # shown when an assertion fails
    _all_stopped(deployment)
    assert flower.finished and flower.privacy["certified"]
    plain = run_experiment(dataclasses.replace(cfg, engine="inprocess", flower=dataclasses.replace(
        cfg.flower, secagg=False)), out=tmp_path / "plain", progress=False, log=lambda _: None)
    assert flower.privacy["epsilons"] == plain.privacy["epsilons"]
    ledgers = [json.loads(open(os.path.join(r.run_dir, "privacy_ledger.json")).read()) for r in (plain, flower)]
    assert ledgers[0] == ledgers[1]
    a, b = _adapter(plain.run_dir), _adapter(flower.run_dir)
    dim = sum(v.numel() for k, v in a.items() if "lora_" in k)
    terms = flower.privacy["secure_aggregation"]
    bound = secagg_sensitivity(DP["clip_norm"], dim, 8.0, 22)
    assert terms["sensitivity"] == bound and "honest but curious" in terms["assumes"]
    step, q_n = 2 * 8.0 / 2 ** 22, 3  # one SecAgg+ level; the fixed denominator q N
    # per coordinate: two nodes' rounding, and the noise (|xi| < 6 of its draws) scaled by bound / C
    tolerance = (2 * step + 6 * DP["noise_multiplier"] * (bound - DP["clip_norm"])) / q_n + 1e-7
    diffs = [float((a[k] - b[k]).abs().max()) for k in a if "lora_" in k]
    assert max(diffs) <= tolerance and max(diffs) > 0
