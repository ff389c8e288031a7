"""The server's side of a round: client sampling and the server optimizer.

The server optimizer treats the aggregated client delta as a pseudo-gradient step
(Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 1); FedAvg is the
plain step with server learning rate 1. Every stateful piece has
`state_dict`/`load_state_dict` so checkpoints extend instead of being bolted on.
"""

from __future__ import annotations

import torch


def sample_clients(num_clients: int, per_round: int, generator: torch.Generator) -> list[int]:
    """Uniform sampling of `per_round` distinct clients, returned in ascending order."""
    if not 1 <= per_round <= num_clients:
        raise ValueError(f"cannot sample {per_round} of {num_clients} clients")
    return sorted(torch.randperm(num_clients, generator=generator)[:per_round].tolist())


class FedAvgServer:
    """x <- x + server_lr * aggregate (FedAvg when server_lr = 1). Stateless."""

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr

    def step(self, params: torch.Tensor, aggregate: torch.Tensor) -> torch.Tensor:
        return params + self.server_lr * aggregate

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state
