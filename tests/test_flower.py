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


def test_a_bad_setting_found_by_the_server_app_is_one_line_and_exit_status_2(tmp_path, capsys):
    """The config passes the launcher's checks but the data has no canaries: the
    ServerApp's error comes back as the CLI's one line, no run directory is left, and
    the local deployment is gone."""
    import yaml
    from conftest import TINY

    from fedsec.cli import main

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


def test_each_supernode_trains_on_its_own_copy_of_the_data_named_by_data_path(tmp_path):
    """Two SuperNodes started with `data-path` pointing at their organisation's file: the
    clients train on those rows, not on the server's copy. The nodes' file has the same
    users (so the same clients) with other answers, so the adapter equals the in-process
    run on the nodes' file, bit for bit, and differs from the one on the server's."""
    def rows(answer: str) -> str:
        return "".join(f'{{"prompt": "q{k}?", "response": "{answer}{k}", "user": "u{k % 4}"}}\n' for k in range(32))

    (tmp_path / "server.jsonl").write_text(rows("server answer "))
    (tmp_path / "org.jsonl").write_text(rows("the organisation's answer "))
    data = {"source": str(tmp_path / "server.jsonl"), "partition": {"scheme": "natural", "by": "user"},
            "test_fraction": 0.125}
    cfg = tiny_config(tmp_path, data=data, engine="flower", eval={"every": 2, "clients": False},
                      federation={"rounds": 2, "clients_per_round": 4},
                      flower={"round_timeout": 300, "start_timeout": 120})
    with LocalDeployment(tmp_path / "flower") as deployment:
        for k in range(2):
            deployment.start_supernode(k, 2, threads=1, extra_config=f"data-path='{tmp_path / 'org.jsonl'}'")
        flower = run_on_flower(cfg, out=tmp_path / "flower-run", echo=lambda _: None, deployment=deployment)
    _all_stopped(deployment)
    assert flower.finished
    on = {}
    for name in ("org", "server"):
        local_cfg = dataclasses.replace(cfg, engine="inprocess", data=dataclasses.replace(
            cfg.data, source=str(tmp_path / f"{name}.jsonl")))
        on[name] = _adapter(run_experiment(local_cfg, out=tmp_path / name, progress=False, log=lambda _: None).run_dir)
    got = _adapter(flower.run_dir)
    assert all(bool((got[k] == on["org"][k]).all()) for k in got)
    assert any(not bool((got[k] == on["server"][k]).all()) for k in got if "lora_B" in k)
