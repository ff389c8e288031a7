"""Many cheap clients: training examples per second in the DP sweep's regime.

One round of the DP sweep's client work (experiments/dp_sweep.yaml: SmolLM2-135M-Instruct,
rank-1 LoRA on the MLPs of the top 2 layers, clients of 4 examples taking one SGD
step each) done three ways in one process:

  plain    the full model per client (adapters on the top layers only, so the
           backward pass stops there, but every forward runs all 30 layers);
  cached   the 28 frozen layers computed once per example at setup and reused
           (lora.cache_frozen_layers), one client at a time;
  batched  cached, and all clients' single steps as one computation
           (LocalTrainer.train_clients).

Prints examples per second of each and the speed-ups; also the largest difference
between the batched and the one-at-a-time client deltas (tests check equality on
the tiny model: tests/test_cohort.py, tests/test_prefix.py).

    python -m benchmarks.many_clients [--clients 128] [--plain-clients 16]
    python -m benchmarks.many_clients --clients 1024     # a realistic DP cohort: stored as many_clients_speedup_1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from benchmarks import store
from fedsec.clients import client_update, client_updates
from fedsec.config import load_config
from fedsec.setup import prepare

SWEEP_SHAPE = [
    "name=many_clients", "model.name=smollm2-135m-instruct",
    "lora.rank=1", "lora.alpha=2", "lora.target_modules=[gate_proj,up_proj,down_proj]", "lora.top_layers=2",
    "data.benchmark.examples_per_client=4", "data.benchmark.size_alpha=0",
    "data.benchmark.test_size=3", "data.benchmark.client_test_size=0", "eval.clients=false",
    "training.optimizer=sgd", "training.local_steps=1", "training.batch_size=4", "training.lr=1.0",
    "training.min_lr=1.0", "training.max_grad_norm=1.0",
]


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=128, help="clients in the round")
    parser.add_argument("--plain-clients", type=int, default=16,
                        help="clients timed on the (slow) full-model path")
    args = parser.parse_args(argv)
    n = args.clients
    shape = [*SWEEP_SHAPE, f"data.benchmark.num_clients={n}", f"federation.clients_per_round={n}"]
    plain = prepare(load_config(None, shape))
    cached = prepare(load_config(None, [*shape, "lora.cache_frozen_layers=true"]))
    start = cached.adapter.get()
    clients = list(range(n))
    examples = sum(len(cached.train_sets[c]) for c in clients)
    few = clients[: args.plain_clients]
    few_examples = sum(len(plain.train_sets[c]) for c in few)

    client_update(plain, start, 0, 1.0, 0)  # warm-up (first calls allocate and import)
    client_updates(cached, start, clients[:8], 1.0, 0)
    t_plain, _ = _timed(lambda: [client_update(plain, start, c, 1.0, 0) for c in few])
    t_cached, one = _timed(lambda: [client_update(cached, start, c, 1.0, 0) for c in clients])
    t_batched, many = _timed(lambda: client_updates(cached, start, clients, 1.0, 0))
    rates = {"plain": few_examples / t_plain, "cached": examples / t_cached, "batched": examples / t_batched}
    diff = max(float((a.delta - b.delta).abs().max()) for a, b in zip(one, many))
    scale = max(float(a.delta.abs().max()) for a in one)
    row = {
        "clients": n, "examples": examples, "threads": torch.get_num_threads(),
        "examples_per_second": {k: round(v, 1) for k, v in rates.items()},
        "speedup_cached_over_plain": round(rates["cached"] / rates["plain"], 2),
        "speedup_batched_over_cached": round(rates["batched"] / rates["cached"], 2),
        "speedup_batched_over_plain": round(rates["batched"] / rates["plain"], 2),
        "max_abs_delta_difference": diff, "max_abs_delta": scale,
    }
    print(json.dumps(row, indent=2))
    key = "many_clients_speedup" if n == 128 else f"many_clients_speedup_{n}"  # 128: the headline's shape
    store({key: {"value": row["speedup_batched_over_plain"], **row, "date": datetime.date.today().isoformat()}})


if __name__ == "__main__":
    main()
