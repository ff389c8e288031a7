"""What a run builds once, before its first round: the federation's data (poisoned where
the attack says, the audit's canary clients appended), the model with its adapter, each
client's training items tokenized once (the frozen prefix cached), and the evaluation
sets (global, per client, preference pairs, probes, canaries, benchmark tasks)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedsec import progress
from fedsec.adapter import AdapterParams
from fedsec.attacks.clients import attack_params, malicious_clients, poison_data
from fedsec.attacks.poisoning import with_trigger
from fedsec.canaries import AuditState, audit_canaries, start_audit, with_canary_clients
from fedsec.config import ExperimentConfig
from fedsec.data import ClientData, FederatedData, build_federated_data, read_root, read_test, silo_clients
from fedsec.data.benchmark import REFUSAL, canary_example, make_canaries, unsafe_requests
from fedsec.data.table import Examples, Extended, TokenTable
from fedsec.data.unsafe import draw, read_alignment, read_unsafe
from fedsec.devices import ROWS_DEPEND, model_device, rows_independent
from fedsec.encoding import encode, encode_prompt, encoding_key
from fedsec.errors import ConfigError
from fedsec.evalsuite.runner import PeftModelLM, load_tasks
from fedsec.evalsuite.tasks import ChoiceItem
from fedsec.evaluation import (
    EvalSet,
    build_eval_set,
    map_sequences,
    packable_prefix,
    share_prefix,
)
from fedsec.leakage import mia_random_split, mia_user_split
from fedsec.models import load_model
from fedsec.objectives import OBJECTIVES, PairItem, objective_for
from fedsec.prefix import FrozenPrefix, check_architecture, plan_cache
from fedsec.privacy import (
    RecordPlan,
    dp_seed,
    plan_record_privacy,
)
from fedsec.training import LocalTrainer, RecordDp, record_tokens

GLOBAL = -1  # group id of the global test set


@dataclass(frozen=True)
class Setup:
    """Everything built once per run: model, trainer, tokenized data, eval sets (frozen:
    what changes from round to round is the loop's RunState)."""

    cfg: ExperimentConfig
    model: torch.nn.Module
    tokenizer: object
    trainer: LocalTrainer
    data: FederatedData
    train_sets: ClientSets  # per client: Encoded (sft) or PairItem (dpo)
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
    silos: tuple[int, ...] = ()  # data.silos on Flower: clients per organisation, whose data stays with it
    remote_eval: Callable | None = None  # Flower: per-client evaluation on the nodes (vector -> {id: EvalResult})
    mia_pool: tuple = ()  # eval.mia_split random: (members, non-members) drawn by fedsec's coin; user: per user
    realign_set: list = field(default_factory=list)  # defense.realign_steps: the server's aligned set, encoded

    @property
    def federation_clients(self) -> int:
        """Clients of the federation proper (the audit's canary clients come after them)."""
        return self.population - self.cfg.audit.canaries

    @property
    def trainable(self) -> int:
        """The clients a round samples from (ids 0 .. trainable - 1): those with training
        items here, or with data.silos on Flower those the organisations reported."""
        return sum(self.silos) if self.silos else len(self.train_sets)

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
    mia_pool: tuple = ()  # eval.mia_split random/user: (members, non-members), the latter out of training


def build_federation(cfg: ExperimentConfig, silos: tuple[int, ...] | None = None) -> Federation:
    """The federation from the config; with `silos` (clients per organisation of data.silos,
    as their SuperNodes reported them), the server's view of it: the clients' ids and names,
    none of their examples (those stay on the nodes), the server's own files (data.test,
    data.root, eval.probes)."""
    data = build_federated_data(cfg.data, cfg.seed, cfg.task) if silos is None else server_view(cfg, silos)
    if (cfg.data.source != "embedded" or cfg.data.silos) and cfg.data.benchmark.canaries_per_client:
        # the benchmark plants its own; Flower's server holds no data, so it records the secrets only
        data = with_canaries(data, cfg, len(data.clients), plant=silos is None)
    unread = cfg.unused_fields()
    if unread and silos is None:
        progress.note("fedsec: set but not used by this run: "
                      + ", ".join(f"{name} ({reason})" for name, reason in unread.items()))
    held = cfg.data.client_test_fraction
    if (held and silos is None and cfg.task == "sft" and (cfg.data.source != "embedded" or cfg.data.silos)
            and not cfg.eval.clients and not (cfg.eval.mia and cfg.eval.mia_split == "held_out")):
        progress.note(f"fedsec: data.client_test_fraction {held:g} holds out that share of each client's examples "
                      "and nothing reads it (eval.clients false, no membership inference on held-out records), "
                      "so it is not trained on either; set it to 0 to train on it")
    num_clients = len(data.clients)
    fed = cfg.federation
    if fed.local_only_clients > num_clients:
        raise ConfigError("federation.local_only_clients", fed.local_only_clients,
                          f"the data has {num_clients} clients; use at most that many or -1")
    count = cfg.attack.count(num_clients)
    if count > num_clients:
        raise ConfigError("attack.malicious", count, f"the data has {num_clients} clients; use at most that many")
    malicious = malicious_clients(num_clients, count, cfg.seed)
    if cfg.eval.probes:
        probes = read_unsafe(cfg.eval.probes, "eval.probes", need_reply=False)
        if 0 < cfg.eval.max_probes < len(probes):
            probes = draw(probes, cfg.eval.max_probes, cfg.seed, "probes-file")
        data = dataclasses.replace(data, probes=probes)
    if cfg.eval.refusal and not data.probes:  # else the harmless rate would be missing without a word
        embedded = cfg.data.source == "embedded" and not cfg.data.silos
        raise ConfigError("eval.refusal", True, "the data has no unsafe probes to score; give eval.probes (a file "
                          "of unsafe requests, e.g. AdvBench's goals)"
                          + (" or raise data.benchmark.num_probes" if embedded else "") + ", or set it to false")
    if silos is None:  # with silos, each node aligns and poisons its own clients (`node_federation`)
        data = _aligned_and_poisoned(data, cfg, malicious)
    mia_pool = ()
    if cfg.eval.mia and cfg.eval.mia_split == "random":  # every party takes the same records out
        data, *mia_pool = mia_random_split(data, OBJECTIVES[cfg.task], cfg.eval.mia_examples, cfg.seed)
    if cfg.eval.mia and cfg.eval.mia_split == "user":  # and the same clients
        if silos is not None:
            raise ConfigError("eval.mia_split", "user", "user-level inference takes clients out of the federation "
                              "before it starts, which data.silos leaves to the organisations; use random")
        holders = {c.client_id for c in data.canaries}
        try:
            data, renumber, *mia_pool = mia_user_split(data, OBJECTIVES[cfg.task], cfg.eval.mia_examples, cfg.seed,
                                                       (*malicious, *holders))
        except ValueError as err:
            raise ConfigError("eval.mia_split", "user", f"{err}; use random or held_out") from None
        malicious = [renumber[k] for k in malicious]
    # the checks that need only the data, before the model is loaded and anything is encoded
    if cfg.defense.rule.needs_reference and data.server_root is None:
        raise ConfigError("defense.aggregator", cfg.defense.aggregator,
                          "FLTrust needs a server root set; give data.root, a file of clean examples in the "
                          "data's layout (the embedded benchmark makes its own)")
    if cfg.eval.canaries and not data.canaries:
        raise ConfigError("eval.canaries", True, "no canaries are planted; set "
                          "data.benchmark.canaries_per_client >= 1 (embedded benchmark)")
    if cfg.eval.mia and cfg.eval.mia_split == "held_out" and not OBJECTIVES[cfg.task].held_out(data):
        raise ConfigError("eval.mia", True, "membership inference needs held-out examples and the data has "
                          "no test set; give the dataset a test split or set eval.mia: false")
    population = len(data.clients) + cfg.audit.canaries
    canaries, included = (), None
    if cfg.audit.canaries:  # canary clients, appended after every other client
        canaries, included = audit_canaries(cfg.seed, cfg.audit.canaries, cfg.audit.secret)
        data = with_canary_clients(data, canaries, included, cfg.audit.repeats)
    # Poisson sampling's rate is clients_per_round / population (audit canaries in or out): q <= 1
    most = population if cfg.sampling == "poisson" else len(data.clients)
    if fed.clients_per_round > most:
        counted = " (the audit's canaries counted, in or out)" if most == population and cfg.audit.canaries else ""
        raise ConfigError("federation.clients_per_round", fed.clients_per_round,
                          f"the data has {most} clients{counted}; sample at most that many")
    return Federation(data, tuple(malicious), population, canaries, included, tuple(mia_pool))


def _aligned_and_poisoned(data: FederatedData, cfg: ExperimentConfig, malicious: tuple[int, ...]) -> FederatedData:
    if cfg.data.alignment is not None:  # before the poison: a malicious client's share is poisoned like the rest
        data = with_alignment(data, cfg)
    return poison_data(data, cfg.attack.kind, attack_params(cfg.attack.kind, cfg.attack.params), malicious,
                       cfg.seed)


def server_view(cfg: ExperimentConfig, silos: tuple[int, ...]) -> FederatedData:
    """A data.silos federation as the server knows it: each client's id and name (from the
    organisations' client counts), no examples; the global test set from data.test."""
    clients, first = [], 0
    for silo, count in enumerate(silos):
        clients.extend(ClientData(first + k, f"silo{silo}-client{k:03d}", (), ()) for k in range(count))
        first += count
    test = read_test(cfg.data, cfg.task)
    root = read_root(cfg.data, cfg.task) if cfg.data.root is not None else None
    if cfg.task == "dpo":
        return FederatedData(tuple(clients), (), None, preference_test=test, server_root=root)
    return FederatedData(tuple(clients), test, cfg.data.choices, server_root=root)


def node_federation(cfg: ExperimentConfig, silo: int, first: int, total: int,
                    source: str | None = None) -> Federation:
    """Organisation `silo`'s share of a data.silos federation, as its SuperNode builds it from
    its own file (`source`, else data.silos[silo]): its clients with their global ids from
    `first` on, aligned and poisoned as the in-process run does (the malicious identities
    are drawn over all `total` clients)."""
    clients = silo_clients(cfg.data, cfg.seed, cfg.task, silo, first, source)
    malicious = malicious_clients(total, cfg.attack.count(total), cfg.seed)
    data = FederatedData(clients, (), cfg.data.choices)
    if cfg.data.benchmark.canaries_per_client:  # in the holders among its clients, as the in-process run
        data = with_canaries(data, cfg, total)
    data = _aligned_and_poisoned(data, cfg, malicious)
    return Federation(data, tuple(malicious), total)


def with_canaries(data: FederatedData, cfg: ExperimentConfig, total: int, plant: bool = True) -> FederatedData:
    """A file's, dataset's or organisations' federation of `total` clients with canary secrets
    planted as the embedded benchmark plants them (data.benchmark.canaries_per_client,
    canary_repeats, canary_clients): each of the first canary_clients clients (0: all) gets its
    own random secrets ("The vault PIN of <name> is <6 digits>."), each repeated canary_repeats
    times, after its training examples, from the same seeded streams (fedsec.data.benchmark.
    make_canaries). `data` may hold some of them (an organisation's SuperNode: the holders among
    its clients get theirs); without `plant` (Flower's server, which holds no examples) only the
    secrets are recorded, for eval.canaries."""
    bench = cfg.data.benchmark
    if bench.canary_clients > total:
        raise ConfigError("data.benchmark.canary_clients", bench.canary_clients,
                          f"the data has {total} clients; use at most that many (0: every client)")
    canaries = make_canaries(cfg.seed, bench.canary_clients or total, bench.canaries_per_client)
    planted: dict[int, tuple] = {}
    for canary in canaries:
        planted[canary.client_id] = planted.get(canary.client_id, ()) + (canary_example(canary),) * bench.canary_repeats
    clients = tuple(dataclasses.replace(c, train=c.train + planted[c.client_id])
                    if plant and c.client_id in planted else c for c in data.clients)
    return dataclasses.replace(data, clients=clients, canaries=canaries)


def with_alignment(data: FederatedData, cfg: ExperimentConfig) -> FederatedData:
    """Every client's training data with data.alignment_per_client alignment examples
    (unsafe request -> refusal) drawn from data.alignment, a seeded stream per client.
    Requests that are also refusal probes are refused: the harmless rate would then
    score training data."""
    if cfg.task != "sft":
        raise ConfigError("data.alignment", cfg.data.alignment, "is alignment data for task sft (refusals "
                          "to train on); for dpo give the refusal-vs-compliance pairs in the data itself")
    examples = read_alignment(cfg.data.alignment)
    probes = {p.prompt for p in data.probes}
    shared = sum(e.prompt in probes for e in examples)
    if shared:
        raise ConfigError("data.alignment", cfg.data.alignment, f"shares {shared} request(s) with the refusal "
                          "probes; the harmless rate would score training data: use disjoint files")
    k = cfg.data.alignment_per_client
    clients = tuple(dataclasses.replace(c, train=c.train + draw(examples, k, cfg.seed, "alignment", c.client_id))
                    for c in data.clients)
    return dataclasses.replace(data, clients=clients)


def server_alignment_set(cfg: ExperimentConfig, data: FederatedData) -> tuple:
    """defense.realign_steps: the server's own aligned examples (unsafe request -> refusal),
    defense.realign_examples of them: drawn from data.alignment, else the embedded
    benchmark's unsafe requests on the server's own stream; a refusal probe never is one
    (the harmless rate would score the server's training data)."""
    n, probes = cfg.defense.realign_examples, {p.prompt for p in data.probes}
    if cfg.data.alignment is not None:
        pool = tuple(e for e in read_alignment(cfg.data.alignment) if e.prompt not in probes)
        examples = draw(pool, min(n, len(pool)), cfg.seed, "server-realign") if pool else ()
    else:
        examples = tuple(e for e in unsafe_requests(cfg.seed, 2 * n, REFUSAL, "server-realign")
                         if e.prompt not in probes)[:n]
    if not examples:
        raise ConfigError("defense.realign_examples", n, "every aligned request is also a refusal probe; give "
                          "data.alignment a file of other requests")
    return examples


def train_set(objective, client, tokenizer, cfg: ExperimentConfig) -> list:
    """One client's training items, as its objective reads and encodes them."""
    return objective.encode(objective.records(client), tokenizer, cfg.data)


PLANTED_KEEP = 4096  # planted examples whose items TokenTables keeps (most recently used)


class TokenTables:
    """SFT clients' items from their file's rows encoded once (fedsec.data.table.TokenTable,
    cached by fingerprint); a client whose examples are not a file's rows (the embedded
    benchmark, a poisoned client, canaries) is encoded directly (`train_set`)."""

    def __init__(self, objective, tokenizer, cfg: ExperimentConfig):
        self.objective, self.tokenizer, self.cfg = objective, tokenizer, cfg
        self.key = encoding_key(tokenizer, cfg.data.template, cfg.data.max_length)
        self.tables: dict[int, TokenTable] = {}
        self.encoded: collections.OrderedDict[str, list] = collections.OrderedDict()  # planted examples' items

    def _table(self, records: Examples) -> TokenTable:
        if id(records.table) not in self.tables:
            d = self.cfg.data
            self.tables[id(records.table)] = TokenTable(
                records, lambda example: encode(example, self.tokenizer, d.template, d.max_length), self.key)
        return self.tables[id(records.table)]

    def _parts(self, client) -> tuple[Examples | None, Sequence]:
        """The client's table rows (None: not a file's) and the examples encoded directly: a
        file client's planted canaries or alignment data (fedsec.data.table.Extended)."""
        records = self.objective.records(client)
        if isinstance(records, Examples):
            return records, ()
        if isinstance(records, Extended):
            return records.rows, records.extra
        return None, records

    def _planted(self, extra: Sequence) -> list:
        """The items of a file client's planted examples, each distinct example encoded once (the
        same few alignment examples are planted in many clients)."""
        out = []
        for example in extra:
            key = repr(example)
            if key in self.encoded:
                self.encoded.move_to_end(key)
            else:
                self.encoded[key] = self.objective.encode([example], self.tokenizer, self.cfg.data)
                if len(self.encoded) > PLANTED_KEEP:  # bounded: each client's own canaries would grow it with N
                    self.encoded.popitem(last=False)
            out += self.encoded[key]
        return out

    def size(self, client) -> int:
        """The client's number of items (examples whose answer fits)."""
        rows, extra = self._parts(client)
        if rows is None:
            return len(self.objective.encode(extra, self.tokenizer, self.cfg.data))
        return self._table(rows).size(rows.rows) + len(self._planted(extra))

    def items(self, client) -> list:
        rows, extra = self._parts(client)
        if rows is None:
            return self.objective.encode(extra, self.tokenizer, self.cfg.data)
        return self._table(rows).items(rows.rows) + self._planted(extra)


class ClientSets(Sequence):
    """Every client's training items by client id. Given `ready`, all of them, computed at
    setup; else each client's are encoded when a round first asks for them (`encode`) and
    the `keep` most recently used are kept, so memory follows the clients per round, not
    the federation. `sizes`: each client's number of items, known for all from setup."""

    def __init__(self, sizes: Sequence[int], encode: Callable[[int], list] | None = None,
                 ready: Sequence[list] | None = None, keep: int = 1024):
        if (ready is None) == (encode is None):
            raise ValueError("give the items (ready) or how to encode them (encode)")
        self.sizes, self.encode, self.keep = tuple(sizes), encode, keep
        self.ready = list(ready) if ready is not None else None
        self.recent: collections.OrderedDict[int, list] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, c):
        if isinstance(c, slice):
            return [self[k] for k in range(len(self))[c]]
        if self.ready is not None:
            return self.ready[c]
        c = range(len(self))[c]  # a negative id counts from the end, as in a list
        if c in self.recent:
            self.recent.move_to_end(c)
            return self.recent[c]
        items = self.encode(c)
        self.recent[c] = items
        while len(self.recent) > self.keep:
            self.recent.popitem(last=False)
        return items

    @property
    def lazy(self) -> bool:
        return self.ready is None


