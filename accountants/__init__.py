"""Privacy accounting: per-round DP events, accountant backends, the ledger.

Empty until the differential-privacy issue lands; until then fedsec prints no
epsilon at all, because nothing could certify one.
"""
