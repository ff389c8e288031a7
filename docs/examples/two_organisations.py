"""Two organisations on one machine: each keeps its data file on its own SuperNode, over
TLS with SuperNode authentication, once with plain aggregation and once under SecAgg+.

    python docs/examples/two_organisations.py /tmp/two-orgs

Writes, under the given folder: bank-a/train.jsonl and bank-b/train.jsonl (each bank's
clients, four sectors of the embedded finance benchmark each, one client per sector),
server/test.jsonl (the server's own test set) and server/experiment.yaml; then starts a
SuperLink with a throwaway CA, registers each bank's SuperNode key, starts the two
SuperNodes with `data-path` at their bank's file, and runs the experiment twice from the
server's folder, which holds no bank's data. docs/flower.md shows its output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import yaml

from fedsec.config import BenchmarkConfig, load_config
from fedsec.data.benchmark import make_benchmark
from fedsec.engine.deploy import LocalDeployment, make_node_key, run_on_flower

EXPERIMENT = {
    "name": "two-banks",
    "engine": "flower",
    "model": {"name": "smollm2-135m-instruct"},
    "lora": {"rank": 8, "alpha": 16, "top_layers": 6, "cache_frozen_layers": True,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "data": {"silos": ["bank-a.jsonl", "bank-b.jsonl"],  # each SuperNode's data-path replaces its entry
             "test": "test.jsonl", "partition": {"scheme": "natural", "by": "user"},
             "choices": ["positive", "negative", "neutral"], "client_test_fraction": 0.12},
    "federation": {"rounds": 4, "clients_per_round": 8},
    "training": {"local_steps": 4, "batch_size": 8, "lr": 1.0e-3},
    "eval": {"every": 2},
    "flower": {"round_timeout": 600},
}


def write_files(root: Path) -> None:
    """The benchmark's eight sector clients as two banks' files, and the server's test set."""
    data = make_benchmark(BenchmarkConfig(num_clients=8, examples_per_client=48, label_alpha=0.5, test_size=120,
                                          client_test_size=6), seed=0)
    for bank, clients in (("bank-a", data.clients[:4]), ("bank-b", data.clients[4:])):
        rows = [{"system": e.system, "prompt": e.prompt, "response": e.response, "user": c.name}
                for c in clients for e in (*c.train, *c.test)]
        _write_jsonl(root / bank / "train.jsonl", rows)
    _write_jsonl(root / "server" / "test.jsonl", [{"system": e.system, "prompt": e.prompt, "response": e.response}
                                                 for e in data.global_test])
    (root / "server" / "experiment.yaml").write_text(yaml.safe_dump(EXPERIMENT, sort_keys=False))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(root: Path) -> None:
    write_files(root)
    os.chdir(root / "server")  # the server's folder: its test set and the experiment, no bank's data
    cfg = load_config("experiment.yaml")
    with LocalDeployment(root / "flower", tls=True, auth=True) as deployment:
        for k, bank in enumerate(("bank-a", "bank-b")):
            private, public = make_node_key(root / bank / "key", bank)
            deployment.register(public)  # the SuperLink operator registers each bank's public key
            deployment.start_supernode(k, 2, key=private, threads=1, name=bank,
                                       extra_config=f"data-path='{root / bank / 'train.jsonl'}'")
        for secagg in (False, True):
            print(f"\n=== flower.secagg: {str(secagg).lower()} ===", flush=True)
            run = dataclasses.replace(cfg, flower=dataclasses.replace(cfg.flower, secagg=secagg))
            run_on_flower(run, out=root / "runs" / f"secagg-{str(secagg).lower()}", deployment=deployment,
                          echo=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/two-orgs").resolve())
