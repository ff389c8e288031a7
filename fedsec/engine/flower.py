"""fedsec on Flower: the ServerApp runs fedsec's round loop, ClientApps train clients.

Flower carries the messages and starts the processes; every privacy and robustness
decision stays in fedsec's own code, on the server, exactly as in-process:

    ServerApp (on the SuperLink's machine)       ClientApp (one process per message, on a SuperNode)
      run_experiment(cfg, clients=FlowerClients)     relays the message to the SuperNode's worker
        sample clients -> one "train" message  ->  (fedsec.engine.worker, started by the first
        per SuperNode hosting any of them            message, alive while its SuperNode is): the
                                                     node's clients (data.silos: from its own
                                                     file alone), the base model and the prepared
                                                     clients, kept across rounds; it trains the
                                                     asked clients from the global adapter
        sanitize, clip, aggregate, noise,       <-  their adapter deltas (and example counts, losses)
        server optimizer, accountant,
        evaluation ("evaluate" messages: the    <-  each client's test metrics, computed on
        clients' test sets stay on their nodes),    its node with the global adapter
        checkpoint, run directory

With data.silos, SuperNode p (partition-id=p) is organisation p: before round 1 the
server asks each how many clients its file makes (all it learns of their data) and
organisation p hosts the next that many ids. Otherwise (the embedded benchmark, a
dataset by name: a simulation where every party builds the federation from the config)
a SuperNode hosts the clients c with c mod num-partitions = partition-id.

A client whose SuperNode is down, crashed or later than `flower.round_timeout` counts
as failed for that round: the round completes with the clients that answered, and the
failure is written to metrics.jsonl. Under user-level DP that keeps the accounting
valid: the sampling already happened and the mean divides by the planned expected
count, so a missing client only lowers the signal.

What a client sends is its adapter delta after local training (never its examples);
clipping to the DP norm happens on the server, where it must happen anyway (a malicious
client would not clip), so the Flower run and the in-process run compute the same numbers.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsec.config import ExperimentConfig, FlowerConfig, from_raw
from fedsec.configfile import load_yaml
from fedsec.engine.flower_client import EVALUATE, QUERY, TRAIN
from fedsec.errors import ConfigError, FedsecError
from fedsec.results import ClientUpdate, SecureSum

server_app = ServerApp()


def config_from_text(text: str) -> ExperimentConfig:
    return from_raw(load_yaml(text))


# ---------------------------------------------------------------------------
# The server side.


class FlowerClients:
    """fedsec.clients.ClientRunner over a Flower Grid: routes each sampled client to the
    SuperNode hosting it and collects the updates that come back in time."""

    def __init__(self, grid: Grid, cfg: FlowerConfig, poll_seconds: float = 0.2, context: Context | None = None):
        self.grid, self.cfg, self.poll = grid, cfg, poll_seconds
        self.context = context  # the ServerApp's: SecAgg+'s workflow runs in it
        self.routes: dict[int, tuple[int, int]] = {}  # node id -> (partition, partitions)
        self.late: dict[str, int] = {}  # unanswered message id -> node id
        self.refused: set[int] = set()  # nodes whose data does not match the server's
        # nodes whose worker has answered a train or evaluate message: before that, a node's first
        # such message also builds its worker (the model, its clients' items) and gets start_timeout
        self.working: set[int] = set()
        self.log: Callable[[str], None] = print
        self.silos: tuple[int, ...] | None = None  # data.silos: clients per organisation, once all reported
        self.offsets: list[int] = []  # data.silos: organisation p hosts the clients offsets[p] <= c < offsets[p + 1]
        self.wanted = 0  # data.silos: how many organisations the config lists
        self.counts: dict[int, int] = {}  # data.silos: clients each organisation reported

    def discover(self, cfg, log: Callable[[str], None]) -> tuple[int, ...] | None:
        """With data.silos, wait until a SuperNode per organisation reports how many clients
        its own file makes; those counts (the federation's size: public, as the guarantee
        assumes) are all the server learns of their data. Without silos: None."""
        if not cfg.data.silos:
            return None
        self.log, self.wanted = log, len(cfg.data.silos)
        self._wait(lambda: [p for p in range(self.wanted) if p not in self.counts],
                   lambda missing: f"after that many seconds no SuperNode serves organisation(s) {_ids(missing)} "
                                   f"of data.silos; start SuperNode k of {self.wanted} (partition-id=k "
                                   f"num-partitions={self.wanted}) for each, or raise it")
        self.silos = tuple(self.counts[p] for p in range(self.wanted))
        self.offsets = [0, *itertools.accumulate(self.silos)]
        log(f"flower: {self.wanted} organisation(s) report {', '.join(map(str, self.silos))} clients")
        return self.silos

    def start(self, setup, log: Callable[[str], None]) -> None:
        """Wait until the SuperNodes present host every client."""
        self.log = log
        clients = setup.trainable
        self._wait(lambda: [c for c in range(clients) if self._host(c) is None],
                   lambda missing: f"after that many seconds no SuperNode hosts clients {_ids(missing)}; "
                                   "start SuperNodes for the missing partitions or raise it", clients)
        log(f"flower: {len(self.routes)} SuperNode(s) host all {clients} clients")
        if self.cfg.secagg and len(self.routes) < 2:
            raise ConfigError("flower.secagg", True, f"SecAgg+ needs at least 2 SuperNodes and {len(self.routes)} "
                              "hosts every client; start more SuperNodes (partitions) or set flower.secagg: false")

    def _wait(self, missing: Callable[[], list[int]], why: Callable[[list[int]], str], clients: int = 0) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout
        while True:
            self._discover(clients)
            left = missing()
            if not left:
                return
            if time.monotonic() > deadline:
                raise ConfigError("flower.start_timeout", self.cfg.start_timeout, why(left))
            time.sleep(1.0)

    def updates(self, setup, start: torch.Tensor, clients: list[int], lr: float, round_idx: int,
                prox_mu: float) -> tuple[list[ClientUpdate], tuple[int, ...]]:
        self._recall_late()
        # under DP the log names no client (who was sampled is what the mechanism hides): counts
        # only; the ids are in the round's "failed" field, in the run's not-covered place
        ids = _ids if setup.cfg.privacy.mode == "off" else (lambda c: f"({len(c)} of them)")
        self._discover(setup.trainable)
        if self.cfg.secagg:
            return self._secure_updates(setup, start, clients, lr, round_idx, prox_mu)
        by_node: dict[int, list[int]] = {}
        for c in clients:
            node = self._host(c)
            if node is not None:
                by_node.setdefault(node, []).append(c)
        record_noise = setup.record_plan.noise_multiplier if setup.record_plan is not None else -1.0
        messages = {node: _train_message(node, start, hosted, lr, round_idx, prox_mu, record_noise,
                                         self._first(node), setup.population)
                    for node, hosted in by_node.items()}
        unhosted = [c for c in clients if self._host(c) is None]
        if unhosted:
            self.log(f"flower: round {round_idx + 1}: no SuperNode hosts clients {ids(unhosted)}")
        replies, silent = self._exchange(messages, self.cfg.round_timeout)
        received: dict[int, ClientUpdate] = {}
        for node in silent:
            self.routes.pop(node, None)
            self.log(f"flower: round {round_idx + 1}: SuperNode {node} did not answer within "
                     f"{self.cfg.round_timeout:g} s; clients {ids(by_node[node])} failed")
        for node, reply in replies.items():
            if reply.has_error():
                self.log(f"flower: round {round_idx + 1}: SuperNode {node} failed "
                         f"({reply.error.reason.strip()[:300]}); clients {ids(by_node[node])} failed")
                continue
            try:
                updates = _read_updates(reply)
            except (KeyError, TypeError, ValueError, IndexError) as err:
                self.log(f"flower: round {round_idx + 1}: SuperNode {node} sent a malformed reply "
                         f"({type(err).__name__}); clients {ids(by_node[node])} failed")
                continue
            asked = set(by_node[node])
            for update in updates:  # a node speaks only for the clients it was asked to train
                if update.client_id in asked and update.client_id not in received:
                    received[update.client_id] = update
            missing = [c for c in by_node[node] if c not in received]
            if missing:
                self.log(f"flower: round {round_idx + 1}: SuperNode {node} sent no update for clients "
                         f"{ids(missing)}; they failed")
        failed = tuple(c for c in clients if c not in received)
        return [received[c] for c in clients if c in received], failed

    def _secure_updates(self, setup, start: torch.Tensor, clients: list[int], lr: float, round_idx: int,
                        prox_mu: float) -> tuple[SecureSum, tuple[int, ...]]:
        """One round under Flower's SecAgg+ workflow. Every SuperNode takes part (one without
        sampled clients adds zeros, so which organisations had sampled clients stays hidden)
        and sends the sum of its clients' deltas, each clipped to the DP norm under user-level
        DP; the server unmasks only the total. A node that drops out is handled as SecAgg+
        specifies (its masks rebuilt from the others' key shares, its clients failed); with
        fewer answering nodes than the threshold the round has no sum and every client failed."""
        from flwr.common import FitIns, ndarrays_to_parameters
        from flwr.compat.common import recorddict_compat as compat
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow

        dp = setup.cfg.privacy.mode == "user"
        clip = setup.cfg.privacy.clip_norm if dp else -1.0
        asked = {node: [c for c in clients if self._hosted(node)(c)] for node in self.routes}
        unhosted = [c for c in clients if self._host(c) is None]
        if unhosted:
            self.log(f"flower: round {round_idx + 1}: no SuperNode hosts {len(unhosted)} sampled client(s)")
        run_id = self.context.run_id
        orders = [(GridClientProxy(node, self.grid, run_id), FitIns(ndarrays_to_parameters([start.numpy()]), {
            "fedsec": json.dumps({"clients": hosted, "lr": float(lr), "round": int(round_idx),
                                  "prox_mu": float(prox_mu), "first": self._first(node),
                                  "total": int(setup.population), "clip": float(clip)})}))
                  for node, hosted in asked.items()]
        strategy = _SecureRound(orders)
        context = LegacyContext(self.context, strategy=strategy)
        context.state.config_records["config"] = ConfigRecord({"current_round": int(round_idx + 1)})
        context.state.array_records["parameters"] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([start.numpy()]), True)
        f = self.cfg
        SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=f.secagg_threshold, max_weight=1.0,
                           clipping_range=f.secagg_clip_range, quantization_range=2 ** f.secagg_bits,
                           timeout=f.round_timeout)(self.grid, context)
        dim = start.numel()
        if strategy.mean is None:
            self.log(f"flower: round {round_idx + 1}: secure aggregation did not complete (fewer SuperNodes "
                     "answered than its threshold); the round has no client update")
            return SecureSum(torch.zeros(dim, device="cpu"), ()), tuple(clients)
        received: dict[int, ClientUpdate] = {}
        for node, report in strategy.reports:
            hosted = set(asked.get(node, ()))  # a node speaks only for the clients it was asked to train
            received.update({u.client_id: u for u in _reported(report) if u.client_id in hosted})
        # SecAgg+ releases the mean over the nodes whose masked vectors it summed: times their count
        total = torch.from_numpy(strategy.mean * len(strategy.reports)).to(torch.float32).reshape(dim)
        failed = tuple(c for c in clients if c not in received)
        return SecureSum(total, tuple(received[c] for c in clients if c in received)), failed

    def evaluate(self, setup, vector: torch.Tensor) -> dict:
        """Each client's test metrics, computed on the SuperNode holding its data with the
        adapter `vector` (a Flower evaluate message per node); a node that does not answer in
        time leaves its clients out of this evaluation."""
        from fedsec.evaluation import EvalResult

        messages = {node: Message(RecordDict({
            "global": ArrayRecord({"adapter": vector.detach().contiguous()}),
            "fedsec": ConfigRecord({"first": self._first(node), "total": int(setup.population),
                                    "record_noise": -1.0})}),
            dst_node_id=node, message_type=EVALUATE) for node in self.routes}
        replies, silent = self._exchange(messages, self.cfg.round_timeout)
        results: dict[int, EvalResult] = {}
        for node, reply in replies.items():
            if reply.has_error():
                self.log(f"flower: SuperNode {node} could not evaluate its clients "
                         f"({reply.error.reason.strip()[:300]})")
                continue
            info = reply.content["fedsec"]
            hosted = self._hosted(node)
            for c, loss, acc, n in zip(info["clients"], info["loss"], info["accuracy"], info["n"]):
                if hosted(int(c)):  # a node speaks only for its own clients
                    results[int(c)] = EvalResult(float(loss), None if acc < 0 else float(acc), int(n))
        for node in silent:
            self.routes.pop(node, None)
            self.log(f"flower: SuperNode {node} did not evaluate its clients within {self.cfg.round_timeout:g} s")
        return dict(sorted(results.items()))

    def _hosted(self, node: int) -> Callable[[int], bool]:
        p, count = self.routes[node]
        if self.silos is not None:
            return lambda c: self.offsets[p] <= c < self.offsets[p + 1]
        return lambda c: c % count == p

    def _first(self, node: int) -> int:
        """The first client id organisation `node` hosts (data.silos), else -1."""
        return self.offsets[self.routes[node][0]] if self.silos is not None else -1

    def _host(self, client: int) -> int | None:
        for node in reversed(self.routes):  # the latest to join wins
            if self._hosted(node)(client):
                return node
        return None

    def _discover(self, clients: int) -> None:
        """Ask SuperNodes not seen before which partition they host."""
        known = set(self.routes) | set(self.late.values()) | self.refused
        new = [n for n in self.grid.get_node_ids() if n not in known]
        if not new:
            return
        queries = {n: Message(RecordDict({"fedsec": ConfigRecord({"clients": clients})}), dst_node_id=n,
                              message_type=QUERY) for n in new}
        replies, _ = self._exchange(queries, self.cfg.round_timeout, work=False)
        for node, reply in replies.items():
            if reply.has_error():
                self.refused.add(node)
                self.log(f"flower: SuperNode {node} cannot serve this run ({reply.error.reason.strip()[:300]})")
                continue
            info = reply.content["fedsec"]
            why = self._mismatch(int(info["partition"]), int(info["partitions"]), int(info["clients"]), clients)
            if why is not None:
                self.refused.add(node)
                self.log(f"flower: SuperNode {node} {why}; it is left out")
                continue
            self._admit(node, (int(info["partition"]), int(info["partitions"])))
            if self.wanted:
                self.counts.setdefault(int(info["partition"]), int(info["clients"]))

    def _mismatch(self, p: int, partitions: int, count: int, clients: int) -> str | None:
        """Why a SuperNode's report does not fit this federation (None: it fits)."""
        if not self.wanted:
            if count != clients:
                return (f"builds {count} clients from its data, the server {clients} (give it the same data "
                        "section)")
            return None
        if partitions != self.wanted:
            return (f"is one of {partitions} organisations, data.silos lists {self.wanted} (start it with "
                    f"num-partitions={self.wanted})")
        if count < 1:
            return f"makes no client from organisation {p}'s file"
        known = self.counts.get(p)
        if known is not None and count != known:
            return f"makes {count} clients from organisation {p}'s file, which had {known} when the run started"
        return None

    def _admit(self, node: int, part: tuple[int, int]) -> None:
        for other, seen in list(self.routes.items()):
            if seen == part and other != node:
                del self.routes[other]
        self.routes[node] = part
        self.log(f"flower: SuperNode {node} joins, hosting partition {part[0]} of {part[1]}")

    def _recall_late(self) -> None:
        """A node that missed a deadline but answered since is taken back."""
        if not self.late:
            return
        for reply in self.grid.pull_messages(list(self.late)):
            node = self.late.pop(reply.metadata.reply_to_message_id, None)
            if node is not None and not reply.has_error() and node not in self.routes:
                info = reply.content["fedsec"]
                self._admit(node, (int(info["partition"]), int(info["partitions"])))
                self.log(f"flower: SuperNode {node} answered late and is back")

    def _exchange(self, messages: dict[int, Message], timeout: float,
                  work: bool = True) -> tuple[dict[int, Message], list[int]]:
        """Send, then collect replies until all are in or `timeout` passes; returns the
        replies by node and the nodes that stayed silent. `work` (train, evaluate): a node
        whose worker has not answered yet is given flower.start_timeout if that is longer,
        since its first such message loads the model and prepares its clients."""
        if not messages:
            return {}, []
        nodes = list(messages)
        ids = list(self.grid.push_messages([messages[n] for n in nodes]))
        node_of = dict(zip(ids, nodes))
        pending, replies = set(ids), {}
        start = time.monotonic()
        limit = {mid: timeout if not work or node_of[mid] in self.working else max(timeout, self.cfg.start_timeout)
                 for mid in ids}
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    replies[node_of[mid]] = reply
            if not pending or all(time.monotonic() - start > limit[mid] for mid in pending):
                break
            time.sleep(self.poll)
        for mid in pending:
            self.late[mid] = node_of[mid]
        if work:
            self.working.update(node for node, reply in replies.items() if not reply.has_error())
        return replies, [node_of[mid] for mid in pending]


class _SecureRound:
    """The Strategy SecAgg+'s workflow asks: which nodes train with what (`orders`), and where
    the unmasked result goes (`mean`, with each node's report of its clients)."""

    def __init__(self, orders: list):
        self.orders, self.mean, self.reports = orders, None, []

    def configure_fit(self, server_round, parameters, client_manager):
        return self.orders

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)[0]
            self.reports = [(proxy.node_id, json.loads(str(res.metrics["fedsec"]))) for proxy, res in results]
        return None, {}


