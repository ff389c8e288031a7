"""The server pipeline per aggregator: sanitize + clip + the rule + noise, on n client
deltas of d parameters, against one pass over the n x d floats (the memory-bandwidth
limit: summing them once).

This is what the round loop runs under DP with a robust rule: fedsec.pipeline's
Sanitize and Clip stages, the rule over the clipped deltas, and the noise draw. Random fp32 deltas with
f = 2 scaled attackers (1 at n = 10, for Bulyan's n >= 4f + 3). Sizes whose n x d exceeds
--max-floats are skipped (500 x 4M is 8 GB before the copies the pipeline makes).

    python -m benchmarks.server_pipeline [--n 10 100 500] [--d 1000000 4000000]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from benchmarks import store
from benchmarks.aggregators import rules
from fedsec.defenses.dp import gaussian_noise
from fedsec.pipeline import Batch, Clip, Sanitize
from fedsec.results import ClientUpdate


def one_pass_seconds(x: torch.Tensor) -> float:
    x.sum(0)
    times = []
    for _ in range(3):
        began = time.perf_counter()
        x.sum(0)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def pipeline(updates: list, d: int, rule, clip: float = 1.0) -> None:
    batch = Clip(lambda: clip)(Sanitize(None)(Batch(0, d, tuple(updates))))
    rule(batch.deltas)
    gaussian_noise(d, clip, torch.Generator().manual_seed(0))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--d", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--f", type=int, default=2)
    parser.add_argument("--max-floats", type=float, default=5e8)
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    results = {}
    for d in args.d:
        for n in args.n:
            if n * d > args.max_floats:
                print(f"n {n} x d {d}: skipped ({n * d * 4 / 1e9:.0f} GB of deltas > --max-floats)")
                continue
            f = min(args.f, (n - 3) // 4)  # Bulyan's n >= 4f + 3
            x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
            x[:f] *= 10
            w, reference = torch.ones(n), x[f:].mean(0)
            updates = [ClientUpdate(i, x[i], 8) for i in range(n)]
            base = one_pass_seconds(x)
            seconds = {}
            for name in rules(x, w, f, reference):
                def rule(clipped, name=name, f=f, w=w, reference=reference):
                    return rules(clipped, w, f, reference)[name]()
                began = time.perf_counter()
                pipeline(updates, d, rule)
                seconds[name] = time.perf_counter() - began
                print(f"n {n:>3} d {d / 1e6:.0f}M  {name:<28} {seconds[name]:7.2f} s  "
                      f"{seconds[name] / base:7.1f} passes", flush=True)
            key = f"server_seconds_n{n}_d{d // 1_000_000}m"
            results[key] = {"value": seconds, "one_pass_seconds": base,
                            "passes": {k: v / base for k, v in seconds.items()}, "date": today}
            del x, updates
    store(results)
    return results


if __name__ == "__main__":
    main()
