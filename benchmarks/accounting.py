"""Accounting: seconds to calibrate the noise multiplier for a target epsilon at
10,000 rounds with each accountant (Opacus RDP and PRV, dp-accounting PLD), and the
seconds a DP run's ledger spends per round.

Calibration: one DP event per round (Poisson-subsampled Gaussian, q = 0.01), target
epsilon 4 at delta 1e-5; the same bisection for every accountant
(fedsec.accountants.backends.calibrate), so the time is the accountant's epsilon evaluations.

Ledger rounds: after each of 30 rounds at sigma 0.729 and q 0.1 (the DP demo's epsilon 8
by PLD) the ledger
computes epsilon so far by every accountant; the seconds per round of each, against
Opacus' RDPAccountant and PRVAccountant and dp-accounting's PLDAccountant asked the same
(fedsec computes each (q, sigma)'s one-round RDP curve and PLD once and composes them as
the libraries do: the same numbers).

    python -m benchmarks.accounting [--rounds 10000]
"""

from __future__ import annotations

import argparse
import datetime
import time

from benchmarks import store
from fedsec.accountants.backends import ACCOUNTANTS, DpEvent, _backend_numerics, calibrate, epsilon


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--sample-rate", type=float, default=0.01)
    parser.add_argument("--epsilon", type=float, default=4.0)
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    results = {}
    for accountant in ("rdp", "prv", "pld"):
        began = time.perf_counter()
        sigma = calibrate(args.epsilon, 1e-5, args.sample_rate, args.rounds, accountant)
        seconds = time.perf_counter() - began
        results[f"calibration_seconds_{accountant}_{args.rounds}_rounds"] = {
            "value": seconds, "noise_multiplier": sigma, "sample_rate": args.sample_rate,
            "target_epsilon": args.epsilon, "date": today}
        print(f"{accountant}: sigma {sigma:.4f} for epsilon {args.epsilon} at {args.rounds} rounds, "
              f"q {args.sample_rate}: {seconds:.2f} s")
    results["ledger_round_seconds"] = {**ledger_rounds(), "date": today}
    store(results)
    return results


def ledger_rounds(sigma: float = 0.729, q: float = 0.1, rounds: int = 30, delta: float = 1e-5) -> dict:
    """Mean seconds per round to compute epsilon so far, by accountant, over `rounds` rounds."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    def per_round(ask) -> float:
        began = time.perf_counter()
        for t in range(1, rounds + 1):
            ask(t)
        return (time.perf_counter() - began) / rounds

    def opacus(kind):
        def ask(t):
            acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
            acc.history = [(sigma, q, t)]
            with _backend_numerics(kind):
                return acc.get_epsilon(delta)
        return ask

    def dp_accounting_pld(t):  # at the grid fedsec's wrapper uses at this sigma (epsilon above 2)
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant

        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), t)
        return acc.get_epsilon(delta)

    out = {a: per_round(lambda t, a=a: epsilon([DpEvent(sigma, q, t)], delta, a)) for a in ACCOUNTANTS}
    out.update({f"opacus_{k}": per_round(opacus(k)) for k in ("rdp", "prv")})
    out["dp_accounting_pld"] = per_round(dp_accounting_pld)
    for k, v in out.items():
        print(f"ledger round, {k}: {v * 1e3:.2f} ms")
    return out


if __name__ == "__main__":
    main()