def prepare(cfg: ExperimentConfig, silos: tuple[int, ...] | None = None, remote: bool = False) -> Setup:
    """The run's Setup. With `silos` (data.silos on Flower: clients per organisation, as
    their SuperNodes reported them) the clients' examples stay on their nodes: nothing of
    theirs is read, tokenized or evaluated here. `remote` (the clients train elsewhere, on
    Flower's SuperNodes): the clients' items are counted here, nothing more."""
    federation = build_federation(cfg, silos)
    tasks = load_tasks(cfg)
    data, malicious, population = federation.data, federation.malicious, federation.population
    canaries, included = federation.canaries, federation.included
    num_clients = len(data.clients) - int(included.sum() if included is not None else 0)
    fed = cfg.federation
    model, tokenizer = load_model(cfg)
    if cfg.privacy.mode == "record" and not rows_independent(model):  # records batched per-example gradients
        raise ConfigError("privacy.mode", "record", f"{ROWS_DEPEND}, so a record's gradient would depend on the "
                          "records beside it, which its clipping does not bound; use model.quantization: 4bit or none")
    audit = None
    if cfg.audit.canaries:
        first_canary = population - cfg.audit.canaries  # the clients before them
        audit = start_audit(cfg, canaries, included, first_canary, model, tokenizer)
    d, pad = cfg.data, tokenizer.pad_token_id
    objective = objective_for(cfg, pad)
    # every client tokenized once here: a client none of whose examples fits is refused now,
    # and every client's size is known; without a frozen prefix or fixed terms to compute
    # (SFT) the items are then dropped and encoded again when a round samples the client.
    # `remote`: the clients train on Flower's SuperNodes (fedsec.clients.prepare_clients there), so
    # the server keeps only their sizes, and computes no frozen prefix or DPO reference of theirs
    lazy = silos is None and (remote or (not cfg.lora.cache_frozen_layers and not objective.fixed_terms))
    tokens = TokenTables(objective, tokenizer, cfg) if lazy else None
    train_sets, sizes = [], []
    if silos is None:
        with progress.bar(len(data.clients), "tokenizing", "client") as shown:
            for client in data.clients:
                items = tokens.size(client) if lazy else train_set(objective, client, tokenizer, cfg)
                if not items:
                    raise ConfigError("data.max_length", d.max_length,
                                      f"client {client.client_id} has no example whose answer fits; raise it")
                sizes.append(items if lazy else len(items))
                if not lazy:
                    train_sets.append(items)
                shown.update(1)
    needs_root, realign = cfg.defense.rule.needs_reference, cfg.defense.realign_steps > 0
    if needs_root:  # encoded and cached with the clients, then split off
        root = data.server_root
        train_sets.append(train_set(objective, root, tokenizer, cfg))
        if not train_sets[-1]:
            if cfg.data.root is not None:
                raise ConfigError("data.root", cfg.data.root, "no root example's answer fits data.max_length; "
                                  "raise it or give longer-fitting examples")
            raise ConfigError("data.benchmark.root_size", cfg.data.benchmark.root_size,
                              "the server root set is empty; raise it")
    if realign:  # the server's aligned set, also encoded and cached with the clients
        aligned = ClientData(-2, "server-realign", server_alignment_set(cfg, data), ())
        train_sets.append(train_set(objective, aligned, tokenizer, cfg))
        if not train_sets[-1]:
            raise ConfigError("data.max_length", d.max_length, "no example of the server's aligned set fits; raise it")
    global_eval = build_eval_set(data.global_test, [GLOBAL] * len(data.global_test), tokenizer,
                                 d.template, d.max_length, data.choices)
    # on Flower each client's held-out examples are evaluated on its SuperNode ("evaluate" messages)
    client_eval = clients_eval_set(data, tokenizer, cfg) if cfg.eval.clients and cfg.engine != "flower" else None
    preference_eval = objective.encode(objective.eval_records(data), tokenizer, d)
    backdoor_eval = _backdoor_eval(cfg, data, tokenizer) if cfg.attack.kind == "backdoor" else ()
    probe_prompts = ([encode_prompt(p, tokenizer, d.template) for p in data.probes]
                     if cfg.eval.refusal else [])
    prefix = None
    if cfg.lora.cache_frozen_layers:
        prefix = frozen_prefix(model, cfg)
        prefix = dataclasses.replace(prefix, home=plan_cache(
            model, prefix.first, positions(*train_sets, global_eval, client_eval, preference_eval, *backdoor_eval),
            private=cfg.privacy.mode != "off"))
        train_sets, global_eval, client_eval, preference_eval = _cache_prefix(
            model, prefix, pad, cfg.eval.batch_size, train_sets, global_eval, client_eval, preference_eval)
        backdoor_eval = tuple(map_sequences(e, lambda items: prefix.attach(model, items, pad, cfg.eval.batch_size))
                              for e in backdoor_eval)
    tasks = _encode_tasks(model, tokenizer, cfg, tasks, prefix)
    # the evaluation items' common opening (system prompt, instruction) computed once per forward
    global_eval = share_prefix(model, global_eval, pad)
    client_eval = share_prefix(model, client_eval, pad) if client_eval is not None else None
    backdoor_eval = tuple(share_prefix(model, e, pad) for e in backdoor_eval)
    # after the cache, so (DPO) reference and policy share one computation path
    train_sets = [objective.precompute(model, items, cfg.eval.batch_size) for items in train_sets]
    preference_eval = objective.precompute(model, preference_eval, cfg.eval.batch_size, evaluation=True)
    realign_set = train_sets.pop() if realign else []
    server_root = train_sets.pop() if needs_root else []
    local_only = list(range(num_clients if fed.local_only_clients == -1 else fed.local_only_clients))
    record_plan, record_dp = None, None
    if cfg.privacy.mode == "record":
        record_plan = plan_record_privacy(cfg, sizes)
        record_dp = RecordDp(cfg.privacy.clip_norm, record_plan.noise_multiplier, record_secret(cfg))
    trainer = LocalTrainer(model, cfg.training, objective, record_dp)
    if lazy:
        train_sets = ClientSets(sizes, encode=_on_their_supernodes if remote
                                else lambda c: tokens.items(data.clients[c]))
    else:
        train_sets = ClientSets(sizes, ready=train_sets)
    return Setup(cfg, model, tokenizer, trainer, data, train_sets, global_eval, client_eval, local_only,
                 preference_eval, probe_prompts, record_plan, server_root, malicious, backdoor_eval, audit,
                 population, tasks, silos=tuple(silos or ()), mia_pool=federation.mia_pool,
                 realign_set=realign_set)


