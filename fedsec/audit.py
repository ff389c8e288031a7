"""The one-run privacy audit (Steinke, Nasr & Jagielski 2023) played on a real run.

`audit.canaries` canary clients are made, each holding `repeats` copies of its own
secret ("The vault PIN of <name> is <6 digits>."), and each is added to the
federation with probability 1/2 (a seeded coin per canary). They train like any
honest client: under user-level DP they are clipped, sampled and noised like the
others. After the last round every canary, in or out, is scored by how much training
raised the model's preference for its PIN over random PINs after the same sentence
(the loss margin, final minus untuned; the sentence itself is shared, so it cancels);
the auditor guesses "in" for the highest scores and "out" for the lowest, and
accountants.audit turns the correct guesses into a lower bound on epsilon, reported
beside the accountant's epsilon. Without DP the bound measures how visible a client
is; with DP it must stay below the accountant's epsilon, or something is wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from accountants.audit import guess_and_count, one_run_bound
from fedsec.data.benchmark import canary_example, draw_canary, random_pin
from fedsec.data.schema import Canary, ClientData, FederatedData
from fedsec.memorization import sequence_nll
from fedsec.seeding import numpy_generator


def audit_canaries(seed: int, m: int) -> tuple[tuple[Canary, ...], np.ndarray]:
    """m canaries (their own random streams) and which of them are included."""
    canaries = [draw_canary(numpy_generator(seed, "audit-canary", i), -1 - i) for i in range(m)]
    included = numpy_generator(seed, "audit-include").random(m) < 0.5
    return tuple(canaries), included


def with_canary_clients(data: FederatedData, canaries: Sequence[Canary], included: np.ndarray,
                        repeats: int) -> FederatedData:
    """The federation with one client per included canary, appended after the others."""
    start = len(data.clients)
    added = [ClientData(start + k, f"audit-canary{k:03d}", (canary_example(c),) * repeats, ())
             for k, c in enumerate(c for c, inc in zip(canaries, included) if inc)]
    return dataclasses.replace(data, clients=tuple(data.clients) + tuple(added))


ALTERNATIVES = 8  # random PINs each secret is compared with


@torch.no_grad()
def secret_margins(model, tokenizer, canaries: Sequence[Canary], template: str, batch_size: int,
                   seed: int) -> list[float]:
    """Per canary: the mean loss of ALTERNATIVES random PINs after the same prefix minus the
    loss of its own PIN (how much the model prefers the secret; the shared sentence
    cancels out)."""
    texts = []
    for c in canaries:
        rng = numpy_generator(seed, "audit-alternatives", c.client_id)
        texts += [c.text] + [f"{c.prefix} {random_pin(rng)}." for _ in range(ALTERNATIVES)]
    nll = np.array(sequence_nll(model, tokenizer, texts, template, batch_size)).reshape(len(canaries), -1)
    return (nll[:, 1:].mean(1) - nll[:, 0]).tolist()


def audit_result(untuned: Sequence[float], final: Sequence[float], included: np.ndarray, guesses: int,
                 delta: float, confidence: float, accountant_epsilon: float | None) -> dict:
    """The score of a canary is how much training raised its margin; then the game."""
    scores = [f - u for u, f in zip(untuned, final)]
    r, v = guess_and_count(scores, included, guesses or len(scores))
    bound = one_run_bound(len(scores), r, v, delta, confidence)
    return {"canaries": len(scores), "included": int(np.sum(included)), "guesses": r, "correct": v,
            "delta": delta, "confidence": confidence, "epsilon_lower_bound": bound.epsilon_lower_bound,
            "accountant_epsilon": accountant_epsilon,
            "bound_exceeds_accountant": (accountant_epsilon is not None
                                         and bound.epsilon_lower_bound > accountant_epsilon)}
