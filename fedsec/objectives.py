"""Training objectives: what differs between SFT and DPO, and nothing else.

The local trainer and the round loop are shared; an objective turns a batch of
pre-encoded items into (summed loss, number of loss terms). For per-record
gradients (record-level DP-SGD, and one batched step for many clients) it also
gives each record's (an example's, or a pair's) summed loss and number of terms,
and the record each forward row belongs to, so per-row gradients can be summed
per record.

The objective also owns what a task reads and precomputes: each client's training
records (`records`: SFT examples, or DPO preference pairs), their encoding
(`encode`), the held-out records membership inference scores (`held_out`), and the
fixed per-item values computed once after encoding (`precompute`: DPO's reference
log-probabilities; nothing for SFT). `OBJECTIVES` names them by `task`.

- SFT: completion-only cross-entropy, summed over target tokens.
- DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7):
      L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])
  summed over pairs, or another preference loss of each pair by name (dpo.loss:
  fedsec.preference's ipo, slic, cdpo, rdpo, or a plugin's). Reference log-probabilities are
  fixed for the whole run (the base model with the adapter disabled, or the adapter the
  run starts from), so they are computed once at setup, never per step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedsec import preference, progress
from fedsec.data.schema import InstructionExample, PreferenceExample
from fedsec.encoding import (
    IGNORE,
    Encoded,
    attention_weight,
    collate,
    collate_packed_rows,
    encode,
    encode_all,
    pack_rows,
    shared_prefix_length,
    split_rows,
)
from fedsec.preference import PairLogps
from fedsec.training import completion_loss, target_logprobs


@dataclass(frozen=True)
class PairItem:
    chosen: Encoded
    rejected: Encoded
    ref_chosen: float = 0.0  # log ref(y_w | x), summed over response tokens
    ref_rejected: float = 0.0

    @functools.cached_property
    def tokens(self) -> tuple[int, int]:
        """The chosen and rejected replies' target-token counts, counted once per pair (not
        per training step: a preference loss may normalise by them)."""
        return int((self.chosen.labels != IGNORE).sum()), int((self.rejected.labels != IGNORE).sum())


def implicit_rewards(pi: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward r(x, y) = beta * (log pi(y|x) - log ref(y|x))."""
    return beta * (pi - ref)


# How a batch's sequences go through the forward: (their shared opening, the sequences in
# each packed row, encoding.pack_rows), or None: a plain batch, a row per sequence
Packing = tuple[int, list[int]] | None


def collate_as(items: Sequence[Encoded], pad_id: int, packing: Packing) -> dict[str, torch.Tensor]:
    """The batch of `items` laid out as `packing` says (encoding.collate_packed_rows: each
    row's items behind one copy of their shared opening), or plain (encoding.collate)."""
    if packing is None:
        return collate(items, pad_id)
    shared, sizes = packing
    return collate_packed_rows([(row, shared) for row in split_rows(items, sizes)], pad_id)


def sequence_logprobs(model, items: Sequence[Encoded], pad_id: int, packing: Packing = None) -> torch.Tensor:
    """Sum of target-token log-probabilities of each sequence (with `packing`: the sequences
    in packed rows, `collate_as`)."""
    logp, rows = target_logprobs(model, collate_as(items, pad_id, packing))
    return torch.zeros(len(items), dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


def encode_pair(example: PreferenceExample, tokenizer, template: str, max_length: int) -> PairItem | None:
    """Both completions of a preference pair, each with the prompt masked."""
    chosen = encode(InstructionExample(example.prompt, example.chosen, example.system), tokenizer,
                    template, max_length)
    rejected = encode(InstructionExample(example.prompt, example.rejected, example.system), tokenizer,
                      template, max_length)
    if chosen is None or rejected is None:
        return None
    return PairItem(chosen, rejected)


@torch.no_grad()
def with_reference(model, pairs: Sequence[PairItem], pad_id: int, batch_size: int) -> list[PairItem]:
    """The pairs with reference log-probabilities under the model as it is now."""
    out = []
    with progress.bar(len(pairs), "DPO reference", "pair") as shown:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start: start + batch_size]
            logps = sequence_logprobs(model, [p.chosen for p in chunk] + [p.rejected for p in chunk], pad_id)
            for i, pair in enumerate(chunk):
                out.append(PairItem(pair.chosen, pair.rejected, float(logps[i]), float(logps[len(chunk) + i])))
            shown.update(len(chunk))
    return out


def _packing_is_exact(model, sequences: Sequence[Encoded], pad_id: int) -> bool:
    """evaluation.packable_prefix, with no effect on the training around it: in eval mode
    (no dropout), without gradients, on a copy of the random state, so a run resumed in
    another process draws what the uninterrupted run drew."""
    from fedsec.evaluation import packable_prefix

    training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            return packable_prefix(model, sequences, pad_id) > 0
    finally:
        model.train(training)


