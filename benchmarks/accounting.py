"""Accounting: seconds to calibrate the noise multiplier for a target epsilon at
10,000 rounds with each accountant (Opacus RDP and PRV, dp-accounting PLD).

One DP event per round (Poisson-subsampled Gaussian, q = 0.01), target epsilon 4 at
delta 1e-5; the same bisection for every accountant (fedsec.accountants.backends.calibrate),
so the time is the accountant's epsilon evaluations.

    python -m benchmarks.accounting [--rounds 10000]
"""

from __future__ import annotations

import argparse
import datetime
import time

from benchmarks import store
from fedsec.accountants.backends import calibrate


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
    store(results)
    return results


if __name__ == "__main__":
    main()
