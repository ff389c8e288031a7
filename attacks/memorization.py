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


# The blind baseline (Das et al. 2024, "Blind baselines beat membership inference attacks
# for foundation models"; Duan et al. 2024): a classifier that never sees the model and
# tells members from non-members by their text alone. If it beats chance, the two sets
# differ in kind (a shifted split), and an MIA's AUC measures that shift as much as any
# memorization. Multinomial naive Bayes over hashed word unigrams and bigrams plus the
# text's length and digit-share buckets, scored out of fold (each text by the classifier
# fitted on the other folds), so it cannot have learned the texts it scores.
BLIND_BUCKETS = 1 << 14
BLIND_FOLDS = 5


def blind_features(text: str) -> np.ndarray:
    """Counts of the text's hashed features (BLIND_BUCKETS of them): lower-cased words,
    word bigrams, its length in characters (log2 bucket) and share of digits (tenths)."""
    import re

    words = re.findall(r"\w+", text.lower())
    tokens = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    tokens += [f"<len {int(math.log2(len(text) + 1))}>",
               f"<digits {int(10 * sum(ch.isdigit() for ch in text) / max(1, len(text)))}>"]
    counts = np.zeros(BLIND_BUCKETS)
    for token in tokens:  # crc32: the same bucket in every process (str hash is salted)
        counts[zlib.crc32(token.encode("utf-8")) % BLIND_BUCKETS] += 1
    return counts


def blind_scores(members: Sequence[str], non_members: Sequence[str], seed: int,
                 folds: int = BLIND_FOLDS) -> tuple[list[float], list[float]]:
    """Out-of-fold log-odds of 'member' for every text (higher = member), from naive Bayes
    fitted on the other folds (Laplace smoothing); the folds are a seeded shuffle."""
    texts = [*members, *non_members]
    labels = np.r_[np.ones(len(members), dtype=bool), np.zeros(len(non_members), dtype=bool)]
    if len(members) < folds or len(non_members) < folds:
        raise ValueError(f"the blind baseline needs at least {folds} members and non-members")
    x = np.stack([blind_features(t) for t in texts])
    fold = np.empty(len(texts), dtype=int)
    fold[np.random.default_rng(seed).permutation(len(texts))] = np.arange(len(texts)) % folds
    scores = np.empty(len(texts))
    for k in range(folds):
        train, test = fold != k, fold == k
        counts_in = x[train & labels].sum(axis=0) + 1.0
        counts_out = x[train & ~labels].sum(axis=0) + 1.0
        weights = np.log(counts_in / counts_in.sum()) - np.log(counts_out / counts_out.sum())
        scores[test] = x[test] @ weights
    return scores[: len(members)].tolist(), scores[len(members):].tolist()


def blind_baseline(members: Sequence[str], non_members: Sequence[str], seed: int) -> MiaResult:
    """The blind baseline's ROC AUC and low-FPR TPRs: 0.5 when the split is fair."""
    return mia_metrics(*blind_scores(members, non_members, seed))


def split_shifted(auc: float, members: int, non_members: int, z: float = 2.326) -> bool:
    """Whether a model-free AUC is above chance at 99% (one-sided): AUC - 1/2 > z times its
    standard deviation under the null, sqrt((m + n + 1) / (12 m n)) (the Mann-Whitney U's).
    Only above: a shift an attack can exploit tells members from non-members; an out-of-fold
    classifier on an exchangeable split lands below chance on small samples (each held-out
    text's own class is one short in the folds it is scored by), which is no shift."""
    return auc - 0.5 > z * math.sqrt((members + non_members + 1) / (12 * members * non_members))
