"""Update sanitation: reject deltas that cannot be aggregated safely.

A delta that is not a dense CPU float32 1-D tensor of the adapter's length, holds
NaN or Inf, or has an absurd L2 norm (above `max_norm`) never reaches the
aggregate; neither does an update whose example count is not a positive integer
(FedAvg weights by it). The stage reports which clients it dropped. fp32 is what
every fedsec client sends (the adapter's flat vector); another dtype would change
the aggregate's precision, or promote the whole round to float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedsec.defenses.dp import norm_buffer, row_norms, squared_norm

DTYPE = torch.float32  # the dtype of every adapter vector (fedsec.adapter.AdapterParams.get)


@dataclass(frozen=True)
class SanitizeResult:
    kept: torch.Tensor  # indices of the accepted rows
    rejected: tuple[int, ...]  # indices of the rejected rows
    norms: torch.Tensor | None = None  # [len(kept)] float64 L2 norms of the accepted rows


@dataclass(frozen=True)
class Stacked:
    """The accepted updates, stacked: what the server pipeline's Sanitize stage hands on."""

    kept: list  # the accepted ClientUpdates, in their order
    rejected: tuple[int, ...]  # the rejected updates' client ids
    deltas: torch.Tensor  # [len(kept), dim] float32: the accepted deltas, a copy (rows of `out` when given)
    norms: torch.Tensor  # [len(kept)] their float64 L2 norms


def acceptable(d: object, dim: int, max_norm: float | None = None) -> bool:
    """Whether `d` is a finite float32 dense CPU vector of length `dim` with norm <= max_norm."""
    if not _shaped(d, dim):
        return False
    norm = float(row_norms([d])[0])  # inf or nan for any non-finite entry
    return math.isfinite(norm) and (max_norm is None or norm <= max_norm)


def _shaped(d: object, dim: int) -> bool:
    return (isinstance(d, torch.Tensor) and d.layout == torch.strided and d.device.type == "cpu"
            and d.dtype == DTYPE and d.ndim == 1 and d.numel() == dim)


def sanitize(deltas: list, dim: int, max_norm: float | None = None) -> SanitizeResult:
    """Accept the deltas that are finite float32 1-D tensors of length `dim` with L2 norm
    at most `max_norm` (None: any norm). One float64 norm per row decides both (a non-finite
    entry makes it non-finite), and the accepted rows' norms come back for clipping."""
    shaped = [i for i, d in enumerate(deltas) if _shaped(d, dim)]
    norms = row_norms([deltas[i] for i in shaped]) if shaped else torch.zeros(0, dtype=torch.float64, device="cpu")
    fine = [k for k, norm in enumerate(norms.tolist())
            if math.isfinite(norm) and (max_norm is None or norm <= max_norm)]
    ok = [shaped[k] for k in fine]
    bad = tuple(sorted(set(range(len(deltas))) - set(ok)))
    return SanitizeResult(torch.tensor(ok, dtype=torch.long, device="cpu"), bad,  # host-side indices
                          norms[torch.tensor(fine, dtype=torch.long, device="cpu")])


def _counted(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def sanitize_updates(updates: list, dim: int, max_norm: float | None = None) -> tuple[list, tuple[int, ...]]:
    """`sanitize` over ClientUpdates, also rejecting example counts that are not integers
    >= 1: (the accepted updates, the rejected clients' ids). The rules are `stack_sanitized`'s."""
    stacked = stack_sanitized(updates, dim, max_norm)
    return stacked.kept, stacked.rejected


def stack_sanitized(updates: list, dim: int, max_norm: float | None = None,
                    out: torch.Tensor | None = None) -> Stacked:
    """Sanitize ClientUpdates and stack the accepted deltas in one read of each: every delta of the
    right shape and example count is copied into the next row of `out` block by block, its float64
    norm taken from the copy while it is in cache (fedsec.defenses.dp.squared_norm); a row that
    fails (non-finite, over the bound) is overwritten by the next. `out`: [>= len(updates), dim]
    float32, reused round after round by the caller (a fresh n x d matrix costs its page faults,
    several passes' time); None allocates one. A delta is accepted on `sanitize`'s rules with an
    example count that is an integer >= 1; the accepted keep their order. The clients' deltas are
    never written."""
    if out is None:
        out = torch.empty(len(updates), dim, dtype=DTYPE, device="cpu")
    if out.dtype != DTYPE or out.shape[0] < len(updates) or out.shape[1] != dim:
        raise ValueError(f"out must be float32 [>= {len(updates)}, {dim}], got {out.dtype} {tuple(out.shape)}")
    buffer = norm_buffer(dim, out.device)
    kept, norms = [], []
    for i, u in enumerate(updates):
        if not (_shaped(u.delta, dim) and _counted(u.num_examples)):
            continue
        norm = math.sqrt(squared_norm(u.delta, buffer, copy_to=out[len(kept)]))
        if math.isfinite(norm) and (max_norm is None or norm <= max_norm):
            kept.append(i)
            norms.append(norm)
    accepted = set(kept)
    return Stacked([updates[i] for i in kept], tuple(u.client_id for i, u in enumerate(updates) if i not in accepted),
                   out[: len(kept)], torch.tensor(norms, dtype=torch.float64, device=out.device))
