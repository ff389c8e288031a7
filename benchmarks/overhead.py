"""Federated overhead and training efficiency, measured in one process.

overhead  wall time of a fedsec round (sampling, client training, sanitize, aggregate,
          server step, metrics, checkpoint; no evaluation that round) divided by the
          time of the same local training steps in a bare PEFT loop: the same model
          with the same LoRA layers, the same clients, batches (same examples, same
          padding), optimizer (AdamW) and steps, written the plain way: the model's own
          forward with `labels` (SFT) or log-softmax over all logits (DPO), loss,
          backward, step. A round is timed between the loop's consecutive round lines
          (log callback after the checkpoint), the median over the rounds without
          evaluation.
flops     achieved FLOP/s of one local training step (forward and backward as run,
          counted by torch.utils.flop_counter) over the FLOP/s of a 2048 x 2048 fp32
          matrix product measured just before it (the machine's practical peak), the
          median over 5 interleaved repetitions; fedsec's step packed and unpacked, one
          step of the shape's 4 clients in lockstep (training.lockstep), and the bare PEFT
          loop's step on the same batch (what the plain way reaches here).
          The same for the DP sweep's batched cohort call (128 one-step clients), plain
          and packed.

    python -m benchmarks.overhead [--models tiny,smollm2] [--tasks sft,dpo]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import store
from fedsec.config import load_config
from fedsec.encoding import IGNORE, collate
from fedsec.loop import run_experiment
from fedsec.seeding import derive_seed
from fedsec.setup import prepare
from fedsec.training import BatchStream

MODELS = {"tiny": "tiny", "smollm2": "smollm2-135m-instruct"}


def shape(model: str, task: str, out: str) -> list[str]:
    """Four clients, every one every round, two AdamW steps of batch 8 each; adapters on
    q and v of every layer (no frozen-prefix cache: both sides run the whole model).
    The tiny model's rounds take a tenth of a second, so it runs 12 of them (4 on SmolLM2)."""
    return [f"name=overhead-{model}-{task}", f"model.name={MODELS[model]}", f"task={task}", f"output_dir={out}",
            "lora.rank=8", "lora.alpha=16", "lora.target_modules=[q_proj,v_proj]",
            "data.benchmark.num_clients=4", "data.benchmark.examples_per_client=24", "data.benchmark.size_alpha=0",
            "data.benchmark.test_size=12", "data.benchmark.client_test_size=0", "eval.clients=false",
            "eval.every=1000", f"federation.rounds={12 if model == 'tiny' else 4}", "federation.clients_per_round=4",
            "training.local_steps=2", "training.batch_size=8", "training.lr=1e-4", "training.min_lr=1e-4",
            "keep_checkpoints=1"]


def fedsec_round_seconds(cfg, out: Path) -> float:
    stamps: list[float] = []
    run_experiment(cfg, out=out, progress=False, log=lambda _line: stamps.append(time.perf_counter()))
    rounds = [b - a for a, b in zip(stamps, stamps[1:])][:-1]  # the last round evaluates
    return statistics.median(rounds)


def bare_peft_seconds(cfg, setup, repeats: int = 2) -> float:
    """The round's client work as a plain PEFT loop on the Setup's model and data."""
    model, pad = setup.model, setup.pad_id
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    t = cfg.training
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        model.train()
        for client in range(len(setup.train_sets)):
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
            stream = BatchStream(setup.train_sets[client], t.batch_size,
                                 torch.Generator().manual_seed(derive_seed(cfg.seed, "client", 0, client)))
            for _step in range(t.local_steps):
                batch = stream.next()
                loss = _dpo_loss(model, batch, pad, cfg.dpo.beta) if cfg.task == "dpo" else _sft_loss(model, batch, pad)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        model.eval()
        times.append(time.perf_counter() - began)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    return statistics.median(times)


def _sft_loss(model, items, pad: int) -> torch.Tensor:
    b = collate(items, pad)
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss


