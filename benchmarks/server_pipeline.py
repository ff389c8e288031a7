"""The server pipeline per aggregator: sanitize + clip + the rule + noise, on n client
deltas of d parameters, against one pass over the n x d floats (the memory-bandwidth
limit: summing them once).

This is what the round loop runs under DP with a robust rule: fedsec.pipeline's
Sanitize and Clip stages, the rule over the clipped deltas, and the noise draw; the DP
mean is the certified path (Clip, DP-FedAvg's fixed-denominator mean, noise), and the
FedAvg mean the pipeline without DP (Sanitize, the example-weighted mean). The stages are
built once and run for --rounds rounds, as the loop runs them: Sanitize's stack is
allocated in the first round and reused after it, so the first round's time is kept
apart and the passes are the later rounds' median. Random fp32 deltas with f = 2 scaled
attackers (1 at n = 10, for Bulyan's n >= 4f + 3). Sizes whose n x d exceeds
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
from fedsec.defenses.robust import weighted_mean
from fedsec.pipeline import Batch, Clip, FixedDenominatorMean, Sanitize
from fedsec.results import ClientUpdate

# issue 28's targets, in passes over n x d (at n 100, d 4M)
TARGETS = {"DP mean (clip, fixed denominator, noise)": 5, "FedAvg mean, no DP": 5, "median": 25,
           "trimmed_mean (beta 0.1)": 25, "bulyan": 60}


def one_pass_seconds(x: torch.Tensor) -> float:
    x.sum(0)
    times = []
    for _ in range(3):
        began = time.perf_counter()
        x.sum(0)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def rounds_seconds(updates: list, d: int, rule, private: bool, certified: bool, rounds: int,
                   clip: float = 1.0) -> list[float]:
    """Each round's seconds through stages built once, as fedsec.pipeline.build_pipeline builds
    them: Sanitize (-> Clip) -> rule (-> + N(0, (zC)^2) / n, the Noise stage's draw, z = 1)."""
    sanitize, clipping = Sanitize(None), Clip(lambda: clip, scale_rows=not certified)
    times = []
    for t in range(rounds):
        began = time.perf_counter()
        batch = sanitize(Batch(t, d, tuple(updates)))
        if private:
            batch = clipping(batch)
        out = rule(batch)
        if private:
            noise = gaussian_noise(d, clip, torch.Generator().manual_seed(t)).div_(len(updates))
            if isinstance(out, torch.Tensor) and out.shape == noise.shape:
                out + noise
        times.append(time.perf_counter() - began)
    return times


def _vector(out):
    return getattr(out, "vector", out)  # a rule's aggregate (the Gram benchmark returns its matrix)


def pipelines(w: torch.Tensor, f: int, reference: torch.Tensor, n: int) -> dict:
    """name -> (rule over the batch -> aggregate, whether it runs under DP, whether it is DP-FedAvg's mean)."""
    fixed = FixedDenominatorMean(n)
    out = {"DP mean (clip, fixed denominator, noise)": (lambda b: fixed(b).aggregate, True, True),
           "FedAvg mean, no DP": (lambda b: weighted_mean(b.deltas, b.weights), False, False)}
    for name in rules(torch.zeros(n, 1), w, f, reference[:1]):
        if name != "mean":
            out[name] = ((lambda b, name=name: _vector(rules(b.deltas, w, f, reference)[name]())), True, False)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--d", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--f", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
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
            seconds, first = {}, {}
            for name, (rule, private, certified) in pipelines(w, f, reference, n).items():
                times = rounds_seconds(updates, d, rule, private, certified, args.rounds)
                first[name], seconds[name] = times[0], statistics.median(times[1:] or times)
                target = TARGETS.get(name)
                print(f"n {n:>3} d {d / 1e6:.0f}M  {name:<42} {seconds[name]:7.2f} s  "
                      f"{seconds[name] / base:6.1f} passes (first round {first[name] / base:5.1f})"
                      + (f"  target <= {target}" if target else ""), flush=True)
            key = f"server_seconds_n{n}_d{d // 1_000_000}m"
            results[key] = {"value": seconds, "one_pass_seconds": base, "first_round_seconds": first,
                            "passes": {k: v / base for k, v in seconds.items()}, "targets": TARGETS,
                            "date": today}
            del x, updates
    store(results)
    return results


if __name__ == "__main__":
    main()
