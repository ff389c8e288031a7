"""Local training: one `LocalTrainer`, reused for every client and round.

A client's work is: load the starting adapter, run `local_steps` optimizer steps (AdamW or SGD) on
random batches of its (pre-tokenized) data, return the adapter delta. The loss is
completion-only cross-entropy; logits are computed only at target positions (the
LM head is a large share of a small model's compute), and so is the last decoder layer's
work after its attention (fedsec.readout). Randomness (batch order,
dropout) comes from one seed per (round, client), so a run is reproducible and a
resumed run equals an uninterrupted one.

Record-level DP (`RecordDp`): each step is DP-SGD (Abadi et al. 2016, Alg. 1) on
the adapter. Examples are Poisson-sampled with rate q = batch_size / n; Opacus'
GradSampleModule gives each example's gradient (rows of one pair are summed into
the pair's); each is clipped to L2 norm C; N(0, (sigma C)^2 I) from the step's own
noise stream is added to the sum, which is divided by the expected batch q n.
The optimizer, FedProx's term and SCAFFOLD's correction act on that noisy gradient
(post-processing: they read no data).

Many clients, one step each (`LocalTrainer.train_clients`): when every client of a
round takes a single plain SGD step from the same global adapter (the DP sweep's
regime: hundreds of clients with a few examples), the clients' steps are one
computation. Their batches go through the model together, in length-sorted chunks
(large matrix products run near twice as fast per FLOP here as a 4-example
batch's), Opacus' per-row gradients are summed per client, and each client's
gradient is clipped and stepped exactly as `train` would. A test checks the deltas
against the one-client-at-a-time path.

Many clients of several steps (`training.lockstep`, opt-in): every local step of the round's
clients is one forward and backward, each client's LoRA branch computed with its own copy of
the adapter (fedsec.lockstep), FedProx's term, the clip, the optimizer and SCAFFOLD's
correction applied per client, in groups whose copies fit LOCKSTEP_FLOATS.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fedsec import lmhead, lockstep
from fedsec.adapter import AdapterParams
from fedsec.config import TrainingConfig
from fedsec.defenses.dp import private_mean
from fedsec.devices import autocast, autocast_dtype, model_device, rows_independent, to_device
from fedsec.encoding import IGNORE, additive_mask
from fedsec.readout import trimmed
from fedsec.seeding import derive_seed, scoped_torch_seed


def cosine_lr(round_idx: int, rounds: int, lr: float, min_lr: float) -> float:
    """Learning rate of a round: cosine decay from lr to min_lr across rounds.

    lr_t = min_lr + (lr - min_lr) (1 + cos(pi t / T)) / 2, t = 0..T-1, constant within a
    round (OpenFedLLM's schedule).
    """
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * round_idx / rounds))


def round_lr(cfg: TrainingConfig, round_idx: int, rounds: int) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cosine_lr(round_idx, rounds, cfg.lr, cfg.min_lr)


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def target_hidden(model, batch: dict[str, torch.Tensor]):
    """The last hidden states at every target position, before the LM head: (hidden [N, d],
    targets [N], rows [N]) for the N positions whose next token is a target, in row-major
    order. Runs the decoder only (the head then runs on those positions alone, which skips
    most of the vocabulary projection). A packed batch (encoding.collate_packed: one
    sequence, a [1, 1, L, L] mask, each item at its own positions) gives `rows` as each
    position's item. Evaluation gathers several batches' states and runs the head on them
    at once (`head_scores`), a larger product."""
    lm = _causal_lm(model)
    batch = to_device(batch, model_device(model))
    mask = batch["attention_mask"]
    extra = {}
    if mask.dim() == 4:  # packed items (encoding.collate_packed): an additive mask, their own positions
        dtype = batch["inputs_embeds"].dtype if "inputs_embeds" in batch else lm.get_input_embeddings().weight.dtype
        mask = additive_mask(mask, dtype)
        extra["position_ids"] = batch["position_ids"]
    decoder = lm.get_decoder()

    def forward() -> torch.Tensor:
        with autocast(model):  # training.precision: the one place a forward's precision is applied
            if "inputs_embeds" in batch:  # frozen-prefix cache: run only the adapted top layers
                from fedsec.prefix import top_layers_only

                with top_layers_only(lm, batch["start_layer"]):
                    return decoder(inputs_embeds=batch["inputs_embeds"], attention_mask=mask,
                                   use_cache=False, **extra).last_hidden_state
            return decoder(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False,
                           **extra).last_hidden_state

    targets = batch["labels"][:, 1:]
    where = targets != IGNORE
    read = torch.nn.functional.pad(where, (0, 1))  # position p's state predicts token p + 1
    with trimmed(lm, decoder, read, forward):  # the last layer's MLP only where it is read
        hidden = forward()
    rows = batch["owner"][:, 1:][where] if "owner" in batch else where.nonzero()[:, 0]
    return hidden[:, :-1][where], targets[where], rows


def head_log_softmax(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's next-token log-distributions [N, vocab] (float32) for hidden states [N, hidden]."""
    with autocast(model):
        logits = _causal_lm(model).get_output_embeddings()(hidden)
    return logits.float().log_softmax(-1)


def target_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every target token, and the batch row each belongs to. A plain
    float32 head takes the vocabulary in blocks (fedsec.lmhead: the same numbers, without
    the [N, vocab] log-distributions)."""
    hidden, targets, rows = target_hidden(model, batch)
    weight = _blockable_head(model, hidden)
    if weight is not None:
        return lmhead.target_logprobs(hidden, weight, targets), rows
    return head_log_softmax(model, hidden).gather(1, targets[:, None]).squeeze(1), rows


def head_scores(model, hidden: torch.Tensor, targets: torch.Tensor) -> lmhead.TargetScores:
    """What evaluation reads from the LM head at these positions (lmhead.TargetScores): the
    targets' log-probabilities, the arg-max words, given words' log-probabilities; a plain
    float32 head in blocks of the vocabulary, any other through `head_log_softmax`."""
    weight = _blockable_head(model, hidden)
    if weight is not None:
        return lmhead.target_scores(hidden, weight, targets)
    return lmhead.TargetScores.from_log_probs(head_log_softmax(model, hidden), targets)


def _blockable_head(model, hidden: torch.Tensor) -> torch.Tensor | None:
    """The LM head's weight where fedsec.lmhead may take it in blocks (lmhead.blockable), else None."""
    head = _causal_lm(model).get_output_embeddings()
    return head.weight if lmhead.blockable(head, hidden, autocast_dtype(model)) else None


def completion_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of target-token NLL, number of target tokens)."""
    logp, _ = target_logprobs(model, batch)
    return -logp.sum(), int(logp.numel())


@dataclass(frozen=True)
class RecordDp:
    """DP-SGD inside clients: per-example clip norm C and noise multiplier sigma.

    `secret`: the root of the steps' Poisson batches and noise (fedsec.privacy.dp_seed:
    OS entropy by default); None: they derive from the client's training seed (privacy.
    reproducible), so anyone who holds the run's seed can recompute them."""

    clip_norm: float
    noise_multiplier: float
    secret: int | None = None


