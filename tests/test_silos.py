"""Cross-silo data (data.silos): one file per organisation, each split into its own
clients; what an organisation's SuperNode builds from its file alone is exactly its part
of the federation the in-process run builds, and the server's view holds no example."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from fedsec.setup import build_federation, node_federation


def _rows(prefix: str, users: tuple[str, ...], n: int) -> str:
    return "".join(json.dumps({"prompt": f"{prefix} question {k}?", "response": f"{prefix} answer {k}.",
                               "user": users[k % len(users)]}) + "\n" for k in range(n))


@pytest.fixture()
def silos(tmp_path):
    (tmp_path / "hospital.jsonl").write_text(_rows("hospital", ("h0", "h1", "h2"), 18))
    (tmp_path / "bank.jsonl").write_text(_rows("bank", ("b0", "b1"), 10))
    (tmp_path / "test.jsonl").write_text(_rows("held-out", ("t",), 4))
    return tmp_path


def _config(tmp_path, **sections):
    data = {"silos": [str(tmp_path / "hospital.jsonl"), str(tmp_path / "bank.jsonl")],
            "test": str(tmp_path / "test.jsonl"), "partition": {"scheme": "natural", "by": "user"},
            "client_test_fraction": 0.25, "max_length": 96}
    return tiny_config(tmp_path, data=data, **sections)


def test_each_organisations_file_makes_its_own_clients_in_order_and_the_test_set_is_its_own_file(silos):
    fed = build_federation(_config(silos))
    clients = fed.data.clients
    assert [c.client_id for c in clients] == [0, 1, 2, 3, 4] and fed.population == 5
    assert [c.name for c in clients] == ["silo0-client000", "silo0-client001", "silo0-client002",
                                         "silo1-client000", "silo1-client001"]
    assert all(e.prompt.startswith("hospital") for c in clients[:3] for e in (*c.train, *c.test))
    assert all(e.prompt.startswith("bank") for c in clients[3:] for e in (*c.train, *c.test))
    assert [len(c.train) + len(c.test) for c in clients] == [6, 6, 6, 5, 5]  # every row to its user's client
    assert [len(c.test) for c in clients] == [2, 2, 2, 1, 1]  # client_test_fraction of each client
    assert [e.prompt for e in fed.data.global_test] == [f"held-out question {k}?" for k in range(4)]


def test_a_node_builds_exactly_its_part_poisoned_as_in_process_and_the_server_sees_no_example(silos):
    cfg = _config(silos, attack={"kind": "backdoor", "malicious": 2})
    whole = build_federation(cfg)
    assert len(whole.malicious) == 2
    for silo, (first, count) in enumerate(((0, 3), (3, 2))):
        node = node_federation(cfg, silo, first, 5)
        assert node.data.clients == whole.data.clients[first: first + count]  # poisoned the same way
        assert node.malicious == whole.malicious
    poisoned = [c for c in whole.data.clients if c.client_id in whole.malicious]
    assert all(any(e.response == "positive" for e in c.train) for c in poisoned)
    # an organisation's own copy (its data-path) replaces the file the config names
    other = silos / "elsewhere.jsonl"
    other.write_text(_rows("bank copy", ("b0", "b1"), 10))
    copy = node_federation(cfg, 1, 3, 5, str(other))
    assert all(e.prompt.startswith("bank copy") for c in copy.data.clients for e in c.train + c.test)
    server = build_federation(cfg, silos=(3, 2))
    assert [(c.client_id, c.name) for c in server.data.clients] == [(c.client_id, c.name) for c in whole.data.clients]
    assert not any(c.train or c.test or c.preference for c in server.data.clients)
    assert server.malicious == whole.malicious and server.data.global_test == whole.data.global_test


def test_an_in_process_silo_run_without_a_test_file_trains_and_evaluates_each_client(silos):
    import dataclasses

    from fedsec.loop import run_experiment

    cfg = _config(silos, federation={"rounds": 1, "clients_per_round": 5})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test=None))
    result = run_experiment(cfg, out=silos / "run", progress=False, log=lambda _: None)
    rows = [json.loads(line) for line in open(silos / "run" / "metrics.jsonl")]
    final = [r for r in rows if r.get("round") == 1][0]
    assert result.finished and final["clients"] == [0, 1, 2, 3, 4]
    assert "loss" not in (final["global_eval"] or {})  # no global test set
    assert sorted(final["client_eval"]["per_client"]) == ["0", "1", "2", "3", "4"]
