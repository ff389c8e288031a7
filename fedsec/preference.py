"""Preference losses by name (`dpo.loss`): what task dpo minimizes for each pair.

    @fedsec.register("preference_loss", "simpo")
    def simpo(pairs: PairLogps, *, beta: float = 2.0, gamma: float = 0.5) -> torch.Tensor: ...

    dpo: {loss: simpo, beta: 2.0, params: {gamma: 0.5}}

A loss gets the batch's `PairLogps` (the policy's and the fixed reference's summed
log-probabilities of each pair's chosen and rejected reply, and the replies' token
counts) and returns one loss per pair [n]; the objective sums them. A parameter named
`beta` takes `dpo.beta`, the others come from `dpo.params`. The loss of a pair may
depend on that pair alone: record-level DP-SGD and the batched cohort path take each
pair's gradient from its own loss (the contract suite checks it).

Built-ins, with h the DPO margin (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)):

    dpo    -log sigmoid(beta h)                              Rafailov et al. 2023, eq. 7
    ipo    (h_avg - 1 / (2 beta))^2, h_avg the margin of     Azar et al. 2024, eq. 17; per-token
           per-token log-ratios                              as TRL and the paper's authors
    slic   max(0, 1 - beta h)                                SLiC-HF's hinge (Zhao et al. 2023)
    cdpo   (1 - e) l(h) + e l(-h),                           conservative DPO (Mitchell 2023): each
           l(h) = -log sigmoid(beta h), e = label_smoothing  pair's pull stops at beta h = log((1 - e) / e)
    rdpo   [(1 - e) l(h) - e l(-h)] / (1 - 2 e),             Chowdhury et al. 2024: unbiased when each
           e = label_noise                                   preference was flipped independently with
                                                             probability e

Both cdpo and rdpo model noisy annotators, each pair flipped independently; fedsec's
preference_flip attack flips every pair of its malicious clients instead, which neither
loss assumes (cdpo bounds how far any one pair, poisoned or not, pushes its margin; rdpo
never stops pushing). At e = 0 both are dpo to the bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsec.registry import register


@dataclass(frozen=True)
class PairLogps:
    """A batch of preference pairs as a loss sees them, each a tensor [n] on the model's device."""

    chosen: torch.Tensor  # log pi(y_w | x), summed over the chosen reply's tokens
    rejected: torch.Tensor  # log pi(y_l | x)
    ref_chosen: torch.Tensor  # the reference policy's, fixed for the run
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # the replies' token counts (float), for per-token losses
    rejected_tokens: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        """DPO's h: how much more the policy prefers the chosen reply than the reference does."""
        return (self.chosen - self.ref_chosen) - (self.rejected - self.ref_rejected)


@register("preference_loss", "dpo")
def dpo(pairs: PairLogps, *, beta: float = 0.1) -> torch.Tensor:
    """Direct Preference Optimization (Rafailov et al. 2023): -log sigmoid(beta h)."""
    return -F.logsigmoid(beta * pairs.margin)


@register("preference_loss", "ipo")
def ipo(pairs: PairLogps, *, beta: float = 0.1) -> torch.Tensor:
    """Identity Preference Optimization (Azar et al. 2024): the per-token margin regressed
    onto 1 / (2 beta), so the policy cannot push the margin without bound."""
    per_token = ((pairs.chosen - pairs.ref_chosen) / pairs.chosen_tokens.clamp(min=1)
                 - (pairs.rejected - pairs.ref_rejected) / pairs.rejected_tokens.clamp(min=1))
    return (per_token - 1 / (2 * beta)) ** 2


@register("preference_loss", "slic")
def slic(pairs: PairLogps, *, beta: float = 0.1) -> torch.Tensor:
    """SLiC-HF's hinge on the DPO margin (Zhao et al. 2023): zero once beta h reaches 1."""
    return torch.relu(1 - beta * pairs.margin)


@register("preference_loss", "cdpo")
def cdpo(pairs: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023): DPO against labels smoothed by `label_smoothing`, so
    the loss is least at a finite margin instead of pushing it without bound."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError("label_smoothing: must be in [0, 0.5): the probability that a preference is wrong")
    h = beta * pairs.margin
    return (1 - label_smoothing) * -F.logsigmoid(h) + label_smoothing * -F.logsigmoid(-h)


@register("preference_loss", "rdpo")
def rdpo(pairs: PairLogps, *, beta: float = 0.1, label_noise: float = 0.1) -> torch.Tensor:
    """Provably robust DPO (Chowdhury et al. 2024): an unbiased estimate of the clean DPO
    loss when each pair's preference was flipped with probability `label_noise`."""
    if not 0 <= label_noise < 0.5:
        raise ValueError("label_noise: must be in [0, 0.5): the share of flipped preferences the loss expects")
    h = beta * pairs.margin
    return ((1 - label_noise) * -F.logsigmoid(h) - label_noise * -F.logsigmoid(-h)) / (1 - 2 * label_noise)
