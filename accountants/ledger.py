"""The privacy ledger of a run: one DP event per round, and epsilon so far.

The ledger keeps the events themselves (sigma, q, C, clients sampled), so every
epsilon in it can be recomputed by anyone with any accountant. It is saved to the
run directory (privacy_ledger.json) and inside every checkpoint, so a resumed run
continues its budget instead of starting a fresh one.

A run whose assumptions do not hold (noise off, a robust aggregator in place of the
clipped mean, sampling that is not Poisson) is recorded as not certified, with the
reason, and its epsilon fields stay empty: fedsec never prints an epsilon it cannot
prove.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from accountants.backends import ACCOUNTANTS, DpEvent, epsilon


def format_epsilon(eps: float, digits: int = 3) -> str:
    """Epsilon to `digits` significant digits, rounded UP: a printed epsilon is never below
    the proven one (7.9931 -> "8.00", 0.99934 -> "1.00")."""
    if eps == 0 or not math.isfinite(eps):
        return f"{eps:g}"
    decimals = digits - 1 - math.floor(math.log10(abs(eps)))
    scale = 10.0 ** decimals
    return f"{math.ceil(eps * scale - 1e-9) / scale:.{max(decimals, 0)}f}"


@dataclass(frozen=True)
class PrivacyReport:
    epsilon: float | None  # None when not certified
    delta: float
    accountant: str
    certified: bool
    reason: str | None = None  # why not certified

    def describe(self) -> str:
        if not self.certified:
            return f"epsilon not certified ({self.reason})"
        return f"epsilon {format_epsilon(self.epsilon, 4)} at delta {self.delta:g} ({self.accountant})"


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    noise_multiplier: float
    sample_rate: float
    clip_norm: float
    clients_sampled: int
    epsilon: dict[str, float] | None  # accountant -> epsilon after this round; None if not certified


@dataclass
class PrivacyLedger:
    delta: float
    accountants: tuple[str, ...] = ACCOUNTANTS
    primary: str = "rdp"
    certified: bool = True
    reason: str | None = None
    entries: list[LedgerEntry] = field(default_factory=list)
    # rounds whose results were released and then computed again with fresh noise (a
    # resume from an older checkpoint): each release is one more mechanism, charged here
    released_again: list[LedgerEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [a for a in (*self.accountants, self.primary) if a not in ACCOUNTANTS]
        if unknown:
            raise ValueError(f"unknown accountant(s) {unknown}; use {', '.join(ACCOUNTANTS)}")
        if self.primary not in self.accountants:
            self.accountants = (self.primary, *self.accountants)

    @property
    def history(self) -> list[DpEvent]:
        return [DpEvent(e.noise_multiplier, e.sample_rate) for e in self.entries + self.released_again]

    def epsilon_after(self, noise_multiplier: float, sample_rate: float) -> float | None:
        """Epsilon (primary accountant) if one more round ran with these parameters."""
        if not self.certified:
            return None
        return epsilon(self.history + [DpEvent(noise_multiplier, sample_rate)], self.delta, self.primary)

    def charge_released(self, entry: LedgerEntry) -> None:
        """Count a round whose result was released once already (it is about to be redone
        with fresh noise, a second release of the same data)."""
        self.released_again.append(entry)

    def record(self, round_idx: int, noise_multiplier: float, sample_rate: float, clip_norm: float,
               clients_sampled: int) -> LedgerEntry:
        """Add the event of finished round `round_idx` (1-based) and the epsilon so far."""
        if self.entries and round_idx != self.entries[-1].round + 1:
            raise ValueError(f"ledger has round {self.entries[-1].round}; cannot record round {round_idx}")
        events = self.history + [DpEvent(noise_multiplier, sample_rate)]
        eps = ({a: epsilon(events, self.delta, a) for a in self.accountants} if self.certified else None)
        entry = LedgerEntry(round_idx, noise_multiplier, sample_rate, clip_norm, clients_sampled, eps)
        self.entries.append(entry)
        return entry

    def report(self, accountant: str | None = None) -> PrivacyReport:
        accountant = accountant or self.primary
        if not self.certified:
            return PrivacyReport(None, self.delta, accountant, False, self.reason)
        return PrivacyReport(self.epsilons_now()[accountant], self.delta, accountant, True)

    def epsilons_now(self) -> dict[str, float] | None:
        """Epsilon so far per accountant (None: not certified), charged releases included."""
        if not self.certified:
            return None
        if not self.entries:
            return {a: 0.0 for a in self.accountants}
        if not self.released_again:
            return dict(self.entries[-1].epsilon)
        return {a: epsilon(self.history, self.delta, a) for a in self.accountants}

    def truncate(self, rounds: int) -> None:
        """Keep the first `rounds` rounds (a resume from the checkpoint after that round)."""
        self.entries = [e for e in self.entries if e.round <= rounds]

    def to_dict(self) -> dict:
        return {"delta": self.delta, "accountants": list(self.accountants), "primary": self.primary,
                "certified": self.certified, "reason": self.reason,
                "entries": [asdict(e) for e in self.entries],
                "released_again": [asdict(e) for e in self.released_again]}

    @classmethod
    def from_dict(cls, data: dict) -> "PrivacyLedger":
        entries = [LedgerEntry(**e) for e in data.get("entries", [])]
        again = [LedgerEntry(**e) for e in data.get("released_again", [])]
        return cls(float(data["delta"]), tuple(data["accountants"]), data["primary"],
                   bool(data["certified"]), data.get("reason"), entries, again)


def epsilons(history: Sequence[DpEvent], delta: float,
             accountants: Sequence[str] = ACCOUNTANTS) -> dict[str, float]:
    """Epsilon of one history under each accountant (a cross-check table)."""
    return {a: epsilon(history, delta, a) for a in accountants}
