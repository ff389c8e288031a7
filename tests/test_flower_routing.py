"""FlowerClients, the server side of the flower engine, against a fake Grid: routing by
partition, silent and lying SuperNodes, malformed replies, a restarted node taking
its partition over. No processes: the Grid's three calls are played by a dict."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from fedsec.config import FlowerConfig  # noqa: E402
from fedsec.engine.flower import EVALUATE, QUERY, FlowerClients  # noqa: E402

DIM = 3


@pytest.fixture(autouse=True)
def _inside_a_run(monkeypatch):
    """Flower's Message needs the run id a ServerApp process has."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _delta(client: int, round_idx: int) -> torch.Tensor:
    return torch.full((DIM,), float(100 * round_idx + client))


class FakeGrid:
    """Nodes answer at once ("ok"), never ("silent"), for clients they were not asked
    ("liar") or with an empty content ("malformed")."""

    def __init__(self, nodes: dict[int, tuple[int, int, str]], clients: int):
        self.nodes, self.clients, self.sent, self.replies = nodes, clients, {}, {}
        self.counts: dict[int, int] = {}  # a node that builds another number of clients

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.sent)}"
            self.sent[mid] = m
            ids.append(mid)
            reply = self._answer(m)
            if reply is not None:
                reply.metadata = SimpleNamespace(reply_to_message_id=mid)
                self.replies[mid] = reply
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def _answer(self, message):
        p, count, mode = self.nodes[message.metadata.dst_node_id]
        if mode == "silent":
            return None
        if mode == "malformed":
            return _reply(RecordDict({}))
        ask = message.content["fedsec"]
        if message.metadata.message_type == QUERY:
            seen = self.counts.get(message.metadata.dst_node_id, self.clients)
            return _reply(RecordDict({"fedsec": ConfigRecord({"partition": p, "partitions": count,
                                                              "clients": seen})}))
        if message.metadata.message_type == EVALUATE:  # its own clients, from `first`; a liar adds client 0
            first = int(ask["first"])
            own = list(range(first, first + self.counts[message.metadata.dst_node_id]))
            ids = own + ([0] if mode == "liar" else [])
            return _reply(RecordDict({"fedsec": ConfigRecord({
                "clients": ids, "loss": [float(c) for c in ids], "accuracy": [-1.0] * len(ids),
                "n": [2] * len(ids), "partition": p, "partitions": count})}))
        clients = [int(c) for c in ask["clients"]] + ([2] if mode == "liar" else [])
        deltas = torch.stack([_delta(c, int(ask["round"])) for c in clients])
        if mode == "liar":
            deltas[-1] = 1e6  # a forged update for client 2, which node 11 hosts
        info = ConfigRecord({"clients": clients, "num_examples": [8] * len(clients), "loss": [1.0] * len(clients),
                             "loss_terms": [8] * len(clients), "tokens": [64] * len(clients), "partition": p,
                             "partitions": count})
        return _reply(RecordDict({"updates": ArrayRecord({"deltas": deltas}), "fedsec": info}))


def _reply(content: RecordDict):
    return SimpleNamespace(content=content, has_error=lambda: False, error=None)


def _runner(grid, lines):
    runner = FlowerClients(grid, FlowerConfig(round_timeout=0.3, start_timeout=5), poll_seconds=0.01)
    runner.start(SimpleNamespace(population=grid.clients, trainable=grid.clients), lines.append)
    return runner


def _round(runner, clients, round_idx, privacy="off"):
    setup = SimpleNamespace(population=6, trainable=6, record_plan=None,
                            cfg=SimpleNamespace(privacy=SimpleNamespace(mode=privacy)))
    return runner.updates(setup, torch.zeros(DIM), clients, 1e-3, round_idx, 0.0)


def test_an_empty_poisson_round_sends_nothing_and_under_dp_no_log_line_names_a_client():
    lines: list[str] = []
    grid = FakeGrid({11: (0, 2, "ok"), 12: (1, 2, "ok")}, clients=6)
    runner = _runner(grid, lines)
    sent = len(grid.sent)
    assert _round(runner, [], round_idx=1, privacy="user") == ([], ())  # the server adds the noise alone
    assert len(grid.sent) == sent
    grid.nodes[12] = (1, 2, "silent")
    before = len(lines)
    updates, failed = _round(runner, [1, 3, 4], round_idx=2, privacy="user")
    assert [u.client_id for u in updates] == [4] and failed == (1, 3)  # the ids stay in the round's row
    said = lines[before:]
    assert any("SuperNode 12 did not answer" in x and "(2 of them)" in x for x in said)
    assert not any("1, 3" in x for x in said)


def test_each_client_is_trained_by_the_node_hosting_it_in_the_sampled_order():
    lines: list[str] = []
    grid = FakeGrid({11: (0, 2, "ok"), 12: (1, 2, "ok")}, clients=6)
    runner = _runner(grid, lines)
    updates, failed = _round(runner, [5, 0, 3, 2], round_idx=1)
    assert failed == () and [u.client_id for u in updates] == [5, 0, 3, 2]
    assert all(torch.equal(u.delta, _delta(u.client_id, 1)) for u in updates)
    asked = {m.metadata.dst_node_id: list(m.content["fedsec"]["clients"]) for m in grid.sent.values()
             if m.metadata.message_type == "train"}
    assert asked == {11: [0, 2], 12: [5, 3]}
    assert "flower: 2 SuperNode(s) host all 6 clients" in lines


