"""Time of each aggregation rule on n client deltas of d parameters (default 100 x 4M).

The deltas are random fp32 (1.6 GB at the default size), with two scaled attackers;
each rule runs once after a warm-up of the Gram product. Pairwise rules (Krum,
Bulyan, FLAME, FoolsGold) compute one centred Gram matrix, not n^2 distance loops;
the table shows that against the coordinate-wise rules, which must sort every column.

    python -m benchmarks.aggregators [--n 100] [--d 4000000]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedsec.defenses import robust


def rules(x: torch.Tensor, w: torch.Tensor, f: int, reference: torch.Tensor) -> dict:
    """Every rule on the deltas x [n, d] with weights w, as a zero-argument call."""
    n = x.shape[0]
    return {
        "mean": lambda: robust.mean(x, w),
        "gram (pairwise distances)": lambda: robust.pairwise_sq_distances(x),
        "krum": lambda: robust.multi_krum(x, w, f, 1),
        "multi_krum (m = n - f)": lambda: robust.multi_krum(x, w, f, n - f),
        "bulyan": lambda: robust.bulyan(x, w, f),
        "median": lambda: robust.median(x, w),
        "trimmed_mean (beta 0.1)": lambda: robust.trimmed_mean(x, w, 0.1),
        "geometric_median": lambda: robust.geometric_median(x, w),
        "norm_bound": lambda: robust.norm_bound(x, w, 1.0),
        "centered_clip (3 iters)": lambda: robust.centered_clip(x, w, 1.0, 3),
        "fltrust": lambda: robust.fltrust(x, w, reference),
        "flame": lambda: robust.flame(x, w, torch.Generator().manual_seed(1)),
        "foolsgold": lambda: robust.foolsgold(x, w, x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--d", type=int, default=4_000_000)
    parser.add_argument("--f", type=int, default=2)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=g)
    x[: args.f] *= 10
    w = torch.ones(args.n)
    reference = x[args.f:].mean(0)
    rules_by_name = rules(x, w, args.f, reference)
    robust.pairwise_sq_distances(x)  # warm-up
    times = {}
    for name, rule in rules_by_name.items():
        started = time.perf_counter()
        rule()
        times[name] = round(time.perf_counter() - started, 2)
        print(f"{name:<28} {times[name]:>7.2f} s", flush=True)
    print(json.dumps({"n": args.n, "d": args.d, "threads": torch.get_num_threads(), "seconds": times}))


if __name__ == "__main__":
    main()