def _ids(clients: list[int]) -> str:
    return ", ".join(map(str, clients[:8])) + (f" and {len(clients) - 8} more" if len(clients) > 8 else "")


def _train_message(node: int, start: torch.Tensor, clients: list[int], lr: float, round_idx: int,
                   prox_mu: float, record_noise: float, first: int, total: int) -> Message:
    content = RecordDict({
        "global": ArrayRecord({"adapter": start.detach().contiguous()}),
        "fedsec": ConfigRecord({"clients": list(clients), "lr": float(lr), "round": int(round_idx),
                                "prox_mu": float(prox_mu), "record_noise": float(record_noise),
                                "first": int(first), "total": int(total)}),
    })
    return Message(content=content, dst_node_id=node, message_type=TRAIN)


def _read_updates(reply: Message) -> list[ClientUpdate]:
    return _reported(reply.content["fedsec"], reply.content["updates"].to_torch_state_dict()["deltas"])


def _reported(info, deltas=None) -> list[ClientUpdate]:
    """A node's report of the clients it trained, as updates: with their deltas, or (secure
    aggregation, where only the sum leaves) with empty ones."""
    empty = torch.zeros(0, device="cpu")
    return [ClientUpdate(int(c), deltas[k] if deltas is not None else empty, int(n),
                         {"loss": float(loss), "loss_terms": int(terms), "tokens": int(tokens)})
            for k, (c, n, loss, terms, tokens) in enumerate(zip(info["clients"], info["num_examples"], info["loss"],
                                                                info["loss_terms"], info["tokens"]))]


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    """The whole run, as `fedsec run` does it in-process, with clients on the grid."""
    from fedsec.cli import _quiet_libraries
    from fedsec.loop import run_experiment

    _quiet_libraries()
    run_config = context.run_config
    if os.path.isdir(str(run_config["workdir"])):
        os.chdir(str(run_config["workdir"]))  # relative paths in the config mean what they meant there
    try:
        cfg = config_from_text(str(run_config["config"]))
        stop_after = int(run_config["stop-after"]) or None
        run_experiment(cfg, out=str(run_config["out"]), resume=bool(run_config["resume"]), stop_after=stop_after,
                       progress=False, log=lambda line: print(line, flush=True),
                       clients=FlowerClients(grid, cfg.flower, context=context))
    except FedsecError as err:  # one line, to the log and (same machine) to the launcher's file
        print(f"fedsec: error: {err}", flush=True)
        error_file = str(run_config.get("error-file", ""))
        if error_file and os.path.isdir(os.path.dirname(error_file)):
            with open(error_file, "w", encoding="utf-8") as f:
                f.write(str(err))
        return  # a normal end, so Flower delivers the log
    print("fedsec: run finished", flush=True)
