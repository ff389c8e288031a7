"""Greedy replies to the refusal probes three ways, in one run: transformers' `generate` in
batches of eval.batch_size (how fedsec decoded before), fedsec's decoding loop in token-budget
batches (`evaluation.generation_batches`), and the same loop with the frozen layers' prefill
kept (`fedsec.decoding`: the layers below the adapters computed once per batch of prompts).

experiments/malicious_base.yaml: SmolLM2-135M-Instruct, the adapter on the top 6 layers (its B
drawn non-zero with a fixed seed, so the adapted layers matter), its 40 probes, 24 new tokens.
Each way once uncounted (the kept way's first call computes the prefill it keeps), then
`--repeats` times in turn; the replies must be the same every way.

    python -m benchmarks.generation [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from benchmarks import store
from fedsec.config import load_config
from fedsec.devices import autocast, model_device
from fedsec.evaluation import greedy_replies, left_padded
from fedsec.setup import frozen_prefix, prepare


def generate_replies(model, tokenizer, prompts, max_new_tokens: int, batch_size: int) -> list[str]:
    """transformers' generate on left-padded batches of `batch_size` prompts."""
    pad, replies = tokenizer.pad_token_id, []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompts[start: start + batch_size], pad, model_device(model))
        with autocast(model):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        replies += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return replies


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cfg = load_config("experiments/malicious_base.yaml", ["training.pack=true"])
    setup = prepare(cfg)
    model, tokenizer, prompts = setup.model.eval(), setup.tokenizer, setup.probe_prompts
    with torch.no_grad():
        draw = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=draw)
    first, new, batch = frozen_prefix(model, cfg).first, cfg.eval.max_new_tokens, cfg.eval.batch_size
    ways = {"generate": lambda: generate_replies(model, tokenizer, prompts, new, batch),
            "loop": lambda: greedy_replies(model, tokenizer, prompts, new, batch),
            "kept": lambda: greedy_replies(model, tokenizer, prompts, new, batch, first)}
    replies = {name: way() for name, way in ways.items()}
    same = replies["loop"] == replies["generate"] and replies["kept"] == replies["generate"]
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            began = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - began)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    row = {"value": seconds["generate"] / seconds["kept"], "loop_speedup": seconds["generate"] / seconds["loop"],
           **{f"{name}_seconds": t for name, t in times.items()}, "prompts": len(prompts), "new_tokens": new,
           "frozen_layers": first, "same_replies": same, "date": datetime.date.today().isoformat()}
    store({"generation_kept_prefill_speedup": row})
    print(f"{len(prompts)} probes, {new} new tokens: generate (batches of {batch}) {seconds['generate']:.2f} s, "
          f"the loop in token-budget batches {seconds['loop']:.2f} s, with the frozen {first} layers' prefill "
          f"kept {seconds['kept']:.2f} s (medians of {args.repeats}): {row['value']:.2f}x; "
          f"the same replies every way: {same}")
    if not same:
        raise SystemExit("the replies differ between the ways")
    return row


if __name__ == "__main__":
    main()
