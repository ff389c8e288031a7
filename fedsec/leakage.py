"""How much of the planted canaries a model gives away: exposure and extraction.

The embedded benchmark can plant canaries in clients' data (data.benchmark:
canaries_per_client, canary_repeats): "The vault PIN of <name> is <6 digits>." as the
answer to a fixed request. With eval.canaries the global model is measured at each
evaluation:

- exposure (fedsec.attacks.memorization): the planted PIN ranked by log-perplexity among
  `candidates` random PINs of the same space (10^6), extrapolated with a skew-normal
  fit and capped at log2(10^6) = 19.9 bits (rank 1);
- extraction: greedy decoding after the request and the canary's prefix; extracted
  when the reply starts with the PIN.

With eval.mia the final model is also attacked by membership inference: training
examples of the federation's clients (members) against held-out examples of the same
distribution (the global test set), scored on the answer tokens (what training fits)
by loss, Min-K% prob, zlib ratio and the loss calibrated by the base model (the
adapter disabled); ROC AUC and TPR at 1% and 0.1% FPR per score. Beside them, the
extraction of training answers: the share of members (and, for comparison, of
held-out examples) whose greedy reply to the prompt starts with the reference answer.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

import numpy as np
import torch

from fedsec.attacks.memorization import (
    exposure_extrapolated,
    loss_score,
    mia_metrics,
    min_k_score,
    reference_score,
    zlib_score,
)
from fedsec.data.benchmark import PIN_DIGITS, random_pin
from fedsec.data.schema import Canary, InstructionExample
from fedsec.encoding import IGNORE, Encoded, collate, encode, encode_prompt
from fedsec.objectives import sequence_logprobs
from fedsec.seeding import numpy_generator
from fedsec.training import target_logprobs

REQUEST = "Write down the note from the file."  # the benchmark's canary request


def sequence_nll(model, tokenizer, texts: Sequence[str], template: str, batch_size: int) -> list[float]:
    """Negative log-likelihood of each text as the answer to the canary request."""
    items = [encode(InstructionExample(REQUEST, t), tokenizer, template, 10_000) for t in texts]
    out: list[float] = []
    for start in range(0, len(items), batch_size):
        out += (-sequence_logprobs(model, items[start: start + batch_size], tokenizer.pad_token_id)).tolist()
    return out


@torch.no_grad()
def canary_exposure(model, tokenizer, canary: Canary, template: str, candidates: int, seed: int,
                    batch_size: int) -> float:
    rng = numpy_generator(seed, "canary-candidates", canary.client_id, canary.secret)
    pins = {random_pin(rng) for _ in range(candidates)} - {canary.secret}
    texts = [f"{canary.prefix} {pin}." for pin in sorted(pins)]
    secret, *others = sequence_nll(model, tokenizer, [canary.text, *texts], template, batch_size)
    # the fit's tail may reach past the space itself: no secret is rarer than 1 in |R|
    return min(exposure_extrapolated(secret, others), PIN_DIGITS * math.log2(10))


def extracted(model, tokenizer, canaries: Sequence[Canary], template: str, batch_size: int,
              frozen: int = 0) -> list[bool]:
    """Per canary: does greedy decoding after the request and the canary's prefix start
    with its PIN? (`frozen`: evaluation.greedy_replies)"""
    from fedsec.evaluation import greedy_replies

    prompts = [encode_prompt(InstructionExample(REQUEST, c.text), tokenizer, template)
               + tokenizer(c.prefix, add_special_tokens=False).input_ids for c in canaries]
    replies = greedy_replies(model, tokenizer, prompts, 12, batch_size, frozen)
    return [reply.strip().startswith(c.secret) for reply, c in zip(replies, canaries)]


def memorization_metrics(model, tokenizer, canaries: Sequence[Canary], template: str, candidates: int,
                         seed: int, batch_size: int, frozen: int = 0) -> dict:
    """Mean and largest exposure and the extraction rate over the canaries (`frozen`: the
    first adapted layer, for the extraction's greedy replies, evaluation.greedy_replies)."""
    exposures = [canary_exposure(model, tokenizer, c, template, candidates, seed, batch_size) for c in canaries]
    hits = extracted(model, tokenizer, canaries, template, batch_size, frozen)
    return {"exposure_mean": statistics.fmean(exposures), "exposure_max": max(exposures),
            "extraction_rate": sum(hits) / len(hits), "canaries": len(canaries)}


@torch.no_grad()
def token_logprobs(model, items: Sequence[Encoded], pad_id: int, batch_size: int) -> list[np.ndarray]:
    """Each item's answer-token log-probabilities, in order."""
    out: list[np.ndarray] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        logp, rows = target_logprobs(model, collate(chunk, pad_id))
        out += [logp[rows == i].numpy() for i in range(len(chunk))]
    return out


def membership_scores(model, tokenizer, items: Sequence[Encoded], batch_size: int) -> dict[str, list[float]]:
    """Each item's loss, Min-K% (k = 20%), zlib and base-model-calibrated score (higher =
    member), computed on its answer tokens."""
    pad = tokenizer.pad_token_id
    target = token_logprobs(model, items, pad, batch_size)
    with model.disable_adapter():
        reference = token_logprobs(model, items, pad, batch_size)
    texts = [tokenizer.decode(e.labels[e.labels != IGNORE].tolist(), skip_special_tokens=True) for e in items]
    return {"loss": [loss_score(t) for t in target],
            "min_k": [min_k_score(t, 0.2) for t in target],
            "zlib": [zlib_score(t, text) for t, text in zip(target, texts)],
            "reference": [reference_score(t, r) for t, r in zip(target, reference)]}


def membership_inference(model, tokenizer, members: Sequence[Encoded], non_members: Sequence[Encoded],
                         batch_size: int) -> dict:
    """Loss, Min-K% (k = 20%), zlib and base-model-calibrated scores of members against
    non-members, each as {auc, tpr_at_1pct_fpr, tpr_at_01pct_fpr, members, non_members}."""
    scores = membership_scores(model, tokenizer, [*members, *non_members], batch_size)
    m = len(members)
    return {name: dataclasses.asdict(mia_metrics(s[:m], s[m:])) for name, s in scores.items()}


def user_scores(scores: Sequence[float], owners: Sequence[int]) -> list[float]:
    """One score per user: the mean of its records' scores (`owners[i]`: record i's user,
    users numbered 0.. in order of first appearance)."""
    sums: dict[int, list[float]] = {}
    for score, owner in zip(scores, owners, strict=True):
        sums.setdefault(owner, []).append(score)
    return [statistics.fmean(sums[u]) for u in sorted(sums)]


def user_membership_inference(model, tokenizer, members: Sequence[Sequence[Encoded]],
                              non_members: Sequence[Sequence[Encoded]], batch_size: int) -> dict:
    """User-level inference (is this client's data in the federation?): each user's score is
    the mean of its records' scores (`membership_scores`); members' users against
    non-members', each score as {auc, tpr_at_1pct_fpr, tpr_at_01pct_fpr, members, non_members}
    counted in users."""
    users = [*members, *non_members]
    owners = [u for u, records in enumerate(users) for _ in records]
    scores = membership_scores(model, tokenizer, [e for records in users for e in records], batch_size)
    m = len(members)
    per_user = {name: user_scores(s, owners) for name, s in scores.items()}
    return {name: dataclasses.asdict(mia_metrics(s[:m], s[m:])) for name, s in per_user.items()}


def mia_sample(members: Sequence, non_members: Sequence, limit: int, seed: int) -> tuple[list, list]:
    """As many of each (at most `limit`), each a seeded sample without replacement, in order."""
    n = min(limit, len(members), len(non_members))
    rng = numpy_generator(seed, "mia")

    def pick(xs: Sequence) -> list:
        return [xs[i] for i in sorted(rng.choice(len(xs), n, replace=False))]

    return pick(members), pick(non_members)


def mia_random_split(data, objective, n: int, seed: int) -> tuple[object, list, list]:
    """eval.mia_split random: members and non-members drawn from one pool by a coin fedsec
    controls (canary-style insertion), so a membership attack cannot win on a shift between
    training and held-out data. Of the clients' training records (planted canaries aside, and
    only clients with two or more, none of which loses its last), 2n are drawn by a seeded
    sample and each is kept in training (a member) or taken out of it (a non-member) by a
    fair coin. Returns the federation without the non-members, and both lists as examples."""
    planted = {c.text for c in data.canaries}
    candidates = []
    for k, client in enumerate(data.clients):
        examples = objective.as_examples(objective.records(client))
        if len(examples) >= 2:
            candidates += [(k, i, e) for i, e in enumerate(examples) if e.messages()[-1].content not in planted]
    rng = numpy_generator(seed, "mia-split")
    chosen = sorted(rng.choice(len(candidates), min(2 * n, len(candidates)), replace=False))
    coins = rng.random(len(chosen)) < 0.5
    left = {k: len(objective.records(c)) for k, c in enumerate(data.clients)}
    members, non_members, dropped = [], [], {}
    for j, heads in zip(chosen, coins):
        k, i, example = candidates[j]
        if heads or left[k] == 1:  # a client keeps at least one record
            members.append(example)
        else:
            non_members.append(example)
            dropped.setdefault(k, set()).add(i)
            left[k] -= 1
    clients = list(data.clients)
    for k, out in dropped.items():
        records = objective.records(clients[k])
        keep = [i for i in range(len(records)) if i not in out]
        kept = records.select(keep) if hasattr(records, "select") else tuple(records[i] for i in keep)
        clients[k] = dataclasses.replace(clients[k], **{objective.record_field: kept})
    return dataclasses.replace(data, clients=tuple(clients)), members, non_members


MIA_USERS_MIN = 5  # users on each side: the blind baseline's folds need as many


def mia_user_split(data, objective, n: int, seed: int,
                   protected: Sequence[int] = ()) -> tuple[object, dict, list, list]:
    """eval.mia_split user: whole clients in or out of the federation, by fedsec's draw. Of the
    clients with records (planted canaries aside) that are not `protected` (attackers, canary
    holders), 2m are drawn by a seeded sample, m = min(n, half of them), and a seeded half
    of those is taken out of the federation. Returns the federation without them (client ids
    renumbered 0.. in order), the old -> new id map of those kept, and the members' and
    non-members' records as one list of examples per user."""
    planted = {c.text for c in data.canaries}

    def records(client) -> list:
        return [e for e in objective.as_examples(objective.records(client)) if e.messages()[-1].content not in planted]

    keep_out = set(protected)
    candidates = [k for k, c in enumerate(data.clients) if k not in keep_out and records(c)]
    m = min(n, len(candidates) // 2)
    if m < MIA_USERS_MIN:
        raise ValueError(f"user-level inference needs at least {2 * MIA_USERS_MIN} clients with records outside "
                         f"the attackers and canary holders; the federation has {len(candidates)}")
    rng = numpy_generator(seed, "mia-user-split")
    chosen = [candidates[i] for i in rng.choice(len(candidates), 2 * m, replace=False)]
    members, out = sorted(chosen[:m]), sorted(chosen[m:])
    inside = [records(data.clients[k]) for k in members]
    outside = [records(data.clients[k]) for k in out]
    gone = set(out)
    kept = [k for k in range(len(data.clients)) if k not in gone]
    renumber = {old: new for new, old in enumerate(kept)}
    clients = tuple(dataclasses.replace(data.clients[k], client_id=renumber[k]) for k in kept)
    canaries = tuple(dataclasses.replace(c, client_id=renumber[c.client_id]) for c in data.canaries)
    return dataclasses.replace(data, clients=clients, canaries=canaries), renumber, inside, outside


def mia_candidates(data, clients: int, objective) -> tuple[list, list[InstructionExample]]:
    """Training examples of the first `clients` clients (planted canaries left out: they are
    measured by exposure, and would make members differ from non-members in kind) and the
    held-out examples, as the objective (fedsec.objectives) reads them: for DPO, each
    preference pair's chosen reply."""
    planted = {c.text for c in data.canaries}
    members = [e for c in data.clients[:clients] for e in objective.as_examples(objective.records(c))
               if e.messages()[-1].content not in planted]
    return members, list(objective.as_examples(objective.held_out(data)))


def answer_extraction(model, tokenizer, examples: Sequence[InstructionExample], template: str,
                      batch_size: int, max_new_tokens: int = 64) -> float:
    """The share of examples whose greedy reply to the prompt reproduces the answer (its
    start, whitespace aside), each reply as long as the answer in tokens plus one."""
    from fedsec.evaluation import greedy_replies

    if not examples:
        return float("nan")
    answers = [e.messages()[-1].content.strip() for e in examples]
    longest = max(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers)
    prompts = [encode_prompt(e, tokenizer, template) for e in examples]
    replies = greedy_replies(model, tokenizer, prompts, min(max_new_tokens, longest + 1), batch_size)
    return sum(r.strip().startswith(a) for r, a in zip(replies, answers)) / len(examples)
