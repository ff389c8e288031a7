"""fedsec's Flower ClientApp: a thin relay to its SuperNode's persistent worker.

Flower starts a new ClientApp process for every message, so this module imports neither
torch nor transformers (Flower and numpy only): it hands the message to the SuperNode's
fedsec worker (fedsec.engine.worker), which keeps the model and the node's prepared
clients alive across messages, and turns the worker's answer into the reply. Which
clients a node hosts: c mod num-partitions = partition-id (its `--node-config`); its
`data-path` replaces the experiment's `data.source` there.
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsec.engine import worker

TRAIN, QUERY = "train", "query"

client_app = ClientApp()


def partition(node_config) -> tuple[int, int]:
    """(partition-id, num-partitions) of a SuperNode; (0, 1): it hosts every client."""
    p, count = int(node_config.get("partition-id", 0)), int(node_config.get("num-partitions", 1))
    if count < 1 or not 0 <= p < count:
        raise ValueError(f"node config partition-id={p} num-partitions={count}: need 0 <= partition-id "
                         "< num-partitions")
    return p, count


def _request(op: str, context: Context, **fields) -> dict:
    p, count = partition(context.node_config)
    run_config = context.run_config
    return {"op": op, "config": str(run_config["config"]), "workdir": str(run_config["workdir"]),
            "data_path": str(context.node_config.get("data-path") or ""), "partition": p, "partitions": count,
            **fields}


@client_app.query()
def describe(message: Message, context: Context) -> Message:
    """This node's partition and the client count it builds from the config."""
    p, count = partition(context.node_config)
    reply, _ = worker.call(os.getppid(), _request("describe", context), {})
    return Message(RecordDict({"fedsec": ConfigRecord({"partition": p, "partitions": count,
                                                       "clients": int(reply["clients"]), "pid": os.getpid()})}),
                   reply_to=message)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Train the asked clients (those this node hosts) from the global adapter, in the worker."""
    p, count = partition(context.node_config)
    ask = message.content["fedsec"]
    start = message.content["global"]["adapter"].numpy()
    request = _request("train", context, clients=[int(c) for c in ask["clients"]], lr=float(ask["lr"]),
                       round=int(ask["round"]), prox_mu=float(ask["prox_mu"]), record_noise=float(ask["record_noise"]))
    reply, arrays = worker.call(os.getppid(), request, {"global": start})
    deltas = np.ascontiguousarray(arrays["deltas"], dtype=np.float32)
    info = ConfigRecord({**{k: reply[k] for k in ("clients", "num_examples", "loss", "loss_terms", "tokens")},
                         "partition": p, "partitions": count})
    return Message(RecordDict({"updates": ArrayRecord({"deltas": Array(deltas)}), "fedsec": info}),
                   reply_to=message)
