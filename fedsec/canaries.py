"""The one-run privacy audit (Steinke, Nasr & Jagielski 2023) played on a real run.

`audit.canaries` canary clients are made, each holding `repeats` copies of its own
secret ("The vault PIN of <name> is <6 digits>."), and each is added to the
federation with probability 1/2 (a seeded coin per canary). They train like any
honest client: under user-level DP they are clipped, sampled and noised like the
others. After the last round every canary, in or out, is scored by how much training
raised the model's preference for its PIN over random PINs after the same sentence
(the loss margin, final minus untuned; the sentence itself is shared, so it cancels);
the auditor guesses "in" for the highest scores and "out" for the lowest, and
fedsec.accountants.audit turns the correct guesses into a lower bound on epsilon, reported
beside the accountant's epsilon. Without DP the bound measures how visible a client
is; with DP it must stay below the accountant's epsilon, or something is wrong.

That is audit.kind secret: the attacker sees only the final model, and the canaries
are data. audit.kind update is the strongest attacker the accountant covers (Andrew
et al. 2024, "One-shot empirical privacy estimation for federated learning"): a
canary client sends no training result but a fixed random direction of norm C
(privacy.clip_norm) whenever it is sampled, and the attacker sees every round's
released aggregate (after the noise, before the server optimizer), scoring each
canary by the largest inner product of its direction with a round's aggregate. The
directions are independent of everything else, so an absent canary's score is noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedsec.accountants.audit import comparable_bound, guess_and_count, one_run_bound, one_run_fdp_bound
from fedsec.data.benchmark import NEW_TOKEN_LENGTH, canary_example, draw_canary, random_secret
from fedsec.data.schema import Canary, ClientData, FederatedData
from fedsec.leakage import sequence_nll
from fedsec.results import ClientUpdate
from fedsec.seeding import numpy_generator, torch_generator


def audit_canaries(seed: int, m: int, secret: str = "pin") -> tuple[tuple[Canary, ...], np.ndarray]:
    """m canaries (their own random streams) and which of them are included; `secret`: pin,
    random_tokens or new_tokens (fedsec.data.benchmark.draw_canary)."""
    canaries = [draw_canary(numpy_generator(seed, "audit-canary", i), -1 - i, secret, i) for i in range(m)]
    included = numpy_generator(seed, "audit-include").random(m) < 0.5
    return tuple(canaries), included


def with_canary_clients(data: FederatedData, canaries: Sequence[Canary], included: np.ndarray,
                        repeats: int) -> FederatedData:
    """The federation with one client per included canary, appended after the others."""
    start = len(data.clients)
    added = [ClientData(start + k, f"audit-canary{k:03d}", (canary_example(c),) * repeats, ())
             for k, c in enumerate(c for c, inc in zip(canaries, included) if inc)]
    return dataclasses.replace(data, clients=tuple(data.clients) + tuple(added))


ALTERNATIVES = 8  # random secrets of its kind each secret is compared with


@torch.no_grad()
def secret_margins(model, tokenizer, canaries: Sequence[Canary], template: str, batch_size: int,
                   seed: int, secret: str = "pin") -> list[float]:
    """Per canary: the mean loss of ALTERNATIVES random secrets of its kind after the same
    prefix minus the loss of its own (how much the model prefers the secret; the shared
    sentence cancels out). A new-token key is compared with keys drawn from every canary's
    new tokens: an included canary's tokens were trained on, an absent one's never."""
    texts, pool = [], NEW_TOKEN_LENGTH * len(canaries)
    for c in canaries:
        rng = numpy_generator(seed, "audit-alternatives", c.client_id)
        texts += [c.text] + [f"{c.prefix} {random_secret(rng, secret, pool)}." for _ in range(ALTERNATIVES)]
    nll = np.array(sequence_nll(model, tokenizer, texts, template, batch_size)).reshape(len(canaries), -1)
    return (nll[:, 1:].mean(1) - nll[:, 0]).tolist()


def canary_direction(seed: int, index: int, dim: int) -> torch.Tensor:
    """Canary `index`'s update direction: a seeded uniformly random unit vector."""
    generator = torch_generator(seed, "audit-direction", index)
    v = torch.randn(dim, generator=generator, device=generator.device)
    return v / v.norm()


