"""Local training: one `LocalTrainer`, reused for every client and round.

A client's work is: load the starting adapter, run `local_steps` optimizer steps (AdamW or SGD) on
random batches of its (pre-tokenized) data, return the adapter delta. The loss is
completion-only cross-entropy; logits are computed only at target positions (the
LM head is a large share of a small model's compute). Randomness (batch order,
dropout) comes from one seed per (round, client), so a run is reproducible and a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fedsec.adapter import AdapterParams
from fedsec.config import TrainingConfig
from fedsec.encoding import IGNORE
from fedsec.seeding import scoped_torch_seed


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


def target_log_softmax(model, batch: dict[str, torch.Tensor]):
    """Next-token log-distributions at every target position.

    Returns (log_probs [N, vocab], targets [N], rows [N]) for the N positions whose
    next token is a target, in row-major order. Runs the decoder, then the LM head
    only on those positions, which skips most of the vocabulary projection.
    """
    lm = _causal_lm(model)
    if "inputs_embeds" in batch:  # frozen-prefix cache: run only the adapted top layers
        from fedsec.prefix import top_layers_only

        with top_layers_only(lm, batch["start_layer"]):
            hidden = lm.get_decoder()(inputs_embeds=batch["inputs_embeds"],
                                      attention_mask=batch["attention_mask"],
                                      use_cache=False).last_hidden_state
    else:
        hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    where = targets != IGNORE
    logits = lm.get_output_embeddings()(hidden[:, :-1][where]).float()
    return logits.log_softmax(-1), targets[where], where.nonzero()[:, 0]


def target_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every target token, and the batch row each belongs to."""
    log_probs, targets, rows = target_log_softmax(model, batch)
    return log_probs.gather(1, targets[:, None]).squeeze(1), rows


def completion_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of target-token NLL, number of target tokens)."""
    logp, _ = target_logprobs(model, batch)
    return -logp.sum(), int(logp.numel())


@dataclass(frozen=True)
class LocalResult:
    delta: torch.Tensor
    num_examples: int
    loss: float  # mean loss per term (target token for SFT, pair for DPO) over the steps
    steps: int
    loss_terms: int


class BatchStream:
    """Endless batches of a dataset: reshuffled each pass, from an explicit generator."""

    def __init__(self, data: Sequence, batch_size: int, generator: torch.Generator):
        self.data, self.size, self.gen = data, min(batch_size, len(data)), generator
        self.order: list[int] = []

    def next(self) -> list:
        if len(self.order) < self.size:
            self.order += torch.randperm(len(self.data), generator=self.gen).tolist()
        picked, self.order = self.order[: self.size], self.order[self.size:]
        return [self.data[i] for i in picked]


class LocalTrainer:
    """Trains the model's adapter for one client at a time; holds no client state.

    `objective.loss(model, items) -> (summed loss, number of terms)` is the only
    thing SFT and DPO do differently (see fedsec.objectives).
    """

    def __init__(self, model, cfg: TrainingConfig, objective):
        self.model, self.cfg, self.objective = model, cfg, objective
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
        cfg = self.cfg
        self.adapter.set(start)
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.adapter.params, lr=lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.adapter.params, lr=lr, weight_decay=cfg.weight_decay)
        stream = BatchStream(data, cfg.batch_size, torch.Generator().manual_seed(seed))
        layout = self.adapter.layout
        anchors = list(layout.unflatten(start).values()) if prox_mu > 0 else None
        offsets = list(layout.unflatten(correction).values()) if correction is not None else None
        total_loss, total_tokens = 0.0, 0
        self.model.train()
        try:
            with scoped_torch_seed(seed):
                for _ in range(cfg.local_steps):
                    for _ in range(cfg.grad_accum):
                        loss_sum, n = self.objective.loss(self.model, stream.next())
                        (loss_sum / max(n, 1) / cfg.grad_accum).backward()
                        total_loss += float(loss_sum.detach())
                        total_tokens += n
                    if anchors is not None:
                        self._add_proximal_gradient(prox_mu, anchors)
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(self.adapter.params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if offsets is not None:
                        self._apply_correction(lr, offsets)
        finally:
            self.model.eval()
        delta = self.adapter.get() - start
        return LocalResult(delta, len(data), total_loss / max(total_tokens, 1), cfg.local_steps,
                           total_tokens)

    @torch.no_grad()
    def _add_proximal_gradient(self, prox_mu: float, anchors) -> None:
        for p, anchor in zip(self.adapter.params, anchors):
            extra = prox_mu * (p - anchor.to(p.dtype))
            p.grad = extra if p.grad is None else p.grad + extra

    @torch.no_grad()
    def _apply_correction(self, lr: float, offsets) -> None:
        for p, offset in zip(self.adapter.params, offsets):
            p.sub_(lr * offset.to(p.dtype))
