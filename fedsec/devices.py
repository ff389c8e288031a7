"""Where tensors live. Encoded data stays in host memory (fedsec.encoding.DATA); the
model's computations and their results are made on the model's own device, named
explicitly at every construction so that nothing lands on an implicit default."""

from __future__ import annotations

import torch


def model_device(model) -> torch.device:
    """Where the model's inputs and outputs go: its `device` (transformers and peft models
    name it: that of their first parameters), else that of its first parameter."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on `device` (other entries, e.g. a layer index, as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
