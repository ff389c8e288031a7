"""Update sanitation: reject deltas that cannot be aggregated safely.

A delta with NaN or Inf, of the wrong size or dtype, or with an absurd L2 norm
(above `max_norm`) never reaches the aggregate; the stage reports which clients it
dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SanitizeResult:
    kept: torch.Tensor  # indices of the accepted rows
    rejected: tuple[int, ...]  # indices of the rejected rows


def _acceptable(d: torch.Tensor, dim: int, max_norm: float | None) -> bool:
    if not (d.ndim == 1 and d.numel() == dim and d.is_floating_point() and bool(torch.isfinite(d).all())):
        return False
    return max_norm is None or float(torch.linalg.vector_norm(d.double())) <= max_norm


def sanitize(deltas: list[torch.Tensor], dim: int, max_norm: float | None = None) -> SanitizeResult:
    """Accept the deltas that are finite floating 1-D tensors of length `dim` with L2 norm
    at most `max_norm` (None: any norm)."""
    ok = [i for i, d in enumerate(deltas) if _acceptable(d, dim, max_norm)]
    bad = tuple(i for i in range(len(deltas)) if i not in set(ok))
    return SanitizeResult(torch.tensor(ok, dtype=torch.long), bad)


def sanitize_updates(updates: list, dim: int, max_norm: float | None = None) -> tuple[list, tuple[int, ...]]:
    """`sanitize` over ClientUpdates: (the accepted updates, the rejected clients' ids)."""
    checked = sanitize([u.delta for u in updates], dim, max_norm)
    return ([updates[i] for i in checked.kept.tolist()],
            tuple(updates[i].client_id for i in checked.rejected))
