"""Packed training (training.pack) against plain batches, in one process.

The quickstart's shape (experiments/quickstart.yaml: SmolLM2-135M-Instruct, the frozen
prefix cached, adapters on the top 6 layers, batches of 8) on its first clients: the
token positions a local update puts through the adapted layers, the update's seconds
(median of 3), and the largest difference between the two updates. The DP sweep's base
(experiments/dp_base.yaml, batches of 4) is counted too: its positions per example-step
with and without packing, from the same batches; and its one-step clients' batched cohort
path is timed on one round's worth of clients (--cohort, all in one call of
`train_clients`, median of 3), plain rows (one per example) against packed rows (one per
client, its batch behind their shared opening).

Long items (--long-words): a batch of 8 SFT examples whose prompts are far longer than
their shared opening, on SmolLM2 (adapters on the top 6 layers, no frozen-prefix cache),
one forward and backward timed (median of 3) in three layouts: one packed row (what
training.pack did before its rows were planned), the rows `encoding.pack_rows` plans, and a
plain batch.

    python -m benchmarks.packing [--clients 2] [--cohort 128] [--long-words 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks import store
from fedsec.config import load_config
from fedsec.models import load_model
from fedsec.objectives import collate_as, objective_for
from fedsec.seeding import derive_seed
from fedsec.setup import build_federation, prepare, train_set
from fedsec.training import BatchStream, completion_loss, record_tokens


def positions_ratio(path: str, clients: int = 64) -> dict:
    """Plain / packed token positions over each client's first local steps' batches (packed
    as training packs them on the model: objective.positions)."""
    cfg = load_config(path, ["training.pack=true"])
    federation = build_federation(cfg)
    model, tokenizer = load_model(cfg)
    objective = objective_for(cfg, tokenizer.pad_token_id)
    plain = packed = 0
    for client in federation.data.clients[:clients]:
        items = train_set(objective, client, tokenizer, cfg)
        stream = BatchStream(items, cfg.training.batch_size, torch.Generator().manual_seed(0))
        for _ in range(cfg.training.local_steps):
            batch = stream.next()
            plain += record_tokens(batch)
            packed += objective.positions(model, batch)
    return {"plain_positions": plain, "packed_positions": packed, "ratio": plain / packed}


def timed_updates(clients: int) -> dict:
    cfg = load_config("experiments/quickstart.yaml", [f"data.benchmark.num_clients={clients}",
                                                      f"federation.clients_per_round={clients}",
                                                      "federation.local_only_clients=0"])
    setups = {}
    for pack in (False, True):
        setups[pack] = prepare(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, pack=pack)))
    start = setups[False].adapter.get()
    row = {}
    for pack, setup in setups.items():
        seconds, tokens, deltas = [], 0, []
        for c in range(clients):
            seed = derive_seed(cfg.seed, "client", 0, c)
            setup.trainer.train(start, setup.train_sets[c], cfg.training.lr, seed)  # warm-up (the packing check)
            times = []
            for _ in range(3):
                began = time.perf_counter()
                result = setup.trainer.train(start, setup.train_sets[c], cfg.training.lr, seed)
                times.append(time.perf_counter() - began)
            seconds.append(statistics.median(times))
            tokens += result.tokens
            deltas.append(result.delta)
        row["packed" if pack else "plain"] = {"seconds": sum(seconds), "positions": tokens, "deltas": deltas}
    plain, packed = row["plain"], row["packed"]
    diff = max(float((a - b).abs().max()) for a, b in zip(plain["deltas"], packed["deltas"]))
    scale = max(float(a.abs().max()) for a in plain["deltas"])
    return {"clients": clients, "plain_seconds": plain["seconds"], "packed_seconds": packed["seconds"],
            "speedup": plain["seconds"] / packed["seconds"], "plain_positions": plain["positions"],
            "packed_positions": packed["positions"], "positions_ratio": plain["positions"] / packed["positions"],
            "max_abs_delta_difference": diff, "max_abs_delta": scale, "threads": torch.get_num_threads()}


def timed_cohort(clients: int) -> dict:
    """The DP sweep's base, `clients` one-step clients in one batched call: plain and packed."""
    cfg = load_config("experiments/dp_base.yaml", [f"data.benchmark.num_clients={clients}",
                                                   f"federation.clients_per_round={clients}"])
    row = {}
    for pack in (False, True):
        setup = prepare(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, pack=pack)))
        start = setup.adapter.get()
        start = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0))  # B != 0
        seeds = [derive_seed(cfg.seed, "client", 0, c) for c in range(clients)]
        datasets = [setup.train_sets[c] for c in range(clients)]
        assert setup.trainer.one_step_batchable
        results = setup.trainer.train_clients(start, datasets, cfg.training.lr, seeds)  # warm-up
        times = []
        for _ in range(3):
            began = time.perf_counter()
            results = setup.trainer.train_clients(start, datasets, cfg.training.lr, seeds)
            times.append(time.perf_counter() - began)
        row[pack] = {"seconds": statistics.median(times), "positions": sum(r.tokens for r in results),
                     "deltas": torch.stack([r.delta for r in results])}
    plain, packed = row[False], row[True]
    return {"clients": clients, "plain_seconds": plain["seconds"], "packed_seconds": packed["seconds"],
            "speedup": plain["seconds"] / packed["seconds"], "plain_positions": plain["positions"],
            "packed_positions": packed["positions"], "positions_ratio": plain["positions"] / packed["positions"],
            "max_abs_delta_difference": float((plain["deltas"] - packed["deltas"]).abs().max()),
            "max_abs_delta": float(plain["deltas"].abs().max()), "threads": torch.get_num_threads()}


