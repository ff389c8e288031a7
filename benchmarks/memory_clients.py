"""Peak memory vs the total number of clients, with a fixed number per round.

Runs the same short SCAFFOLD experiment (SmolLM2-135M-Instruct, LoRA on every
linear layer, 2 clients per round) with 10 and with 1,000 total clients, each in a
fresh process, and compares peak resident memory. The anchors allocate one
adapter per client up front (here 4.9M fp32 values = 19.5 MB each, so 19.5 GB for
1,000 clients); fedsec keeps one global adapter and SCAFFOLD's client variates on
disk, so only the data itself grows with the number of clients.

    python -m benchmarks.memory_clients [--clients 10 1000] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import store

HERE = Path(__file__).resolve().parent


def child(num_clients: int, model: str, out: str) -> None:
    from fedsec.config import load_config
    from fedsec.loop import run_experiment

    cfg = load_config(None, [
        "name=memory", f"model.name={model}", "federation.algorithm=scaffold",
        "federation.rounds=2", "federation.clients_per_round=2",
        f"data.benchmark.num_clients={num_clients}", "data.benchmark.examples_per_client=4",
        "data.benchmark.size_alpha=0", "data.benchmark.test_size=3",
        "data.benchmark.client_test_size=0", "eval.clients=false",
        "training.local_steps=1", "training.batch_size=2",
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
    ])
    started = time.perf_counter()
    run_experiment(cfg, out=out, progress=False, log=lambda s: None)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"clients": num_clients, "peak_rss_mb": peak_kib / 1024,
                      "seconds": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.model, args.out)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_clients", "--child", str(n),
                                   "--model", args.model, "--out", os.path.join(tmp, f"run{n}")],
                                  capture_output=True, text=True, check=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{n:>6} clients: peak RSS {rows[-1]['peak_rss_mb']:.0f} MB "
                  f"({rows[-1]['seconds']:.0f} s)")
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"memory ratio {rows[0]['clients']} -> {rows[-1]['clients']} clients: {ratio:.3f}")
    key = f"memory_ratio_{rows[0]['clients']}_to_{rows[-1]['clients']}_clients"
    store({key: {"value": ratio, "rows": rows, "model": args.model, "date": time.strftime("%Y-%m-%d"),
                 "machine": f"{os.cpu_count()} CPU cores"}})


if __name__ == "__main__":
    main()
