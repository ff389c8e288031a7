"""The privacy ledger of a run: one DP event per round, and epsilon so far.

The ledger keeps the events themselves (sigma, q, C, the noise split), so every
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from fedsec.accountants.backends import ACCOUNTANTS, DpEvent, epsilon
from fedsec.registry import registry


def _significant(value: float, digits: int, rounding: str) -> str:
    """`value` to `digits` significant digits, rounded in the exact decimal value of the float."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    exact = Decimal(value)  # the float's exact value: no slack, no double rounding
    decimals = digits - 1 - exact.adjusted()
    out = exact.quantize(Decimal(1).scaleb(-decimals), rounding=rounding)
    return f"{out:f}"


def format_epsilon(eps: float, digits: int = 3) -> str:
    """Epsilon to `digits` significant digits, rounded UP: a printed epsilon is never below
    the proven one (7.9931 -> "8.00", 0.99934 -> "1.00", 7.9990000000004 -> "8.00")."""
    return _significant(eps, digits, ROUND_CEILING)


def format_lower_bound(eps: float, digits: int = 3) -> str:
    """An audit's lower bound on epsilon, rounded DOWN: never above the proven bound."""
    return _significant(eps, digits, ROUND_FLOOR)


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
    """One round's mechanism, as released: nothing here depends on who was sampled.

    `noise_multiplier` is the accounted z of the round's Gaussian mechanism. Under
    adaptive clipping it is made of two releases, the update sum with multiplier
    `update_noise_multiplier` and the clip count with std `count_stddev` at sensitivity
    `count_sensitivity`: (update^-2 + (count_stddev / count_sensitivity)^-2)^(-1/2) == z.
    Without adaptive clipping the update carries all of z and the count fields are None.
    (The realised number of clients sampled is not recorded: the fixed denominator
    q N exists so that it stays hidden.)
    """

    round: int
    noise_multiplier: float
    sample_rate: float
    clip_norm: float
    epsilon: dict[str, float] | None  # accountant -> epsilon after this round; None if not certified
    update_noise_multiplier: float | None = None
    count_stddev: float | None = None
    count_sensitivity: float | None = None
    unavailable: dict[str, str] | None = None  # accountant -> why it gave no epsilon this round
    # correlated noise (tree, banded_mf): the rounds so far are ONE Gaussian mechanism, whose
    # multiplier is `noise_multiplier` (sample_rate 1); only the newest such entry is accounted.
    # sensitivity: what one client can move the released C x by so far (clip norm included);
    # noise_stddev: the std of each fresh noise coordinate
    mechanism: str | None = None
    sensitivity: float | None = None
    noise_stddev: float | None = None

    @property
    def correlated(self) -> bool:
        return self.mechanism not in (None, "dp_fedavg")

    @classmethod
    def from_dict(cls, data: dict) -> LedgerEntry:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})  # older ledgers: clients_sampled dropped


