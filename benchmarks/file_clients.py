"""Peak memory of a federation read from a local file: 100,000 clients against 100.

A JSONL file of finance headlines (the embedded benchmark's generator), `--per-client`
examples for each of N users, split naturally (one client per user); the same
experiment on each (SmolLM2-135M-Instruct, LoRA on the top 2 layers, 10 clients per
round, 2 rounds, one local step, a fixed 60-example test file), each in a fresh process,
comparing peak resident memory. The rows stay in `datasets`' memory-mapped Arrow table
and clients are encoded when a round samples them (fedsec.setup.ClientSets), so what
grows with N is one small index array per client.

    python -m benchmarks.file_clients [--clients 100 100000] [--per-client 3] [--alignment K]

`--alignment K`: every client also gets K alignment examples (data.alignment, unsafe
request -> refusal, from a file of the embedded generator's requests), planted after its
rows without reading them (fedsec.data.table.Extended).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import store

TEST_ROWS = 60


def data_file(users: int, per_client: int) -> tuple[Path, Path]:
    """The benchmark's files, written once under $FEDSEC_CACHE/benchmarks (a second run maps
    the same Arrow table from `datasets`' cache instead of parsing the file again)."""
    from fedsec.data.benchmark import LABELS, SECTORS, headline_example
    from fedsec.models import cache_dir
    from fedsec.seeding import numpy_generator

    sectors = list(SECTORS)
    folder = cache_dir() / "benchmarks" / "file_clients"
    folder.mkdir(parents=True, exist_ok=True)
    path, test = folder / f"users{users}x{per_client}.jsonl", folder / "test.jsonl"
    for target, rows, stream in ((path, users * per_client, "rows"), (test, TEST_ROWS, "test")):
        if target.is_file():
            continue
        rng = numpy_generator(0, "file-clients", stream, users)
        partial = target.with_suffix(".partial")
        with partial.open("w") as fh:
            for i in range(rows):
                example = headline_example(rng, sectors[i % len(sectors)], LABELS[int(rng.integers(len(LABELS)))])
                fh.write(json.dumps({"prompt": example.prompt, "response": example.response,
                                     "user": f"user{i // per_client:06d}"}) + "\n")
        partial.rename(target)
    return path, test


def alignment_file() -> Path:
    """Unsafe requests of the embedded generator, one per row (the refusal is fedsec's standard one)."""
    from fedsec.data.benchmark import REFUSAL, unsafe_requests
    from fedsec.models import cache_dir

    path = cache_dir() / "benchmarks" / "file_clients" / "alignment.jsonl"
    if not path.is_file():
        rows = unsafe_requests(0, 64, REFUSAL, "file-clients-alignment")
        path.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in rows))
    return path


def child(users: int, per_client: int, out: str, alignment: int = 0) -> None:
    from fedsec.config import load_config
    from fedsec.loop import run_experiment

    path, test = data_file(users, per_client)
    aligned = [f"data.alignment={alignment_file()}", f"data.alignment_per_client={alignment}"] if alignment else []
    cfg = load_config(None, [*aligned,
        "name=file-clients", f"data.source={path}", f"data.test={test}", "data.partition.scheme=natural",
        "data.client_test_fraction=0", "eval.clients=false", "federation.rounds=2",
        "federation.clients_per_round=10", "training.local_steps=1", "training.batch_size=2",
        "lora.top_layers=2", "lora.cache_frozen_layers=false",
    ])
    started = time.perf_counter()
    result = run_experiment(cfg, out=out, progress=False, log=lambda s: None)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clients = json.loads((Path(result.run_dir) / "federation.json").read_text())["num_clients"]
    print(json.dumps({"clients": clients, "peak_rss_mb": peak_kib / 1024, "seconds": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs=2, default=[100, 100_000])
    parser.add_argument("--per-client", type=int, default=3)
    parser.add_argument("--alignment", type=int, default=0, help="alignment examples planted in every client")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.per_client, args.out, args.alignment)
        return
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            data_file(n, args.per_client)  # written before the measured process starts
            proc = subprocess.run([sys.executable, "-m", "benchmarks.file_clients", "--child", str(n),
                                   "--per-client", str(args.per_client), "--alignment", str(args.alignment),
                                   "--out", os.path.join(tmp, f"run{n}")],
                                  capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                sys.exit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{rows[-1]['clients']:>7} clients: peak RSS {rows[-1]['peak_rss_mb']:.0f} MB "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS ratio {rows[0]['clients']} -> {rows[-1]['clients']} clients: {ratio:.3f} (target <= 1.2)")
    aligned = f"_alignment{args.alignment}" if args.alignment else ""
    store({f"file_memory_ratio_{args.clients[0]}_to_{args.clients[1]}_clients{aligned}": {
        "value": ratio, "rows": rows, "per_client": args.per_client, "alignment_per_client": args.alignment,
        "model": "smollm2-135m-instruct",
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores"}})


if __name__ == "__main__":
    main()
