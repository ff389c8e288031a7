"""Data: schemas, loaders, partitions and the embedded federated benchmark.

`build_federated_data` is the one entry point the round loop uses: it turns the
`data` section of a config into clients with train/test splits and a global test
set, whatever the source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fedsec.config import DataConfig
from fedsec.data import partition
from fedsec.data.benchmark import make_benchmark
from fedsec.data.loaders import (
    KNOWN_DATASETS,
    infer_fields,
    infer_preference_spec,
    preference_converter,
    read_table,
    sft_converter,
    spec_for,
)
from fedsec.data.schema import ClientData, FederatedData, SftExample
from fedsec.data.table import Examples
from fedsec.errors import ConfigError
from fedsec.seeding import numpy_generator

__all__ = ["build_federated_data", "read_examples", "silo_clients", "split_clients", "FederatedData", "ClientData"]


def read_examples(cfg: DataConfig, task: str = "sft", source: str | None = None, field: str = "data.source",
                  max_examples: int | None = None) -> Examples:
    """A file's or dataset's examples (instruction or chat for sft, preference pairs for
    dpo), read with data.fields, else with the first common layout the records fit
    (fedsec.data.loaders.LAYOUTS). `source` defaults to data.source; `field` names the
    config entry in errors. The examples stay rows of the memory-mapped table (Examples),
    every one read once here so that a row the mapping does not fit is refused now."""
    source = cfg.source if source is None else source
    kind = "preference" if task == "dpo" else "instruction"
    spec = spec_for(source, kind, cfg.fields)
    if (spec.task == "preference") != (task == "dpo"):
        raise ConfigError(field, source, f"is {spec.task} data, which task {task} "
                          "cannot train on; choose the matching task or dataset")
    try:
        table = read_table(source, cfg.split if cfg.split != "train" else spec.split)
    except ConfigError as err:
        if field == "data.source":
            raise
        raise ConfigError(field, source, err.fix) from None
    if kind == "instruction" and not cfg.fields and source not in KNOWN_DATASETS and len(table):
        inferred = infer_fields(_present(table[0]))  # Alpaca's instruction/input/output and the other common layouts
        if inferred is not None:
            spec = spec_for(source, kind, inferred)
    if kind == "preference" and not cfg.fields and source not in KNOWN_DATASETS and len(table):
        spec = infer_preference_spec(source, _present(table[0])) or spec  # HH-RLHF's dialogues, UltraFeedback's lists
    convert = preference_converter(spec) if task == "dpo" else sft_converter(spec)
    examples = Examples(table, convert, mapping=f"{task}|{spec!r}")
    if max_examples is not None:
        examples = examples[:max_examples]
    for _ in examples:  # every row converts (else its one-line error); nothing is kept
        pass
    return examples


def _present(row: dict) -> dict:
    """A row's fields that hold a value (a table gives every row every column, None where absent)."""
    return {k: v for k, v in row.items() if v is not None}


def build_federated_data(cfg: DataConfig, seed: int, task: str = "sft") -> FederatedData:
    """Clients, test sets and extras for `task` (sft: instruction/chat; dpo: preference),
    with data.root as the server's root set where given."""
    data = _federated_data(cfg, seed, task)
    if cfg.root is not None:
        data = dataclasses.replace(data, server_root=read_root(cfg, task))
    return data


def read_root(cfg: DataConfig, task: str) -> ClientData:
    """data.root: the server's own clean examples (FLTrust's root set), in the data's layout."""
    examples = tuple(read_examples(cfg, task, cfg.root, "data.root"))
    if not examples:
        raise ConfigError("data.root", cfg.root, "the file holds no examples")
    return ClientData(-1, "server-root", () if task == "dpo" else examples, (), examples if task == "dpo" else ())


def _federated_data(cfg: DataConfig, seed: int, task: str) -> FederatedData:
    if cfg.silos:
        clients: list[ClientData] = []
        for silo in range(len(cfg.silos)):
            clients.extend(silo_clients(cfg, seed, task, silo, first=len(clients)))
        return _federation(tuple(clients), read_test(cfg, task), cfg, task)
    if cfg.source == "embedded":
        return make_benchmark(cfg.benchmark, seed)
    examples = read_examples(cfg, task, max_examples=cfg.max_examples)
    if cfg.test is not None:  # the test set is its own file: every example goes to the clients
        test, pool = read_test(cfg, task), examples
    else:
        if len(examples) < 2:
            raise ConfigError("data.source", cfg.source, f"has {len(examples)} usable examples; need >= 2")
        rng = numpy_generator(seed, "global-split")
        order = rng.permutation(len(examples))
        n_test = max(1, int(round(cfg.test_fraction * len(examples))))
        test, pool = examples.select(np.sort(order[:n_test])), examples.select(np.sort(order[n_test:]))
    shards = split_clients(pool, cfg, seed)
    clients = tuple(_client(pool, idx, cfg, task, cid, f"client{cid:03d}", numpy_generator(seed, "client-split", cid))
                    for cid, idx in enumerate(shards))
    return _federation(clients, test, cfg, task)


