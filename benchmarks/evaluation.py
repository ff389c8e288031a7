"""What evaluating the global model costs against the round it follows (issue 12's target:
at most 10% of the round time on the embedded default).

The quickstart experiment (SmolLM2-135M-Instruct, 8 clients x 4 AdamW steps of batch 8,
adapters on the top 6 layers over the cached frozen prefix) times, in one process:

  round      the 8 clients' local training from the global adapter (what a round is);
  eval       the run's evaluation (global test set of 120 and each client's test set,
             label log-likelihood, frozen prefix reused, items packed behind their shared
             opening), run every eval.every = 2 rounds;
  benchmark  the same 120 global test items as an eval.benchmarks `choice` benchmark
             (fedsec.evalsuite; its scoring sequences get the frozen-prefix states at setup
             and are packed the same way).

Prints each and the share of a round they cost when run every k rounds.

    python -m benchmarks.evaluation
"""

from __future__ import annotations

import datetime
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import store
from fedsec.clients import client_updates
from fedsec.config import load_config
from fedsec.round_eval import evaluate_model
from fedsec.setup import build_federation, prepare
from fedsec.training import round_lr


def _timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    base = ["name=eval_cost", "federation.local_only_clients=0"]
    cfg = load_config("experiments/quickstart.yaml", base)
    data = build_federation(cfg).data
    with tempfile.TemporaryDirectory() as tmp:
        items = Path(tmp) / "global_test.jsonl"
        items.write_text("".join(json.dumps({"prompt": ex.prompt, "choices": list(data.choices),
                                             "answer": ex.response}) + "\n" for ex in data.global_test))
        cfg = load_config("experiments/quickstart.yaml",
                          base + [f"eval.benchmarks=[{{name: choice, source: {items}}}]"])
        setup = prepare(cfg)
    start, clients = setup.adapter.get(), list(range(len(setup.train_sets)))
    lr = round_lr(cfg.training, 0, cfg.federation.rounds)
    client_updates(setup, start, clients, lr, 0)  # warm-up
    t_round = _timed(lambda: client_updates(setup, start, clients, lr, 0))
    t_eval = _timed(lambda: evaluate_model(setup, start))
    t_both = _timed(lambda: evaluate_model(setup, start, 0))  # round 0: the benchmark is due
    t_bench = t_both - t_eval
    every = cfg.eval.every
    row = {"round_seconds": round(t_round, 2), "eval_seconds": round(t_eval, 2),
           "benchmark_seconds": round(t_bench, 2), "benchmark_items": len(setup.tasks[0].items),
           "eval_every": every, "threads": torch.get_num_threads(),
           "eval_fraction_every_k": round(t_eval / every / t_round, 4),
           "eval_fraction_every_round": round(t_eval / t_round, 4),
           "benchmark_fraction_every_k": round(t_bench / every / t_round, 4)}
    print(json.dumps(row, indent=2))
    store({"eval_cost_fraction": {"value": row["eval_fraction_every_k"], **row,
                                  "date": datetime.date.today().isoformat()}})


if __name__ == "__main__":
    main()
