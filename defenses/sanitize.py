"""Update sanitation: reject deltas that cannot be aggregated safely.

A delta with NaN or Inf, or of the wrong size, never reaches the aggregate; the
stage reports which clients it dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SanitizeResult:
    kept: torch.Tensor  # indices of the accepted rows
    rejected: tuple[int, ...]  # indices of the rejected rows


def sanitize(deltas: list[torch.Tensor], dim: int) -> SanitizeResult:
    """Accept the deltas that are finite 1-D tensors of length `dim`."""
    ok = [i for i, d in enumerate(deltas)
          if d.ndim == 1 and d.numel() == dim and d.is_floating_point() and bool(torch.isfinite(d).all())]
    bad = tuple(i for i in range(len(deltas)) if i not in set(ok))
    return SanitizeResult(torch.tensor(ok, dtype=torch.long), bad)


def sanitize_updates(updates: list, dim: int) -> tuple[list, tuple[int, ...]]:
    """`sanitize` over ClientUpdates: (the accepted updates, the rejected clients' ids)."""
    checked = sanitize([u.delta for u in updates], dim)
    return ([updates[i] for i in checked.kept.tolist()],
            tuple(updates[i].client_id for i in checked.rejected))