# The ledger computes its other accountants beside the primary one up to this epsilon: above
# it no accountant's number is a guarantee anyone would claim, and at the small sigmas that
# get there PRV can take 20 s a round (sigma 0.05, q 0.1, 30 rounds; it returns inf)
SIDE_BY_SIDE_UP_TO = 100.0


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
        table = registry("accountant")
        unknown = [a for a in (*self.accountants, self.primary) if a not in table]
        if unknown:
            raise ValueError(f"unknown accountant(s) {unknown}; use {', '.join(table)}")
        if self.primary not in self.accountants:
            self.accountants = (self.primary, *self.accountants)

    @property
    def history(self) -> list[DpEvent]:
        return _events(self.entries) + [DpEvent(e.noise_multiplier, e.sample_rate) for e in self.released_again]

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, mechanism: str | None = None) -> float | None:
        """Epsilon (primary accountant) if one more round ran with these parameters."""
        if not self.certified:
            return None
        nxt = LedgerEntry(len(self.entries) + 1, noise_multiplier, sample_rate, 0.0, None, mechanism=mechanism)
        again = [DpEvent(e.noise_multiplier, e.sample_rate) for e in self.released_again]
        return epsilon(_events([*self.entries, nxt]) + again, self.delta, self.primary)

    def charge_released(self, entry: LedgerEntry) -> None:
        """Count a round whose result was released once already (it is about to be redone
        with fresh noise, a second release of the same data)."""
        self.released_again.append(entry)

    def record(self, round_idx: int, noise_multiplier: float, sample_rate: float, clip_norm: float,
               update_noise_multiplier: float | None = None, count_stddev: float | None = None,
               count_sensitivity: float | None = None, mechanism: str | None = None,
               sensitivity: float | None = None, noise_stddev: float | None = None) -> LedgerEntry:
        """Add the event of finished round `round_idx` (1-based) and the epsilon so far.

        A secondary accountant that fails (a numerical limit of its backend) is recorded as
        unavailable with the reason and the round goes on; the primary's failure raises
        (planning has already computed the primary at the run's horizon).
        """
        if self.entries and round_idx != self.entries[-1].round + 1:
            raise ValueError(f"ledger has round {self.entries[-1].round}; cannot record round {round_idx}")
        entry = LedgerEntry(round_idx, noise_multiplier, sample_rate, clip_norm, None,
                            noise_multiplier if update_noise_multiplier is None else update_noise_multiplier,
                            count_stddev, count_sensitivity, None, mechanism, sensitivity, noise_stddev)
        again = [DpEvent(e.noise_multiplier, e.sample_rate) for e in self.released_again]
        eps, unavailable = self._epsilons(_events([*self.entries, entry]) + again) if self.certified else (None, None)
        entry = replace(entry, epsilon=eps, unavailable=unavailable)
        self.entries.append(entry)
        return entry

    def _epsilons(self, events: list[DpEvent]) -> tuple[dict[str, float], dict[str, str] | None]:
        return side_by_side(lambda a: epsilon(events, self.delta, a), self.primary, self.accountants)

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
        return self._epsilons(self.history)[0]

    def truncate(self, rounds: int) -> None:
        """Keep the first `rounds` rounds (a resume from the checkpoint after that round)."""
        self.entries = [e for e in self.entries if e.round <= rounds]

    def to_dict(self) -> dict:
        return {"delta": self.delta, "accountants": list(self.accountants), "primary": self.primary,
                "certified": self.certified, "reason": self.reason,
                "entries": [asdict(e) for e in self.entries],
                "released_again": [asdict(e) for e in self.released_again]}

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        entries = [LedgerEntry.from_dict(e) for e in data.get("entries", [])]
        again = [LedgerEntry.from_dict(e) for e in data.get("released_again", [])]
        return cls(float(data["delta"]), tuple(data["accountants"]), data["primary"],
                   bool(data["certified"]), data.get("reason"), entries, again)


def side_by_side(epsilon_of: Callable[[str], float], primary: str,
                 accountants: Sequence[str]) -> tuple[dict[str, float], dict[str, str] | None]:
    """Epsilon by each accountant (in `accountants`' order), and why any is unavailable: the
    primary's failure raises; another's failure is recorded with its reason, and above
    SIDE_BY_SIDE_UP_TO by the primary the others are not computed."""
    eps, unavailable = {primary: epsilon_of(primary)}, {}
    for a in accountants:
        if a == primary:
            continue
        if eps[primary] > SIDE_BY_SIDE_UP_TO:
            unavailable[a] = (f"not computed: the primary accountant's epsilon {format_epsilon(eps[primary])} "
                              f"is above {SIDE_BY_SIDE_UP_TO:g}")
            continue
        try:
            eps[a] = epsilon_of(a)
        except (ValueError, ArithmeticError, MemoryError, RuntimeError) as err:
            unavailable[a] = f"{type(err).__name__}: {err}"
    order = accountants if primary in accountants else (primary, *accountants)
    return {a: eps[a] for a in order if a in eps}, unavailable or None


def _events(entries: Sequence[LedgerEntry]) -> list[DpEvent]:
    """What the accountants compose: each DP-FedAvg round's sampled Gaussian, and the newest
    correlated entry's one Gaussian mechanism (it covers every round before it)."""
    events = [DpEvent(e.noise_multiplier, e.sample_rate) for e in entries if not e.correlated]
    correlated = [e for e in entries if e.correlated]
    return events + ([DpEvent(correlated[-1].noise_multiplier, 1.0)] if correlated else [])


def epsilons(history: Sequence[DpEvent], delta: float,
             accountants: Sequence[str] = ACCOUNTANTS) -> dict[str, float]:
    """Epsilon of one history under each accountant (a cross-check table)."""
    return {a: epsilon(history, delta, a) for a in accountants}