def poisson_batch(n: int, batch_size: int, generator: torch.Generator) -> tuple[list[int], float]:
    """Indices of one Poisson batch (each example with q = min(1, batch/n)), and q n."""
    q = min(1.0, batch_size / n)
    picked = (torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device) < q).nonzero()[:, 0]
    return picked.tolist(), q * n


@contextlib.contextmanager
def per_sample_gradients(model) -> Iterator[None]:
    """Opacus hooks on the trainable modules while the block runs: each backward leaves
    `p.grad_sample` [rows, *p.shape] on every trainable parameter."""
    from opacus import GradSampleModule

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        module = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        try:
            yield
        finally:
            module.remove_hooks()
            for p in model.parameters():
                if hasattr(p, "grad_sample"):
                    p.grad_sample = None


@dataclass(frozen=True)
class LocalResult:
    delta: torch.Tensor
    num_examples: int
    loss: float  # mean loss per term (target token for SFT, pair for DPO) over the steps
    steps: int
    loss_terms: int
    tokens: int = 0  # token positions through the model's forward (a pair: both replies), padding excluded


class BatchStream:
    """Endless batches of a dataset: reshuffled each pass, from an explicit generator."""

    def __init__(self, data: Sequence, batch_size: int, generator: torch.Generator):
        self.data, self.size, self.gen = data, min(batch_size, len(data)), generator
        self.order: list[int] = []

    def next(self) -> list:
        if len(self.order) < self.size:
            self.order += torch.randperm(len(self.data), generator=self.gen, device=self.gen.device).tolist()
        picked, self.order = self.order[: self.size], self.order[self.size:]
        return [self.data[i] for i in picked]


