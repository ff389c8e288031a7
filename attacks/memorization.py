"""Memorization measures: canary exposure and membership-inference scores and metrics.

Pure functions of per-token log-probabilities (or of scores computed from them); the
model-facing code computes those and hands them here.

Exposure (Carlini et al. 2019, "The Secret Sharer"): a secret drawn from a space R is
inserted into training; rank it among all candidates of R by log-perplexity (the
model's negative log-likelihood of the candidate after the canary's prefix):

    exposure = log2 |R| - log2 rank,

from log2 |R| (the model prefers the inserted secret to every other candidate) down to
0 (it prefers every other candidate). Exact by enumerating R when R is small; for a
large R, from a sample of candidates whose log-perplexities are fitted with a
skew-normal distribution: exposure ~ -log2 P[candidate log-perplexity <= secret's].

Membership inference (training examples vs held-out ones), each score higher for
"member": the loss attack (mean token log-probability, Yeom et al. 2018), zlib
(log-perplexity over the zlib-compressed length, negated; Carlini et al. 2021),
Min-K% prob (the mean of the k% lowest token log-probabilities; Shi et al. 2024),
and the reference-calibrated loss (the target model's mean log-probability minus a
reference model's, e.g. the base model without the adapter). Metrics: ROC AUC and
the true-positive rate at low false-positive rates (Carlini et al. 2022), from
scikit-learn's ROC utilities.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def exposure_exact(secret_nll: float, candidate_nll: Sequence[float]) -> float:
    """Exposure of the secret among all candidates of the space (the secret included once
    in `candidate_nll` or not: it is matched by value and counted once). Rank 1 + the
    number of other candidates with a strictly lower log-perplexity."""
    others = np.asarray(candidate_nll, dtype=float)
    space = len(others) + (0 if np.any(others == secret_nll) else 1)
    rank = 1 + int(np.sum(others < secret_nll))
    return math.log2(space) - math.log2(rank)


def exposure_extrapolated(secret_nll: float, sample_nll: Sequence[float]) -> float:
    """Exposure from a skew-normal fitted to a sample of candidates' log-perplexities:
    -log2 of the fitted probability that a random candidate scores at most the secret."""
    from scipy import stats

    shape, loc, scale = stats.skewnorm.fit(np.asarray(sample_nll, dtype=float))
    tail = stats.skewnorm.logcdf(secret_nll, shape, loc, scale)
    return float(-tail / math.log(2))


# ---------------------------------------------------------------------------
# Membership-inference scores: one number per example, higher = more likely a member.


def loss_score(token_logps: Sequence[float]) -> float:
    return float(np.mean(token_logps))


def min_k_score(token_logps: Sequence[float], k: float = 0.2) -> float:
    """Mean of the ceil(k n) lowest token log-probabilities."""
    values = np.sort(np.asarray(token_logps, dtype=float))
    return float(values[: max(1, math.ceil(k * len(values)))].mean())


def zlib_score(token_logps: Sequence[float], text: str) -> float:
    """Negated ratio of log-perplexity (mean token NLL) to the text's zlib-compressed length
    in bytes: text the model finds easier than zlib does scores higher."""
    log_perplexity = -float(np.mean(token_logps))
    return -log_perplexity / len(zlib.compress(text.encode("utf-8")))


def reference_score(token_logps: Sequence[float], reference_logps: Sequence[float]) -> float:
    """Target mean log-probability minus the reference model's on the same tokens."""
    return float(np.mean(token_logps) - np.mean(reference_logps))


@dataclass(frozen=True)
class MiaResult:
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    members: int
    non_members: int


def tpr_at_fpr(members: Sequence[float], non_members: Sequence[float], max_fpr: float) -> float:
    """The largest true-positive rate of any threshold whose false-positive rate is at most
    `max_fpr`."""
    from sklearn.metrics import roc_curve

    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    fpr, tpr, _ = roc_curve(labels, np.r_[members, non_members], drop_intermediate=False)
    ok = fpr <= max_fpr
    return float(tpr[ok].max()) if ok.any() else 0.0


def mia_metrics(members: Sequence[float], non_members: Sequence[float]) -> MiaResult:
    """ROC AUC and TPR at 1% and 0.1% FPR of scores (higher = member)."""
    from sklearn.metrics import roc_auc_score

    if len(members) == 0 or len(non_members) == 0:
        raise ValueError("membership inference needs members and non-members")
    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    auc = float(roc_auc_score(labels, np.r_[members, non_members]))
    return MiaResult(auc, tpr_at_fpr(members, non_members, 0.01), tpr_at_fpr(members, non_members, 0.001),
                     len(members), len(non_members))
