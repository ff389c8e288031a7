"""The last decoder layer at the positions the loss reads, not at every position.

A loss (SFT's target tokens, DPO's replies, an evaluation's label words) reads the final
hidden state at a few positions of each row. In the last decoder layer, the position-wise
modules after the attention (the attention's output projection and the MLP) feed only their
own position's final state, so at any other position their work is never read. Running them
at the read positions only gives the same hidden states there, and the same gradients
(nothing downstream of the others has a loss), for a fraction of the layer: with adapters on
the top layer only (the DP sweep's shape: rows of about 100 positions, 3 read per example)
most of it. Every other layer is untouched: its outputs at all positions feed the next
layer's attention.

The rows stay rows (each row's read positions, padded to the longest), so per-row gradients
(Opacus' hooks for DP-SGD and the batched cohort path) stay per row. Whether it gives the full
forward's states on a model is checked once per model, on its first batch (`trimmed`), as
packing is. A last layer that names its MLP otherwise (Mixtral's `block_sparse_moe`) keeps it
whole; one whose MLP returns more than a tensor (a mixture of experts' router logits) or mixes
positions runs the plain forward.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch

from fedsec.devices import agrees

# The position-wise modules of a decoder layer that follow its attention, by attribute path
# (Llama, Mistral, Qwen, Phi-3, Gemma-2 and OLMo-2 all name them so)
POSITIONWISE = ("self_attn.o_proj", "mlp")


class _NotPositionwise(Exception):
    """A module called or answering otherwise than one tensor in, one tensor out per position."""


def _module(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    for name in path.split("."):
        root = getattr(root, name, None)
        if not isinstance(root, torch.nn.Module):
            return None
    return root


@contextlib.contextmanager
def read_positions_only(decoder, read: torch.Tensor) -> Iterator[None]:
    """Inside the block, the decoder's last layer runs its attention output projection and its
    MLP only at the positions `read` marks ([rows, positions], bool); elsewhere their output is
    zero. The last hidden state is then the plain forward's at the read positions (up to float
    rounding: the products have other shapes) and meaningless at the others."""
    rows, length = read.shape
    counts = read.sum(1)
    width = int(counts.max()) if rows else 0
    # each row's read positions in order, then `length` (a sink column, dropped) for padding
    order = torch.argsort((~read).to(torch.uint8), dim=1, stable=True)[:, :width]
    sink = torch.arange(width, device=read.device) >= counts[:, None]
    target = order.masked_fill(sink, length)
    source = order  # padding reads some position; what it computes goes to the sink
    layer = decoder.layers[-1]
    handles, picked = [], set()

    def pick(module, args):
        if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[:2] != (rows, length):
            raise _NotPositionwise(type(module).__name__)
        x = args[0]
        picked.add(id(module))
        return (x.gather(1, source[..., None].expand(-1, -1, x.shape[-1])), *args[1:])

    def place(module, _args, out):
        if id(module) not in picked:
            return out
        picked.discard(id(module))
        if not isinstance(out, torch.Tensor) or out.shape[:2] != (rows, width):
            raise _NotPositionwise(type(module).__name__)
        full = out.new_zeros(rows, length + 1, *out.shape[2:])
        index = target.view(rows, width, *[1] * (out.dim() - 2)).expand(-1, -1, *out.shape[2:])
        return full.scatter(1, index, out)[:, :length]

    try:
        for path in POSITIONWISE:
            module = _module(layer, path)
            if module is not None:
                handles += [module.register_forward_pre_hook(pick), module.register_forward_hook(place)]
        yield
    finally:
        for handle in handles:
            handle.remove()


# Whether `read_positions_only` gives the plain forward's read states on a model: checked once
# per model (`trimmed`), on its first batch
_EXACT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trimmed(model, decoder, read: torch.Tensor, forward: Callable[[], torch.Tensor]
            ) -> contextlib.AbstractContextManager:
    """`read_positions_only(decoder, read)` where it is exact on `model`, else a block that
    changes nothing. The first call on a model runs `forward` (the decoder's last hidden state,
    [rows, positions, hidden]) both ways, in eval mode, without gradients and on a copy of the
    random state (a resumed run draws what the uninterrupted one drew), and compares the read
    states (`devices.agrees`). Skipped where nothing
    would be saved (every position read, or none) and under gradient checkpointing, whose backward
    recomputes the layer without the block."""
    if bool(read.all()) or not bool(read.any()) or _EXACT.get(model) is False:
        return contextlib.nullcontext()
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):  # GPT-2's `h`: not handled
        _EXACT[model] = False
        return contextlib.nullcontext()
    if any(getattr(m, "gradient_checkpointing", False) for m in (decoder, decoder.layers[-1])):
        return contextlib.nullcontext()
    if model not in _EXACT:
        training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                plain = forward()[read].float()
                try:
                    with read_positions_only(decoder, read):
                        cut = forward()[read].float()
                    _EXACT[model] = agrees(cut, plain, model)
                except _NotPositionwise:
                    _EXACT[model] = False
        finally:
            model.train(training)
        if not _EXACT[model]:
            return contextlib.nullcontext()
    return read_positions_only(decoder, read)
