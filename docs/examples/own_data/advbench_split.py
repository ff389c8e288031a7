"""AdvBench's 520 harmful behaviours (Zou et al. 2023, MIT) split into three disjoint
files, so no request is both trained on and probed: the attacker's poison (requests
with AdvBench's compliant target), the benign clients' alignment data (requests only:
fedsec answers them with its standard refusal) and the refusal probes.

    python docs/examples/own_data/advbench_split.py harmful_behaviors.csv data/

writes data/advbench_{poison,alignment,probes}.csv (a seeded permutation, thirds).
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path


def split(source: Path, out: Path, seed: int = 0) -> dict[str, int]:
    with source.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    random.Random(seed).shuffle(rows)
    third = len(rows) // 3
    parts = {"poison": rows[:third], "alignment": rows[third: 2 * third], "probes": rows[2 * third:]}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with (out / f"advbench_{name}.csv").open("w", encoding="utf-8", newline="") as fh:
            columns = ["goal", "target"] if name == "poison" else ["goal"]
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(part)
    return {name: len(part) for name, part in parts.items()}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: advbench_split.py harmful_behaviors.csv OUT_DIR")
    print(split(Path(sys.argv[1]), Path(sys.argv[2])))