@dataclass
class UpdateCanaries:
    """audit.kind update: the crafted canary updates, and every canary's running score: the
    largest inner product of its direction with a released aggregate so far (statistic max),
    or their sum over the rounds (statistic sum)."""

    seed: int
    members: dict[int, int]  # client id of an included canary -> its index among all canaries
    norm: float
    examples: int  # the example count a canary update reports (FedAvg weights by it)
    scores: torch.Tensor  # [canaries]: max: -inf until the first round; sum: 0
    statistic: str = "max"
    _directions: torch.Tensor | None = field(default=None, repr=False)

    def trained(self, sampled: Sequence[int]) -> list[int]:
        """The sampled clients that train (every one but the canaries)."""
        return [c for c in sampled if c not in self.members]

    def insert(self, updates: Sequence[ClientUpdate], sampled: Sequence[int], dim: int) -> list[ClientUpdate]:
        """The trained clients' updates with the sampled canaries' crafted ones, in sampled order."""
        by_client = {u.client_id: u for u in updates}
        for c in sampled:
            if c in self.members:
                delta = self.norm * canary_direction(self.seed, self.members[c], dim)
                by_client[c] = ClientUpdate(c, delta, self.examples, {"loss": 0.0, "loss_terms": 0})
        return [by_client[c] for c in sampled]

    def observe(self, aggregate: torch.Tensor) -> None:
        """Score every canary, in or out, against one round's released aggregate."""
        if self._directions is None:  # [canaries, d] floats, made once
            self._directions = torch.stack([canary_direction(self.seed, k, aggregate.numel())
                                            for k in range(len(self.scores))])
        products = self._directions @ aggregate.to(self._directions.device)
        self.scores = self.scores + products if self.statistic == "sum" else torch.maximum(self.scores, products)


@dataclass
class AuditState:
    """A run's audit: the canaries, which are in, and what their scores start from."""

    canaries: tuple[Canary, ...]
    included: np.ndarray
    untuned: list[float] | None = None  # kind secret: the base model's margins
    updates: UpdateCanaries | None = None  # kind update: the crafted updates and running scores


def start_audit(cfg, canaries: tuple[Canary, ...], included: np.ndarray, first_client: int, model,
                tokenizer) -> AuditState:
    """The audit of config `cfg`, whose included canaries are clients first_client, ..."""
    if cfg.audit.kind == "update":
        members = {first_client + j: int(k) for j, k in enumerate(np.flatnonzero(included))}
        start = 0.0 if cfg.audit.statistic == "sum" else -math.inf
        scores = torch.full((len(canaries),), start, device="cpu")
        return AuditState(canaries, included, updates=UpdateCanaries(cfg.seed, members, cfg.privacy.clip_norm,
                                                                     cfg.audit.repeats, scores, cfg.audit.statistic))
    # the adapter starts at zero: these are the base model's margins
    return AuditState(canaries, included, secret_margins(model, tokenizer, canaries, cfg.data.template,
                                                         cfg.eval.batch_size, cfg.seed, cfg.audit.secret))


def audit_result(untuned: Sequence[float], final: Sequence[float], included: np.ndarray, guesses: int,
                 delta: float, confidence: float, accountant_epsilon: float | None,
                 gaussian: bool = False) -> dict:
    """The score of a canary is how much training raised its margin; then the game, judged
    twice: Steinke et al.'s (epsilon, delta) test and Mahloujifar et al.'s f-DP test of the
    Gaussian curve (fedsec.accountants.audit). `gaussian`: the run's guarantee is exactly
    that curve (every client every round, or correlated noise), so the f-DP bound too must
    stay below the accountant's epsilon."""
    scores = [f - u for u, f in zip(untuned, final)]
    r, v = guess_and_count(scores, included, guesses or len(scores))
    bound = one_run_bound(len(scores), r, v, delta, confidence).epsilon_lower_bound
    fdp = one_run_fdp_bound(len(scores), r, v, delta, confidence).epsilon_lower_bound if delta > 0 else None
    comparable = comparable_bound(bound, fdp, gaussian)
    return {"canaries": len(scores), "included": int(np.sum(included)), "guesses": r, "correct": v,
            "delta": delta, "confidence": confidence, "epsilon_lower_bound": bound,
            "fdp_epsilon_lower_bound": fdp, "gaussian_mechanism": gaussian,
            "scores": [float(x) for x in scores], "included_canaries": [bool(x) for x in included],
            "accountant_epsilon": accountant_epsilon,
            "tightness": comparable / accountant_epsilon if accountant_epsilon else None,
            "bound_exceeds_accountant": accountant_epsilon is not None and comparable > accountant_epsilon}
