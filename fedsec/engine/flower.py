"""fedsec on Flower: the ServerApp runs fedsec's round loop, ClientApps train clients.

Flower carries the messages and starts the processes; every privacy and robustness
decision stays in fedsec's own code, on the server, exactly as in-process:

    ServerApp (on the SuperLink's machine)       ClientApp (one process per message, on a SuperNode)
      run_experiment(cfg, clients=FlowerClients)     relays the message to the SuperNode's worker
        sample clients -> one "train" message  ->  (fedsec.engine.worker, started by the first
        per SuperNode hosting any of them            message, alive while its SuperNode is): the
                                                     federation's data from the config, this node's
                                                     partition, the base model and the prepared
                                                     clients, kept across rounds; it trains the
                                                     asked clients from the global adapter
        sanitize, clip, aggregate, noise,       <-  their adapter deltas (and example counts, losses)
        server optimizer, accountant,
        evaluation, checkpoint, run directory

A SuperNode hosts the clients c with c mod num-partitions = partition-id (its
`--node-config`). A client whose SuperNode is down, crashed or later than
`flower.round_timeout` counts as failed for that round: the round completes with the
clients that answered, and the failure is written to metrics.jsonl. Under user-level DP
that keeps the accounting valid: the sampling already happened and the mean divides by
the planned expected count, so a missing client only lowers the signal.

What a client sends is its adapter delta after local training (never its examples);
clipping to the DP norm happens on the server, where it must happen anyway (a malicious
client would not clip), so the Flower run and the in-process run compute the same numbers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsec.config import ExperimentConfig, FlowerConfig, from_raw
from fedsec.engine.flower_client import QUERY, TRAIN
from fedsec.errors import ConfigError, FedsecError
from fedsec.results import ClientUpdate

server_app = ServerApp()


def config_from_text(text: str) -> ExperimentConfig:
    return from_raw(yaml.safe_load(text))


# ---------------------------------------------------------------------------
# The server side.


class FlowerClients:
    """fedsec.clients.ClientRunner over a Flower Grid: routes each sampled client to the
    SuperNode hosting it and collects the updates that come back in time."""

    def __init__(self, grid: Grid, cfg: FlowerConfig, poll_seconds: float = 0.2):
        self.grid, self.cfg, self.poll = grid, cfg, poll_seconds
        self.routes: dict[int, tuple[int, int]] = {}  # node id -> (partition, partitions)
        self.late: dict[str, int] = {}  # unanswered message id -> node id
        self.refused: set[int] = set()  # nodes whose data does not match the server's
        self.log: Callable[[str], None] = print

    def start(self, setup, log: Callable[[str], None]) -> None:
        """Wait until the SuperNodes present host every client."""
        self.log = log
        clients = len(setup.train_sets)
        deadline = time.monotonic() + self.cfg.start_timeout
        while True:
            self._discover(clients)
            missing = [c for c in range(clients) if self._host(c) is None]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise ConfigError("flower.start_timeout", self.cfg.start_timeout,
                                  f"after that many seconds no SuperNode hosts clients {_ids(missing)}; "
                                  "start SuperNodes for the missing partitions or raise it")
            time.sleep(1.0)
        log(f"flower: {len(self.routes)} SuperNode(s) host all {clients} clients")

    def updates(self, setup, start: torch.Tensor, clients: list[int], lr: float, round_idx: int,
                prox_mu: float) -> tuple[list[ClientUpdate], tuple[int, ...]]:
        self._recall_late()
        # under DP the log names no client (who was sampled is what the mechanism hides): counts
        # only; the ids are in the round's "failed" field, in the run's not-covered place
        ids = _ids if setup.cfg.privacy.mode == "off" else (lambda c: f"({len(c)} of them)")
        self._discover(len(setup.train_sets))
        by_node: dict[int, list[int]] = {}
        for c in clients:
            node = self._host(c)
            if node is not None:
                by_node.setdefault(node, []).append(c)
        record_noise = setup.record_plan.noise_multiplier if setup.record_plan is not None else -1.0
        messages = {node: _train_message(node, start, hosted, lr, round_idx, prox_mu, record_noise)
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
        failed = tuple(c for c in clients if c not in received)
        return [received[c] for c in clients if c in received], failed

    def _host(self, client: int) -> int | None:
        for node, (p, count) in reversed(self.routes.items()):  # the latest to join wins
            if client % count == p:
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
        replies, _ = self._exchange(queries, self.cfg.round_timeout)
        for node, reply in replies.items():
            if reply.has_error():
                self.refused.add(node)
                self.log(f"flower: SuperNode {node} cannot serve this run ({reply.error.reason.strip()[:300]})")
                continue
            info = reply.content["fedsec"]
            if int(info["clients"]) != clients:
                self.refused.add(node)
                self.log(f"flower: SuperNode {node} builds {info['clients']} clients from its data, the server "
                         f"{clients}; it is left out (give it the same data section)")
                continue
            self._admit(node, (int(info["partition"]), int(info["partitions"])))

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

    def _exchange(self, messages: dict[int, Message], timeout: float) -> tuple[dict[int, Message], list[int]]:
        """Send, then collect replies until all are in or `timeout` passes; returns the
        replies by node and the nodes that stayed silent."""
        if not messages:
            return {}, []
        nodes = list(messages)
        ids = list(self.grid.push_messages([messages[n] for n in nodes]))
        node_of = dict(zip(ids, nodes))
        pending, replies = set(ids), {}
        deadline = time.monotonic() + timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    replies[node_of[mid]] = reply
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(self.poll)
        for mid in pending:
            self.late[mid] = node_of[mid]
        return replies, [node_of[mid] for mid in pending]


def _ids(clients: list[int]) -> str:
    return ", ".join(map(str, clients[:8])) + (f" and {len(clients) - 8} more" if len(clients) > 8 else "")


def _train_message(node: int, start: torch.Tensor, clients: list[int], lr: float, round_idx: int,
                   prox_mu: float, record_noise: float) -> Message:
    content = RecordDict({
        "global": ArrayRecord({"adapter": start.detach().contiguous()}),
        "fedsec": ConfigRecord({"clients": list(clients), "lr": float(lr), "round": int(round_idx),
                                "prox_mu": float(prox_mu), "record_noise": float(record_noise)}),
    })
    return Message(content=content, dst_node_id=node, message_type=TRAIN)


def _read_updates(reply: Message) -> list[ClientUpdate]:
    info = reply.content["fedsec"]
    deltas = reply.content["updates"].to_torch_state_dict()["deltas"]
    return [ClientUpdate(int(c), deltas[k], int(n), {"loss": float(loss), "loss_terms": int(terms),
                                                     "tokens": int(tokens)})
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
                       clients=FlowerClients(grid, cfg.flower))
    except FedsecError as err:  # one line, to the log and (same machine) to the launcher's file
        print(f"fedsec: error: {err}", flush=True)
        error_file = str(run_config.get("error-file", ""))
        if error_file and os.path.isdir(os.path.dirname(error_file)):
            with open(error_file, "w", encoding="utf-8") as f:
                f.write(str(err))
        return  # a normal end, so Flower delivers the log
    print("fedsec: run finished", flush=True)
