"""Measuring the global model: the evaluation of a round (global test set, each client's
held-out examples, preference pairs, refusal probes, canaries, benchmark tasks), and at
the end of a run the membership-inference attack and the privacy audit's outcome."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import weakref
from pathlib import Path

import torch

from fedsec.attacks.memorization import blind_baseline, split_shifted
from fedsec.canaries import audit_result, secret_margins
from fedsec.devices import autocast_dtype, model_device
from fedsec.encoding import encode_all
from fedsec.evalsuite.runner import PeftModelLM, run_task
from fedsec.evaluation import (
    evaluate,
    evaluate_greedy,
    evaluate_groups,
    is_refusal,
    preference_metrics,
    refusal_rate,
)
from fedsec.leakage import (
    answer_extraction,
    membership_inference,
    memorization_metrics,
    mia_candidates,
    mia_sample,
    user_membership_inference,
)
from fedsec.merged import merged_lora
from fedsec.metrics import MetricContext, measure
from fedsec.objectives import OBJECTIVES
from fedsec.prefix import tensors_digest
from fedsec.rundir import atomic_write_text
from fedsec.setup import Setup, frozen_prefix


def evaluate_model(setup: Setup, vector: torch.Tensor, round_done: int | None = None) -> tuple[dict, dict | None]:
    """Global (and alignment) evaluation and per-client evaluation of the adapter `vector`;
    with `round_done`, also the eval.benchmarks due after that round. The adapted layers run
    through merged weights where they merge at fp32's rounding (fedsec.merged)."""
    setup.adapter.set(vector)
    with merged_lora(setup.model):
        return _evaluate_model(setup, vector, round_done)


def _evaluate_model(setup: Setup, vector: torch.Tensor, round_done: int | None) -> tuple[dict, dict | None]:
    batch = setup.cfg.eval.batch_size
    global_eval: dict = {}
    if setup.global_eval.encoded:
        global_eval.update(evaluate(setup.model, setup.global_eval, setup.pad_id, batch).as_dict())
    if setup.preference_eval:
        global_eval["preference"] = preference_metrics(setup.model, setup.preference_eval,
                                                       setup.pad_id, batch, setup.cfg.dpo.beta)
    if setup.backdoor_eval:
        triggered, clean = setup.backdoor_eval
        # the rates are arg-max shares (of the choices where the data has them, else of
        # greedy replies that are exactly the target, from the same pass); the losses (mean
        # NLL of the target answer with and without the trigger) are the margin behind
        # them, and do not flip on a near tie
        if triggered.prompts is not None:
            on, off = (evaluate(setup.model, e, setup.pad_id, batch) for e in (triggered, clean))
            rates = on.accuracy, off.accuracy
        else:
            (on, rate_on), (off, rate_off) = (evaluate_greedy(setup.model, e, setup.pad_id, batch)
                                              for e in (triggered, clean))
            rates = rate_on, rate_off
        global_eval["backdoor"] = {"attack_success_rate": rates[0], "clean_target_rate": rates[1],
                                   "triggered_target_loss": on.loss, "clean_target_loss": off.loss}
    if setup.cfg.eval.canaries:
        e = setup.cfg.eval
        global_eval["memorization"] = memorization_metrics(
            setup.model, setup.tokenizer, setup.data.canaries, setup.cfg.data.template, e.canary_candidates,
            setup.cfg.seed, batch, frozen_layers(setup))
    if setup.probe_prompts:
        global_eval["refusal_rate"], replies = probe_replies(setup, vector)
        if setup.answers_dir is not None and round_done is not None:
            path = write_probe_replies(setup.answers_dir / "refusal_probes" / f"round_{round_done:04d}.jsonl",
                                       setup.data.probes, replies)
            global_eval["refusal_replies"] = str(path.relative_to(setup.answers_dir.parent))  # in the run directory
    if setup.cfg.eval.metrics:  # plugins' metrics; the uncovered ones leave a DP run's main files
        ctx = MetricContext(setup.model, setup.tokenizer, setup.data, setup.cfg, round_done)
        covered, uncovered = measure(ctx, setup.cfg.eval.metrics)
        global_eval.update({k: v for k, v in (("metrics", covered), ("metrics_uncovered", uncovered)) if v})
    due = [t for t in setup.tasks if round_done is not None and t.due(round_done, setup.cfg.federation.rounds)]
    if due:
        lm = PeftModelLM(setup.model, setup.tokenizer, setup.cfg.data.template, batch, frozen=frozen_layers(setup))
        global_eval["benchmarks"] = {
            t.name: run_task(t, lm, setup.answers_dir / t.name if setup.answers_dir else None, round_done)
            for t in due}
    if setup.client_eval is not None:
        per_client = evaluate_groups(setup.model, setup.client_eval, setup.pad_id, batch)
    elif setup.remote_eval is not None and setup.cfg.eval.clients:  # on the nodes holding the clients' data
        per_client = setup.remote_eval(vector)
    else:
        return global_eval, None
    return global_eval, client_summary(per_client) if per_client else None