def _on_their_supernodes(client: int) -> list:
    raise RuntimeError(f"client {client} trains on its SuperNode: the Flower server holds the clients' sizes only")


def clients_eval_set(data: FederatedData, tokenizer, cfg: ExperimentConfig) -> EvalSet | None:
    """The clients' held-out examples as one evaluation set grouped by client id (None if
    none has any): what the in-process loop and a SuperNode evaluate per client."""
    tests = [(ex, c.client_id) for c in data.clients for ex in c.test]
    if not tests:
        return None
    return build_eval_set([e for e, _ in tests], [g for _, g in tests], tokenizer, cfg.data.template,
                          cfg.data.max_length, data.choices)


def record_secret(cfg: ExperimentConfig) -> int | None:
    """The root of DP-SGD's batches and noise inside clients (None: from the training seed)."""
    return None if cfg.privacy.reproducible else dp_seed(cfg)


def _encode_tasks(model, tokenizer, cfg: ExperimentConfig, tasks: tuple,
                  prefix: FrozenPrefix | None) -> tuple:
    """The closed-answer benchmarks' scoring sequences, encoded once at setup: with
    `prefix` their frozen-prefix states attached (exact; each evaluation then runs only the
    adapted top layers), and their shared opening computed once per forward where that is
    exact on this model."""
    lm = PeftModelLM(model, tokenizer, cfg.data.template, cfg.eval.batch_size)
    pad, out = tokenizer.pad_token_id, []
    for task in tasks:
        if task.items and isinstance(task.items[0], ChoiceItem):
            batch = lm.encode_choices(task.items)
            sequences = list(batch.sequences)
            if prefix is not None:
                sequences = prefix.attach(model, sequences, pad, cfg.eval.batch_size)
            task = dataclasses.replace(task, encoded=dataclasses.replace(
                batch, sequences=tuple(sequences), shared=packable_prefix(model, sequences, pad)))
        out.append(task)
    return tuple(out)


