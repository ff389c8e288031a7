"""Data: schemas, loaders, partitions and the embedded federated benchmark.

`build_federated_data` is the one entry point the round loop uses: it turns the
`data` section of a config into clients with train/test splits and a global test
set, whatever the source.
"""

from __future__ import annotations

import numpy as np

from fedsec.config import DataConfig
from fedsec.data import partition
from fedsec.data.benchmark import make_benchmark
from fedsec.data.loaders import (
    KNOWN_DATASETS,
    infer_fields,
    read_records,
    spec_for,
    to_preference_examples,
    to_sft_examples,
)
from fedsec.data.schema import ClientData, FederatedData, SftExample
from fedsec.errors import ConfigError
from fedsec.seeding import numpy_generator

__all__ = ["build_federated_data", "split_clients", "FederatedData", "ClientData"]


def build_federated_data(cfg: DataConfig, seed: int, task: str = "sft") -> FederatedData:
    """Clients, test sets and extras for `task` (sft: instruction/chat; dpo: preference)."""
    if cfg.source == "embedded":
        return make_benchmark(cfg.benchmark, seed)
    kind = "preference" if task == "dpo" else "instruction"
    spec = spec_for(cfg.source, kind, cfg.fields)
    if (spec.task == "preference") != (task == "dpo"):
        raise ConfigError("data.source", cfg.source, f"is {spec.task} data, which task {task} "
                          "cannot train on; choose the matching task or dataset")
    rows = read_records(cfg.source, cfg.split if cfg.split != "train" else spec.split)
    if cfg.max_examples is not None:
        rows = rows[: cfg.max_examples]
    if kind == "instruction" and not cfg.fields and cfg.source not in KNOWN_DATASETS and rows:
        inferred = infer_fields(rows[0])  # Alpaca's instruction/input/output and the other common layouts
        if inferred is not None:
            spec = spec_for(cfg.source, kind, inferred)
    examples = to_preference_examples(rows, spec) if task == "dpo" else to_sft_examples(rows, spec)
    if len(examples) < 2:
        raise ConfigError("data.source", cfg.source, f"has {len(examples)} usable examples; need >= 2")
    rng = numpy_generator(seed, "global-split")
    order = rng.permutation(len(examples))
    n_test = max(1, int(round(cfg.test_fraction * len(examples))))
    test = tuple(examples[i] for i in np.sort(order[:n_test]))
    pool = [examples[i] for i in np.sort(order[n_test:])]
    shards = split_clients(pool, cfg, seed)
    clients = []
    for cid, idx in enumerate(shards):
        local = [pool[i] for i in idx]
        if not local:
            raise ConfigError("data.partition", cfg.partition.scheme,
                              f"client {cid} got no examples; use fewer clients or min_size >= 1")
        n_local_test = int(round(cfg.client_test_fraction * len(local))) if len(local) > 1 else 0
        perm = numpy_generator(seed, "client-split", cid).permutation(len(local))
        held = set(perm[:n_local_test].tolist())
        train = tuple(e for i, e in enumerate(local) if i not in held)
        held_out = tuple(e for i, e in enumerate(local) if i in held)
        if task == "dpo":
            clients.append(ClientData(cid, f"client{cid:03d}", (), (), train))
        else:
            clients.append(ClientData(cid, f"client{cid:03d}", train, held_out))
    if task == "dpo":
        return FederatedData(tuple(clients), (), None, preference_test=test)
    return FederatedData(tuple(clients), test, cfg.choices)


def split_clients(pool: list[SftExample], cfg: DataConfig, seed: int) -> list[np.ndarray]:
    part = cfg.partition
    rng = numpy_generator(seed, "partition")
    if part.scheme == "iid":
        return partition.iid(len(pool), part.num_clients, rng)
    if part.scheme == "quantity":
        return partition.quantity(len(pool), part.num_clients, part.alpha, rng, part.min_size)
    key = part.by or ("user" if part.scheme == "natural" else "label")
    values = [ex.meta.get(key) for ex in pool]
    if any(v is None for v in values):
        raise ConfigError("data.partition.by", key, f"some examples have no '{key}' field; map it "
                          "in data.fields (e.g. user: user_id) or choose another scheme")
    if part.scheme == "dirichlet":
        return partition.dirichlet(values, part.num_clients, part.alpha, rng, part.min_size)
    return partition.natural(values)
