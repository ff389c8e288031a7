"""The benchmarks by name: each reads its published schema and yields items.

Closed-answer items (`ChoiceItem`): the finance sentiment sets of FinGPT's benchmark
that OpenFedLLM reports (their Hugging Face dataset cards' columns, FinGPT's label
mappings), MMLU-style multiple choice (cais/mmlu: question, choices, answer), and any
file with a prompt, its choices and the answer. Generation items: GSM8K (question,
answer ending in '#### N'); programs (`CodeItem`): HumanEval (prompt, test,
entry_point) and MBPP (text, test_list, test_setup_code).

Each loader takes rows (`fedsec.data.loaders.read_records`: a local file in the
schema, or the dataset by name with network access) and raises ConfigError naming
the benchmark and the missing column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedsec.errors import ConfigError
from fedsec.registry import register, registry

SENTIMENT = ("negative", "neutral", "positive")
NEWS_PROMPT = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
TWEET_PROMPT = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."


@dataclass(frozen=True)
class ChoiceItem:
    prompt: str
    choices: tuple[str, ...]
    answer: int  # index into choices


@dataclass(frozen=True)
class GenerationItem:
    prompt: str
    reference: str  # scored by its final number (GSM8K)


@dataclass(frozen=True)
class CodeItem:
    prompt: str  # what the model is asked
    prefix: str  # code the completion continues (HumanEval: the signature and docstring; MBPP: none)
    tests: str  # run after the program; it passes when they raise nothing


def _col(row: Mapping[str, Any], name: str, benchmark: str, i: int) -> Any:
    if name not in row:
        raise ConfigError(f"eval.benchmarks[{benchmark}]", name, f"row {i} has no column '{name}' (it has: "
                          f"{', '.join(map(str, row))}); give a file in the benchmark's published schema")
    return row[name]


def _label(value: Any, mapping: Mapping[Any, str], benchmark: str, i: int) -> int:
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, str) and key.isdigit() and int(key) in mapping:  # a CSV's integer labels
        key = int(key)
    if key not in mapping:
        raise ConfigError(f"eval.benchmarks[{benchmark}]", value, f"row {i}: unknown label; expected one of "
                          f"{', '.join(map(str, mapping))}")
    return SENTIMENT.index(mapping[key])


def _sentiment(prompt: str, text: str) -> str:
    return f"{prompt}\n{text}"


# financial_phrasebank (sentences_50agree): sentence, label 0 negative / 1 neutral / 2 positive
def fpb(rows: Sequence[Mapping], fields: Mapping[str, str]) -> list[ChoiceItem]:
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    return [ChoiceItem(_sentiment(NEWS_PROMPT, _col(r, "sentence", "fpb", i)), SENTIMENT,
                       _label(_col(r, "label", "fpb", i), labels, "fpb", i)) for i, r in enumerate(rows)]


# zeroshot/twitter-financial-news-sentiment: text, label 0 bearish / 1 bullish / 2 neutral
def tfns(rows: Sequence[Mapping], fields: Mapping[str, str]) -> list[ChoiceItem]:
    labels = {0: "negative", 1: "positive", 2: "neutral"}
    return [ChoiceItem(_sentiment(TWEET_PROMPT, _col(r, "text", "tfns", i)), SENTIMENT,
                       _label(_col(r, "label", "tfns", i), labels, "tfns", i)) for i, r in enumerate(rows)]


# oliverwang15/news_with_gpt_instructions: news, label in seven grades; FinGPT folds the mild ones into neutral
NWGI_LABELS = {"strong negative": "negative", "moderately negative": "negative", "mildly negative": "neutral",
               "neutral": "neutral", "mildly positive": "neutral", "moderately positive": "positive",
               "strong positive": "positive"}


def nwgi(rows: Sequence[Mapping], fields: Mapping[str, str]) -> list[ChoiceItem]:
    return [ChoiceItem(_sentiment(NEWS_PROMPT, _col(r, "news", "nwgi", i)), SENTIMENT,
                       _label(_col(r, "label", "nwgi", i), NWGI_LABELS, "nwgi", i)) for i, r in enumerate(rows)]


def fiqa_label(score: float) -> str:
    """FinGPT's three classes of a FiQA sentiment score in [-1, 1]."""
    return "negative" if score < -0.1 else ("neutral" if score < 0.1 else "positive")


# pauri32/fiqa-2018: sentence, sentiment_score in [-1, 1], format (post: a tweet; headline: news)
def fiqa_sa(rows: Sequence[Mapping], fields: Mapping[str, str]) -> list[ChoiceItem]:
    items = []
    for i, r in enumerate(rows):
        score = _col(r, "sentiment_score", "fiqa_sa", i)
        try:
            label = fiqa_label(float(score))
        except (TypeError, ValueError):
            raise ConfigError("eval.benchmarks[fiqa_sa]", score, f"row {i}: sentiment_score must be a number "
                              "in [-1, 1]") from None
        prompt = TWEET_PROMPT if r.get("format") == "post" else NEWS_PROMPT
        items.append(ChoiceItem(_sentiment(prompt, _col(r, "sentence", "fiqa_sa", i)), SENTIMENT,
                                SENTIMENT.index(label)))
    return items


LETTERS = "ABCDEFGHIJ"