def _record_length(item) -> int:
    """Padded width an item needs in a batch (a pair: its longer reply)."""
    if hasattr(item, "input_ids"):
        return int(item.input_ids.numel())
    return max(_record_length(item.chosen), _record_length(item.rejected))


def record_tokens(items) -> int:
    """Token positions the items put through a forward (a pair: both replies), padding excluded."""
    return sum(int(i.input_ids.numel()) if hasattr(i, "input_ids") else record_tokens((i.chosen, i.rejected))
               for i in items)


def _dropout(model) -> bool:
    """Whether the model's forward draws random numbers (dropout with p > 0 anywhere)."""
    return (any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
            or bool(getattr(getattr(model, "config", None), "attention_dropout", 0.0)))


def _chunks(lengths: Sequence[int], tokens: int, max_rows: int) -> list[list[int]]:
    """Indices grouped into length-sorted chunks of at most `tokens` padded tokens and
    `max_rows` records (a record longer than `tokens` gets a chunk of its own)."""
    chunks, current, width = [], [], 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        wider = max(width, lengths[i])
        if current and (wider * (len(current) + 1) > tokens or len(current) >= max_rows):
            chunks.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        width = wider
    return chunks + ([current] if current else [])


# Chunk size of the batched one-step path: padded tokens per forward, and a cap on the
# per-row gradients held at once (rows x adapter size floats). Measured on SmolLM2-135M
# (128 clients of 4 examples): 2,048 tokens is as fast as any larger chunk would be if
# memory were free; larger chunks allocate activations and LM-head logits beyond
# malloc's reuse threshold and pay fresh page faults on every call (8,192: 1.4x slower).
COHORT_TOKENS = 2048
COHORT_GRAD_FLOATS = 2**26
# Clients in lockstep at once, at most: their adapter copies, gradients and AdamW's two moments
# (4 floats an adapter entry a client) within 2**27 floats (512 MB in fp32): the quickstart's 8
# clients of 0.49M entries take 16M; a 1B model's rank-16 adapter on every layer (12M) goes two at a time
LOCKSTEP_FLOATS = 2**27
# fp16's first loss scale. Each client's scaler is fresh (shared state would couple clients and
# break a resumed run's equality) and has only local_steps steps to find its scale; torch's
# 2**16 overflows at the start and skips them (tiny model, 4 rounds of 4 steps: final loss 2.53
# against fp32's 1.84), 2**12 does not (1.842). Overflow still halves it and skips that step.
FP16_INIT_SCALE = 2.0**12