def long_items(words: int, out: Path, batch: int = 8) -> dict:
    """One SFT forward and backward of `batch` long examples (prompts of `words` words behind
    the chat template's opening) on SmolLM2: one packed row, the planned rows, a plain batch."""
    rng = random.Random(0)
    vocabulary = ("market river signal harvest copper lantern orbit meadow ledger canyon velvet "
                  "quarry beacon summit tide parcel ember grove ferry saddle").split()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "long.jsonl"
    with path.open("w") as f:
        for _ in range(4 * batch):
            prompt = " ".join(rng.choice(vocabulary) for _ in range(words))
            f.write(json.dumps({"prompt": f"Summarise: {prompt}", "response": "A short summary."}) + "\n")
    cfg = load_config(None, [
        "model.name=smollm2-135m-instruct", f"data.source={path}", "data.max_length=2048", "data.test_fraction=0.1",
        "data.client_test_fraction=0", "data.partition.scheme=iid", "data.partition.num_clients=1",
        "federation.clients_per_round=1", "federation.local_only_clients=0", "lora.top_layers=6",
        "lora.cache_frozen_layers=false", "eval.clients=false", f"training.batch_size={batch}", f"output_dir={out}"])
    setup = prepare(cfg)
    model, objective = setup.model, setup.trainer.objective
    items = list(setup.train_sets[0][:batch])
    planned = objective.packing(model, items)
    shared = objective.shared_width(model, items)
    layouts = {"one_row": (shared, [len(items)]), "planned": planned, "plain": None}
    row: dict = {"items": len(items), "shared": shared, "lengths": [int(i.input_ids.numel()) for i in items],
                 "planned_rows": planned[1] if planned else [1] * len(items)}
    model.train()
    for name, packing in layouts.items():
        times = []
        for _ in range(4):  # the first is a warm-up
            for p in setup.adapter.params:
                p.grad = None
            began = time.perf_counter()
            loss, _ = completion_loss(model, collate_as(items, objective.pad_id, packing))
            loss.backward()
            times.append(time.perf_counter() - began)
        row[f"{name}_seconds"] = statistics.median(times[1:])
    model.eval()
    row["speedup_over_one_row"] = row["one_row_seconds"] / row["planned_seconds"]
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2, help="quickstart clients whose updates are timed")
    parser.add_argument("--cohort", type=int, default=128, help="DP sweep clients in the timed batched call")
    parser.add_argument("--only-cohort", action="store_true", help="time the batched cohort path only")
    parser.add_argument("--long-words", type=int, default=300, help="words per long prompt (0: skip)")
    parser.add_argument("--only-long", action="store_true", help="time the long items only")
    parser.add_argument("--out", default="/tmp/fedsec-bench-packing")
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    results = {}
    if args.long_words:
        long = long_items(args.long_words, Path(args.out))
        print(json.dumps({"long_items": long}, indent=2))
        results["packed_long_items_speedup"] = {"value": long["speedup_over_one_row"], **long, "date": today}
        if args.only_long:
            store(results)
            return results
    if not args.only_cohort:
        quick = positions_ratio("experiments/quickstart.yaml")
        sweep = positions_ratio("experiments/dp_base.yaml")
        timed = timed_updates(args.clients)
        print(json.dumps({"quickstart": quick, "dp_sweep": sweep, "timed": timed}, indent=2))
        results.update({
            "packed_positions_ratio_quickstart": {"value": quick["ratio"], **quick, "date": today},
            "packed_positions_ratio_dp_sweep": {"value": sweep["ratio"], **sweep, "date": today},
            "packed_update_speedup_quickstart": {"value": timed["speedup"], **timed, "date": today},
        })
    cohort = timed_cohort(args.cohort)
    print(json.dumps({"cohort": cohort}, indent=2))
    results["packed_cohort_speedup_dp_sweep"] = {"value": cohort["speedup"], **cohort, "date": today}
    store(results)
    return results


if __name__ == "__main__":
    main()
