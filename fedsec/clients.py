"""The clients' side of a round: local training from the global adapter (one client, a
batch of one-step clients, SCAFFOLD's corrected clients), where the sampled clients
train (`ClientRunner`: here, or on Flower SuperNodes), what one machine prepares to
train the clients it hosts, and the server's own update on FLTrust's root set."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from fedsec.config import ExperimentConfig, to_mapping
from fedsec.encoding import Encoded
from fedsec.evaluation import EvalResult, EvalSet, evaluate_groups, map_sequences, share_prefix
from fedsec.merged import merged_lora
from fedsec.models import load_model
from fedsec.objectives import PairItem, objective_for
from fedsec.results import ClientUpdate
from fedsec.rundir import atomic_write_bytes
from fedsec.scaffold import VariateStore, client_variate, server_variate
from fedsec.seeding import derive_seed
from fedsec.setup import (
    Federation,
    Setup,
    build_federation,
    cache_train_sets,
    clients_eval_set,
    frozen_prefix,
    record_secret,
    train_set,
)
from fedsec.training import LocalTrainer, RecordDp


def client_update(setup: Setup, start: torch.Tensor, client: int, lr: float, round_idx: int,
                  stream: str = "client", prox_mu: float = 0.0,
                  correction: torch.Tensor | None = None) -> ClientUpdate:
    result = setup.trainer.train(start, setup.train_sets[client], lr,
                                 derive_seed(setup.cfg.seed, stream, round_idx, client),
                                 prox_mu=prox_mu, correction=correction)
    return ClientUpdate(client, result.delta, result.num_examples,
                        {"loss": result.loss, "loss_terms": result.loss_terms, "tokens": result.tokens})


def client_updates(setup: Setup, start: torch.Tensor, clients: list[int], lr: float, round_idx: int,
                   prox_mu: float = 0.0) -> list[ClientUpdate]:
    """The round's client updates from the global adapter (batched when each is one SGD step)."""
    seeds = [derive_seed(setup.cfg.seed, "client", round_idx, c) for c in clients]
    results = setup.trainer.train_clients(start, [setup.train_sets[c] for c in clients], lr, seeds,
                                          prox_mu=prox_mu)
    return [ClientUpdate(c, r.delta, r.num_examples, {"loss": r.loss, "loss_terms": r.loss_terms,
                                                       "tokens": r.tokens})
            for c, r in zip(clients, results)]


def scaffold_updates(setup: Setup, variates: VariateStore, c: torch.Tensor, start: torch.Tensor,
                     sampled: list[int], lr: float, round_idx: int) -> tuple[list[ClientUpdate], torch.Tensor]:
    """SCAFFOLD's client side for one round; returns the updates and the new server variate.
    Clients train one at a time, or in lockstep groups (training.lockstep), each group's
    variates read before and written after it."""
    updates, variate_deltas = [], []
    group = setup.trainer.lockstep_group
    for k in range(0, len(sampled), group):
        clients = sampled[k: k + group]
        held = [variates.get(client, round_idx) for client in clients]
        seeds = [derive_seed(setup.cfg.seed, "client", round_idx, client) for client in clients]
        results = setup.trainer.train_clients(start, [setup.train_sets[client] for client in clients], lr, seeds,
                                              corrections=[c - c_i for c_i in held])
        for client, c_i, result in zip(clients, held, results):
            update = ClientUpdate(client, result.delta, result.num_examples,
                                  {"loss": result.loss, "loss_terms": result.loss_terms, "tokens": result.tokens})
            new_c_i = client_variate(c_i, c, start, start + update.delta, setup.cfg.training.local_steps, lr)
            variates.put(client, round_idx, new_c_i)
            variate_deltas.append(new_c_i - c_i)
            updates.append(update)
    return updates, server_variate(c, variate_deltas, len(setup.train_sets))


class ClientRunner(Protocol):
    """Where the sampled clients train: `updates` returns their updates (in the order of
    `clients`) and the ids of the clients that never answered (a crashed machine).

    A runner whose clients' data is elsewhere (data.silos on Flower) also has
    `discover(cfg, log)`, called before the Setup is built, returning the clients per
    organisation (None: the data is here), and `evaluate(setup, vector)`, each client's
    test metrics computed where its data is."""

    def start(self, setup: Setup, log: Callable[[str], None]) -> None: ...

    def updates(self, setup: Setup, start: torch.Tensor, clients: list[int], lr: float, round_idx: int,
                prox_mu: float) -> tuple[list[ClientUpdate], tuple[int, ...]]: ...


class InProcessClients:
    """Every client simulated here, on the Setup's model."""

    def start(self, setup: Setup, log: Callable[[str], None]) -> None:
        pass

    def updates(self, setup: Setup, start: torch.Tensor, clients: list[int], lr: float, round_idx: int,
                prox_mu: float) -> tuple[list[ClientUpdate], tuple[int, ...]]:
        return client_updates(setup, start, clients, lr, round_idx, prox_mu), ()


