"""The LM head's log-probability of each target token, in blocks of the vocabulary.

Training needs log p(target) at a few positions, and the gradient of its sum with respect
to the hidden states. `log_softmax(h W^T).gather(targets)` computes it by writing the
[N, vocab] logits, then their log-distributions (autograd keeps both), then reading them
back in the backward: about five passes over N x vocab floats (200 MB at 1,024 positions
of SmolLM2's 49,152 words), each taken from memory, not cache. Here each block of
`HEAD_BLOCK` words is one product whose [N, block] logits stay in cache while they become
exponentials: their maximum and sum per position, the target's logit where it falls in
the block, and the block's exp(z - max) written once for the backward, which reads them
once:

    log p(t) = z_t - lse,  lse = M + log sum_b s_b exp(m_b - M)
    d log p(t) / dh = W_t - sum_b (exp(z_b - m_b) exp(m_b - lse)) W_b

(m_b, s_b: block b's maximum and sum of exp(z - m_b); M: the largest m_b). The same
numbers to float rounding, in about 0.7 of the time on SmolLM2's head at 228-1,024
positions (benchmarks/RESULTS.md), and half the memory autograd holds.

Evaluation reads a little more, without a gradient (`target_scores`, a `TargetScores`):
the targets' log-probabilities, each position's arg-max word (the blocks' maxima), and the
log-probabilities of given words (a label's first token) as their logits less the kept
log-sum-exp.

Only a plain float32 head that is not trained takes these paths (`blockable`); any other
(a bias, a trained or adapted head, half precision, hooks on the head) is the plain
computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Words per block: a block's logits at 200-512 positions (3-8 MB) sit in a core's cache.
HEAD_BLOCK = 4096


def blockable(head: torch.nn.Module, hidden: torch.Tensor, precision: torch.dtype | None) -> bool:
    """Whether `target_logprobs` may take `head`'s blocks: a bias-free float32 nn.Linear, not
    trained (no gradient for its weight), no hooks on it, fp32 forwards (`precision` None),
    and at least one position."""
    return (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and head.weight.dtype == torch.float32 and hidden.dtype == torch.float32
            and precision is None and hidden.shape[0] > 0
            and not (head._forward_hooks or head._forward_pre_hooks or head._backward_hooks))


def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    block: int = HEAD_BLOCK) -> torch.Tensor:
    """log softmax(hidden weight^T)[i, targets[i]] for hidden [N, d], weight [vocab, d],
    targets [N]: [N], differentiable in `hidden` (the weight is taken as frozen)."""
    return _BlockedTargetLogSoftmax.apply(hidden, weight, targets, block)


def _blocks(vocab: int, block: int) -> list[tuple[int, int]]:
    return [(b, min(b + block, vocab)) for b in range(0, vocab, block)]


def _pick(picked: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, b0: int) -> None:
    """picked[i] = logits[i, targets[i] - b0] where the target falls in this block [N, width]
    starting at word b0 (by a mask, not an index list: no host sync on a GPU)."""
    column = (targets - b0).clamp(0, logits.shape[1] - 1)
    inside = (targets >= b0) & (targets < b0 + logits.shape[1])
    torch.where(inside, logits.gather(1, column[:, None]).squeeze(1), picked, out=picked)


def _scan(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, block: int, keep: bool,
          argmax: bool):
    """One pass over the vocabulary's blocks: (log p(target) [N], the log-sum-exp [N], the
    blocks' maxima m [blocks, N], each block's exp(z - m_b) if `keep`, the arg-max word [N]
    if `argmax` (the first of equal maxima, as torch.argmax), the blocks' spans)."""
    n, spans = hidden.shape[0], _blocks(weight.shape[0], block)
    m = torch.empty(len(spans), n, dtype=hidden.dtype, device=hidden.device)
    s = torch.empty_like(m)
    arg = torch.empty(len(spans), n, dtype=torch.long, device=hidden.device) if argmax else None
    picked = torch.empty(n, dtype=hidden.dtype, device=hidden.device)
    # [N, b1 - b0] each: one tensor per block, a size malloc keeps and reuses, where one
    # [N, vocab] buffer is mapped afresh by every call
    kept = []
    for i, (b0, b1) in enumerate(spans):
        z = torch.mm(hidden, weight[b0:b1].t())
        _pick(picked, z, targets, b0)
        if argmax:
            torch.max(z, 1, out=(m[i], arg[i]))
        else:
            torch.amax(z, 1, out=m[i])
        torch.sum(z.sub_(m[i][:, None]).exp_(), 1, out=s[i])
        if keep:
            kept.append(z)
    top, best = m.max(0)  # the first block holding the maximum: torch.argmax's first index
    lse = top + (s * (m - top).exp()).sum(0).log()
    word = None
    if argmax:
        word = arg.gather(0, best[None]).squeeze(0) + torch.tensor([b0 for b0, _ in spans], device=hidden.device)[best]
    return picked - lse, lse, m, kept, word, spans