# The refusal probes' greedy replies by everything they are a function of (`_replies_key`): a
# sweep's runs share their base model and, with one seed, their untuned adapter, so the round-0
# probes (greedy generation, most of an untuned evaluation: 11.8 of 13.7 s on the malicious grid's
# SmolLM2 run, a 2-core CPU) run once per sweep instead of once per run. Bounded: oldest out.
_REPLIES: dict[str, tuple[float, list[str]]] = {}
_REPLIES_ENTRIES = 8
_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_fingerprint(model) -> str:
    """A digest of the model's weights other than the adapter's (its base, quantized or not, and
    any rows added at setup): frozen during a run, so computed once per model object."""
    if model not in _WEIGHTS:
        _WEIGHTS[model] = tensors_digest((name, t) for name, t in model.state_dict().items() if "lora_" not in name)
    return _WEIGHTS[model]


def _replies_key(setup: Setup, vector: torch.Tensor) -> str:
    """The base weights, the adapter, the prompts' tokens, the reply budget, the batches (their
    padding shapes the float sums), the precision, the threads and the decoding settings."""
    model, tokenizer, e = setup.model, setup.tokenizer, setup.cfg.eval
    digest = hashlib.sha256(weights_fingerprint(model).encode())
    digest.update(memoryview(vector.detach().to("cpu", torch.float32).contiguous().numpy()))
    for prompt in setup.probe_prompts:
        digest.update(f"{list(prompt)}|".encode())
    digest.update(f"{e.max_new_tokens}|{e.batch_size}|{autocast_dtype(model)}|{model_device(model)}|"
                  f"{torch.get_num_threads()}|{tokenizer.name_or_path}|{len(tokenizer)}|"
                  f"{model.generation_config.to_json_string()}".encode())
    return digest.hexdigest()


def frozen_layers(setup: Setup) -> int:
    """The run's first adapted layer where it caches the frozen layers below (else 0): greedy
    decoding then keeps those layers' prefill of a batch of prompts (fedsec.decoding)."""
    return frozen_prefix(setup.model, setup.cfg).first if setup.cfg.lora.cache_frozen_layers else 0


def probe_replies(setup: Setup, vector: torch.Tensor) -> tuple[float, list[str]]:
    """The refusal rate on the unsafe probes and the greedy replies behind it (`refusal_rate`),
    taken from an earlier evaluation of this process with the same key (`_REPLIES`)."""
    key = _replies_key(setup, vector)
    if key not in _REPLIES:
        _REPLIES[key] = refusal_rate(setup.model, setup.tokenizer, setup.probe_prompts, setup.cfg.eval.max_new_tokens,
                                     setup.cfg.eval.batch_size, frozen_layers(setup))
        while len(_REPLIES) > _REPLIES_ENTRIES:
            _REPLIES.pop(next(iter(_REPLIES)))
    rate, replies = _REPLIES[key]
    return rate, list(replies)


