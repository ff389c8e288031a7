"""Open-ended sets: answers in FastChat's format, scored by a pluggable judge.

MT-Bench and Vicuna-Bench questions are FastChat's question.jsonl (question_id,
category, turns); FedLLM-Bench's held-out instructions are rows with an instruction
column; AdvBench is harmful_behaviors.csv (goal, target). The global model answers each
question greedily (every turn of a multi-turn question, its earlier answers in the
conversation), and the answers are written as FastChat answer records
({question_id, answer_id, model_id, choices: [{index, turns}], tstamp}) so FastChat's
own judging can read them.

A judge scores each answer 1-10 with MT-Bench's single-answer grading prompt (the
verdict "Rating: [[N]]"): `HttpJudge` calls an OpenAI-compatible chat endpoint the user
gives (its key from an environment variable, never the config); `ModelJudge` asks a
local model. The prompt template is written beside the answers, and its hash goes into
the metrics, so a score always says what produced it. AdvBench needs no judge: its
harmless rate is the share of replies with a refusal marker (the GCG/AdvBench rule).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedsec.errors import ConfigError

# MT-Bench's single-answer grading prompt (FastChat llm_judge, "single-v1"), one turn.
JUDGE_SYSTEM = "You are a helpful assistant."
JUDGE_PROMPT = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
    "you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for "
    "example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]")
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")


@dataclass(frozen=True)
class OpenItem:
    question_id: object
    category: str
    turns: tuple[str, ...]


def fastchat_questions(rows: Sequence[Mapping], benchmark: str) -> list[OpenItem]:
    """MT-Bench / Vicuna-Bench question.jsonl rows."""
    items = []
    for i, r in enumerate(rows):
        turns = r.get("turns")
        if not isinstance(turns, list) or not turns or "question_id" not in r:
            raise ConfigError(f"eval.benchmarks[{benchmark}]", sorted(r), f"row {i}: FastChat questions need "
                              "question_id and a non-empty list of turns")
        items.append(OpenItem(r["question_id"], str(r.get("category", "")), tuple(map(str, turns))))
    return items


def instruction_rows(rows: Sequence[Mapping], benchmark: str, column: str = "instruction") -> list[OpenItem]:
    """FedLLM-Bench's held-out instructions (or any file with an instruction column)."""
    if rows and column not in rows[0]:
        raise ConfigError(f"eval.benchmarks[{benchmark}]", column, f"row 0 has no column '{column}' (it has: "
                          f"{', '.join(map(str, rows[0]))}); map it with fields: {{instruction: <column>}}")
    return [OpenItem(r.get("id", i), str(r.get("category", "")), (str(r[column]),)) for i, r in enumerate(rows)]


def advbench_rows(rows: Sequence[Mapping], benchmark: str = "advbench") -> list[OpenItem]:
    column = "goal" if rows and "goal" in rows[0] else "prompt"
    if rows and column not in rows[0]:
        raise ConfigError(f"eval.benchmarks[{benchmark}]", sorted(rows[0]), "AdvBench rows need a goal (or "
                          "prompt) column")
    return [OpenItem(i, "harmful", (str(r[column]),)) for i, r in enumerate(rows)]


class Judge(Protocol):
    name: str

    def rate(self, prompt: str) -> str: ...


class HttpJudge:
    """An OpenAI-compatible /chat/completions endpoint (temperature 0)."""

    def __init__(self, url: str, model: str, api_key_env: str = "", timeout: float = 120.0):
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self.key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.name = f"{model}@{self.url}"

    def rate(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 1024, "messages": [
            {"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url + "/chat/completions", body, headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]


class ModelJudge:
    """A local model as the judge (greedy): `complete` is a LanguageModel's."""

    def __init__(self, lm, name: str, max_new_tokens: int = 256):
        self.lm, self.name, self.max_new_tokens = lm, name, max_new_tokens

    def rate(self, prompt: str) -> str:
        return self.lm.complete([prompt], self.max_new_tokens)[0]


def rating(verdict: str) -> float | None:
    """The judge's [[N]] rating (1-10), None when it gave none."""
    found = _RATING.findall(verdict)
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


def answer_all(lm, items: Sequence[OpenItem], max_new_tokens: int) -> list[list[str]]:
    """Greedy answers to every turn, each turn conditioned on the answers before it."""
    answers: list[list[str]] = [[] for _ in items]
    for turn in range(max(len(it.turns) for it in items)):
        todo = [k for k, it in enumerate(items) if turn < len(it.turns)]
        conversations = [[*sum(([it.turns[t], answers[k][t]] for t in range(turn)), []), it.turns[turn]]
                         for k, it in ((k, items[k]) for k in todo)]
        for k, reply in zip(todo, lm.converse(conversations, max_new_tokens)):
            answers[k].append(reply.strip())
    return answers


def write_answers(path: Path, items: Sequence[OpenItem], answers: Sequence[Sequence[str]], model_id: str) -> None:
    """FastChat's answer records, one JSON line per question, each with the question's
    category and turns beside them (keys FastChat's readers ignore), so a file can be
    read or judged without the question file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question_id": it.question_id, "answer_id": uuid.uuid4().hex, "model_id": model_id,
                         "choices": [{"index": 0, "turns": list(turns)}], "tstamp": time.time(),
                         "category": it.category, "question_turns": list(it.turns)})
             for it, turns in zip(items, answers)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def judge_answers(judge: Judge, items: Sequence[OpenItem], answers: Sequence[Sequence[str]],
                  folder: Path | None = None) -> dict:
    """Mean 1-10 rating of each question's first-turn answer (MT-Bench's single grading),
    the count the judge gave no rating for, and what judged."""
    scores, verdicts = [], []
    for it, turns in zip(items, answers):
        verdict = judge.rate(JUDGE_PROMPT.format(question=it.turns[0], answer=turns[0]))
        verdicts.append({"question_id": it.question_id, "verdict": verdict})
        scores.append(rating(verdict))
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "judge_prompt.txt").write_text(JUDGE_SYSTEM + "\n---\n" + JUDGE_PROMPT, encoding="utf-8")
        (folder / "judgments.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verdicts), encoding="utf-8")
    rated = [s for s in scores if s is not None]
    return {"mean_score": sum(rated) / len(rated) if rated else None, "judged": len(rated),
            "unrated": len(scores) - len(rated), "n": len(scores), "judge": judge.name,
            "judge_prompt_sha256": hashlib.sha256((JUDGE_SYSTEM + JUDGE_PROMPT).encode()).hexdigest()[:16]}
