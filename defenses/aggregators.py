"""Aggregation rules over stacked client deltas."""

from __future__ import annotations

import torch


def weighted_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FedAvg (McMahan et al. 2017, eq. in Alg. 1): sum_k (n_k / n) * delta_k.

    deltas: [num_clients, dim]; weights: [num_clients], non-negative (example counts).
    """
    if deltas.ndim != 2 or weights.shape != (deltas.shape[0],):
        raise ValueError(f"expected deltas [n, d] and weights [n], got {tuple(deltas.shape)} "
                         f"and {tuple(weights.shape)}")
    w = weights.to(torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    return ((w / w.sum()).to(deltas.dtype) @ deltas)