def write_probe_replies(path: Path, probes, replies: list[str]) -> Path:
    """The refusal probes' greedy replies, one JSON line each (request, reply, whether
    the keyword rule counts it a refusal), so the harmless rate beside them can be audited."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"request": p.prompt, "reply": r, "refused": is_refusal(r)}) for p, r in zip(probes, replies)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def client_summary(per_client: dict) -> dict:
    accs = [r.accuracy for r in per_client.values() if r.accuracy is not None]
    losses = [r.loss for r in per_client.values()]
    return {
        "mean_accuracy": sum(accs) / len(accs) if accs else None,
        "min_accuracy": min(accs) if accs else None,
        "mean_loss": sum(losses) / len(losses),
        "per_client": {str(c): r.as_dict() for c, r in per_client.items()},
    }


def membership_attack(setup: Setup) -> dict:
    """eval.mia on the model as it stands: a sample of the federation's training examples
    against as many held-out ones, encoded (and prefix-cached) like the training data."""
    cfg = setup.cfg
    if cfg.eval.mia_split == "user":
        return user_membership_attack(setup)
    pool = setup.mia_pool or mia_candidates(setup.data, setup.federation_clients, OBJECTIVES[cfg.task])
    sample = mia_sample(*pool, cfg.eval.mia_examples, cfg.seed)
    encoded = [encode_all(examples, setup.tokenizer, cfg.data.template, cfg.data.max_length)
               for examples in sample]
    if cfg.lora.cache_frozen_layers:
        prefix = frozen_prefix(setup.model, cfg)
        encoded = [prefix.attach(setup.model, items, setup.pad_id, cfg.eval.batch_size) for items in encoded]
    membership = membership_inference(setup.model, setup.tokenizer, *encoded, cfg.eval.batch_size)
    extraction = {side: answer_extraction(setup.model, setup.tokenizer, examples, cfg.data.template,
                                          cfg.eval.batch_size)
                  for side, examples in zip(("members", "non_members"), sample)}
    texts = [[" ".join(m.content for m in e.messages()) for e in examples] for examples in sample]
    return {**membership, "blind": _blind(texts, cfg.seed), "answer_extraction": extraction}


def user_membership_attack(setup: Setup) -> dict:
    """eval.mia_split user: the clients fedsec kept in the federation against those it took
    out, each scored by the mean of its records' scores; the blind baseline on each user's
    records joined into one text."""
    cfg = setup.cfg
    encoded = []
    for users in setup.mia_pool:  # (members, non-members), a user's records that fit data.max_length
        users = [items for records in users
                 if (items := encode_all(records, setup.tokenizer, cfg.data.template, cfg.data.max_length))]
        flat = [item for items in users for item in items]
        if cfg.lora.cache_frozen_layers:
            flat = frozen_prefix(setup.model, cfg).attach(setup.model, flat, setup.pad_id, cfg.eval.batch_size)
        bounds = [0, *itertools.accumulate(len(items) for items in users)]
        encoded.append([flat[a:b] for a, b in itertools.pairwise(bounds)])
    membership = user_membership_inference(setup.model, setup.tokenizer, *encoded, cfg.eval.batch_size)
    texts = [[" ".join(m.content for e in records for m in e.messages()) for records in users]
             for users in setup.mia_pool]
    return {"level": "user", **membership, "blind": _blind(texts, cfg.seed)}


def _blind(texts: list[list[str]], seed: int) -> dict:
    """The model-free classifier beside every MIA, on (members' texts, non-members' texts):
    above chance, the split itself is shifted."""
    blind = dataclasses.asdict(blind_baseline(*texts, seed))
    return {**blind, "shifted": split_shifted(blind["auc"], len(texts[0]), len(texts[1]))}


def audit_outcome(setup: Setup, privacy: dict | None) -> dict:
    """The audit's game on the finished run, beside the accountant's epsilon (if certified)."""
    cfg, state = setup.cfg, setup.audit
    if state.updates is not None:
        before, after = [0.0] * len(state.canaries), state.updates.scores.tolist()
    else:
        before = state.untuned
        after = secret_margins(setup.model, setup.tokenizer, state.canaries, cfg.data.template,
                               cfg.eval.batch_size, cfg.seed, cfg.audit.secret)
    certified = privacy is not None and privacy.get("certified")
    # every client in every round, or one correlated-noise mechanism: a composition of Gaussians
    gaussian = bool(certified and (privacy.get("mechanism", "dp_fedavg") != "dp_fedavg"
                                   or privacy.get("sample_rate") == 1.0))
    return {"kind": cfg.audit.kind,
            **audit_result(before, after, state.included, cfg.audit.guesses, cfg.privacy.delta,
                           cfg.audit.confidence, privacy["epsilon"] if certified else None, gaussian)}