def test_a_silent_node_fails_its_clients_and_a_restarted_one_takes_its_partition():
    lines: list[str] = []
    grid = FakeGrid({11: (0, 2, "ok"), 12: (1, 2, "ok")}, clients=6)
    runner = _runner(grid, lines)
    grid.nodes[12] = (1, 2, "silent")  # the machine died
    updates, failed = _round(runner, [0, 1, 3, 4], round_idx=2)
    assert [u.client_id for u in updates] == [0, 4] and failed == (1, 3)
    assert any("SuperNode 12 did not answer" in x for x in lines)
    updates, failed = _round(runner, [1, 2], round_idx=3)  # nobody hosts partition 1 now
    assert [u.client_id for u in updates] == [2] and failed == (1,)
    grid.nodes[13] = (1, 2, "ok")  # restarted: a new node id
    updates, failed = _round(runner, [1, 2], round_idx=4)
    assert [u.client_id for u in updates] == [1, 2] and failed == ()
    assert any("SuperNode 13 joins, hosting partition 1 of 2" in x for x in lines)


def test_forged_and_malformed_replies_never_reach_the_aggregate():
    lines: list[str] = []
    grid = FakeGrid({11: (0, 2, "ok"), 12: (1, 2, "liar")}, clients=6)
    runner = _runner(grid, lines)
    updates, failed = _round(runner, [1, 2], round_idx=1)  # the liar's reply is read first
    by_id = {u.client_id: u for u in updates}
    assert sorted(by_id) == [1, 2] and failed == ()
    assert torch.equal(by_id[1].delta, _delta(1, 1)) and torch.equal(by_id[2].delta, _delta(2, 1))
    grid.nodes[12] = (1, 2, "malformed")
    updates, failed = _round(runner, [1, 2], round_idx=2)
    assert [u.client_id for u in updates] == [2] and failed == (1,)
    assert any("SuperNode 12 sent a malformed reply" in x for x in lines)


def test_a_node_building_other_data_is_left_out_and_the_start_waits_for_coverage():
    lines: list[str] = []
    grid = FakeGrid({11: (0, 2, "ok")}, clients=6)
    runner = FlowerClients(grid, FlowerConfig(round_timeout=0.3, start_timeout=1.5), poll_seconds=0.01)
    from fedsec.errors import ConfigError

    with pytest.raises(ConfigError, match="flower.start_timeout .* no SuperNode hosts clients 1, 3, 5"):
        runner.start(SimpleNamespace(population=6, trainable=6), lines.append)
    odd = FakeGrid({11: (0, 2, "ok"), 12: (1, 2, "ok")}, clients=6)
    odd.counts[12] = 7  # node 12's data gives 7 clients
    runner = FlowerClients(odd, FlowerConfig(round_timeout=0.3, start_timeout=1.5), poll_seconds=0.01)
    with pytest.raises(ConfigError):
        runner.start(SimpleNamespace(population=6, trainable=6), lines.append)
    assert any("builds 7 clients from its data, the server 6" in x for x in lines)


def test_with_silos_each_organisation_hosts_the_clients_its_file_makes_and_evaluates_only_those():
    """Organisations 0 and 1 report 3 and 2 clients: they host 0-2 and 3-4, train messages
    carry each node's first id, evaluation comes from the nodes, and a node that claims
    another organisation's client is not believed; one started for another number of
    organisations is left out."""
    lines: list[str] = []
    grid = FakeGrid({11: (0, 2, "ok"), 12: (1, 2, "liar"), 13: (0, 3, "ok")}, clients=0)
    grid.counts.update({11: 3, 12: 2, 13: 4})
    runner = FlowerClients(grid, FlowerConfig(round_timeout=0.3, start_timeout=5), poll_seconds=0.01)
    cfg = SimpleNamespace(data=SimpleNamespace(silos=("a.jsonl", "b.jsonl")))
    assert runner.discover(cfg, lines.append) == (3, 2)
    assert any("SuperNode 13 is one of 3 organisations, data.silos lists 2" in x for x in lines)
    runner.start(SimpleNamespace(population=5, trainable=5), lines.append)
    assert {c: runner._host(c) for c in range(5)} == {0: 11, 1: 11, 2: 11, 3: 12, 4: 12}
    updates, failed = _round(runner, [1, 4], round_idx=1)
    sent = {m.metadata.dst_node_id: m.content["fedsec"] for m in grid.sent.values()
            if m.metadata.message_type == "train"}
    assert (sent[11]["first"], sent[12]["first"], sent[12]["total"]) == (0, 3, 6)  # total: the setup's population
    assert [u.client_id for u in updates] == [1, 4] and failed == ()  # the liar's client 2 is dropped
    results = runner.evaluate(SimpleNamespace(population=5, trainable=5), torch.zeros(DIM))
    assert sorted(results) == [0, 1, 2, 3, 4] and results[0].loss == 0.0  # node 12's "client 0" is ignored
    assert results[4].loss == 4.0 and results[4].accuracy is None and results[4].num_examples == 2