def _sequence_logps(model, items, pad: int) -> torch.Tensor:
    b = collate(items, pad)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def _dpo_loss(model, pairs, pad: int, beta: float) -> torch.Tensor:
    n = len(pairs)
    logps = _sequence_logps(model, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad)
    ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
    margin = (logps[:n] - ref[:n]) - (logps[n:] - ref[n:])
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - began)
    return 2 * n ** 3 / statistics.median(times)


def fraction_of_peak(run: Callable[[], object], repeats: int) -> dict:
    """`run` once uncounted (one-time checks, e.g. a trainer's first packed step runs the packing
    check's two more forwards, which are not the step's FLOPs), once under the FLOP counter, then
    `repeats` times each just after a matmul peak (interleaved, so a change of the machine's
    clock moves both); the fraction is the median of the repetitions' own ratios."""
    from torch.utils.flop_counter import FlopCounterMode

    run()
    with FlopCounterMode(display=False) as counter:
        run()
    flops, times, peaks = float(counter.get_total_flops()), [], []
    for _ in range(repeats):
        peaks.append(matmul_peak(repeats=5))
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    fractions = [flops / t / p for t, p in zip(times, peaks)]
    return {"value": statistics.median(fractions), "fractions": fractions, "step_flops": flops,
            "step_seconds": times, "peak_flops": peaks}


def step_flops(cfg, setup, repeats: int = 5) -> dict:
    """One local step of client 0 (`fraction_of_peak`)."""
    trainer = setup.trainer
    trainer.cfg = dataclasses.replace(cfg.training, local_steps=1)
    start = setup.adapter.get()
    seed = derive_seed(cfg.seed, "client", 0, 0)
    try:
        return fraction_of_peak(lambda: trainer.train(start, setup.train_sets[0], cfg.training.lr, seed), repeats)
    finally:
        trainer.cfg = cfg.training


def lockstep_step_flops(cfg, setup, repeats: int = 5) -> dict:
    """One local step of all the round's clients trained in lockstep (training.lockstep, fedsec.lockstep:
    one forward and backward for their batches, each client its own adapter copy and AdamW state)."""
    trainer = setup.trainer
    trainer.cfg = dataclasses.replace(cfg.training, local_steps=1, lockstep=True)
    start = setup.adapter.get()
    clients = range(len(setup.train_sets))
    seeds = [derive_seed(cfg.seed, "client", 0, c) for c in clients]
    datasets = [setup.train_sets[c] for c in clients]
    try:
        return fraction_of_peak(functools.partial(trainer.train_clients, start, datasets, cfg.training.lr, seeds),
                                repeats)
    finally:
        trainer.cfg = cfg.training


