"""Evaluation through merged LoRA weights: W + s B A once per adapter, not a LoRA branch per call.

An adapted linear layer computes x W^T + s (x A^T) B^T: the base product, then two thin
products and an addition over every position, each reading and writing activations of the
layer's width. Where nothing needs the adapter's gradient (an evaluation, greedy decoding),
the same layer is x (W + s B A)^T: one product, with the merged weight built once per adapter
value (`merged_lora`). On the quickstart's evaluation (SmolLM2, 6 adapted layers of 7
projections, rank 8) that takes 15% off the evaluation's time, building the 42 merged
weights included (benchmarks/RESULTS.md, `eval_over_unmerged`).

The merged weight is a new tensor: the base weight is never written (an in-place merge and
unmerge would drift it by float rounding, round after round), the state dict is untouched, and
the layer's outputs equal the LoRA branch's up to float rounding. Merged only where that
rounding is fp32's: a base weight in fp32 (or fp64) in a plain `nn.Linear`, one active vanilla
LoRA adapter (no DoRA or other variant, no bias on B). A bf16 or fp16 base would round the
adapter's small delta away; a quantized base has no weight to add it to: those layers keep the
branch. The copies are bounded (`MERGE_BYTES`): past it nothing is merged.

A call under autograd, in training mode, with the adapters disabled (`disable_adapter()`, a
DPO reference) or with extra arguments runs PEFT's own forward, so the context is safe around
any code. A layer's merged weight is rebuilt when its adapter or base tensors are written in
place (their version counters: `AdapterParams.set` inside the block takes effect); a write
through `.data`, which moves no counter, is not seen until the block ends.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear

# The merged copies' total size at most (bytes): SmolLM2-135M's 30 layers in fp32 take 425 MB;
# a 7B model's would take 28 GB, and keeps its LoRA branches
MERGE_BYTES = 1 << 30

_FP32_OR_WIDER = (torch.float32, torch.float64)


def mergeable(module: torch.nn.Module) -> bool:
    """Whether `module` is a LoRA linear layer whose adapter merges at fp32's rounding (see the
    module docstring)."""
    if type(module) is not LoraLinear:
        return False
    base = module.base_layer
    if type(base) is not torch.nn.Linear or base.weight.dtype not in _FP32_OR_WIDER or module.fan_in_fan_out:
        return False
    if len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return False
    a, b = module.lora_A[name], module.lora_B[name]
    return b.bias is None and a.bias is None and a.weight.dtype == b.weight.dtype == base.weight.dtype


def _key(*tensors: torch.Tensor) -> tuple:
    """What a merged weight was built from: each tensor's storage and version counter, which
    every in-place write through the tensor moves (`AdapterParams.set`'s copy_, an optimizer
    step), without reading the values (no device sync on a GPU)."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _forward(module, cache: dict, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or torch.is_grad_enabled() or module.training or module.disable_adapters or module.merged:
        return type(module).forward(module, x, *args, **kwargs)
    name = module.active_adapters[0]
    a, b, base = module.lora_A[name].weight, module.lora_B[name].weight, module.base_layer.weight
    scale = module.scaling[name]
    key = _key(a, b, base), scale
    hit = cache.get(module)
    if hit is None or hit[0] != key:
        hit = cache[module] = key, torch.addmm(base, b, a, alpha=scale)
    return F.linear(x, hit[1], module.base_layer.bias)


@contextlib.contextmanager
def merged_lora(model: torch.nn.Module, budget: int | None = None) -> Iterator[int]:
    """Inside the block, the model's mergeable LoRA layers (`mergeable`) run through merged
    weights wherever no gradient is needed; yields how many layers do (0 where none qualifies or
    their copies would pass `budget` bytes, MERGE_BYTES by default). Nested blocks leave the
    outer one in charge."""
    budget = MERGE_BYTES if budget is None else budget
    layers = [m for m in model.modules() if mergeable(m) and "forward" not in vars(m)]
    if sum(m.base_layer.weight.numel() * m.base_layer.weight.element_size() for m in layers) > budget:
        layers = []
    cache: dict = {}
    for m in layers:
        m.forward = functools.partial(_forward, m, cache)
    try:
        yield len(layers)
    finally:
        for m in layers:
            del m.forward
        cache.clear()
