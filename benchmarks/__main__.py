"""Every benchmark, one after the other, each in a fresh process: `python -m benchmarks`.

Each writes its figures into benchmarks/results.json (with the date measured); this
runner then prints the headline ratios and rewrites the "Latest run" table at the top
of benchmarks/RESULTS.md (the analysis below it is kept). About 30 minutes on a
2-core CPU, half of it `make demo` from a fresh clone (benchmarks.demo; `--only` skips it).

    python -m benchmarks [--only overhead,accounting]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("accounting", "overhead", "packing", "many_clients", "memory_clients", "file_clients", "evaluation",
         "generation", "server_pipeline", "prefix_batching", "flower_round", "demo",
         "gpu")  # gpu: says so and exits 0 without CUDA
ARGS = {"memory_clients": ["--clients", "10", "1000", "10000"]}
HEADLINES = (  # key, what it is, target
    ("overhead_ratio_tiny", "fedsec round / bare PEFT loop, tiny, SFT", "<= 1.05"),
    ("overhead_ratio_tiny_dpo", "fedsec round / bare PEFT loop, tiny, DPO", "<= 1.05"),
    ("overhead_ratio_smollm2", "fedsec round / bare PEFT loop, SmolLM2, SFT", "<= 1.05"),
    ("overhead_ratio_smollm2_dpo", "fedsec round / bare PEFT loop, SmolLM2, DPO", "<= 1.05"),
    ("flops_fraction_smollm2", "achieved FLOP/s of a SmolLM2 step (packed, the default) / fp32 matmul peak",
     ">= 0.8"),
    ("flops_fraction_smollm2_lockstep", "the same, the round's 4 clients' step in lockstep (training.lockstep)",
     ">= 0.8"),
    ("flops_fraction_smollm2_unpacked", "the same, one example per row", ">= 0.8"),
    ("flops_fraction_smollm2_bare_loop", "the same batch's step in the bare PEFT loop (the plain way, for reference)",
     "-"),
    ("flops_fraction_dp_cohort_packed", "the same, the DP sweep's batched cohort call (128 clients, packed)",
     ">= 0.8"),
    ("packed_positions_ratio_quickstart", "token positions through the adapted layers, plain / packed, quickstart",
     ">= 1.5"),
    ("packed_positions_ratio_dp_sweep", "the same, the DP sweep's base", ">= 1.5"),
    ("packed_long_items_speedup", "a batch of 8 long examples: one packed row's time / the planned rows'", "-"),
    ("many_clients_speedup", "examples/s, batched cached clients / plain path", "-"),
    ("prefix_joined_rows_speedup", "frozen prefix of the DP sweep's clients: a forward each / one-row clients of "
     "one width joined", "-"),
    ("memory_ratio_10_to_10000_clients", "peak RSS, 10,000 / 10 total clients", "<= 1.1"),
    ("file_memory_ratio_100_to_100000_clients", "peak RSS, 100,000 / 100 clients from a file, natural split",
     "<= 1.2"),
    ("eval_cost_fraction", "evaluation every eval.every rounds / round time, SmolLM2 quickstart", "<= 0.1"),
    ("generation_kept_prefill_speedup", "the refusal probes' greedy replies, SmolLM2: generate in batches of "
     "eval.batch_size / fedsec.decoding with the frozen layers' prefill kept (the same replies)", "-"),
    ("flower_round_ratio", "Flower round (2 SuperNodes) / in-process round, SmolLM2", "<= 1.5"),
    ("untuned_eval_second_run_fraction", "a sweep's second run's untuned evaluation / its first's, "
     "malicious grid base (refusal probes)", "-"),
    ("demo_minutes", "make demo from a fresh clone, minutes", "<= 15"),
)
BEGIN, END = "<!-- latest run: written by python -m benchmarks -->", "<!-- end of latest run -->"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(ORDER)}")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(ORDER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    began = time.perf_counter()
    for k, name in enumerate(chosen, 1):
        print(f"[{k}/{len(chosen)}] benchmarks.{name}", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *ARGS.get(name, [])],
                              cwd=HERE.parent, env=env)
        if done.returncode != 0:
            print(f"benchmarks.{name} failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
        print(f"[{k}/{len(chosen)}] {name}: {time.perf_counter() - started:.0f} s", flush=True)
    results = json.loads((HERE / "results.json").read_text())
    table = latest_table(results, time.perf_counter() - began, chosen)
    print(table)
    write_latest(HERE / "RESULTS.md", table)
    return 0


def latest_table(results: dict, seconds: float, chosen: list[str]) -> str:
    rows = ["| figure | value | target | measured |", "|---|---|---|---|"]
    for key, what, target in HEADLINES:
        if key in results:
            rows.append(f"| {what} (`{key}`) | {results[key]['value']:.3f} | {target} | {results[key]['date']} |")
    server = results.get("server_seconds_n100_d4m")
    if server:
        targets = server.get("targets", {})
        for rule, s in server["value"].items():
            target = f"<= {targets[rule]} passes" if rule in targets else "-"
            rows.append(f"| server pipeline, {rule}, n 100, d 4M (`server_seconds_n100_d4m`) | {s:.2f} s "
                        f"({server['passes'][rule]:.1f} passes) | {target} | {server['date']} |")
    for key in sorted(k for k in results if k.startswith("calibration_seconds_")):
        rows.append(f"| {key.replace('_', ' ')} (`{key}`) | {results[key]['value']:.2f} s | - | "
                    f"{results[key]['date']} |")
    ledger = results.get("ledger_round_seconds")
    if ledger:
        ours = sum(ledger[a] for a in ("rdp", "prv", "pld"))
        theirs = ledger["opacus_rdp"] + ledger["opacus_prv"] + ledger.get("dp_accounting_pld", ledger["pld"])
        rows.append(f"| a DP ledger's round, rdp + prv + pld side by side, sigma 0.729, q 0.1 "
                    f"(`ledger_round_seconds`) | {ours * 1e3:.0f} ms (the libraries asked directly: "
                    f"{theirs * 1e3:.0f} ms) | - | {ledger['date']} |")
    stamp = datetime.date.today().isoformat()
    which = "" if list(chosen) == list(ORDER) else f" --only {','.join(chosen)}"
    return (f"{BEGIN}\n## Latest run\n\n`python -m benchmarks{which}` on {stamp}, {os.cpu_count()} CPU cores, "
            f"{seconds / 60:.1f} min; each row's date says when it was measured.\n\n" + "\n".join(rows) + f"\n{END}")


def write_latest(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        head, _, rest = text.partition("\n## ")
        text = f"{head}\n{table}\n\n## {rest}" if rest else f"{text}\n{table}\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