class _Objective:
    """What SFT and DPO share: packing a training batch (training.pack) behind its
    sequences' shared opening, once a first batch showed that packing gives the plain
    batch's numbers on this model (evaluation.packable_prefix), in as many rows as make the
    forward cheapest (encoding.pack_rows: one row for short items, a row per item, i.e. a
    plain batch, for long ones). `loss` packs a batch; `group_terms` packs each client's
    batch into rows of its own for the batched cohort path, whose gradients are per client.
    Record-level DP needs each record's own gradient: a record's gradient flows through the
    opening it would share, so it keeps one row per record."""

    pad_id: int
    pack: bool = False
    _packable: bool | None = None  # decided on the first batch with a shared opening

    def record_losses(self, model, items) -> tuple[torch.Tensor, torch.Tensor]:
        """(each record's loss per term [n], the record of each forward row)."""
        sums, terms, row_record = self.record_terms(model, items)
        return sums / terms.clamp(min=1), row_record

    def sequences(self, items) -> list[Encoded]:
        """The sequences a batch of records puts through the forward."""
        return list(items)

    def shared_width(self, model, items) -> int:
        """The shared opening a training batch is packed behind (0: a plain batch)."""
        if not self.pack:
            return 0
        sequences = self.sequences(items)
        shared = shared_prefix_length(sequences)
        if shared < 1:
            return 0
        if self._packable is None:
            self._packable = _packing_is_exact(model, sequences, self.pad_id)
        return shared if self._packable else 0

    def packing(self, model, items) -> Packing:
        """How a training batch goes through the forward: (its shared opening, the sequences
        in each packed row) where packing is on, exact here and cheaper than a row per
        sequence on this model (encoding.pack_rows); else None, a plain batch."""
        shared = self.shared_width(model, items)
        if shared < 1:
            return None
        lengths = [int(s.input_ids.numel()) for s in self.sequences(items)]
        sizes = pack_rows(lengths, shared, attention_weight(model.config))
        return (shared, sizes) if len(sizes) < len(lengths) else None

    def row_lengths(self, items, packing: Packing) -> list[int]:
        """The token positions of each forward row a training batch runs in, laid out as its
        `packing` says (a packed row's opening once), padding excluded."""
        lengths = [int(s.input_ids.numel()) for s in self.sequences(items)]
        if packing is None:
            return lengths
        shared, sizes = packing
        return [sum(row) - shared * (len(row) - 1) for row in split_rows(lengths, sizes)]

    def positions(self, model, items) -> int:
        """Token positions a training batch puts through the forward (a packed row's opening once)."""
        return sum(self.row_lengths(items, self.packing(model, items)))

    def group_terms(self, model, groups, packings: Sequence[Packing]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`record_terms` of all the groups' records, each group in forward rows of its own
        (one client's batch in the batched cohort path, whose per-row gradients then sum to
        the client's): its sequences packed as its `packing` (given, computed once per round by
        the caller) says, or a row each. Returns (each record's summed terms [R], its term count
        [R], the group of each record [R], the group of each row), records in group order."""
        sequences = [self.sequences(g) for g in groups]
        rows, row_group = [], []
        for k, (seqs, packing) in enumerate(zip(sequences, packings)):
            shared, sizes = packing or (0, [1] * len(seqs))
            rows += [(row, shared) for row in split_rows(seqs, sizes)]
            row_group += [k] * len(sizes)
        logp, owner = target_logprobs(model, collate_packed_rows(rows, self.pad_id))
        total = sum(len(s) for s in sequences)
        summed = torch.zeros(total, dtype=logp.dtype, device=logp.device).index_add(0, owner, logp)
        count = torch.zeros(total, dtype=logp.dtype, device=logp.device).index_add(0, owner, torch.ones_like(logp))
        record_group = torch.tensor([k for k, g in enumerate(groups) for _ in g], device=logp.device)
        return (*self._terms(groups, summed, count), record_group,
                torch.tensor(row_group, device=logp.device))


class SftObjective(_Objective):
    """Supervised fine-tuning on instruction or chat examples."""

    fixed_terms = False  # precompute adds nothing: a client's items can be encoded whenever it is sampled

    def __init__(self, pad_id: int, pack: bool = False):
        self.pad_id, self.pack = pad_id, pack

    @classmethod
    def from_config(cls, cfg, pad_id: int) -> SftObjective:
        return cls(pad_id, cfg.training.pack)

    @staticmethod
    def records(client) -> tuple:
        return client.train

    record_field = "train"  # the ClientData field records() reads

    @staticmethod
    def eval_records(data) -> tuple:
        return ()  # scored on the global test set like every task, nothing of its own

    @staticmethod
    def as_examples(records) -> list:
        return list(records)  # its records are prompt-answer examples already

    @staticmethod
    def held_out(data) -> tuple:
        return data.global_test

    def encode(self, records, tokenizer, data_cfg) -> list[Encoded]:
        """The examples whose answer fits `max_length`, encoded (prompt tokens unscored)."""
        return encode_all(records, tokenizer, data_cfg.template, data_cfg.max_length)

    def precompute(self, model, items: list, batch_size: int, evaluation: bool = False) -> list:
        return items  # nothing fixed to compute ahead

    def loss(self, model, items: Sequence[Encoded]) -> tuple[torch.Tensor, int]:
        return completion_loss(model, collate_as(items, self.pad_id, self.packing(model, items)))

    @staticmethod
    def _terms(groups, logps: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return -logps, counts  # a sequence per example

    def record_terms(self, model, items: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed target-token NLL of each example [n], its target tokens [n], arange(n))."""
        logp, rows = target_logprobs(model, collate(items, self.pad_id))
        n = len(items)
        nll = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, rows, -logp)
        count = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, rows, torch.ones_like(logp))
        return nll, count, torch.arange(n, device=logp.device)


