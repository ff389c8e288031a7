"""The T0 training mixture as self-instruct released it (Wang et al. 2023; P3 prompts of
Sanh et al. 2022, Apache-2.0): one file of prompt/completion pairs per prompt template.
This writes one instruction file fedsec reads without a field map, with a `user` column
naming the template, so `partition: {scheme: natural}` makes one client per template:
a federation of parties that each hold their own task (sentiment, topic, paraphrase,
question answering, concept-to-sentence), as in FedNLP-style task-heterogeneous splits.

    python docs/examples/own_data/t0_templates.py data_per_template/ data/t0_templates.jsonl

The source folder is data/finetuning/t0_train_50k/data_per_template of
https://github.com/yizhongw/self-instruct; nothing is downloaded here. Templates are
kept when they have at least `--min-rows` usable rows and short prompts and replies
(means at most `--max-prompt` and `--max-output` characters, so a CPU round stays
short); from each, `--rows` rows spread
evenly over the file. GPT-3's `<|endoftext|>` ending is removed and rows with an empty
completion (the file's trec templates hold many) are dropped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

END = "<|endoftext|>"


def template_rows(path: Path) -> list[dict]:
    """A template file's usable rows as instruction/output/user records."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        output = record["completion"].replace(END, "").strip()
        if output:
            rows.append({"instruction": record["prompt"].strip(), "output": output, "user": path.stem})
    return rows


def convert(source: Path, out: Path, rows_per_template: int = 30, min_rows: int = 100,
            max_prompt: int = 240, max_output: int = 200) -> tuple[int, int]:
    """Write the selected templates' rows to `out`; returns (rows, templates)."""
    kept = []
    for path in sorted(source.glob("*.jsonl")):
        rows = template_rows(path)
        if (len(rows) < min_rows or sum(len(r["instruction"]) for r in rows) / len(rows) > max_prompt
                or sum(len(r["output"]) for r in rows) / len(rows) > max_output):
            continue
        step = max(1, len(rows) // rows_per_template)  # all rows when there are fewer
        kept.append(rows[::step][:rows_per_template])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for rows in kept for r in rows),
                   encoding="utf-8")
    return sum(len(rows) for rows in kept), len(kept)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the data_per_template folder")
    parser.add_argument("out", type=Path, help="the instruction file to write")
    parser.add_argument("--rows", type=int, default=30, help="rows per template (default 30)")
    parser.add_argument("--min-rows", type=int, default=100, help="usable rows a template needs (default 100)")
    parser.add_argument("--max-prompt", type=int, default=240, help="mean prompt characters at most (default 240)")
    parser.add_argument("--max-output", type=int, default=200, help="mean reply characters at most (default 200)")
    args = parser.parse_args()
    n, templates = convert(args.source, args.out, args.rows, args.min_rows, args.max_prompt, args.max_output)
    print(f"{n} rows from {templates} templates written to {args.out}")
