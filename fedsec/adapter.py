"""AdapterState: the trainable LoRA parameters as one flat fp32 vector.

The flat vector is what travels between clients and server, what server stages
transform and what checkpoints store; the layout maps it back to named tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdapterLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named tensors of a flat vector [numel], or of stacked ones [..., numel] (each tensor
        then [..., *shape], e.g. one row per client)."""
        out, offset, lead = {}, 0, vector.shape[:-1]
        for name, shape in zip(self.names, self.shapes):
            n = int(torch.Size(shape).numel())
            out[name] = vector[..., offset: offset + n].reshape(*lead, *shape)
            offset += n
        return out


class AdapterParams:
    """Reads and writes a model's trainable parameters as one flat vector."""

    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters; attach an adapter first")
        self.params = [p for _, p in named]
        self.layout = AdapterLayout(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    def get(self) -> torch.Tensor:
        """A detached fp32 copy of the current adapter."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    @torch.no_grad()
    def set(self, vector: torch.Tensor) -> None:
        if vector.numel() != self.layout.numel:
            raise ValueError(f"adapter vector has {vector.numel()} values, expected {self.layout.numel}")
        offset = 0
        for p in self.params:
            n = p.numel()
            p.copy_(vector[offset: offset + n].view_as(p))
            offset += n