class DpoObjective(_Objective):
    """DPO on preference pairs, against a fixed reference policy: the base model with the
    adapter disabled (`reference: base`), or the adapter the run starts from."""

    def __init__(self, pad_id: int, beta: float, reference: str = "base", pack: bool = False,
                 pair_loss: Callable[[PairLogps], torch.Tensor] | None = None, uses_reference: bool = True):
        self.pad_id, self.beta, self.reference, self.pack = pad_id, beta, reference, pack
        # each pair's loss (dpo.loss, fedsec.preference): DPO's own by default
        self.pair_loss = pair_loss or functools.partial(preference.dpo, beta=beta)
        # the reference log-probabilities come from the model at setup, unless the loss reads none
        self.uses_reference = self.fixed_terms = uses_reference

    @classmethod
    def from_config(cls, cfg, pad_id: int) -> DpoObjective:
        from fedsec.registry import registry

        uses = registry("preference_loss").entry(cfg.dpo.loss).options["reference"]
        return cls(pad_id, cfg.dpo.beta, cfg.dpo.reference, cfg.training.pack, cfg.dpo.preference_loss, uses)

    def sequences(self, items) -> list[Encoded]:
        return [p.chosen for p in items] + [p.rejected for p in items]

    @staticmethod
    def records(client) -> tuple:
        return client.preference

    record_field = "preference"

    @staticmethod
    def eval_records(data) -> tuple:
        return data.preference_test  # held-out pairs: preference accuracy, reward margin

    @staticmethod
    def as_examples(records) -> list[InstructionExample]:
        """Each pair as the example its chosen reply answers (what membership inference scores)."""
        return [InstructionExample(p.prompt, p.chosen, p.system) for p in records]

    @staticmethod
    def held_out(data) -> tuple:
        return data.preference_test

    def encode(self, records, tokenizer, data_cfg) -> list[PairItem]:
        """The pairs whose both replies fit `max_length`, encoded."""
        pairs = (encode_pair(e, tokenizer, data_cfg.template, data_cfg.max_length) for e in records)
        return [p for p in pairs if p]

    def precompute(self, model, items: list[PairItem], batch_size: int, evaluation: bool = False) -> list[PairItem]:
        """The pairs with the reference policy's log-probabilities (fixed for the run): always
        for the held-out pairs (`evaluation`: the preference metrics are DPO's implicit reward
        whatever the loss), for training pairs only where the loss reads them."""
        if not (self.uses_reference or evaluation):
            return items  # the loss reads no reference: its log-probabilities stay 0.0
        policy = model.disable_adapter() if self.reference == "base" else contextlib.nullcontext()
        with policy:
            return with_reference(model, items, self.pad_id, batch_size)

    def loss(self, model, items: Sequence[PairItem]) -> tuple[torch.Tensor, int]:
        return self._pair_losses(model, items, self.packing(model, items)).sum(), len(items)

    def record_terms(self, model, items: Sequence[PairItem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(DPO loss of each pair [n], ones [n], the pair of each row: chosen rows 0..n-1,
        rejected n..2n-1)."""
        n = len(items)
        losses = self._pair_losses(model, items)
        return losses, torch.ones_like(losses), torch.arange(2 * n, device=losses.device) % n

    def _pair_losses(self, model, items: Sequence[PairItem], packing: Packing = None) -> torch.Tensor:
        return self._losses(items, sequence_logprobs(model, self.sequences(items), self.pad_id, packing))

    def _losses(self, items: Sequence[PairItem], logps: torch.Tensor) -> torch.Tensor:
        """Each pair's preference loss (dpo.loss) from its replies' log-probabilities (all
        chosen, then all rejected)."""
        n = len(items)

        def column(values) -> torch.Tensor:
            return torch.tensor(values, dtype=logps.dtype, device=logps.device)

        return self.pair_loss(PairLogps(
            logps[:n], logps[n:], column([p.ref_chosen for p in items]), column([p.ref_rejected for p in items]),
            column([p.tokens[0] for p in items]), column([p.tokens[1] for p in items])))

    def _terms(self, groups, logps: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, at = [], 0
        for group in groups:  # a group's sequences: its chosen replies, then its rejected
            losses.append(self._losses(group, logps[at: at + 2 * len(group)]))
            at += 2 * len(group)
        losses = torch.cat(losses)
        return losses, torch.ones_like(losses)


OBJECTIVES = {"sft": SftObjective, "dpo": DpoObjective}  # ExperimentConfig.task -> objective


def objective_for(cfg, pad_id: int) -> SftObjective | DpoObjective:
    """The experiment's objective (its task), with the tokenizer's pad id."""
    return OBJECTIVES[cfg.task].from_config(cfg, pad_id)
