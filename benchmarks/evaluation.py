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

Then the untuned evaluation a sweep's runs repeat (`untuned_eval_second_run_fraction`): two
runs of the malicious grid's base (experiments/malicious_base.yaml: 40 refusal probes answered
greedily, 120 test headlines), set up one after the other in one process as a sweep does and
differing in their training only, each evaluate their untuned model at round 0; the second
takes the probes' replies from the first (fedsec.round_eval.probe_replies). The figure is
the second evaluation's time over the first's.

    python -m benchmarks.evaluation [--part cost,untuned]
"""

from __future__ import annotations

import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import store
from fedsec import evaluation, lmhead, merged
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


def head_per_forward(fn):
    """fn() with the LM head run once per forward (evaluation.HEAD_ROWS 1), as before 2026-12-06."""
    rows, evaluation.HEAD_ROWS = evaluation.HEAD_ROWS, 1
    try:
        return fn()
    finally:
        evaluation.HEAD_ROWS = rows


def plain_head(fn):
    """fn() with the LM head's [N, vocab] log-distributions computed whole (training.head_scores
    without fedsec.lmhead's blocks), as before 2026-12-07."""
    blockable, lmhead.blockable = lmhead.blockable, lambda *args: False
    try:
        return fn()
    finally:
        lmhead.blockable = blockable


def unmerged(fn):
    """fn() with the adapted layers' LoRA branches run at every call (fedsec.merged off), as
    before 2026-12-07's merged evaluation."""
    budget, merged.MERGE_BYTES = merged.MERGE_BYTES, 0
    try:
        return fn()
    finally:
        merged.MERGE_BYTES = budget


def untuned_repeat() -> dict:
    """Seconds of the round-0 evaluation in a sweep's first and second run (see the docstring)."""
    seconds, rates = [], []
    for lr in ("1e-3", "5e-4"):
        cfg = load_config("experiments/malicious_base.yaml", ["training.pack=true", f"training.lr={lr}"])
        setup = prepare(cfg)
        started = time.perf_counter()
        global_eval, _ = evaluate_model(setup, setup.adapter.get(), 0)
        seconds.append(time.perf_counter() - started)
        rates.append(global_eval["refusal_rate"])
    assert rates[0] == rates[1], rates  # the same untuned model: the same replies
    row = {"first_run_seconds": round(seconds[0], 2), "second_run_seconds": round(seconds[1], 2),
           "probes": len(setup.probe_prompts), "threads": torch.get_num_threads()}
    print(json.dumps(row, indent=2))
    return {"value": round(seconds[1] / seconds[0], 3), **row}


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="cost,untuned")
    parts = parser.parse_args(argv).part.split(",")
    today = datetime.date.today().isoformat()
    if "untuned" in parts:
        store({"untuned_eval_second_run_fraction": {**untuned_repeat(), "date": today}})
    if "cost" in parts:
        eval_cost()


def eval_cost() -> None:
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
    evaluate_model(setup, start, 0)
    # round, evaluation and the evaluation with the benchmark in turn, 5 times: this machine's
    # speed drifts by a third within minutes, so the share is the median of each turn's own
    # ratio, never a ratio of times taken minutes apart
    turns = [(_timed(lambda: client_updates(setup, start, clients, lr, 0), 1),
              _timed(lambda: evaluate_model(setup, start), 1),
              _timed(lambda: evaluate_model(setup, start, 0), 1),  # round 0: the benchmark is due
              _timed(lambda: head_per_forward(lambda: evaluate_model(setup, start)), 1),
              _timed(lambda: plain_head(lambda: evaluate_model(setup, start)), 1),
              _timed(lambda: unmerged(lambda: evaluate_model(setup, start)), 1))
             for _ in range(5)]
    t_round, t_eval, t_both = (statistics.median(t[k] for t in turns) for k in range(3))
    every = cfg.eval.every
    shares = sorted(e / every / r for r, e, *_ in turns)
    row = {"round_seconds": round(t_round, 2), "eval_seconds": round(t_eval, 2),
           "benchmark_seconds": round(t_both - t_eval, 2), "benchmark_items": len(setup.tasks[0].items),
           "eval_every": every, "threads": torch.get_num_threads(),
           "eval_fraction_every_k": round(statistics.median(shares), 4),
           "eval_fraction_every_k_range": [round(shares[0], 4), round(shares[-1], 4)],
           "eval_fraction_every_round": round(statistics.median(e / r for r, e, *_ in turns), 4),
           "benchmark_fraction_every_k": round(statistics.median((b - e) / every / r for r, e, b, *_ in turns), 4),
           # the same evaluation with one LM-head call per forward (before 2026-12-06's HEAD_ROWS)
           "eval_over_head_per_forward": round(statistics.median(e / h for _, e, _, h, *_ in turns), 4),
           # the same evaluation with the head's log-distributions whole (before 2026-12-07's blocks)
           "eval_over_plain_head": round(statistics.median(e / p for _, e, _, _, p, _ in turns), 4),
           # the same evaluation with the LoRA branches run at every call (before 2026-12-07's merging)
           "eval_over_unmerged": round(statistics.median(e / u for _, e, *_, u in turns), 4)}
    print(json.dumps(row, indent=2))
    store({"eval_cost_fraction": {"value": row["eval_fraction_every_k"], **row,
                                  "date": datetime.date.today().isoformat()}})


if __name__ == "__main__":
    main()
