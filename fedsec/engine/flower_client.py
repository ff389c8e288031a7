"""fedsec's Flower ClientApp: a thin relay to its SuperNode's persistent worker.

Flower starts a new ClientApp process for every message, so this module imports neither
torch nor transformers (Flower and numpy only): it hands the message to the SuperNode's
fedsec worker (fedsec.engine.worker), which keeps the model and the node's prepared
clients alive across messages, and turns the worker's answer into the reply. Which
clients a node hosts: with data.silos, the clients organisation partition-id makes from
its own file (its `data-path`, else the config's data.silos[partition-id]); otherwise
c mod num-partitions = partition-id (its `--node-config`).
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsec.engine import worker

TRAIN, QUERY, EVALUATE = "train", "query", "evaluate"

def _secure_when_asked(message: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client mod for the messages of a secure round (they carry its
    stage record); any other message goes straight to the handlers."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


client_app = ClientApp(mods=[_secure_when_asked])


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
    if "fitins.parameters" in message.content.array_records:
        return _secure_train(message, context)
    p, count = partition(context.node_config)
    ask = message.content["fedsec"]
    start = message.content["global"]["adapter"].numpy()
    request = _request("train", context, clients=[int(c) for c in ask["clients"]], lr=float(ask["lr"]),
                       round=int(ask["round"]), prox_mu=float(ask["prox_mu"]), record_noise=float(ask["record_noise"]),
                       first=int(ask["first"]), total=int(ask["total"]))
    reply, arrays = worker.call(os.getppid(), request, {"global": start})
    deltas = np.ascontiguousarray(arrays["deltas"], dtype=np.float32)
    info = ConfigRecord({**{k: reply[k] for k in ("clients", "num_examples", "loss", "loss_terms", "tokens")},
                         "partition": p, "partitions": count})
    return Message(RecordDict({"updates": ArrayRecord({"deltas": Array(deltas)}), "fedsec": info}),
                   reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The test metrics of each client this node hosts under the global adapter, computed here,
    where their held-out examples are."""
    p, count = partition(context.node_config)
    ask = message.content["fedsec"]
    start = message.content["global"]["adapter"].numpy()
    request = _request("evaluate", context, first=int(ask["first"]), total=int(ask["total"]),
                       record_noise=float(ask["record_noise"]))
    reply, _ = worker.call(os.getppid(), request, {"global": start})
    info = ConfigRecord({**{k: reply[k] for k in ("clients", "loss", "accuracy", "n")},
                         "partition": p, "partitions": count})
    return Message(RecordDict({"fedsec": info}), reply_to=message)


def _secure_train(message: Message, context: Context) -> Message:
    """SecAgg+'s masked-vector stage: the sum of the asked clients' deltas (each clipped to
    the DP norm when one is given), which the SecAgg+ mod quantizes and masks; beside it
    (not masked) what the clients' training reports, as in a plain round."""
    import json

    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    ask = json.loads(str(fitins.config["fedsec"]))
    start = parameters_to_ndarrays(fitins.parameters)[0]
    request = _request("train", context, clients=[int(c) for c in ask["clients"]], lr=float(ask["lr"]),
                       round=int(ask["round"]), prox_mu=float(ask["prox_mu"]), record_noise=-1.0,
                       first=int(ask["first"]), total=int(ask["total"]), secure={"clip": float(ask["clip"])})
    reply, arrays = worker.call(os.getppid(), request, {"global": start})
    total = np.ascontiguousarray(arrays["sum"], dtype=np.float32).reshape(-1)
    report = {k: reply[k] for k in ("clients", "num_examples", "loss", "loss_terms", "tokens")}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([total]), 1, {"fedsec": json.dumps(report)})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)
