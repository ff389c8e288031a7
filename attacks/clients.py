"""Malicious clients in the round loop: who they are, and what they send.

Identities are fixed for the whole run (a seeded draw of `count` clients out of N),
so "3 of 10 clients are malicious" means the same 3 every round they are sampled.
A malicious client first trains like any other (its own delta is what sign flip and
scaling transform); then `attack_round` replaces its delta with the attack's
vector, computed where the attack needs it from the round's honest deltas (the
omniscient attacker of the papers). The updates keep `malicious=True`, so the
round's metrics can score the defense against the known identities.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from fedsec.attacks import updates as attack
from fedsec.attacks.poisoning import DATA_ATTACKS
from fedsec.results import ClientUpdate

UPDATE_ATTACKS = ("sign_flip", "gaussian", "scaling", "alie", "ipm", "min_max", "min_sum")
# plugins' update attacks (fedsec.register("update_attack", name)): name -> fn(own, honest, generator, **params)
PLUGIN_ATTACKS: dict[str, Any] = {}
# parameter name -> default, per attack (scaling's factor None: n / eta, model replacement)
PARAMS: dict[str, dict[str, Any]] = {
    "sign_flip": {"scale": 1.0},
    "gaussian": {"std": 1.0},
    "scaling": {"factor": None},
    "alie": {},
    "ipm": {"epsilon": 0.1},
    "min_max": {"direction": "unit"},
    "min_sum": {"direction": "unit"},
    "alignment_poison": {"ratio": 1.0, "source": None},
    "preference_flip": {"ratio": 1.0, "source": None},
    "backdoor": {"ratio": 0.5, "trigger": "zq-alert", "target": "positive"},
}


def attack_params(kind: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The attack's parameters: its defaults, overridden by the config's."""
    return {**PARAMS.get(kind, {}), **given}


def malicious_clients(num_clients: int, count: int, seed: int) -> tuple[int, ...]:
    """The fixed malicious identities: `count` clients drawn once from the run's seed."""
    rng = np.random.default_rng([seed, 0x6D616C])  # its own stream ("mal")
    return tuple(sorted(int(c) for c in rng.permutation(num_clients)[:count]))


@dataclass(frozen=True)
class AttackOutcome:
    updates: list[ClientUpdate]
    malicious: tuple[int, ...]  # sampled malicious clients this round
    note: str | None = None  # why the attack could not run this round (it sent honest deltas)


def attack_round(kind: str, params: Mapping[str, Any], updates: list[ClientUpdate], malicious: set[int],
                 generator: torch.Generator, server_lr: float) -> AttackOutcome:
    """Replace the malicious clients' deltas in `updates` with the attack's vectors."""
    bad = [i for i, u in enumerate(updates) if u.client_id in malicious]
    ids = tuple(updates[i].client_id for i in bad)
    if kind == "none" or not bad:
        return AttackOutcome(updates, ids)
    if kind in DATA_ATTACKS:  # the poisoned data already shaped these deltas
        return AttackOutcome([dataclasses.replace(u, malicious=u.client_id in malicious) for u in updates], ids)
    p = attack_params(kind, params)
    honest = [u.delta for u in updates if u.client_id not in malicious]
    n, f = len(updates), len(bad)
    shared = None  # the omniscient attacks send one vector from every attacker
    if kind in ("alie", "ipm", "min_max", "min_sum"):
        if len(honest) < 2:
            return AttackOutcome([dataclasses.replace(updates[i], malicious=i in bad) for i in range(n)], ids,
                                 f"{kind} needs >= 2 honest updates in the round; attackers sent their own")
        stack = torch.stack(honest)
        shared = {"alie": lambda: attack.alie(stack, n, f), "ipm": lambda: attack.ipm(stack, p["epsilon"]),
                  "min_max": lambda: attack.min_max(stack, p["direction"]),
                  "min_sum": lambda: attack.min_sum(stack, p["direction"])}[kind]()
    out = list(updates)
    plugin = PLUGIN_ATTACKS.get(kind)
    if plugin is not None:  # the attacker sees its own delta and the round's honest ones (omniscient)
        stack = torch.stack(honest) if honest else torch.zeros(0, updates[bad[0]].delta.numel())
        for i in bad:
            own = updates[i].delta
            delta = plugin(own, stack, generator, **p)
            if not (isinstance(delta, torch.Tensor) and delta.shape == own.shape):
                raise ValueError(f"update attack {kind} returned {type(delta).__name__} "
                                 f"{tuple(getattr(delta, 'shape', ()))}, not a tensor of shape {tuple(own.shape)}")
            out[i] = dataclasses.replace(updates[i], delta=delta.to(own.dtype), malicious=True)
        return AttackOutcome(out, ids)
    for i in bad:
        own = updates[i].delta
        if shared is not None:
            delta = shared
        elif kind == "sign_flip":
            delta = attack.sign_flip(own, p["scale"])
        elif kind == "gaussian":
            delta = attack.gaussian(own.numel(), p["std"], generator)
        else:  # scaling: model replacement boosts by n / eta unless a factor is given
            delta = attack.scaling(own, p["factor"] if p["factor"] is not None else n / server_lr)
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
