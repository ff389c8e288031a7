"""The frozen-prefix states in one call whose batches stay inside a client (what
in-process `prepare` computes), against one call per client (what a Flower SuperNode
computes for the clients it hosts), and against batches that cross clients (what
`prepare` computed before the two engines shared one encoder), and against the same
per-client batches packed behind their shared chat-template opening (training.pack, on by
default: the opening goes through the frozen layers once per row of up to 8 examples), and
those packed batches one forward at a time on all of torch's threads (fedsec until
2026-12-07) against one thread per forward, as many forwards at once as torch has threads
(`fedsec.prefix._side_by_side`, now on the CPU); then clients whose examples pack into one row
of the same width joined in one forward (`fedsec.prefix._join`, since 2026-12-07) against a
forward per client.

The DP sweep's shape (experiments/dp_base.yaml: SmolLM2-135M-Instruct, 4 examples per
client, the 28 frozen layers below the top 2) on `--clients` clients. Prints the three
times, and how many states of each are bit-identical to the per-client ones (float
matrix products batched differently differ in the last bits, and the layers carry the
difference on).

    python -m benchmarks.prefix_batching [--clients 160]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import time
from unittest import mock

import torch

import fedsec.prefix
from benchmarks import store
from fedsec.config import load_config
from fedsec.data import build_federated_data
from fedsec.models import load_model
from fedsec.objectives import objective_for
from fedsec.prefix import prefix_states
from fedsec.setup import frozen_prefix, train_set


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=160)
    args = parser.parse_args(argv)
    cfg = load_config("experiments/dp_base.yaml", [f"data.benchmark.num_clients={args.clients}"])
    data = build_federated_data(cfg.data, cfg.seed, cfg.task)
    model, tokenizer = load_model(cfg)
    pad, batch = tokenizer.pad_token_id, cfg.eval.batch_size
    objective = objective_for(cfg, pad)
    sets = [train_set(objective, c, tokenizer, cfg) for c in data.clients]
    first = frozen_prefix(model, cfg).first
    flat = [item for items in sets for item in items]
    with torch.inference_mode():
        prefix_states(model, flat[:batch], first, pad, batch)  # warm up
        began = time.perf_counter()
        grouped = prefix_states(model, flat, first, pad, batch, groups=[len(items) for items in sets])
        one_call = time.perf_counter() - began
        began = time.perf_counter()
        alone = [h for items in sets for h in prefix_states(model, items, first, pad, batch)]
        per_client = time.perf_counter() - began
        began = time.perf_counter()
        crossing = prefix_states(model, flat, first, pad, batch)
        across = time.perf_counter() - began
        prefix_states(model, flat[:batch], first, pad, batch, pack=True)  # its one check against plain
        began = time.perf_counter()
        packed = prefix_states(model, flat, first, pad, batch, groups=[len(items) for items in sets], pack=True)
        packed_seconds = time.perf_counter() - began
        packed_alone = [h for items in sets for h in prefix_states(model, items, first, pad, batch, pack=True)]
        with mock.patch.object(fedsec.prefix, "_side_by_side", lambda _model: contextlib.nullcontext(1)):
            began = time.perf_counter()
            one_at_a_time = prefix_states(model, flat, first, pad, batch, groups=[len(items) for items in sets],
                                          pack=True)
            serial_seconds = time.perf_counter() - began

        # one-row clients of one width joined in a forward (fedsec.prefix._join) against a forward per client
        with mock.patch.object(fedsec.prefix, "_join", lambda _m, _items, chunks, _size: [[c] for c in chunks]):
            began = time.perf_counter()
            unjoined = prefix_states(model, flat, first, pad, batch, groups=[len(items) for items in sets], pack=True)
            unjoined_seconds = time.perf_counter() - began

    side_same = sum(bool(torch.equal(a, b)) for a, b in zip(packed, one_at_a_time, strict=True))
    joined_same = sum(bool(torch.equal(a, b)) for a, b in zip(packed, unjoined, strict=True))

    def same(states):
        return sum(bool(torch.equal(a, b)) for a, b in zip(states, alone, strict=True))

    worst = max(float((a - b).abs().max()) for a, b in zip(crossing, alone))
    packed_worst = max(float((a - b).abs().max()) for a, b in zip(packed, alone))
    packed_same = sum(bool(torch.equal(a, b)) for a, b in zip(packed, packed_alone, strict=True))
    scale = max(float(h.abs().max()) for h in alone)
    print(f"{len(flat)} examples of {len(sets)} clients, batch {batch}: one call in per-client batches "
          f"{one_call:.1f} s ({same(grouped)}/{len(flat)} states bit-identical to per-client calls), "
          f"per-client calls {per_client:.1f} s, batches across clients {across:.1f} s "
          f"({same(crossing)}/{len(flat)} identical, largest difference {worst:.2e}); "
          f"per-client batches / across {one_call / across:.2f}x; packed per-client batches "
          f"{packed_seconds:.1f} s ({packed_same}/{len(flat)} bit-identical to packed per-client calls, "
          f"largest difference to plain {packed_worst:.2e} of states up to {scale:.0f}): "
          f"plain / packed {one_call / packed_seconds:.2f}x; packed one forward at a time on "
          f"{torch.get_num_threads()} threads {serial_seconds:.1f} s, side by side on one thread each "
          f"{serial_seconds / packed_seconds:.2f}x faster ({side_same}/{len(flat)} states the same bits); "
          f"one-row clients of one width joined {unjoined_seconds / packed_seconds:.2f}x faster than a forward "
          f"per client ({joined_same}/{len(flat)} the same bits)")
    today = datetime.date.today().isoformat()
    results = {"prefix_per_client_over_batched": {"value": one_call / across, "date": today,
                                                  "examples": len(flat), "identical_states": same(grouped),
                                                  "identical_states_across_clients": same(crossing),
                                                  "largest_difference_across_clients": worst},
               "prefix_plain_over_packed": {"value": one_call / packed_seconds, "date": today,
                                            "examples": len(flat), "identical_to_per_client_packed": packed_same,
                                            "largest_difference_to_plain": packed_worst,
                                            "largest_state": scale},
               "prefix_side_by_side_speedup": {"value": serial_seconds / packed_seconds, "date": today,
                                               "examples": len(flat), "threads": torch.get_num_threads(),
                                               "identical_states": side_same},
               "prefix_joined_rows_speedup": {"value": unjoined_seconds / packed_seconds, "date": today,
                                              "examples": len(flat), "identical_states": joined_same}}
    store(results)
    return results


if __name__ == "__main__":
    main()
