"""Many clients' local steps side by side: one forward and backward per step for the round.

A round's clients train from the same global adapter, each on its own batches with its own
optimizer. One client's step puts a batch of a few hundred positions through the model, so
every frozen product has a few hundred rows and runs far from the machine's rate for large
products (a GPU's most of all). `training.lockstep` trains the round's clients together
instead: at each local step every client's batch goes through one forward (its rows its own,
as in the batched one-step path), the frozen products carry all of them, and each client's
LoRA branch uses its own copy of the adapter (`ClientAdapters`: the adapter's tensors
stacked [clients, *shape], a row's copy picked by its owner). The summed loss's gradient
then holds each client's own gradient in its slice, and the optimizer (AdamW and SGD act
entry by entry) steps every client's copy as it would alone.

The same numbers as one client at a time up to float rounding: the products have other
shapes, so a published table's figures would move by a last digit; it is therefore opt-in,
and the one-step path (`LocalTrainer.train_clients`' batched cohort) comes first where it
applies. Supported where the per-client path is deterministic given the batches (no dropout,
no record-level DP, no fp16 loss scaling, no recomputed forward) and the adapter is plain LoRA
(`lora_layers`) on `nn.Linear` layers or on bitsandbytes' 4-bit ones (QLoRA: the quantized
base's product, dequantizing included, then carries every client's rows at once); elsewhere
the clients train one at a time. Not on 8-bit layers: LLM.int8 computes in higher precision the
input columns where any row of the batch has an outlier, so a client's numbers would depend on
the other clients' rows.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from peft.tuners.lora import bnb as lora_bnb
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer

from fedsec.adapter import AdapterParams

# PEFT's LoRA layers whose forward is base_layer(x) + s B A x, the input cast to the adapter's dtype
# outside autocast (`_forward`), and whose base computes each row on its own: over nn.Linear and,
# where bitsandbytes is installed (PEFT defines the class only then), over its 4-bit layers
LINEAR_TYPES = (LoraLinear, *([lora_bnb.Linear4bit] if hasattr(lora_bnb, "Linear4bit") else []))


def _plain(module: torch.nn.Module) -> bool:
    """A vanilla LoRA linear layer with one active adapter: no variant (DoRA), no bias on A or B,
    no dropout, not merged into its base."""
    if type(module) not in LINEAR_TYPES or module.merged or len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return False
    drop = module.lora_dropout[name]
    return (module.lora_A[name].bias is None and module.lora_B[name].bias is None
            and (isinstance(drop, torch.nn.Identity) or getattr(drop, "p", 1.0) == 0))


def lora_layers(model: torch.nn.Module, adapter: AdapterParams
                ) -> list[tuple[torch.nn.Module, int | None, int | None]] | None:
    """The LoRA layers with a trained matrix, each with the index of its A and of its B among
    `adapter.params` (None: that matrix is frozen, as FFA-LoRA's A); None where some trained
    parameter is not a plain LoRA layer's A or B (`_plain`), so the clients cannot share a forward."""
    index = {id(p): i for i, p in enumerate(adapter.params)}
    layers, seen = [], set()
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        name = module.active_adapters[0] if module.active_adapters else None
        weights = [module.lora_A[name].weight, module.lora_B[name].weight] if name in module.lora_A else []
        found = [index.get(id(w)) for w in weights]
        if all(i is None for i in found):
            continue
        if not _plain(module):
            return None
        layers.append((module, *found))
        seen.update(i for i in found if i is not None)
    return layers if len(seen) == len(adapter.params) else None


class ClientAdapters:
    """K copies of the adapter, one per client, each parameter as a [K, *shape] tensor
    (`params`, the leaves an optimizer steps), starting at `start` (one adapter vector for all,
    or [K, numel]: each client's own, as the local-only baseline's). Inside `active()`, the
    layers of `lora_layers` compute their LoRA branch with the copy of each input row's client
    (`routed`)."""

    def __init__(self, model: torch.nn.Module, adapter: AdapterParams, start: torch.Tensor, clients: int):
        layers = lora_layers(model, adapter)
        if layers is None:
            raise ValueError("the adapter is not plain LoRA on linear layers; clients cannot train in lockstep")
        self.layers, self.clients = layers, clients
        starts = adapter.layout.unflatten(start.expand(clients, -1))
        self.params = [value.to(p.dtype).clone().requires_grad_() for p, value in zip(adapter.params, starts.values())]
        self.owner: torch.Tensor | None = None

    @contextlib.contextmanager
    def routed(self, owner: torch.Tensor) -> Iterator[None]:
        """Inside the block, row r of a forward's input is client owner[r]'s ([rows], values in
        [0, K)). Outside it (a one-time check's forward), the layers run the model's own adapter."""
        self.owner = owner
        try:
            yield
        finally:
            self.owner = None

    def vectors(self) -> torch.Tensor:
        """Each client's adapter as a flat fp32 vector [K, numel] (AdapterParams' layout)."""
        return torch.cat([p.detach().reshape(self.clients, -1).float() for p in self.params], 1)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        patched = []
        try:
            for module, a, b in self.layers:
                if "forward" in vars(module):
                    raise RuntimeError("a LoRA layer's forward is already replaced; lockstep cannot nest")
                module.forward = functools.partial(_forward, module, self, a, b)
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward
            self.owner = None


def _forward(module, clients: ClientAdapters, a: int | None, b: int | None, x: torch.Tensor, *args,
             **kwargs) -> torch.Tensor:
    """PEFT's LoRA forward, x W^T + s (x A^T) B^T, with each row's own client's A and B (x cast
    to their dtype and the branch to the base's, as PEFT does outside autocast; under autocast
    the products run in its dtype either way)."""
    owner, name = clients.owner, module.active_adapters[0]
    if owner is None or module.disable_adapters:  # a check's forward, or the base alone (a DPO reference)
        return type(module).forward(module, x, *args, **kwargs)
    if x.dim() != 3 or x.shape[0] != owner.numel():
        raise RuntimeError(f"lockstep: a LoRA layer got input {tuple(x.shape)} for {owner.numel()} routed rows")
    result = module.base_layer(x, *args, **kwargs)
    rows = owner.numel()
    lora_a = clients.params[a][owner] if a is not None else module.lora_A[name].weight.expand(rows, -1, -1)
    lora_b = clients.params[b][owner] if b is not None else module.lora_B[name].weight.expand(rows, -1, -1)
    low = torch.bmm(x.to(lora_a.dtype), lora_a.transpose(1, 2))
    return result + (torch.bmm(low, lora_b.transpose(1, 2)) * module.scaling[name]).to(result.dtype)