# cais/mmlu: question, choices (list), answer (index; some copies give the letter)
def mmlu(rows: Sequence[Mapping], fields: Mapping[str, str]) -> list[ChoiceItem]:
    items = []
    for i, r in enumerate(rows):
        options = list(_col(r, "choices", "mmlu", i))
        answer = _col(r, "answer", "mmlu", i)
        index = LETTERS.index(answer) if isinstance(answer, str) and answer in LETTERS else answer
        if not isinstance(index, int) or not 0 <= index < len(options):
            raise ConfigError("eval.benchmarks[mmlu]", answer, f"row {i}: answer must index its choices")
        lines = [_col(r, "question", "mmlu", i)] + [f"{LETTERS[k]}. {c}" for k, c in enumerate(options)]
        items.append(ChoiceItem("\n".join(lines) + "\nAnswer with the letter of the correct option.",
                                tuple(LETTERS[: len(options)]), index))
    return items


def choice(rows: Sequence[Mapping], fields: Mapping[str, str]) -> list[ChoiceItem]:
    """Any file with a prompt, a list of choices and the answer (its index or its text);
    `fields` maps prompt/choices/answer to the file's columns."""
    f = {"prompt": "prompt", "choices": "choices", "answer": "answer", **fields}
    items = []
    for i, r in enumerate(rows):
        options = tuple(str(c) for c in _col(r, f["choices"], "choice", i))
        answer = _col(r, f["answer"], "choice", i)
        index = answer if isinstance(answer, int) and not isinstance(answer, bool) else (
            options.index(str(answer)) if str(answer) in options else None)
        if index is None or not 0 <= index < len(options) or len(options) < 2:
            raise ConfigError("eval.benchmarks[choice]", answer, f"row {i}: the answer must be one of at least two "
                              "choices (its index or its text)")
        items.append(ChoiceItem(str(_col(r, f["prompt"], "choice", i)), options, index))
    return items


# openai/gsm8k (main): question, answer (worked solution ending '#### N')
def gsm8k(rows: Sequence[Mapping], fields: Mapping[str, str]) -> list[GenerationItem]:
    return [GenerationItem(_col(r, "question", "gsm8k", i) + "\nEnd with the final number.",
                           _col(r, "answer", "gsm8k", i)) for i, r in enumerate(rows)]


# openai_humaneval: prompt (signature + docstring), test (defines check(candidate)), entry_point
def humaneval(rows: Sequence[Mapping], fields: Mapping[str, str]) -> list[CodeItem]:
    items = []
    for i, r in enumerate(rows):
        prompt = _col(r, "prompt", "humaneval", i)
        tests = _col(r, "test", "humaneval", i) + f"\ncheck({_col(r, 'entry_point', 'humaneval', i)})\n"
        items.append(CodeItem("Complete this Python function:\n" + prompt, prompt, tests))
    return items


# mbpp: text (the task), test_list (asserts), test_setup_code
def mbpp(rows: Sequence[Mapping], fields: Mapping[str, str]) -> list[CodeItem]:
    items = []
    for i, r in enumerate(rows):
        asserts = list(_col(r, "test_list", "mbpp", i))
        setup = r.get("test_setup_code") or ""
        prompt = f"{_col(r, 'text', 'mbpp', i)}\nYour code should pass these tests:\n" + "\n".join(asserts)
        items.append(CodeItem(prompt, "", setup + "\n" + "\n".join(asserts) + "\n"))
    return items


# The built-in benchmarks in the registry (fedsec.registry, kind benchmark), each
# fn(rows, fields) -> items; `hub`: where it lives on the Hugging Face hub and the split
# it is reported on (FinGPT's choices), used when eval.benchmarks[].source is empty.
register("benchmark", "fpb", hub=("financial_phrasebank", "train"))(fpb)
register("benchmark", "fiqa_sa", hub=("pauri32/fiqa-2018", "test"))(fiqa_sa)
register("benchmark", "tfns", hub=("zeroshot/twitter-financial-news-sentiment", "validation"))(tfns)
register("benchmark", "nwgi", hub=("oliverwang15/news_with_gpt_instructions", "test"))(nwgi)
register("benchmark", "mmlu", hub=("cais/mmlu", "test"))(mmlu)
register("benchmark", "choice")(choice)
register("benchmark", "gsm8k", hub=("openai/gsm8k", "test"))(gsm8k)
register("benchmark", "humaneval", hub=("openai_humaneval", "test"))(humaneval)
register("benchmark", "mbpp", hub=("mbpp", "test"))(mbpp)


@register("benchmark", "mt_bench")
def mt_bench(rows: Sequence[Mapping], fields: Mapping[str, str]):
    """MT-Bench: FastChat's question.jsonl (turns; answers judged, or written only)."""
    from fedsec.evalsuite import openended

    return openended.fastchat_questions(rows, "mt_bench")


@register("benchmark", "vicuna_bench")
def vicuna_bench(rows: Sequence[Mapping], fields: Mapping[str, str]):
    """Vicuna-Bench: FastChat's question.jsonl."""
    from fedsec.evalsuite import openended

    return openended.fastchat_questions(rows, "vicuna_bench")


@register("benchmark", "fedllm_instructions")
def fedllm_instructions(rows: Sequence[Mapping], fields: Mapping[str, str]):
    """Open-ended instructions (an instruction column, `fields.instruction`)."""
    from fedsec.evalsuite import openended

    return openended.instruction_rows(rows, "fedllm_instructions", fields.get("instruction", "instruction"))


@register("benchmark", "advbench")
def advbench(rows: Sequence[Mapping], fields: Mapping[str, str]):
    """AdvBench's harmful behaviours (goal, target): the harmless rate of the replies."""
    from fedsec.evalsuite import openended

    return openended.advbench_rows(rows, "advbench")


LOADERS = registry("benchmark")  # name -> fn(rows, fields), plugins' included
