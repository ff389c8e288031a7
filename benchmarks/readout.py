"""The last decoder layer at read positions only (fedsec.readout) against the plain forward:
the time of two SmolLM2 training calls each way, alternating, in one run, and how far their
results are apart.

- the DP sweep's batched cohort call as `make demo` runs it (experiments/dp_base.yaml with
  the top layer adapted and packing on: `--clients` one-step clients of 4 headlines, one
  `train_clients`);
- one quickstart client's local training (experiments/quickstart.yaml: 4 AdamW steps of 8
  examples over the top 6 layers, packed).

    python -m benchmarks.readout [--clients 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import time

import torch

import fedsec.training as training
from benchmarks import store
from fedsec.config import load_config
from fedsec.seeding import derive_seed
from fedsec.setup import prepare


@contextlib.contextmanager
def _plain() -> None:
    trimmed = training.trimmed
    training.trimmed = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        yield
    finally:
        training.trimmed = trimmed


def _compare(call, repeats: int) -> dict:
    """Median seconds of `call()` with and without the trimmed layer (alternating, after one
    uncounted call each), and the largest difference between their results."""
    call()
    with _plain():
        call()
    times: dict[str, list[float]] = {"read": [], "plain": []}
    out = {}
    for _ in range(repeats):
        for name in ("read", "plain"):
            with _plain() if name == "plain" else contextlib.nullcontext():
                began = time.perf_counter()
                out[name] = call()
                times[name].append(time.perf_counter() - began)
    read, plain = statistics.median(times["read"]), statistics.median(times["plain"])
    return {"value": plain / read, "read_seconds": times["read"], "plain_seconds": times["plain"],
            "largest_difference": float((out["read"] - out["plain"]).abs().max()),
            "largest_entry": float(out["plain"].abs().max())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    today, results = datetime.date.today().isoformat(), {}

    cfg = load_config("experiments/dp_base.yaml", [f"data.benchmark.num_clients={args.clients}",
                                                   f"federation.clients_per_round={args.clients}",
                                                   "training.pack=true", "lora.top_layers=1"])
    setup = prepare(cfg)
    start = setup.adapter.get()
    seeds = [derive_seed(cfg.seed, "client", 0, c) for c in range(args.clients)]
    data = [setup.train_sets[c] for c in range(args.clients)]
    row = _compare(lambda: torch.stack([r.delta for r in setup.trainer.train_clients(start, data, cfg.training.lr,
                                                                                     seeds)]), args.repeats)
    results["readout_speedup_dp_cohort"] = {**row, "date": today, "clients": args.clients}
    print(f"DP cohort call ({args.clients} clients, top layer, packed): plain "
          f"{statistics.median(row['plain_seconds']):.2f} s, read positions only "
          f"{statistics.median(row['read_seconds']):.2f} s: {row['value']:.2f}x; deltas apart by at most "
          f"{row['largest_difference']:.1e} (entries up to {row['largest_entry']:.2f})", flush=True)

    cfg = load_config("experiments/quickstart.yaml", [])
    setup = prepare(cfg)
    start = setup.adapter.get()
    row = _compare(lambda: setup.trainer.train(start, setup.train_sets[0], cfg.training.lr, seed=1).delta,
                   args.repeats)
    results["readout_speedup_quickstart_client"] = {**row, "date": today}
    print(f"quickstart client (4 steps, top 6 layers, packed): plain {statistics.median(row['plain_seconds']):.2f} s, "
          f"read positions only {statistics.median(row['read_seconds']):.2f} s: {row['value']:.2f}x; deltas apart "
          f"by at most {row['largest_difference']:.1e} (entries up to {row['largest_entry']:.2g})", flush=True)
    store(results)
    return results


if __name__ == "__main__":
    main()