class _BlockedTargetLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, block):
        keep = ctx.needs_input_grad[0]
        logp, lse, m, kept, _, spans = _scan(hidden, weight, targets, block, keep, argmax=False)
        if keep:
            ctx.save_for_backward(weight, targets, m, lse, *kept)
            ctx.spans = spans
        return logp

    @staticmethod
    def backward(ctx, grad):
        weight, targets, m, lse, *kept = ctx.saved_tensors
        scale = (m - lse).exp() * grad  # [blocks, N]: exp(m_b - lse) times each position's gradient
        grad_hidden = grad[:, None] * weight[targets]
        for (b0, b1), exps, row_scale in zip(ctx.spans, kept, scale):  # the saved blocks stay as they are
            grad_hidden = torch.addmm(grad_hidden, exps * row_scale[:, None], weight[b0:b1], alpha=-1)
        return grad_hidden, None, None, None


@dataclass(frozen=True)
class TargetScores:
    """The LM head at N target positions as evaluation reads it: each position's target
    log-probability and arg-max word, and on request the log-probabilities of given words
    (`words`). From `target_scores` in blocks (the positions' hidden states and log-sum-exps
    kept, [N, d] and [N]) or from full log-distributions (`from_log_probs`, [N, vocab])."""

    target: torch.Tensor  # [N] log p(target)
    argmax: torch.Tensor  # [N] the most likely word
    log_probs: torch.Tensor | None = None  # [N, vocab]: the plain head's
    hidden: torch.Tensor | None = None  # [N, d], with weight and lse: the blocked head's
    weight: torch.Tensor | None = None
    lse: torch.Tensor | None = None

    @classmethod
    def from_log_probs(cls, log_probs: torch.Tensor, targets: torch.Tensor) -> TargetScores:
        return cls(log_probs.gather(1, targets[:, None]).squeeze(1), log_probs.argmax(1), log_probs=log_probs)

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, rows: slice) -> TargetScores:
        """The scores of a run of consecutive positions."""
        return TargetScores(self.target[rows], self.argmax[rows],
                            *(None if t is None else t[rows] for t in (self.log_probs, self.hidden)),
                            self.weight, None if self.lse is None else self.lse[rows])

    def words(self, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """log p(word) at `positions` (indices or a mask over the N) for `ids`: [k] (the same
        words at each position) or [P, k] (a row of words per position); [P, k]."""
        if self.log_probs is not None:
            at = self.log_probs[positions]
            return at[:, ids] if ids.dim() == 1 else at.gather(1, ids)
        hidden = self.hidden[positions]
        logits = hidden @ self.weight[ids].t() if ids.dim() == 1 else (hidden[:, None] * self.weight[ids]).sum(-1)
        return logits - self.lse[positions][:, None]


@torch.no_grad()
def target_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  block: int = HEAD_BLOCK) -> TargetScores:
    """`TargetScores` of hidden [N, d] under the head `weight` [vocab, d], the vocabulary in
    blocks: the target's logit less the log-sum-exp, the arg-max (the first of equal
    maxima, as torch.argmax), no [N, vocab] tensor."""
    logp, lse, _, _, word, _ = _scan(hidden, weight, targets, block, keep=False, argmax=True)
    return TargetScores(logp, word, hidden=hidden, weight=weight, lse=lse)