class LocalTrainer:
    """Trains the model's adapter for one client at a time; holds no client state.

    `objective.loss(model, items) -> (summed loss, number of terms)` is the only
    thing SFT and DPO do differently (see fedsec.objectives).
    """

    def __init__(self, model, cfg: TrainingConfig, objective, record_dp: RecordDp | None = None):
        self.model, self.cfg, self.objective, self.record_dp = model, cfg, objective, record_dp
        self.adapter = AdapterParams(model)

    def train(self, start: torch.Tensor, data: Sequence, lr: float, seed: int,
              prox_mu: float = 0.0, correction: torch.Tensor | None = None) -> LocalResult:
        """Train from `start` for `local_steps` steps; returns the adapter delta.

        prox_mu: FedProx (Li et al. 2020, eq. 2) adds (mu/2)||w - w_start||^2 to the
        objective; its gradient mu (w - w_start) is added to each step's gradient.
        correction: SCAFFOLD's (c - c_i). The update y <- y - lr (g - c_i + c) is split:
        the optimizer takes its step on g, then y <- y - lr (c - c_i). Feeding the
        correction through AdamW instead would let Adam's normalization rescale it,
        and at these gradient sizes the correction would dominate the step.
        """
        if not data:
            raise ValueError("a client with no training examples cannot train")
        cfg, on, home = self.cfg, model_device(self.model), start.device
        start = start.to(on)  # the server's vector, where the model computes; the delta goes home
        correction = correction.to(on) if correction is not None else None
        self.adapter.set(start)
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.adapter.params, lr=lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.adapter.params, lr=lr, weight_decay=cfg.weight_decay)
        stream = BatchStream(data, cfg.batch_size, torch.Generator().manual_seed(seed))
        layout = self.adapter.layout
        anchors = list(layout.unflatten(start).values()) if prox_mu > 0 else None
        offsets = list(layout.unflatten(correction).values()) if correction is not None else None
        # fp16: dynamic loss scaling (Micikevicius et al. 2018) keeps small gradients above fp16's underflow
        scaler = torch.amp.GradScaler(on.type, init_scale=FP16_INIT_SCALE) if cfg.precision == "fp16" else None
        total_loss, total_terms, tokens = 0.0, 0, 0
        dp = self.record_dp
        sampler = stream.gen  # reproducible DP-SGD: the batch order's stream also draws the Poisson batches
        if dp is not None and dp.secret is not None:
            sampler = torch.Generator().manual_seed(derive_seed(dp.secret, seed, "record-batches"))
        self.model.train()
        try:
            with scoped_torch_seed(seed), (per_sample_gradients(self.model) if dp else contextlib.nullcontext()):
                for step in range(cfg.local_steps):
                    if dp is None:
                        loss_sum, n, step_tokens = self._accumulate_gradient(stream, scaler)
                    else:
                        noise_root = (seed,) if dp.secret is None else (dp.secret, seed)
                        noise = torch.Generator().manual_seed(derive_seed(*noise_root, "record-noise", step))
                        loss_sum, n, step_tokens = self._dp_sgd_gradient(data, sampler, noise)
                    total_loss += loss_sum
                    total_terms += n
                    tokens += step_tokens
                    if scaler is not None:
                        scaler.unscale_(optimizer)  # the true gradient, for FedProx's term and the clip
                    if anchors is not None:
                        self._add_proximal_gradient(prox_mu, anchors)
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(self.adapter.params, cfg.max_grad_norm)
                    if scaler is not None:
                        scaler.step(optimizer)  # skipped when the scaled gradient overflowed
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if offsets is not None:
                        self._apply_correction(lr, offsets)
        finally:
            self.model.eval()
        delta = (self.adapter.get() - start).to(home)
        return LocalResult(delta, len(data), total_loss / max(total_terms, 1), cfg.local_steps,
                           total_terms, tokens)

    @property
    def one_step_batchable(self) -> bool:
        """Whether `train_clients` may batch clients: one plain SGD step each, no
        record-level DP, nothing random in the forward (dropout), per-row gradients that
        Opacus' hooks can take (no recomputed forward, no fp16 loss scaling), and a model whose
        rows do not depend on each other (devices.rows_independent: not LLM.int8), so that no
        client's update moves with another's data."""
        cfg, model = self.cfg, self.model
        return (cfg.local_steps == 1 and cfg.grad_accum == 1 and cfg.optimizer == "sgd"
                and self.record_dp is None and not cfg.gradient_checkpointing and cfg.precision != "fp16"
                and not _dropout(model) and rows_independent(model))

    @property
    def lockstep_batchable(self) -> bool:
        """Whether `train_clients` may train clients in lockstep (training.lockstep, fedsec.lockstep):
        nothing random in the forward, no record-level DP, no fp16 loss scaling, no recomputed
        forward, rows that do not depend on each other (not LLM.int8) and an adapter of plain
        LoRA layers."""
        cfg, model = self.cfg, self.model
        return (cfg.lockstep and self.record_dp is None and not cfg.gradient_checkpointing
                and cfg.precision != "fp16" and not _dropout(model) and rows_independent(model)
                and lockstep.lora_layers(model, self.adapter) is not None)

    @property
    def lockstep_group(self) -> int:
        """How many clients `train_clients` trains in lockstep at once: as many as their adapter
        copies, gradients and AdamW moments fit LOCKSTEP_FLOATS; 1 where lockstep does not apply."""
        return max(1, LOCKSTEP_FLOATS // (4 * self.adapter.layout.numel)) if self.lockstep_batchable else 1

    def train_clients(self, start: torch.Tensor, datasets: Sequence[Sequence], lr: float,
                      seeds: Sequence[int], prox_mu: float = 0.0,
                      corrections: Sequence[torch.Tensor] | None = None) -> list[LocalResult]:
        """`train(start, data, lr, seed, prox_mu, correction)` for each client; one batched
        computation when `one_step_batchable` and no SCAFFOLD `corrections` (FedProx's gradient
        mu (w - w_start) is 0 at the only step, so prox_mu changes nothing there), else in
        lockstep groups of `lockstep_group` when `lockstep_batchable`. `start`: the adapter
        every client starts from, or [clients, numel], each its own (the local-only baseline)."""
        own = start.dim() == 2  # each client from its own adapter: never the one-step path (one shared start)
        group = self.lockstep_group
        if len(datasets) > 1 and group > 1 and (own or corrections is not None or not self.one_step_batchable):
            return [result for k in range(0, len(datasets), group)
                    for result in self._train_lockstep(start[k: k + group] if own else start, datasets[k: k + group],
                                                       lr, seeds[k: k + group], prox_mu,
                                                       None if corrections is None else corrections[k: k + group])]
        if own or corrections is not None or not self.one_step_batchable or not datasets:  # a Poisson round: none
            return [self.train(start[k] if own else start, data, lr, seed, prox_mu=prox_mu,
                               correction=None if corrections is None else corrections[k])
                    for k, (data, seed) in enumerate(zip(datasets, seeds))]
        if not all(datasets):
            raise ValueError("a client with no training examples cannot train")
        cfg, n, on, home = self.cfg, len(datasets), model_device(self.model), start.device
        start = start.to(on)  # the server's vector, where the model computes; the deltas go home
        self.adapter.set(start)
        batches = [BatchStream(data, cfg.batch_size, torch.Generator().manual_seed(seed)).next()
                   for data, seed in zip(datasets, seeds)]
        grads = torch.zeros(n, self.adapter.layout.numel, device=on)
        loss_sums, terms = (torch.zeros(n, dtype=torch.float64, device=on) for _ in range(2))
        # training.pack: each client's batch in forward rows of its own behind its shared opening
        # (objective.packing), whose gradients sum to the client's; else one row per sequence,
        # summed into the client's
        packings = [self.objective.packing(self.model, batch) for batch in batches]  # once per client and round
        packed = any(p is not None for p in packings)
        if packed:
            units = [(k, batch) for k, batch in enumerate(batches)]
            unit_rows = [self.objective.row_lengths(batch, p) for batch, p in zip(batches, packings)]
            lengths, rows_per_unit = [max(r) for r in unit_rows], max(len(r) for r in unit_rows)
        else:
            units = [(k, [item]) for k, batch in enumerate(batches) for item in batch]
            lengths = [_record_length(item[0]) for _, item in units]
            rows_per_unit = 2 if hasattr(units[0][1][0], "chosen") else 1  # a DPO pair: two rows
        max_rows = max(1, COHORT_GRAD_FLOATS // self.adapter.layout.numel // rows_per_unit)
        self.model.train()
        try:
            with per_sample_gradients(self.model):
                for chunk in _chunks(lengths, COHORT_TOKENS // rows_per_unit, max_rows):
                    owners = torch.tensor([units[i][0] for i in chunk], device=on)
                    if packed:
                        sums, counts, record_unit, row_unit = self.objective.group_terms(
                            self.model, [units[i][1] for i in chunk], [packings[i] for i in chunk])
                        row_owner = owners[row_unit]
                    else:
                        sums, counts, row_record = self.objective.record_terms(
                            self.model, [units[i][1][0] for i in chunk])
                        record_unit, row_owner = torch.arange(len(chunk), device=on), owners[row_record]
                    sums.sum().backward()
                    rows = torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1).float()
                                      for p in self.adapter.params], 1)
                    for p in self.adapter.params:
                        p.grad, p.grad_sample = None, None
                    grads.index_add_(0, row_owner, rows)
                    loss_sums.index_add_(0, owners[record_unit], sums.detach().double())
                    terms.index_add_(0, owners[record_unit], counts.double())
        finally:
            self.model.eval()
        grads /= terms.clamp(min=1).float()[:, None]
        if cfg.max_grad_norm is not None:  # as clip_grad_norm_: scale by min(1, C / (|g| + 1e-6))
            grads *= (cfg.max_grad_norm / (grads.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
        deltas = (-lr * (grads + cfg.weight_decay * start)).to(home)  # SGD: w <- w - lr (g + wd w)
        return [LocalResult(deltas[k], len(datasets[k]), float(loss_sums[k] / max(terms[k], 1)), 1, int(terms[k]),
                            sum(unit_rows[k]) if packed else record_tokens(batch)) for k, batch in enumerate(batches)]

    def _train_lockstep(self, start: torch.Tensor, datasets: Sequence[Sequence], lr: float,
                        seeds: Sequence[int], prox_mu: float,
                        corrections: Sequence[torch.Tensor] | None = None) -> list[LocalResult]:
        """`train` for every client at once (fedsec.lockstep): each client's batches are the ones
        `train` draws with its seed, its rows in chunks of the batched forward, its gradient the
        slice of its own adapter copy; FedProx's term, the clip, the optimizer and SCAFFOLD's
        correction act per client."""
        if not all(datasets):
            raise ValueError("a client with no training examples cannot train")
        cfg, n, on, home = self.cfg, len(datasets), model_device(self.model), start.device
        start = start.to(on)
        # the model's own adapter: what a one-time check's forward runs (the clients share the frozen rest)
        self.adapter.set(start if start.dim() == 1 else start[0])
        clients = lockstep.ClientAdapters(self.model, self.adapter, start, n)
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(clients.params, lr=lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(clients.params, lr=lr, weight_decay=cfg.weight_decay)
        streams = [BatchStream(data, cfg.batch_size, torch.Generator().manual_seed(seed))
                   for data, seed in zip(datasets, seeds)]
        anchors = [p.detach().clone() for p in clients.params] if prox_mu > 0 else None
        offsets = None
        if corrections is not None:  # each client's (c - c_i), as [n, *shape] per parameter
            stacked = self.adapter.layout.unflatten(torch.stack([c.to(on) for c in corrections]))
            offsets = [value.to(p.dtype) for p, value in zip(clients.params, stacked.values())]
        loss_sums, terms, tokens = (torch.zeros(n, dtype=torch.float64, device=on) for _ in range(3))
        self.model.train()
        try:
            with clients.active():
                for _step in range(cfg.local_steps):
                    for _ in range(cfg.grad_accum):
                        self._lockstep_backward(clients, [stream.next() for stream in streams], loss_sums, terms,
                                                tokens)
                    with torch.no_grad():
                        if anchors is not None:  # FedProx: + mu (w - w_start), per client as `train` adds it
                            for p, anchor in zip(clients.params, anchors):
                                extra = prox_mu * (p - anchor)
                                p.grad = extra if p.grad is None else p.grad.add_(extra)
                        grads = [p.grad for p in clients.params if p.grad is not None]  # as clip_grad_norm_
                        if cfg.max_grad_norm is not None and grads:  # as clip_grad_norm_, each client's own norm
                            norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in grads], 1).norm(dim=1)
                            scale = (cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
                            for g in grads:
                                g.mul_(scale.view(n, *([1] * (g.dim() - 1))).to(g.dtype))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if offsets is not None:  # SCAFFOLD: y <- y - lr (c - c_i), as `train` applies it
                        with torch.no_grad():
                            for p, offset in zip(clients.params, offsets):
                                p.sub_(lr * offset)
        finally:
            self.model.eval()
        deltas = (clients.vectors() - start).to(home)
        return [LocalResult(deltas[k], len(datasets[k]), float(loss_sums[k] / max(float(terms[k]), 1)),
                            cfg.local_steps, int(terms[k]), int(tokens[k])) for k in range(n)]

    def _lockstep_backward(self, clients, batches: list, loss_sums: torch.Tensor, terms: torch.Tensor,
                           tokens: torch.Tensor) -> None:
        """One batch per client through the model in length-sorted chunks of clients; backward of
        each client's mean loss over its terms (over grad_accum, as `_accumulate_gradient`); adds
        each client's summed loss, terms and token positions (`objective.positions`'s count)."""
        objective, on = self.objective, loss_sums.device
        packings = [objective.packing(self.model, batch) for batch in batches]
        widths = [objective.row_lengths(batch, p) for batch, p in zip(batches, packings)]  # a client's rows
        tokens += torch.tensor([sum(w) for w in widths], dtype=tokens.dtype, device=on)
        rows_per_client = max(len(w) for w in widths)
        for chunk in _chunks([max(w) for w in widths], COHORT_TOKENS // rows_per_client, len(batches)):
            group, group_packings = [batches[i] for i in chunk], [packings[i] for i in chunk]
            owners = torch.tensor(chunk, device=on)
            # group_terms runs a client's rows in order, as many as row_lengths counts
            row_owner = torch.tensor([i for i in chunk for _ in widths[i]], device=on)
            with clients.routed(row_owner):
                sums, counts, record_group, _ = objective.group_terms(self.model, group, group_packings)
                per_client = torch.zeros(len(chunk), dtype=sums.dtype, device=on).index_add(0, record_group, sums)
                per_terms = torch.zeros(len(chunk), dtype=counts.dtype, device=on).index_add(0, record_group, counts)
                (per_client / per_terms.clamp(min=1) / self.cfg.grad_accum).sum().backward()
            loss_sums.index_add_(0, owners, per_client.detach().double())
            terms.index_add_(0, owners, per_terms.double())

    def _accumulate_gradient(self, stream: BatchStream, scaler=None) -> tuple[float, int, int]:
        """Backward `grad_accum` batches (loss per term, scaled by fp16's `scaler`); returns
        (summed loss, terms, token positions)."""
        total, terms, tokens = 0.0, 0, 0
        for _ in range(self.cfg.grad_accum):
            batch = stream.next()
            positions = getattr(self.objective, "positions", None)  # SFT: a packed batch's shared opening once
            tokens += positions(self.model, batch) if positions is not None else record_tokens(batch)
            loss_sum, n = self.objective.loss(self.model, batch)
            loss = loss_sum / max(n, 1) / self.cfg.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += float(loss_sum.detach())
            terms += n
        return total, terms, tokens

    def _dp_sgd_gradient(self, data: Sequence, sampler: torch.Generator,
                         noise: torch.Generator) -> tuple[float, int, int]:
        """Set each parameter's .grad to one DP-SGD step's noisy clipped mean gradient.

        Returns (sum of the sampled records' losses, number of records sampled, their token positions).
        """
        dp, params = self.record_dp, self.adapter.params
        picked, expected = poisson_batch(len(data), self.cfg.batch_size, sampler)
        per_record = torch.zeros(len(picked), self.adapter.layout.numel, device=model_device(self.model))
        loss_sum, records = 0.0, [data[i] for i in picked]
        tokens = record_tokens(records)
        if picked:
            losses, row_record = self.objective.record_losses(self.model, records)
            losses.sum().backward()
            rows = torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1).float() for p in params], 1)
            per_record.index_add_(0, row_record, rows)
            loss_sum = float(losses.detach().sum())
        step = private_mean(per_record, dp.clip_norm, dp.noise_multiplier, expected, noise).aggregate
        with torch.no_grad():
            for p, grad in zip(params, self.adapter.layout.unflatten(step).values()):
                p.grad = grad.to(p.dtype).clone()
                p.grad_sample = None
        return loss_sum, len(picked), tokens

    @torch.no_grad()
    def _add_proximal_gradient(self, prox_mu: float, anchors) -> None:
        for p, anchor in zip(self.adapter.params, anchors):
            extra = prox_mu * (p - anchor.to(p.dtype))
            p.grad = extra if p.grad is None else p.grad + extra

    @torch.no_grad()
    def _apply_correction(self, lr: float, offsets) -> None:
        for p, offset in zip(self.adapter.params, offsets):
            p.sub_(lr * offset.to(p.dtype))
