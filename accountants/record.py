"""Record-level accounting: each client's DP-SGD steps composed on their own.

Under record-level DP (DP-SGD inside each client, Abadi et al. 2016), a record of
client k is touched only by k's own local steps: each step is one Poisson-subsampled
Gaussian mechanism with the run's noise multiplier and k's sample rate
q_k = batch_size / n_k. Everything else a record can influence (k's delta, the
global adapter, the other clients' later steps, SCAFFOLD's variates) is
post-processing of those steps. So the guarantee for a record of client k is the
composition of k's steps, and the run's guarantee, for any record of any client,
is the largest epsilon over clients.

`RecordLedger` counts each client's steps and reports that worst case per round.
Clients differ only in (q_k, steps_k), and epsilon grows in both, so only the
Pareto front of those pairs needs an accountant call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedsec.accountants.backends import DpEvent, epsilon
from fedsec.accountants.ledger import PrivacyReport, side_by_side
from fedsec.registry import registry


def pareto_front(pairs: set[tuple[float, int]]) -> list[tuple[float, int]]:
    """The (q, steps) pairs not dominated by another (q' >= q and steps' >= steps)."""
    front = []
    for q, steps in sorted(pairs, key=lambda p: (-p[0], -p[1])):
        if not front or steps > front[-1][1]:
            front.append((q, steps))
    return front


def worst_record_epsilon(noise_multiplier: float, sample_rates: dict[int, float],
                         steps: dict[int, int], delta: float, accountant: str) -> float:
    """max over clients k of epsilon(steps_k x sampled Gaussian(sigma, q_k)); 0 before any step."""
    pairs = {(sample_rates[k], s) for k, s in steps.items() if s > 0}
    if not pairs:
        return 0.0
    return max(epsilon([DpEvent(noise_multiplier, q, s)], delta, accountant)
               for q, s in pareto_front(pairs))


@dataclass
class RecordLedger:
    """Per-client DP-SGD step counts and the worst record's epsilon after each round."""

    delta: float
    noise_multiplier: float
    sample_rates: dict[int, float]  # client -> q_k
    primary: str = "rdp"
    certified: bool = True
    reason: str | None = None
    steps: dict[int, int] = field(default_factory=dict)  # client -> DP-SGD steps so far
    rounds: list[dict] = field(default_factory=list)  # per round: clients, epsilon (primary)
    released_again: list[dict] = field(default_factory=list)  # rounds released, then redone (charged)

    def __post_init__(self) -> None:
        if self.primary not in registry("accountant"):
            raise ValueError(f"unknown accountant {self.primary!r}; use {', '.join(registry('accountant'))}")

    def record(self, round_idx: int, client_steps: dict[int, int]) -> float | None:
        """Add finished round `round_idx` (1-based): the DP-SGD steps each client took."""
        if self.rounds and round_idx != self.rounds[-1]["round"] + 1:
            raise ValueError(f"ledger has round {self.rounds[-1]['round']}; cannot record round {round_idx}")
        for client, n in client_steps.items():
            self.steps[client] = self.steps.get(client, 0) + n
        eps = self.epsilon(self.primary) if self.certified else None
        self.rounds.append({"round": round_idx, "clients": len(client_steps), "epsilon": eps})
        return eps

    def epsilon_after(self, client_steps: dict[int, int]) -> float | None:
        """The worst record's epsilon (primary accountant) if these clients took these steps."""
        if not self.certified:
            return None
        steps = dict(self.steps)
        for client, n in client_steps.items():
            steps[client] = steps.get(client, 0) + n
        return worst_record_epsilon(self.noise_multiplier, self.sample_rates, steps, self.delta, self.primary)

    def charge_released(self, round_idx: int, client_steps: dict[int, int]) -> None:
        """Count the steps of a round whose result was released once already and is about
        to be redone with fresh noise (a second release of the same records)."""
        for client, n in client_steps.items():
            self.steps[client] = self.steps.get(client, 0) + n
        self.released_again.append({"round": round_idx, "clients": len(client_steps)})

    def epsilon(self, accountant: str) -> float:
        return worst_record_epsilon(self.noise_multiplier, self.sample_rates, self.steps, self.delta,
                                    accountant)

    def epsilons(self, accountants: Sequence[str]) -> tuple[dict[str, float], dict[str, str] | None]:
        """The worst record's epsilon by each accountant, side by side as in PrivacyLedger."""
        return side_by_side(self.epsilon, self.primary, accountants)

    def report(self, accountant: str | None = None) -> PrivacyReport:
        accountant = accountant or self.primary
        if not self.certified:
            return PrivacyReport(None, self.delta, accountant, False, self.reason)
        return PrivacyReport(self.epsilon(accountant), self.delta, accountant, True)

    def to_dict(self) -> dict:
        return {"kind": "record", "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "primary": self.primary, "certified": self.certified, "reason": self.reason,
                "sample_rates": {str(k): q for k, q in self.sample_rates.items()},
                "steps": {str(k): s for k, s in self.steps.items()}, "rounds": list(self.rounds),
                "released_again": list(self.released_again)}

    def public_dict(self) -> dict:
        """What may be published beside the model: the mechanism and the worst epsilon per
        round, without the per-client step counts (which say who trained when)."""
        return {"kind": "record", "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "primary": self.primary, "certified": self.certified, "reason": self.reason,
                "sample_rates": {str(k): q for k, q in self.sample_rates.items()},
                "rounds": [{"round": r["round"], "epsilon": r["epsilon"]} for r in self.rounds],
                "released_again": [{"round": r["round"]} for r in self.released_again]}

    @classmethod
    def from_dict(cls, data: dict) -> RecordLedger:
        return cls(float(data["delta"]), float(data["noise_multiplier"]),
                   {int(k): float(q) for k, q in data["sample_rates"].items()}, data["primary"],
                   bool(data["certified"]), data.get("reason"),
                   {int(k): int(s) for k, s in data["steps"].items()}, list(data["rounds"]),
                   list(data.get("released_again", [])))