def bare_step_flops(cfg, setup, repeats: int = 5) -> dict:
    """`step_flops` for the bare PEFT loop's step on the same batch (client 0's first: the
    model's own forward with `labels`, every position through the LM head, backward, AdamW):
    what the plain way reaches on this CPU, beside fedsec's step."""
    model, pad = setup.model, setup.pad_id
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    batch = BatchStream(setup.train_sets[0], cfg.training.batch_size,
                        torch.Generator().manual_seed(derive_seed(cfg.seed, "client", 0, 0))).next()

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)

    def step() -> None:
        restore()
        optimizer = torch.optim.AdamW(params, lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
        _sft_loss(model, batch, pad).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    try:
        return fraction_of_peak(step, repeats)
    finally:
        model.eval()
        restore()


def cohort_flops(clients: int = 128, repeats: int = 3) -> dict:
    """The DP sweep's batched cohort call (experiments/dp_base.yaml, `clients` one-step clients
    of 4 examples in one `train_clients`), plain rows and packed: FLOPs as run (the
    per-sample gradients included), seconds, and the fraction of a matmul peak measured just
    before each call (`fraction_of_peak`)."""
    out = {}
    for pack in (False, True):
        cfg = load_config("experiments/dp_base.yaml", [f"data.benchmark.num_clients={clients}",
                                                       f"federation.clients_per_round={clients}",
                                                       f"training.pack={str(pack).lower()}"])
        setup = prepare(cfg)
        start = setup.adapter.get()
        seeds = [derive_seed(cfg.seed, "client", 0, c) for c in range(clients)]
        datasets = [setup.train_sets[c] for c in range(clients)]
        m = fraction_of_peak(functools.partial(setup.trainer.train_clients, start, datasets, cfg.training.lr, seeds),
                             repeats)
        row = out["packed" if pack else "plain"] = {"value": m["value"], "fractions": m["fractions"],
                                                    "flops": m["step_flops"], "seconds": m["step_seconds"]}
        print(f"dp cohort ({clients} clients, {'packed' if pack else 'plain'}): {row['flops'] / 1e9:.1f} GFLOP in "
              f"{statistics.median(row['seconds']):.2f} s: {row['value']:.2f} of the peak "
              f"(median of {', '.join(f'{f:.2f}' for f in row['fractions'])})", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--tasks", default="sft,dpo")
    parser.add_argument("--out", default="/tmp/fedsec-bench-overhead")
    parser.add_argument("--cohort", type=int, default=128, help="clients in the DP cohort FLOP/s call (0: skip)")
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    results: dict = {}
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3): {peak / 1e9:.1f} GFLOP/s")
    for model in args.models.split(","):
        for task in args.tasks.split(","):
            cfg = load_config(None, shape(model, task, args.out))
            stamp = datetime.datetime.now().strftime("%H%M%S%f")
            fed = fedsec_round_seconds(cfg, Path(args.out) / f"{model}-{task}-{stamp}")
            setup = prepare(cfg)
            bare = bare_peft_seconds(cfg, setup, repeats=7 if model == "tiny" else 2)
            ratio = fed / bare
            row = {"value": ratio, "fedsec_round_seconds": fed, "bare_peft_seconds": bare, "date": today}
            key = f"overhead_ratio_{model}" + ("" if task == "sft" else "_dpo")
            results[key] = row
            print(f"{model} {task}: fedsec round {fed:.2f} s, bare PEFT loop {bare:.2f} s, ratio {ratio:.3f}")
            if model == "smollm2" and task == "sft":
                unpacked = load_config(None, shape(model, task, args.out) + ["training.pack=false"])
                # packed is the default; unpacked rows and the bare loop's step beside it
                for kind in ("packed", "lockstep", "unpacked", "bare_loop"):
                    step = (step_flops(cfg, setup) if kind == "packed" else bare_step_flops(cfg, setup)
                            if kind == "bare_loop" else lockstep_step_flops(cfg, setup) if kind == "lockstep"
                            else step_flops(unpacked, prepare(unpacked)))
                    key = "flops_fraction_smollm2" + ("" if kind == "packed" else f"_{kind}")
                    results[key] = {**step, "date": today}
                    seconds, peaks = statistics.median(step["step_seconds"]), statistics.median(step["peak_flops"])
                    print(f"smollm2 sft step ({kind}): {step['step_flops'] / 1e9:.1f} "
                          f"GFLOP in {seconds:.2f} s (median) = {step['step_flops'] / seconds / 1e9:.1f} GFLOP/s "
                          f"against peaks of {peaks / 1e9:.1f} GFLOP/s (median) measured before each step: "
                          f"{step['value']:.2f} of the peak (median of "
                          f"{', '.join(f'{f:.2f}' for f in step['fractions'])})")
    if args.cohort:
        cohort = cohort_flops(args.cohort)
        for kind, row in cohort.items():
            results[f"flops_fraction_dp_cohort_{kind}"] = {**row, "clients": args.cohort, "date": today}
    store(results)
    return results


if __name__ == "__main__":
    main()