@dataclass
class ClientSide:
    """What one machine needs to train some of the federation's clients: the model with
    its adapter, and those clients' training items (tokenized as `prepare` does)."""

    cfg: ExperimentConfig
    trainer: LocalTrainer
    train_sets: dict[int, list]
    population: int
    client_eval: EvalSet | None = None  # the hosted clients' held-out examples (eval.clients), by client id
    pad_id: int = 0

    def evaluate(self, vector: torch.Tensor) -> dict[int, EvalResult]:
        """Each hosted client's test metrics under the adapter `vector` (what the in-process
        loop's per-client evaluation computes for these clients)."""
        if self.client_eval is None:
            return {}
        self.trainer.adapter.set(vector)
        with merged_lora(self.trainer.model):
            return evaluate_groups(self.trainer.model, self.client_eval, self.pad_id, self.cfg.eval.batch_size)


def prepare_clients(cfg: ExperimentConfig, hosted: Callable[[int], bool], record_noise: float | None = None,
                    only: set[int] | None = None, cache: Path | None = None,
                    federation: Federation | None = None) -> ClientSide:
    """The client side of a deployment: the federation's clients (`federation`, by default
    built from the config) that `hosted` accepts (and, if given, that are in `only`), ready
    to train and, with eval.clients, to be evaluated on their held-out examples.

    Each client's items (tokens, frozen-prefix states, DPO reference log-probabilities)
    are computed from that client alone, so they do not depend on which clients a
    message asks for; with `cache` they are stored there and read back by later
    messages (a Flower ClientApp is a new process each round). They are `prepare`'s
    items bit for bit: both encode with `train_set`, `cache_train_sets` (batches inside
    one client) and the objective's `precompute`.
    """
    federation = build_federation(cfg) if federation is None else federation
    model, tokenizer = load_model(cfg)
    pad = tokenizer.pad_token_id
    objective = objective_for(cfg, pad)
    by_id = {client.client_id: client for client in federation.data.clients}  # a silo's ids start at its first
    ids = [c for c in by_id if hosted(c) and (only is None or c in only)]
    prefix = frozen_prefix(model, cfg) if cfg.lora.cache_frozen_layers else None
    sets, todo = {}, {}
    paths = {c: cache / f"client-{c}.pt" if cache is not None else None for c in ids}
    for c in ids:
        path = paths[c]
        if path is not None and path.is_file():
            try:
                sets[c] = [_item_from_dict(d) for d in torch.load(path, weights_only=True)]
                continue
            except Exception as err:  # a damaged file is computed again and replaced
                print(f"fedsec: {path} is unreadable ({type(err).__name__}); preparing client {c} again",
                      file=sys.stderr)
        todo[c] = train_set(objective, by_id[c], tokenizer, cfg)
    if prefix is not None and any(todo.values()):  # one call for the node's clients, batches inside each
        cached = iter(cache_train_sets(model, prefix, pad, cfg.eval.batch_size, [x for x in todo.values() if x]))
        todo = {c: next(cached) if items else items for c, items in todo.items()}
    for c, items in todo.items():
        path = paths[c]
        items = objective.precompute(model, items, cfg.eval.batch_size)  # DPO: the reference log-probabilities
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            torch.save([_item_to_dict(item) for item in items], buffer)
            atomic_write_bytes(path, buffer.getvalue())
        sets[c] = items
    sets = {c: sets[c] for c in ids}  # the federation's order, wherever each came from
    record_dp = (RecordDp(cfg.privacy.clip_norm, record_noise, record_secret(cfg)) if record_noise is not None
                 else None)
    trainer = LocalTrainer(model, cfg.training, objective, record_dp)
    client_eval = None
    if cfg.eval.clients:
        kept = dataclasses.replace(federation.data, clients=tuple(c for c in federation.data.clients
                                                                  if c.client_id in sets))
        client_eval = clients_eval_set(kept, tokenizer, cfg)
        if client_eval is not None and prefix is not None:
            client_eval = map_sequences(client_eval, lambda items: prefix.attach(model, items, pad,
                                                                                 cfg.eval.batch_size))
        if client_eval is not None:
            client_eval = share_prefix(model, client_eval, pad)
    return ClientSide(cfg, trainer, sets, federation.population, client_eval, pad)


def client_cache_key(cfg: ExperimentConfig) -> str:
    """What a client's prepared items depend on: the config without the sections that
    only steer the rounds (federation, training, privacy, defense, engine, names)."""
    steering = ("name", "output_dir", "keep_checkpoints", "federation", "training", "privacy", "defense",
                "engine", "flower")
    kept = {k: v for k, v in to_mapping(cfg).items() if k not in steering}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _item_to_dict(item) -> dict:
    if isinstance(item, PairItem):
        return {"chosen": _item_to_dict(item.chosen), "rejected": _item_to_dict(item.rejected),
                "ref_chosen": item.ref_chosen, "ref_rejected": item.ref_rejected}
    return {"input_ids": item.input_ids, "labels": item.labels, "hidden": item.hidden,
            "hidden_layer": item.hidden_layer}


def _item_from_dict(d: dict):
    if "chosen" in d:
        return PairItem(_item_from_dict(d["chosen"]), _item_from_dict(d["rejected"]), d["ref_chosen"],
                        d["ref_rejected"])
    return Encoded(d["input_ids"], d["labels"], d["hidden"], d["hidden_layer"])


def server_reference(setup: Setup, start: torch.Tensor, lr: float, round_idx: int) -> torch.Tensor | None:
    """FLTrust's g0: the server's own update on its root set, from the global adapter."""
    if not setup.server_root:
        return None
    return setup.trainer.train(start, setup.server_root, lr,
                               derive_seed(setup.cfg.seed, "server-root", round_idx)).delta