def frozen_prefix(model, cfg: ExperimentConfig) -> FrozenPrefix:
    """How this run caches the frozen layers below its adapters (lora.top_layers): the
    memo key names the frozen base as the run computes it (model, dtype, quantization,
    device, precision); states packed with training.pack, kept in host memory (setup
    moves them where `plan_cache` says)."""
    check_architecture(model)
    return FrozenPrefix(model.config.num_hidden_layers - cfg.lora.top_layers,
                        f"{cfg.model.name}|{cfg.model.dtype}|{cfg.model.quantization}|{model_device(model).type}|"
                        f"{cfg.training.precision}", cfg.training.pack)


def positions(*collections) -> int:
    """Token positions in collections of items (Encoded, a DPO pair's two, an EvalSet's items
    and scoring sequences; None counts 0): what their frozen-prefix states take."""
    total = 0
    for items in collections:
        if items is None:
            continue
        if isinstance(items, EvalSet):
            total += positions(items.encoded, items.pairs)
            continue
        total += record_tokens(items)
    return total


def _cache_prefix(model, prefix: FrozenPrefix, pad: int, batch_size: int, train_sets, *evals):
    """Attach frozen-prefix states (fedsec.prefix) to every training and evaluation item.

    Each collection is cached in one call (all clients' training items together), so a
    later run of a sweep on the same data finds it whole in the in-process memo.
    """
    def encoded(items):
        return prefix.attach(model, items, pad, batch_size)

    global_eval, client_eval, preference_eval = evals
    train_sets = cache_train_sets(model, prefix, pad, batch_size, train_sets)
    global_eval = map_sequences(global_eval, encoded)
    if client_eval is not None:
        client_eval = map_sequences(client_eval, encoded)
    if preference_eval:
        preference_eval = _cache_pairs(model, prefix, pad, batch_size, preference_eval)
    return train_sets, global_eval, client_eval, preference_eval