def test_a_data_path_is_this_organisations_file_and_needs_data_silos(tmp_path, monkeypatch):
    from conftest import TINY

    from fedsec.config import ExperimentConfig, dump_config, from_mapping
    from fedsec.engine.flower_client import _request
    from fedsec.engine.worker import Worker

    rows = "".join(f'{{"prompt": "q{k}", "response": "a{k}", "user": "u{k % 3}"}}\n' for k in range(30))
    own = tmp_path / "org1.jsonl"
    own.write_text(rows)
    data = {"silos": ["hospital.jsonl", "bank.jsonl"], "partition": {"scheme": "natural", "by": "user"}}
    cfg = from_mapping(ExperimentConfig, {**TINY, "data": data})
    context = SimpleNamespace(run_config={"workdir": str(tmp_path), "config": dump_config(cfg)},
                              node_config={"partition-id": 1, "num-partitions": 2, "data-path": str(own)})
    monkeypatch.chdir(tmp_path)  # the worker moves into the run's workdir; the test's cwd comes back after
    request = _request("describe", context)
    mine, part = Worker._config(request)
    assert part == (1, 2) and Worker._describe(mine, part, request) == 3  # three users in its own file
    embedded = SimpleNamespace(run_config={"workdir": str(tmp_path), "config": dump_config(
        from_mapping(ExperimentConfig, TINY))}, node_config=context.node_config)
    with pytest.raises(ValueError, match="has no data.silos"):
        Worker._config(_request("describe", embedded))


def test_secure_aggregation_with_one_supernode_is_refused_at_the_start():
    from fedsec.errors import ConfigError

    grid = FakeGrid({11: (0, 1, "ok")}, clients=4)
    runner = FlowerClients(grid, FlowerConfig(secagg=True, supernodes=2, round_timeout=0.3, start_timeout=2),
                           poll_seconds=0.01)
    with pytest.raises(ConfigError, match="flower.secagg = True: SecAgg.* needs at least 2 SuperNodes"):
        runner.start(SimpleNamespace(population=4, trainable=4), lambda _: None)


def test_the_launcher_shows_the_server_apps_lines_without_flowers_bookkeeping():
    """What `fedsec run --engine flower` echoes of the server's stream (lines as seen at the end
    of a real run): fedsec's lines, errors and Flower's informative records pass; Flower's
    DEBUG records, its empty records (colored or not) and its log-stream notes do not."""
    from fedsec.engine.deploy import _server_lines

    passed: list[str] = []
    show = _server_lines(passed.append)
    kept = ["flower: 2 SuperNode(s) host all 20 clients", "round   1/3  lr 3.00e-04  C 0.1",
            "fedsec: run finished", "fedsec: error: eval.canaries = True: no canaries are planted",
            "Traceback (most recent call last):", "12/06/2026 12:27:14:INFO:Received 2 results"]
    dropped = ["12/06/2026 12:27:14:DEBUG:ServerApp finished running.", "\x1b[92mINFO \x1b[0m:      ",
               "12/06/2026 12:27:14:INFO:",
               "12/06/2026 12:27:14:DEBUG:[flwr-serverapp] Will push ServerApp task output",
               "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `1`", "   "]
    for line in dropped[:3] + kept[:3] + dropped[3:] + kept[3:]:
        show(line)
    assert passed == kept


class SlowGrid(FakeGrid):
    """Train and evaluate replies become visible `delay` seconds after they are sent (a worker
    still loading its model); queries are answered at once."""

    def __init__(self, nodes, clients, delay: float):
        super().__init__(nodes, clients)
        self.delay, self.ready = delay, {}

    def push_messages(self, messages):
        import time

        ids = super().push_messages(messages)
        for mid in ids:
            slow = self.sent[mid].metadata.message_type != QUERY
            self.ready[mid] = time.monotonic() + (self.delay if slow else 0.0)
        return ids

    def pull_messages(self, ids):
        import time

        now = time.monotonic()
        return [self.replies.pop(i) for i in list(ids) if i in self.replies and self.ready[i] <= now]


def test_a_supernodes_first_work_message_gets_the_start_timeout_and_later_ones_the_round_timeout():
    """A SuperNode's first train message also builds its worker (the model, its clients): it is
    given flower.start_timeout (5 s here), not the round's 0.3 s; once it has answered, a reply
    as slow (1 s) is past the round's deadline and its clients fail."""
    lines: list[str] = []
    grid = SlowGrid({11: (0, 1, "ok")}, clients=6, delay=1.0)
    runner = _runner(grid, lines)
    updates, failed = _round(runner, [0, 1], round_idx=1)
    assert failed == () and [u.client_id for u in updates] == [0, 1]
    updates, failed = _round(runner, [2], round_idx=2)
    assert updates == [] and failed == (2,)
    assert any("SuperNode 11 did not answer" in line for line in lines)
