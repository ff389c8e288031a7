"""What a Flower round costs against the same round in-process, measured in one run.

experiments/flower.yaml (SmolLM2-135M-Instruct, the quickstart's shape: 8 clients of 48
examples, all every round, 4 local AdamW steps on the top 6 layers) for 5 rounds, once on
2 local SuperNodes (engine flower: a SuperLink, two SuperNodes and their fedsec workers on
this machine) and once in-process. A round's time is the round loop's own (`seconds` in
metrics.jsonl: the clients' phase with its messages, the server pipeline, the step);
evaluation only after the last round, and round 1 (the SuperNodes' workers load the model
and prepare their clients) reported apart. The ratio is the median of rounds 2-4.

    python -m benchmarks.flower_round [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
from pathlib import Path

from benchmarks import store
from fedsec.api import run
from fedsec.rundir import RunDir


def round_seconds(engine: str, rounds: int, out: Path) -> list[float]:
    overrides = [f"engine={engine}", f"federation.rounds={rounds}", f"eval.every={rounds}", "eval.clients=false"]
    result = run("experiments/flower.yaml", overrides=overrides, out=out / engine, progress=False)
    rows = RunDir(result.run_dir).read_metrics()
    return [r["seconds"] for r in rows if r.get("phase") == "federated" and r["round"] >= 1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="fedsec-flower-round-"))
    local = round_seconds("inprocess", args.rounds, out)
    flower = round_seconds("flower", args.rounds, out)
    steady = slice(1, args.rounds - 1)  # not the first (workers start) nor the last (evaluation)
    ratio = statistics.median(flower[steady]) / statistics.median(local[steady])
    print(f"in-process rounds: {', '.join(f'{s:.1f}' for s in local)} s")
    print(f"flower rounds (2 SuperNodes): {', '.join(f'{s:.1f}' for s in flower)} s")
    print(f"flower / in-process, median of rounds 2-{args.rounds - 1}: {ratio:.2f}")
    results = {"flower_round_ratio": {"value": ratio, "flower_seconds": flower, "inprocess_seconds": local,
                                      "supernodes": 2, "date": datetime.date.today().isoformat()}}
    store(results)
    return results


if __name__ == "__main__":
    main()
