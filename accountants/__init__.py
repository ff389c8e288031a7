"""Privacy accounting: per-round DP events, accountant backends, the ledger.

Each round of a user-level DP run is one Poisson-subsampled Gaussian event
(`DpEvent`); `epsilon` turns a history of events into epsilon with Opacus' RDP or
PRV accountant or dp-accounting's PLD accountant; `calibrate` finds the noise
multiplier for a target epsilon; `PrivacyLedger` keeps a run's events and its
epsilon after every round. `RecordLedger` does the same for record-level DP-SGD
inside clients, where each client's steps compose on their own.
"""

from fedsec.accountants.backends import ACCOUNTANTS, DpEvent, calibrate, epsilon, gdp_epsilon
from fedsec.accountants.ledger import (
           LedgerEntry,
           PrivacyLedger,
           PrivacyReport,
           epsilons,
           format_epsilon,
           format_lower_bound,
)
from fedsec.accountants.record import RecordLedger, worst_record_epsilon

__all__ = ["ACCOUNTANTS", "DpEvent", "calibrate", "epsilon", "gdp_epsilon", "epsilons", "format_epsilon",
           "format_lower_bound", "LedgerEntry", "PrivacyLedger", "PrivacyReport", "RecordLedger",
           "worst_record_epsilon"]
