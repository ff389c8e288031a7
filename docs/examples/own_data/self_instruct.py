"""Self-instruct's user-oriented instructions (Wang et al. 2023, 252 tasks written for
71 apps, Apache-2.0) as one instruction file fedsec reads without a field map: one row
per task instance with Alpaca's instruction/input/output columns and a `user` column,
the app the task was written for, so `partition: {scheme: natural}` makes one client
per app.

    python docs/examples/own_data/self_instruct.py user_oriented_instructions.jsonl \
        data/self_instruct.jsonl

The source file is human_eval/user_oriented_instructions.jsonl of
https://github.com/yizhongw/self-instruct; nothing is downloaded here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def convert(source: Path, out: Path) -> int:
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        task = json.loads(line)
        for instance in task["instances"]:
            rows.append({"instruction": task["instruction"], "input": instance["input"],
                         "output": instance["output"], "user": task["motivation_app"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: self_instruct.py SOURCE.jsonl OUT.jsonl")
    n = convert(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{n} rows written to {sys.argv[2]}")
