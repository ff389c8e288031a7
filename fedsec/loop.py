"""The federated round loop, top to bottom.

    setup (once): model + LoRA, data, tokenization, evaluation sets
    round t:  sample clients -> local training -> sanitize -> aggregate (weighted mean
              or a robust rule; DP: clip, aggregate, noise) -> server step -> (local-only baseline clients train alone)
              -> evaluate -> metrics.jsonl -> checkpoint
    end:      local-only evaluation, final adapter, result.json

Every random stream derives from the root seed and (round, client), so a run
resumed from its checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from fedsec.accountants.ledger import format_epsilon
from fedsec.adapter import AdapterParams
from fedsec.attacks.clients import attack_params, attack_round, detection, malicious_clients, poison_data
from fedsec.attacks.poisoning import with_trigger
from fedsec.canaries import AuditState, audit_canaries, audit_result, secret_margins, start_audit, with_canary_clients
from fedsec.config import ExperimentConfig, to_mapping
from fedsec.console import round_line
from fedsec.data import FederatedData, build_federated_data
from fedsec.data.unsafe import draw, read_unsafe
from fedsec.disclosure import split_result
from fedsec.encoding import Encoded, encode_all, encode_prompt
from fedsec.errors import ConfigError
from fedsec.evalsuite.runner import PeftModelLM, load_tasks, run_task
from fedsec.evalsuite.tasks import ChoiceItem
from fedsec.evaluation import (
    EvalSet,
    build_eval_set,
    evaluate,
    evaluate_groups,
    map_sequences,
    packable_prefix,
    preference_metrics,
    refusal_rate,
    share_prefix,
)
from fedsec.leakage import answer_extraction, membership_inference, memorization_metrics, mia_candidates, mia_sample
from fedsec.models import attach_lora, load_base_model
from fedsec.objectives import (
    DpoObjective,
    PairItem,
    SftObjective,
    encode_pair,
    with_reference,
)
from fedsec.pipeline import build_pipeline
from fedsec.prefix import cache_frozen_prefix
from fedsec.privacy import (
    RecordLevelDp,
    RecordPlan,
    UserLevelDp,
    dp_seed,
    plan_privacy,
    plan_record_privacy,
    reproducible_warning,
)
from fedsec.results import ClientUpdate, RoundResult, RunResult
from fedsec.rundir import RunDir, atomic_write_bytes, default_run_dir, latest_run_dir
from fedsec.scaffold import VariateStore, client_variate, server_variate
from fedsec.seeding import derive_seed, torch_generator
from fedsec.server import make_server_optimizer, poisson_sample, sample_clients
from fedsec.training import LocalTrainer, RecordDp, round_lr

GLOBAL = -1  # group id of the global test set


@dataclass
class Setup:
    """Everything built once per run: model, trainer, tokenized data, eval sets."""

    cfg: ExperimentConfig
    model: torch.nn.Module
    tokenizer: object
    trainer: LocalTrainer
    data: FederatedData
    train_sets: list[list]  # per client: Encoded (sft) or PairItem (dpo), tokenized once
    global_eval: EvalSet
    client_eval: EvalSet | None
    local_only: list[int] = field(default_factory=list)
    preference_eval: list[PairItem] = field(default_factory=list)
    probe_prompts: list[list[int]] = field(default_factory=list)
    record_plan: RecordPlan | None = None  # privacy.mode record: DP-SGD inside clients
    server_root: list = field(default_factory=list)  # FLTrust: the server's clean root set, encoded
    malicious: tuple[int, ...] = ()  # the fixed malicious identities (attack section)
    backdoor_eval: tuple = ()  # backdoor: (triggered, clean) global test inputs, answer = target
    audit: AuditState | None = None  # the privacy audit (audit section)
    population: int = 0  # clients the sampling rate is defined over (audit canaries in or out)
    tasks: tuple = ()  # eval.benchmarks, loaded (fedsec.evalsuite.Task)
    answers_dir: Path | None = None  # where open-ended answers go (the run directory's answers/)

    @property
    def federation_clients(self) -> int:
        """Clients of the federation proper (the audit's canary clients come after them)."""
        return self.population - self.cfg.audit.canaries

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def adapter(self) -> AdapterParams:
        return self.trainer.adapter


@dataclass(frozen=True)
class Federation:
    """The federation's data as every party builds it from the config: clients (poisoned
    where the attack says, audit canary clients appended), the malicious identities, and
    the population the sampling rate is defined over."""

    data: FederatedData
    malicious: tuple[int, ...]
    population: int
    canaries: tuple = ()  # the audit's canaries, in or out
    included: object = None  # which canaries are in (numpy bool array), None without an audit


def build_federation(cfg: ExperimentConfig) -> Federation:
    data = build_federated_data(cfg.data, cfg.seed, cfg.task)
    num_clients = len(data.clients)
    fed = cfg.federation
    if fed.local_only_clients > num_clients:
        raise ConfigError("federation.local_only_clients", fed.local_only_clients,
                          f"the data has {num_clients} clients; use at most that many or -1")
    count = cfg.attack.count(num_clients)
    if count > num_clients:
        raise ConfigError("attack.malicious", count, f"the data has {num_clients} clients; use at most that many")
    malicious = malicious_clients(num_clients, count, cfg.seed)
    data = poison_data(data, cfg.attack.kind, attack_params(cfg.attack.kind, cfg.attack.params), malicious,
                       cfg.seed)
    if cfg.eval.canaries and not data.canaries:
        raise ConfigError("eval.canaries", True, "no canaries are planted; set "
                          "data.benchmark.canaries_per_client >= 1 (embedded benchmark)")
    if cfg.eval.mia and not (data.preference_test if cfg.task == "dpo" else data.global_test):
        raise ConfigError("eval.mia", True, "membership inference needs held-out examples and the data has "
                          "no test set; give the dataset a test split or set eval.mia: false")
    if cfg.eval.probes:
        probes = read_unsafe(cfg.eval.probes, "eval.probes", need_reply=False)
        if 0 < cfg.eval.max_probes < len(probes):
            probes = draw(probes, cfg.eval.max_probes, cfg.seed, "probes-file")
        data = dataclasses.replace(data, probes=probes)
    population = len(data.clients) + cfg.audit.canaries
    canaries, included = (), None
    if cfg.audit.canaries:  # canary clients, appended after every other client
        canaries, included = audit_canaries(cfg.seed, cfg.audit.canaries)
        data = with_canary_clients(data, canaries, included, cfg.audit.repeats)
    if fed.clients_per_round > len(data.clients):
        raise ConfigError("federation.clients_per_round", fed.clients_per_round,
                          f"the data has {len(data.clients)} clients; sample at most that many")
    return Federation(data, tuple(malicious), population, canaries, included)


def _objective(cfg: ExperimentConfig, pad: int):
    return DpoObjective(pad, cfg.dpo.beta) if cfg.task == "dpo" else SftObjective(pad)


def _train_set(client, tokenizer, cfg: ExperimentConfig) -> list:
    """One client's training items: encoded examples (sft) or preference pairs (dpo)."""
    if cfg.task == "dpo":
        return _pairs(client.preference, tokenizer, cfg)
    return encode_all(client.train, tokenizer, cfg.data.template, cfg.data.max_length)


def prepare(cfg: ExperimentConfig) -> Setup:
    federation = build_federation(cfg)
    tasks = load_tasks(cfg)
    data, malicious, population = federation.data, federation.malicious, federation.population
    canaries, included = federation.canaries, federation.included
    num_clients = len(data.clients) - int(included.sum() if included is not None else 0)
    fed = cfg.federation
    model, tokenizer = load_base_model(cfg.model)
    model = attach_lora(model, cfg.lora, cfg.seed)
    audit = None
    if cfg.audit.canaries:
        first_canary = population - cfg.audit.canaries  # the clients before them
        audit = start_audit(cfg, canaries, included, first_canary, model, tokenizer)
    d, pad = cfg.data, tokenizer.pad_token_id
    objective = _objective(cfg, pad)
    train_sets = [_train_set(c, tokenizer, cfg) for c in data.clients]
    needs_root = cfg.defense.rule.needs_reference
    if needs_root and data.server_root is None:
        raise ConfigError("defense.aggregator", cfg.defense.aggregator,
                          "FLTrust needs a server root set; the embedded benchmark has one "
                          "(data.benchmark.root_size), file datasets do not yet")
    if needs_root:  # encoded and cached with the clients, then split off
        root = data.server_root
        train_sets.append(_pairs(root.preference, tokenizer, cfg) if cfg.task == "dpo" else
                          encode_all(root.train, tokenizer, d.template, d.max_length))
        if not train_sets[-1]:
            raise ConfigError("data.benchmark.root_size", cfg.data.benchmark.root_size,
                              "the server root set is empty; raise it")
    for client, encoded in zip(data.clients, train_sets):
        if not encoded:
            raise ConfigError("data.max_length", d.max_length,
                              f"client {client.client_id} has no example whose answer fits; raise it")
    global_eval = build_eval_set(data.global_test, [GLOBAL] * len(data.global_test), tokenizer,
                                 d.template, d.max_length, data.choices)
    client_eval = None
    if cfg.eval.clients and any(c.test for c in data.clients):
        tests = [(ex, c.client_id) for c in data.clients for ex in c.test]
        client_eval = build_eval_set([e for e, _ in tests], [g for _, g in tests], tokenizer,
                                     d.template, d.max_length, data.choices)
    preference_eval = _pairs(data.preference_test, tokenizer, cfg) if cfg.task == "dpo" else []
    backdoor_eval = _backdoor_eval(cfg, data, tokenizer) if cfg.attack.kind == "backdoor" else ()
    probe_prompts = ([encode_prompt(p, tokenizer, d.template) for p in data.probes]
                     if cfg.eval.refusal else [])
    if cfg.lora.cache_frozen_layers:
        first, model_key = _prefix_args(model, cfg)
        train_sets, global_eval, client_eval, preference_eval = _cache_prefix(
            model, first, pad, cfg.eval.batch_size, model_key, train_sets, global_eval, client_eval,
            preference_eval)
        backdoor_eval = tuple(map_sequences(e, lambda items: cache_frozen_prefix(
            model, items, first, pad, cfg.eval.batch_size, model_key)) for e in backdoor_eval)
    tasks = _encode_tasks(model, tokenizer, cfg, tasks,
                          _prefix_args(model, cfg) if cfg.lora.cache_frozen_layers else None)
    # the evaluation items' common opening (system prompt, instruction) computed once per forward
    global_eval = share_prefix(model, global_eval, pad)
    client_eval = share_prefix(model, client_eval, pad) if client_eval is not None else None
    backdoor_eval = tuple(share_prefix(model, e, pad) for e in backdoor_eval)
    if cfg.task == "dpo":  # after the cache, so reference and policy share one computation path
        train_sets = [_with_reference(model, pairs, pad, cfg) for pairs in train_sets]
        preference_eval = _with_reference(model, preference_eval, pad, cfg)
    server_root = train_sets.pop() if needs_root else []
    local_only = list(range(num_clients if fed.local_only_clients == -1 else fed.local_only_clients))
    record_plan, record_dp = None, None
    if cfg.privacy.mode == "record":
        record_plan = plan_record_privacy(cfg, [len(t) for t in train_sets])
        record_dp = RecordDp(cfg.privacy.clip_norm, record_plan.noise_multiplier, record_secret(cfg))
    trainer = LocalTrainer(model, cfg.training, objective, record_dp)
    return Setup(cfg, model, tokenizer, trainer, data, train_sets, global_eval, client_eval, local_only,
                 preference_eval, probe_prompts, record_plan, server_root, malicious, backdoor_eval, audit,
                 population, tasks)


def record_secret(cfg: ExperimentConfig) -> int | None:
    """The root of DP-SGD's batches and noise inside clients (None: from the training seed)."""
    return None if cfg.privacy.reproducible else dp_seed(cfg)


def _encode_tasks(model, tokenizer, cfg: ExperimentConfig, tasks: tuple,
                  prefix: tuple[int, str] | None) -> tuple:
    """The closed-answer benchmarks' scoring sequences, encoded once at setup: with
    `prefix` (first adapted layer, memo key) their frozen-prefix states attached (exact;
    each evaluation then runs only the adapted top layers), and their shared opening
    computed once per forward where that is exact on this model."""
    lm = PeftModelLM(model, tokenizer, cfg.data.template, cfg.eval.batch_size)
    pad, out = tokenizer.pad_token_id, []
    for task in tasks:
        if task.items and isinstance(task.items[0], ChoiceItem):
            batch = lm.encode_choices(task.items)
            sequences = list(batch.sequences)
            if prefix is not None:
                sequences = cache_frozen_prefix(model, sequences, prefix[0], pad, cfg.eval.batch_size, prefix[1])
            task = dataclasses.replace(task, encoded=dataclasses.replace(
                batch, sequences=tuple(sequences), shared=packable_prefix(model, sequences, pad)))
        out.append(task)
    return tuple(out)


def _prefix_args(model, cfg: ExperimentConfig) -> tuple[int, str]:
    """The first adapted layer and the memo key of the frozen-prefix cache."""
    return (model.config.num_hidden_layers - cfg.lora.top_layers,
            f"{cfg.model.name}|{cfg.model.dtype}|{cfg.model.quantization}")


def _cache_prefix(model, first: int, pad: int, batch_size: int, model_key: str, train_sets, *evals):
    """Attach frozen-prefix states (fedsec.prefix) to every training and evaluation item.

    Each collection is cached in one call (all clients' training items together), so a
    later run of a sweep on the same data finds it whole in the in-process memo.
    """
    def encoded(items):
        return cache_frozen_prefix(model, list(items), first, pad, batch_size, model_key)

    global_eval, client_eval, preference_eval = evals
    train_sets = _cache_train_sets(model, first, pad, batch_size, model_key, train_sets)
    global_eval = map_sequences(global_eval, encoded)
    if client_eval is not None:
        client_eval = map_sequences(client_eval, encoded)
    if preference_eval:
        preference_eval = _cache_pairs(model, first, pad, batch_size, model_key, preference_eval)
    return train_sets, global_eval, client_eval, preference_eval


def _cache_pairs(model, first: int, pad: int, batch_size: int, model_key: str, items: list) -> list:
    flat = cache_frozen_prefix(model, [p.chosen for p in items] + [p.rejected for p in items], first, pad,
                               batch_size, model_key)
    n = len(items)
    return [dataclasses.replace(p, chosen=flat[i], rejected=flat[n + i]) for i, p in enumerate(items)]


def _cache_train_sets(model, first: int, pad: int, batch_size: int, model_key: str, train_sets) -> list:
    """Every client's training items with their frozen-prefix states, cached in one call."""
    sizes = [len(items) for items in train_sets]
    flat = [item for items in train_sets for item in items]
    if flat and isinstance(flat[0], PairItem):
        flat = _cache_pairs(model, first, pad, batch_size, model_key, flat)
    else:
        flat = cache_frozen_prefix(model, flat, first, pad, batch_size, model_key)
    bounds = [0, *itertools.accumulate(sizes)]
    return [flat[bounds[k]: bounds[k + 1]] for k in range(len(sizes))]


def _backdoor_eval(cfg: ExperimentConfig, data: FederatedData, tokenizer) -> tuple[EvalSet, EvalSet]:
    """The global test examples whose answer is not the target, with and without the
    trigger, each scored against the target: accuracy is the attack success rate on the
    first, the rate of answering the target anyway on the second."""
    p, d = attack_params("backdoor", cfg.attack.params), cfg.data
    victims = [e for e in data.global_test if e.response != p["target"]]
    sets = ([with_trigger(e, p["trigger"], p["target"]) for e in victims],
            [dataclasses.replace(e, response=p["target"]) for e in victims])
    return tuple(build_eval_set(x, [GLOBAL] * len(x), tokenizer, d.template, d.max_length, data.choices)
                 for x in sets)


def _pairs(examples, tokenizer, cfg: ExperimentConfig) -> list[PairItem]:
    """Encode preference pairs (those whose both replies fit max_length)."""
    d = cfg.data
    return [p for p in (encode_pair(e, tokenizer, d.template, d.max_length) for e in examples) if p]


def _with_reference(model, pairs: list[PairItem], pad: int, cfg: ExperimentConfig) -> list[PairItem]:
    """The pairs with the reference policy's log-probabilities: the base model with the
    adapter disabled, or the adapter the run starts from."""
    reference = model.disable_adapter() if cfg.dpo.reference == "base" else contextlib.nullcontext()
    with reference:
        return with_reference(model, pairs, pad, cfg.eval.batch_size)


# ---------------------------------------------------------------------------
# One round's pieces.


def client_update(setup: Setup, start: torch.Tensor, client: int, lr: float, round_idx: int,
                  stream: str = "client", prox_mu: float = 0.0,
                  correction: torch.Tensor | None = None) -> ClientUpdate:
    result = setup.trainer.train(start, setup.train_sets[client], lr,
                                 derive_seed(setup.cfg.seed, stream, round_idx, client),
                                 prox_mu=prox_mu, correction=correction)
    return ClientUpdate(client, result.delta, result.num_examples,
                        {"loss": result.loss, "loss_terms": result.loss_terms})


def client_updates(setup: Setup, start: torch.Tensor, clients: list[int], lr: float, round_idx: int,
                   prox_mu: float = 0.0) -> list[ClientUpdate]:
    """The round's client updates from the global adapter (batched when each is one SGD step)."""
    seeds = [derive_seed(setup.cfg.seed, "client", round_idx, c) for c in clients]
    results = setup.trainer.train_clients(start, [setup.train_sets[c] for c in clients], lr, seeds,
                                          prox_mu=prox_mu)
    return [ClientUpdate(c, r.delta, r.num_examples, {"loss": r.loss, "loss_terms": r.loss_terms})
            for c, r in zip(clients, results)]


def scaffold_updates(setup: Setup, variates: VariateStore, c: torch.Tensor, start: torch.Tensor,
                     sampled: list[int], lr: float, round_idx: int) -> tuple[list[ClientUpdate], torch.Tensor]:
    """SCAFFOLD's client side for one round; returns the updates and the new server variate."""
    updates, variate_deltas = [], []
    for client in sampled:
        c_i = variates.get(client, round_idx)
        update = client_update(setup, start, client, lr, round_idx, correction=c - c_i)
        new_c_i = client_variate(c_i, c, start, start + update.delta, setup.cfg.training.local_steps, lr)
        variates.put(client, round_idx, new_c_i)
        variate_deltas.append(new_c_i - c_i)
        updates.append(update)
    return updates, server_variate(c, variate_deltas, len(setup.train_sets))


class ClientRunner(Protocol):
    """Where the sampled clients train: `updates` returns their updates (in the order of
    `clients`) and the ids of the clients that never answered (a crashed machine)."""

    def start(self, setup: Setup, log: Callable[[str], None]) -> None: ...

    def updates(self, setup: Setup, start: torch.Tensor, clients: list[int], lr: float, round_idx: int,
                prox_mu: float) -> tuple[list[ClientUpdate], tuple[int, ...]]: ...


class InProcessClients:
    """Every client simulated here, on the Setup's model."""

    def start(self, setup: Setup, log: Callable[[str], None]) -> None:
        pass

    def updates(self, setup: Setup, start: torch.Tensor, clients: list[int], lr: float, round_idx: int,
                prox_mu: float) -> tuple[list[ClientUpdate], tuple[int, ...]]:
        return client_updates(setup, start, clients, lr, round_idx, prox_mu), ()


@dataclass
class ClientSide:
    """What one machine needs to train some of the federation's clients: the model with
    its adapter, and those clients' training items (tokenized as `prepare` does)."""

    cfg: ExperimentConfig
    trainer: LocalTrainer
    train_sets: dict[int, list]
    population: int


def prepare_clients(cfg: ExperimentConfig, hosted: Callable[[int], bool], record_noise: float | None = None,
                    only: set[int] | None = None, cache: Path | None = None) -> ClientSide:
    """The client side of a deployment: the federation's clients that `hosted` accepts
    (and, if given, that are in `only`), ready to train.

    Each client's items (tokens, frozen-prefix states, DPO reference log-probabilities)
    are computed from that client alone, so they do not depend on which clients a
    message asks for; with `cache` they are stored there and read back by later
    messages (a Flower ClientApp is a new process each round). Computed per client,
    they can differ from `prepare`'s, which batches all clients together, in the last
    float bits.
    """
    federation = build_federation(cfg)
    model, tokenizer = load_base_model(cfg.model)
    model = attach_lora(model, cfg.lora, cfg.seed)
    pad = tokenizer.pad_token_id
    ids = [c for c in range(len(federation.data.clients)) if hosted(c) and (only is None or c in only)]
    sets = {}
    for c in ids:
        path = cache / f"client-{c}.pt" if cache is not None else None
        if path is not None and path.is_file():
            try:
                sets[c] = [_item_from_dict(d) for d in torch.load(path, weights_only=True)]
                continue
            except Exception as err:  # a damaged file is computed again and replaced
                print(f"fedsec: {path} is unreadable ({type(err).__name__}); preparing client {c} again",
                      file=sys.stderr)
        items = _train_set(federation.data.clients[c], tokenizer, cfg)
        if cfg.lora.cache_frozen_layers and items:
            first, model_key = _prefix_args(model, cfg)
            items = _cache_train_sets(model, first, pad, cfg.eval.batch_size, model_key, [items])[0]
        if cfg.task == "dpo":
            items = _with_reference(model, items, pad, cfg)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            torch.save([_item_to_dict(item) for item in items], buffer)
            atomic_write_bytes(path, buffer.getvalue())
        sets[c] = items
    record_dp = (RecordDp(cfg.privacy.clip_norm, record_noise, record_secret(cfg)) if record_noise is not None
                 else None)
    trainer = LocalTrainer(model, cfg.training, _objective(cfg, pad), record_dp)
    return ClientSide(cfg, trainer, sets, federation.population)


def client_cache_key(cfg: ExperimentConfig) -> str:
    """What a client's prepared items depend on: the config without the sections that
    only steer the rounds (federation, training, privacy, defense, engine, names)."""
    steering = ("name", "output_dir", "keep_checkpoints", "federation", "training", "privacy", "defense",
                "engine", "flower")
    kept = {k: v for k, v in to_mapping(cfg).items() if k not in steering}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _item_to_dict(item) -> dict:
    if isinstance(item, PairItem):
        return {"chosen": _item_to_dict(item.chosen), "rejected": _item_to_dict(item.rejected),
                "ref_chosen": item.ref_chosen, "ref_rejected": item.ref_rejected}
    return {"input_ids": item.input_ids, "labels": item.labels, "hidden": item.hidden,
            "hidden_layer": item.hidden_layer}


def _item_from_dict(d: dict):
    if "chosen" in d:
        return PairItem(_item_from_dict(d["chosen"]), _item_from_dict(d["rejected"]), d["ref_chosen"],
                        d["ref_rejected"])
    return Encoded(d["input_ids"], d["labels"], d["hidden"], d["hidden_layer"])


def server_reference(setup: Setup, start: torch.Tensor, lr: float, round_idx: int) -> torch.Tensor | None:
    """FLTrust's g0: the server's own update on its root set, from the global adapter."""
    if not setup.server_root:
        return None
    return setup.trainer.train(start, setup.server_root, lr,
                               derive_seed(setup.cfg.seed, "server-root", round_idx)).delta


def evaluate_model(setup: Setup, vector: torch.Tensor, round_done: int | None = None) -> tuple[dict, dict | None]:
    """Global (and alignment) evaluation and per-client evaluation of the adapter `vector`;
    with `round_done`, also the eval.benchmarks due after that round."""
    setup.adapter.set(vector)
    batch = setup.cfg.eval.batch_size
    global_eval: dict = {}
    if setup.global_eval.encoded:
        global_eval.update(evaluate(setup.model, setup.global_eval, setup.pad_id, batch).as_dict())
    if setup.preference_eval:
        global_eval["preference"] = preference_metrics(setup.model, setup.preference_eval,
                                                       setup.pad_id, batch, setup.cfg.dpo.beta)
    if setup.backdoor_eval:
        triggered, clean = setup.backdoor_eval
        on, off = (evaluate(setup.model, e, setup.pad_id, batch) for e in (triggered, clean))
        # the rates are arg-max shares; the losses (mean NLL of the target answer with and
        # without the trigger) are the margin behind them, and do not flip on a near tie
        global_eval["backdoor"] = {"attack_success_rate": on.accuracy, "clean_target_rate": off.accuracy,
                                   "triggered_target_loss": on.loss, "clean_target_loss": off.loss}
    if setup.cfg.eval.canaries:
        e = setup.cfg.eval
        global_eval["memorization"] = memorization_metrics(
            setup.model, setup.tokenizer, setup.data.canaries, setup.cfg.data.template, e.canary_candidates,
            setup.cfg.seed, batch)
    if setup.probe_prompts:
        global_eval["refusal_rate"], _ = refusal_rate(setup.model, setup.tokenizer, setup.probe_prompts,
                                                      setup.cfg.eval.max_new_tokens, batch)
    due = [t for t in setup.tasks if round_done is not None and t.due(round_done, setup.cfg.federation.rounds)]
    if due:
        lm = PeftModelLM(setup.model, setup.tokenizer, setup.cfg.data.template, batch)
        global_eval["benchmarks"] = {
            t.name: run_task(t, lm, setup.answers_dir / t.name if setup.answers_dir else None, round_done)
            for t in due}
    if setup.client_eval is None:
        return global_eval, None
    per_client = evaluate_groups(setup.model, setup.client_eval, setup.pad_id, batch)
    return global_eval, client_summary(per_client)


def client_summary(per_client: dict) -> dict:
    accs = [r.accuracy for r in per_client.values() if r.accuracy is not None]
    losses = [r.loss for r in per_client.values()]
    return {
        "mean_accuracy": sum(accs) / len(accs) if accs else None,
        "min_accuracy": min(accs) if accs else None,
        "mean_loss": sum(losses) / len(losses),
        "per_client": {str(c): r.as_dict() for c, r in per_client.items()},
    }


# ---------------------------------------------------------------------------
# The run.


def run_experiment(cfg: ExperimentConfig, out: str | Path | None = None, resume: bool = False,
                   stop_after: int | None = None, progress: bool = True,
                   log: Callable[[str], None] = print, clients: ClientRunner | None = None) -> RunResult:
    """Run (or resume) one federated experiment; returns its headline numbers.

    `stop_after` ends the run after that many rounds (as a crash would), leaving a
    checkpoint that `resume=True` continues from. `clients` trains the sampled clients
    (default: here, in this process; fedsec.engine.flower: on Flower SuperNodes).

    Crash safety: each round ends with its checkpoint (written atomically), and only
    then its metrics row and ledger are written out; the checkpoint carries the row, so
    a resume restores a row a crash kept from being written. A run killed at any moment
    resumes to the same results.
    """
    clients = clients if clients is not None else InProcessClients()
    run = None
    if resume:
        path = Path(out) if out is not None else latest_run_dir(cfg)
        if path is None:
            raise ConfigError("--resume", cfg.name, f"no earlier run of it under {cfg.output_dir}/; "
                              "start one without --resume")
        run = RunDir.reopen(path, cfg)
        run.acquire()
    else:
        path = Path(out) if out is not None else default_run_dir(cfg)
        RunDir.check_free(path)
    try:
        setup = prepare(cfg)  # fails on bad data or model before any directory is made
        # the sampling rate q = clients_per_round / population does not depend on which audit
        # canaries are in, so the mechanism (and its accounting) is the same in both worlds
        dp = UserLevelDp(cfg, plan_privacy(cfg, setup.population)) if cfg.privacy.mode == "user" else None
        record = RecordLevelDp(cfg, setup.record_plan) if setup.record_plan is not None else None
        if run is None:
            run = RunDir.create(path, cfg)
        return _rounds(setup, run, dp, record, resume, stop_after, progress, log, clients)
    finally:
        if run is not None:
            run.close()


def _rounds(setup: Setup, run: RunDir, dp: UserLevelDp | None, record: RecordLevelDp | None, resume: bool,
            stop_after: int | None, progress: bool, log: Callable[[str], None], clients: ClientRunner) -> RunResult:
    """The rounds of `run_experiment`, from its checkpoint when resuming, then `finish`."""
    cfg = setup.cfg
    num_clients = len(setup.train_sets)
    malicious = setup.malicious
    attack_summary = {"kind": cfg.attack.kind, "malicious": list(malicious)} if malicious else None
    private = dp if dp is not None else record  # the run's privacy state, if any
    if private is not None and cfg.privacy.reproducible:
        log(reproducible_warning(cfg))
    setup.answers_dir = run.path / "answers"

    fed = cfg.federation
    dim = setup.adapter.layout.numel
    pipeline = build_pipeline(cfg, run.path, dim, dp)  # sanitize -> (clip) -> rule -> (noise)
    server = make_server_optimizer(fed)
    global_vec = setup.adapter.get()
    variates = VariateStore(run.path / "scaffold", dim) if fed.algorithm == "scaffold" else None
    server_variate_c = torch.zeros(dim) if variates is not None else None
    crafted = setup.audit.updates if setup.audit is not None else None  # audit.kind update
    prox_mu = fed.prox_mu if fed.algorithm == "fedprox" else 0.0
    local = {c: global_vec.clone() for c in setup.local_only}
    # under user-level DP the Poisson sample is part of the mechanism: its randomness is the DP stream's
    sample_root = dp.root if dp is not None else cfg.seed
    rounds_done = 0
    checkpoint = run.load_latest_checkpoint() if resume else None
    if checkpoint is not None:
        rounds_done = int(checkpoint["rounds_done"])
        global_vec = checkpoint["global"]
        server.load_state_dict(checkpoint["server"])
        local = {int(c): v for c, v in checkpoint["local_only"].items()}
        server_variate_c = checkpoint.get("scaffold_c")
        pipeline.rule.load_state_dict(checkpoint.get("defense"))
        if private is not None:
            private.load_state_dict(checkpoint["privacy"], rounds_done)
            _charge_lost_rounds(run, private, rounds_done, log)
        if crafted is not None:
            crafted.scores = checkpoint["audit_scores"]
        run.truncate_metrics(rounds_done)
        row = checkpoint.get("row")
        if row is not None and not any(r.get("phase") == "federated" and r.get("round") == rounds_done
                                       for r in run.read_covered_metrics()):
            run.append_metrics(row)  # the crash came between the checkpoint and its row
        if private is not None:
            _write_ledger(run, private)
        log(f"resuming {run.path} after round {rounds_done}/{fed.rounds}")
    elif resume:
        run.truncate_metrics(0)
    clients.start(setup, log)
    if rounds_done == 0 and not any(r.get("round") == 0 for r in run.read_covered_metrics()):
        untuned, clients_eval = evaluate_model(setup, global_vec, 0)
        run.append_metrics({"phase": "federated", "round": 0, "global_eval": untuned,
                            "client_eval": clients_eval})
        log(round_line(0, fed.rounds, None, untuned, clients_eval, private is not None))

    budget = Budget(cfg, log)
    bar = tqdm(total=fed.rounds, initial=rounds_done, desc="rounds", unit="round", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    for round_idx in range(rounds_done, fed.rounds):
        started = time.perf_counter()
        lr = round_lr(cfg.training, round_idx, fed.rounds)
        sampler = torch_generator(sample_root, "sample", round_idx)
        sampled = (poisson_sample(num_clients, fed.clients_per_round / setup.population, sampler)
                   if cfg.sampling == "poisson" else
                   sample_clients(num_clients, fed.clients_per_round, sampler))
        if private is not None and budget.exceeded(round_idx, private, sampled):
            bar.close()
            return finish(setup, run, global_vec, local, private.report(), attack_summary,
                          rounds_done=round_idx, stopped=budget.stopped)
        trained = crafted.trained(sampled) if crafted is not None else sampled
        failed: tuple[int, ...] = ()
        if variates is None:
            updates, failed = clients.updates(setup, global_vec, trained, lr, round_idx, prox_mu)
        else:
            updates, server_variate_c = scaffold_updates(setup, variates, server_variate_c,
                                                         global_vec, trained, lr, round_idx)
        if crafted is not None:
            updates = crafted.insert(updates, sampled, dim)
        outcome = None
        if malicious:
            outcome = attack_round(cfg.attack.kind, cfg.attack.params, updates, set(malicious),
                                   torch_generator(cfg.seed, "attack", round_idx), fed.server_lr)
            updates = outcome.updates
        batch = pipeline(updates, round_idx, server_reference(setup, global_vec, lr, round_idx))
        update, rejected = batch.aggregate, batch.rejected
        defended = batch.info.get("rule")  # the robust rule's report: who it excluded, its scores
        privacy = None
        if dp is not None:
            privacy = dp.record(batch)  # the round's DP release onto the ledger: epsilon so far
        if record is not None:
            privacy = record.record(round_idx, sampled)
        attacked = None
        if outcome is not None:
            attacked = detection(outcome.malicious, tuple(sampled), rejected, (defended or {}).get("excluded"))
            if outcome.note:
                attacked["note"] = outcome.note
        if crafted is not None:  # the audit's attacker sees every released aggregate
            crafted.observe(update)
        global_vec = server.step(global_vec, update)
        for c in setup.local_only:
            local[c] = local[c] + client_update(setup, local[c], c, lr, round_idx, "local").delta

        due = ((round_idx + 1) % cfg.eval.every == 0 or round_idx + 1 == fed.rounds
               or any(t.due(round_idx + 1, fed.rounds) for t in setup.tasks))
        global_eval, clients_eval = evaluate_model(setup, global_vec, round_idx + 1) if due else (None, None)
        kept = [u for u in updates if u.client_id not in set(rejected)]
        terms = sum(u.metrics["loss_terms"] for u in kept)
        train_loss = sum(u.metrics["loss"] * u.metrics["loss_terms"] for u in kept) / max(terms, 1)
        result = RoundResult(round_idx + 1, lr, tuple(sampled), train_loss, rejected,
                             time.perf_counter() - started, global_eval, clients_eval, privacy, defended,
                             attacked, failed)
        row = result.as_dict()
        # the checkpoint first: nothing computed from this round leaves the process before it is durable
        run.save_checkpoint(round_idx + 1, {"global": global_vec, "server": server.state_dict(),
                                            "local_only": {str(c): v for c, v in local.items()},
                                            "scaffold_c": server_variate_c,
                                            "defense": pipeline.rule.state_dict(),
                                            "privacy": private.state_dict() if private is not None else None,
                                            "audit_scores": crafted.scores if crafted is not None else None,
                                            "row": row},
                            keep=cfg.keep_checkpoints)
        run.append_metrics(row)
        if private is not None:
            _write_ledger(run, private)
        bar.update(1)
        bar.clear()
        log(round_line(round_idx + 1, fed.rounds, result, global_eval, clients_eval, private is not None))
        bar.refresh()
        if stop_after is not None and round_idx + 1 >= stop_after and round_idx + 1 < fed.rounds:
            bar.close()
            return RunResult(str(run.path), round_idx + 1, False, None, None, None, fed.algorithm,
                             private.report() if private is not None else None, attack_summary)
    bar.close()
    return finish(setup, run, global_vec, local, private.report() if private is not None else None,
                  attack_summary)


def _write_ledger(run: RunDir, private) -> None:
    """privacy_ledger.json: the mechanism's rounds (the record ledger's per-client step counts,
    which say who trained, go to the not-covered place)."""
    run.write_json("privacy_ledger.json", private.public_ledger())
    if isinstance(private, RecordLevelDp):
        run.write_uncovered_json("record_ledger_steps.json", private.ledger.to_dict())


def _charge_lost_rounds(run: RunDir, private, rounds_done: int, log: Callable[[str], None]) -> None:
    """Rounds written out after the checkpoint we resume from were released; the checkpoint
    that followed them is lost (unreadable), and they are computed again. Each redo is a
    second release of the same data, charged: with fresh noise plainly so, and with
    privacy.reproducible too, since nothing verifies that a redo is bit-identical to the
    release (another machine, thread count or library version can change the bits)."""
    lost = [r for r in run.read_metrics() if r.get("phase") == "federated" and r.get("round", 0) > rounds_done
            and r.get("privacy")]
    if not lost:
        return
    for row in lost:
        private.charge_released(row)
    log(f"fedsec: rounds {', '.join(str(r['round']) for r in lost)} were written out before their checkpoint "
        "was lost; each is computed again and charged to the privacy ledger a second time")


class Budget:
    """privacy.epsilon_budget: before each round, would it take epsilon over the budget?"""

    def __init__(self, cfg: ExperimentConfig, log: Callable[[str], None]):
        self.limit, self.action, self.log = cfg.privacy.epsilon_budget, cfg.privacy.on_budget, log
        self.warned = False
        self.stopped: str | None = None

    def exceeded(self, round_idx: int, private, sampled: list[int]) -> bool:
        """True when the run must stop before round `round_idx` (0-based); warns once otherwise."""
        if self.limit is None or self.warned:
            return False
        after = private.epsilon_after(sampled)
        if after is None:
            self.log(f"fedsec: warning: privacy.epsilon_budget {self.limit:g} cannot be checked: the run's epsilon "
                     f"is not certified ({private.report()['reason']})")
            self.warned = True
            return False
        if after <= self.limit:
            return False
        what = (f"round {round_idx + 1} would take epsilon to {format_epsilon(after)} > privacy.epsilon_budget "
                f"{self.limit:g}")
        if self.action == "stop":
            self.stopped = what
            self.log(f"fedsec: stopping before {what}; the run ends after round {round_idx}")
            return True
        self.log(f"fedsec: warning: {what}; going on (privacy.on_budget: warn)")
        self.warned = True
        return False


def membership_attack(setup: Setup) -> dict:
    """eval.mia on the model as it stands: a sample of the federation's training examples
    against as many held-out ones, encoded (and prefix-cached) like the training data."""
    cfg = setup.cfg
    sample = mia_sample(*mia_candidates(setup.data, setup.federation_clients, cfg.task), cfg.eval.mia_examples,
                        cfg.seed)
    encoded = [encode_all(examples, setup.tokenizer, cfg.data.template, cfg.data.max_length)
               for examples in sample]
    if cfg.lora.cache_frozen_layers:
        first, model_key = _prefix_args(setup.model, cfg)
        encoded = [cache_frozen_prefix(setup.model, items, first, setup.pad_id, cfg.eval.batch_size, model_key)
                   for items in encoded]
    membership = membership_inference(setup.model, setup.tokenizer, *encoded, cfg.eval.batch_size)
    extraction = {side: answer_extraction(setup.model, setup.tokenizer, examples, cfg.data.template,
                                          cfg.eval.batch_size)
                  for side, examples in zip(("members", "non_members"), sample)}
    return {**membership, "answer_extraction": extraction}


def audit_outcome(setup: Setup, privacy: dict | None) -> dict:
    """The audit's game on the finished run, beside the accountant's epsilon (if certified)."""
    cfg, state = setup.cfg, setup.audit
    if state.updates is not None:
        before, after = [0.0] * len(state.canaries), state.updates.scores.tolist()
    else:
        before = state.untuned
        after = secret_margins(setup.model, setup.tokenizer, state.canaries, cfg.data.template,
                               cfg.eval.batch_size, cfg.seed)
    certified = privacy is not None and privacy.get("certified")
    return {"kind": cfg.audit.kind,
            **audit_result(before, after, state.included, cfg.audit.guesses, cfg.privacy.delta,
                           cfg.audit.confidence, privacy["epsilon"] if certified else None)}


def finish(setup: Setup, run: RunDir, global_vec: torch.Tensor, local: dict,
           privacy: dict | None = None, attack: dict | None = None, rounds_done: int | None = None,
           stopped: str | None = None) -> RunResult:
    """Local-only evaluation, final adapter, result.json. `stopped`: why the run ended after
    `rounds_done` rounds, before the planned ones (the epsilon budget)."""
    rounds_done = setup.cfg.federation.rounds if rounds_done is None else rounds_done
    rows = run.read_metrics()
    untuned = next(r["global_eval"] for r in rows if r.get("round") == 0)
    last = [r for r in rows if r.get("phase") == "federated" and r.get("round") == rounds_done]
    if stopped is not None and not (last and last[-1].get("global_eval")):
        final, _ = evaluate_model(setup, global_vec)  # the adapter the run ends with, evaluated
    else:
        final = next(r["global_eval"] for r in reversed(rows) if r.get("global_eval"))
    local_only = None
    if local:
        per_client = {}
        for c, vec in sorted(local.items()):
            global_eval, own = evaluate_model(setup, vec)
            own_eval = own["per_client"].get(str(c)) if own else None
            per_client[str(c)] = {"global_eval": global_eval, "own_test": own_eval}
        accs = [v["global_eval"].get("accuracy") for v in per_client.values()]
        accs = [a for a in accs if a is not None]
        local_only = {"mean_accuracy": sum(accs) / len(accs) if accs else None,
                      "per_client": per_client}
        run.append_metrics({"phase": "local_only_final", "round": rounds_done, **local_only})
    setup.adapter.set(global_vec)
    setup.model.save_pretrained(run.path / "adapter")
    audit = None
    if setup.audit is not None:
        audit = audit_outcome(setup, privacy)
    membership = None
    if setup.cfg.eval.mia:
        membership = membership_attack(setup)
    result = RunResult(str(run.path), rounds_done, True, untuned, final, local_only,
                       setup.cfg.federation.algorithm, privacy, attack, audit, membership, stopped)
    if run.guarded:
        covered, hidden = split_result(asdict(result))
        run.write_uncovered_json("result.json", hidden)
        run.write_json("result.json", covered)
    else:
        run.write_json("result.json", asdict(result))
    return result