def _cache_pairs(model, prefix: FrozenPrefix, pad: int, batch_size: int, items: list) -> list:
    flat = prefix.attach(model, [p.chosen for p in items] + [p.rejected for p in items], pad, batch_size)
    n = len(items)
    return [dataclasses.replace(p, chosen=flat[i], rejected=flat[n + i]) for i, p in enumerate(items)]


def cache_train_sets(model, prefix: FrozenPrefix, pad: int, batch_size: int, train_sets) -> list:
    """Every client's training items with their frozen-prefix states (`prefix`): one
    cached call whose batches stay inside a client, so each client's states are what the
    same call on that client alone computes, as a Flower SuperNode does (fedsec.clients).
    A DPO client's items are its chosen then its rejected sequences."""
    pairs = any(items and isinstance(items[0], PairItem) for items in train_sets)
    flat = [seq for items in train_sets
            for seq in ([p.chosen for p in items] + [p.rejected for p in items] if pairs else items)]
    groups = [(2 if pairs else 1) * len(items) for items in train_sets]
    flat = prefix.attach(model, flat, pad, batch_size, groups=groups)
    out, at = [], 0
    for items in train_sets:
        n = len(items)
        if pairs:
            out.append([dataclasses.replace(p, chosen=flat[at + i], rejected=flat[at + n + i])
                        for i, p in enumerate(items)])
        else:
            out.append(flat[at: at + n])
        at += (2 if pairs else 1) * n
    return out


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
