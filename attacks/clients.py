"""Malicious clients in the round loop: who they are, and what they send.

Identities are fixed for the whole run (a seeded draw of `count` clients out of N),
so "3 of 10 clients are malicious" means the same 3 every round they are sampled.
A malicious client first trains like any other (its own delta is what sign flip and
scaling transform); then `attack_round` replaces its delta with the attack's
vector, computed where the attack needs it from the round's honest deltas (the
omniscient attacker of the papers). The updates keep `malicious=True`, so the
round's metrics can score the defense against the known identities.

The attacks themselves come from the registries (fedsec.registry): the built-in update
attacks in fedsec.attacks.updates, the data attacks in fedsec.attacks.poisoning,
plugins' beside them; this module only drives them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsec.data.schema import FederatedData
from fedsec.registry import registry, typed_params
from fedsec.results import AttackContext, ClientUpdate


def attack_params(kind: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The attack's parameters: its registered defaults, overridden by the config's (typed from
    the attack's annotations, fedsec.registry.typed_params)."""
    for table in (registry("update_attack"), registry("data_attack")):
        if kind in table:
            return typed_params(table.entry(kind), given, "attack.params")
    return dict(given)


def malicious_clients(num_clients: int, count: int, seed: int) -> tuple[int, ...]:
    """The fixed malicious identities: `count` clients drawn once from the run's seed."""
    rng = np.random.default_rng([seed, 0x6D616C])  # its own stream ("mal")
    return tuple(sorted(int(c) for c in rng.permutation(num_clients)[:count]))


def poison_data(data: FederatedData, kind: str, params: Mapping[str, Any], malicious: tuple[int, ...],
                seed: int) -> FederatedData:
    """The federation with the malicious clients' data poisoned, when `kind` is a data attack."""
    table = registry("data_attack")
    if kind not in table or not malicious:
        return data
    poison, bad, p = table[kind], set(malicious), attack_params(kind, params)
    clients = tuple(poison(c, seed, **p) if c.client_id in bad else c for c in data.clients)
    return dataclasses.replace(data, clients=clients)


@dataclass(frozen=True)
class AttackOutcome:
    updates: list[ClientUpdate]
    malicious: tuple[int, ...]  # sampled malicious clients this round
    note: str | None = None  # why the attack could not run this round (it sent honest deltas)


def attack_round(kind: str, params: Mapping[str, Any], updates: list[ClientUpdate], malicious: set[int],
                 generator: torch.Generator, server_lr: float) -> AttackOutcome:
    """Replace the malicious clients' deltas in `updates` with the update attack's vectors."""
    bad = [i for i, u in enumerate(updates) if u.client_id in malicious]
    ids = tuple(updates[i].client_id for i in bad)
    if kind == "none" or not bad:
        return AttackOutcome(updates, ids)
    flagged = [dataclasses.replace(u, malicious=u.client_id in malicious) for u in updates]
    table = registry("update_attack")
    if kind not in table:  # a data attack: the poisoned data already shaped these deltas
        return AttackOutcome(flagged, ids)
    entry, p = table.entry(kind), attack_params(kind, params)
    honest = [u.delta for u in updates if u.client_id not in malicious]
    if len(honest) < entry.options["min_honest"]:
        return AttackOutcome(flagged, ids, f"{kind} needs >= {entry.options['min_honest']} honest updates in "
                                           "the round; attackers sent their own")
    dim = updates[bad[0]].delta.numel()
    stack = torch.stack(honest) if honest else torch.zeros(0, dim, device=updates[bad[0]].delta.device)
    ctx = AttackContext(generator, clients=len(updates), attackers=len(bad), server_lr=server_lr)
    out, shared = list(updates), None
    for i in bad:  # in round order: the attack stream is drawn the same way every run
        own = updates[i].delta
        delta = shared if shared is not None else entry.obj(own, stack, ctx, **p)
        if not (isinstance(delta, torch.Tensor) and delta.shape == own.shape):
            raise ValueError(f"update attack {kind} returned {type(delta).__name__} "
                             f"{tuple(getattr(delta, 'shape', ()))}, not a tensor of shape {tuple(own.shape)}")
        if entry.options["shared"]:
            shared = delta
        out[i] = dataclasses.replace(updates[i], delta=delta.to(own.dtype), malicious=True)
    return AttackOutcome(out, ids)


def detection(malicious: tuple[int, ...], sampled: tuple[int, ...], rejected: tuple[int, ...],
              excluded: list[int] | None) -> dict:
    """The defense scored against the known identities: which sampled clients it dropped
    (sanitation or the rule), true and false positives."""
    dropped = set(rejected) | set(excluded or [])
    bad = set(malicious)
    return {"malicious": list(malicious),
            "true_positives": sorted(dropped & bad),
            "false_positives": sorted(dropped - bad),
            "missed": sorted(bad - dropped),
            "honest": len(set(sampled) - bad)}


def detection_rates(rounds: list[dict]) -> dict:
    """Over a run's rounds (each a `detection` result): the share of sampled malicious
    updates the defense dropped and the share of honest ones it dropped (None where the
    run never sampled one)."""
    bad = sum(len(r["malicious"]) for r in rounds)
    honest = sum(r["honest"] for r in rounds)
    caught = sum(len(r["true_positives"]) for r in rounds)
    wrong = sum(len(r["false_positives"]) for r in rounds)
    return {"true_positive_rate": caught / bad if bad else None,
            "false_positive_rate": wrong / honest if honest else None}
