"""Scorers: pure functions from predictions and references to metrics.

Accuracy and macro-F1 (scikit-learn's, over the labels the benchmark defines, so a
label the model never predicts still counts with F1 0); the final number of a
GSM8K-style answer and its exact match; pass@1 over executed programs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sklearn.metrics import accuracy_score, f1_score

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def classification(predicted: Sequence[int], answers: Sequence[int], num_labels: int) -> dict:
    """accuracy and macro-F1 of predicted label indices against the references."""
    if len(predicted) != len(answers):
        raise ValueError(f"{len(predicted)} predictions for {len(answers)} references")
    if not answers:
        return {"accuracy": None, "macro_f1": None, "n": 0}
    labels = list(range(num_labels))
    return {"accuracy": float(accuracy_score(answers, predicted)),
            "macro_f1": float(f1_score(answers, predicted, labels=labels, average="macro", zero_division=0)),
            "n": len(answers)}


def final_number(text: str) -> str | None:
    """The answer's final number, normalized: GSM8K references end with '#### 72'; a model's
    reply is read by its last number ('... so she sold 72 clips.'). Commas and a trailing
    '.0' go; None when there is no number."""
    if "####" in text:
        text = text.split("####")[-1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if number in ("", "-"):
        return None
    return "0" if number in ("-0", "-") else number


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Share of replies whose final number equals the reference's."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = [final_number(p) is not None and final_number(p) == final_number(r)
            for p, r in zip(predictions, references)]
    return {"exact_match": sum(hits) / len(hits) if hits else None, "n": len(hits)}


def pass_at_1(passed: Sequence[bool]) -> dict:
    """pass@1 with one greedy sample per problem: the share of problems whose program passed."""
    return {"pass_at_1": sum(map(bool, passed)) / len(passed) if passed else None, "n": len(passed)}