def silo_clients(cfg: DataConfig, seed: int, task: str, silo: int, first: int,
                 source: str | None = None) -> tuple[ClientData, ...]:
    """One organisation's clients (data.silos): its file (or `source`, its own copy) split as
    data.partition says, ids from `first` on. A function of that file alone, so the
    organisation's SuperNode builds exactly the clients the in-process run builds."""
    source = cfg.silos[silo] if source is None else source
    field = f"data.silos[{silo}]"
    pool = read_examples(cfg, task, source, field, max_examples=cfg.max_examples)
    if not pool:
        raise ConfigError(field, source, "holds no usable examples")
    shards = split_clients(pool, cfg, seed, silo)
    return tuple(_client(pool, idx, cfg, task, first + k, f"silo{silo}-client{k:03d}",
                         numpy_generator(seed, "client-split", "silo", silo, k))
                 for k, idx in enumerate(shards))


def read_test(cfg: DataConfig, task: str) -> tuple:
    """data.test: the global test set from its own file (none with silos and no file)."""
    if cfg.test is None:
        return ()
    examples = tuple(read_examples(cfg, task, cfg.test, "data.test"))
    if not examples:
        raise ConfigError("data.test", cfg.test, "the file holds no examples")
    return examples


def _client(pool: Examples, idx: np.ndarray, cfg: DataConfig, task: str, cid: int, name: str,
            rng: np.random.Generator) -> ClientData:
    """A client from its shard of `pool`, client_test_fraction held out for its test (task sft; a
    DPO client trains on all its pairs: it was dropping that share of them unread)."""
    if not len(idx):
        raise ConfigError("data.partition", cfg.partition.scheme,
                          f"client {cid} got no examples; use fewer clients or min_size >= 1")
    if task == "dpo":  # nothing reads a client's held-out pairs (preference metrics use the global test)
        return ClientData(cid, name, (), (), pool.select(idx))
    n_local_test = int(round(cfg.client_test_fraction * len(idx))) if len(idx) > 1 else 0
    held = np.zeros(len(idx), dtype=bool)
    held[rng.permutation(len(idx))[:n_local_test]] = True
    train = pool.select(idx[~held])  # rows of the table, read when used
    held_out = pool.select(idx[held]) if n_local_test else ()
    return ClientData(cid, name, train, held_out)


def _federation(clients: tuple[ClientData, ...], test: tuple, cfg: DataConfig, task: str) -> FederatedData:
    if task == "dpo":
        return FederatedData(clients, (), None, preference_test=test)
    return FederatedData(clients, test, cfg.choices)


def split_clients(pool: Sequence[SftExample], cfg: DataConfig, seed: int, silo: int | None = None) -> list[np.ndarray]:
    """`pool` split into clients as data.partition says (one silo's pool: its own stream)."""
    part = cfg.partition
    rng = numpy_generator(seed, "partition") if silo is None else numpy_generator(seed, "partition", "silo", silo)
    if part.scheme == "iid":
        return partition.iid(len(pool), part.num_clients, rng)
    if part.scheme == "quantity":
        return partition.quantity(len(pool), part.num_clients, part.alpha, rng, part.min_size)
    key = part.by or ("user" if part.scheme == "natural" else "label")
    values = [ex.meta.get(key) for ex in pool]
    if any(v is None for v in values):
        fix = ("set data.partition.by to the column that names each example's user (natural: one client "
               "per value), or choose scheme iid or quantity" if part.scheme == "natural" else
               "set data.partition.by to a column of class labels (dirichlet: each client's label mix is "
               "skewed), or choose scheme iid or quantity")
        raise ConfigError("data.partition.by", key, f"some examples have no '{key}' column; {fix}")
    if part.scheme == "dirichlet":
        return partition.dirichlet(values, part.num_clients, part.alpha, rng, part.min_size)
    return partition.natural(values)
