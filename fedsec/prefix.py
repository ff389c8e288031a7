"""Frozen-prefix caching: compute the layers below the adapters once per example.

With adapters on the top k layers only (lora.top_layers), the hidden state entering
the lowest adapted layer does not depend on the adapter: it is a fixed function of
the example. `cache_frozen_prefix` runs the frozen bottom of the model once per
example at setup and stores that state on the example; from then on every
training step and evaluation runs only the top k layers, the final norm and the
LM head (at target positions). The result is the same computation as the full
model (a test checks the loss), at a fraction of the cost: what makes hundreds of
clients per round affordable in a DP sweep.

The top pass reuses the model's own forward (its mask and rotary embeddings) by
feeding the cached states as `inputs_embeds` to the decoder with its layer list
temporarily cut to the adapted layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from fedsec import progress
from fedsec.encoding import Encoded, collate
from fedsec.rundir import atomic_write_bytes


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _decoder(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.get_decoder()


@contextlib.contextmanager
def top_layers_only(model, first: int) -> Iterator[None]:
    """Inside the block, the decoder's layer list is layers[first:]."""
    decoder = _decoder(model)
    full = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(full)[first:])
    try:
        yield
    finally:
        decoder.layers = full


@torch.no_grad()
def prefix_states(model, items: Sequence[Encoded], first: int, pad_id: int,
                  batch_size: int = 32) -> list[torch.Tensor]:
    """The hidden state entering layer `first` for each item, [T_i, hidden] each."""
    decoder = _decoder(model)

    def capture(_module, args, kwargs):
        raise _Captured(args[0] if args else kwargs["hidden_states"])

    handle = decoder.layers[first].register_forward_pre_hook(capture, with_kwargs=True)
    # batches of similar length waste little on padding; results go back in item order
    order = sorted(range(len(items)), key=lambda i: items[i].input_ids.numel())
    out: list[torch.Tensor | None] = [None] * len(items)
    shown = progress.bar(len(items), "frozen prefix", "example")
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            batch = collate([items[i] for i in chunk], pad_id)
            try:
                decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False)
                raise RuntimeError("the decoder never reached the first adapted layer")
            except _Captured as hit:
                for row, i in enumerate(chunk):
                    out[i] = hit.hidden[row, : items[i].input_ids.numel()].clone()
            shown.update(len(chunk))
    finally:
        handle.remove()
        shown.close()
    return out


# States computed in this process, by (model, layer, token ids): the runs of a sweep share
# their base model and often their data (an epsilon sweep differs only in the noise), so
# the frozen prefix is computed once per sweep, not once per run. Bounded: oldest out.
_MEMO: dict[str, list[torch.Tensor]] = {}
_MEMO_ENTRIES = 8
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def frozen_fingerprint(model, first: int) -> str:
    """A digest of the weights below layer `first` (the embeddings and layers[:first]):
    what the frozen prefix is a function of, whatever the model's name says."""
    if model in _FINGERPRINTS and first in _FINGERPRINTS[model]:
        return _FINGERPRINTS[model][first]
    decoder = _decoder(model)
    digest = hashlib.sha256()
    modules = [("embed", decoder.embed_tokens), *((f"layer{k}", decoder.layers[k]) for k in range(first))]
    for name, module in modules:
        for pname, param in module.state_dict().items():
            tensor = param.detach().cpu().contiguous()
            digest.update(f"{name}.{pname}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    _FINGERPRINTS.setdefault(model, {})[first] = digest.hexdigest()
    return _FINGERPRINTS[model][first]


def _memo_key(model_key: str, first: int, items: Sequence[Encoded], batch_size: int) -> str:
    # the batch size and the threads shape the kernels' float sums: states computed under
    # others could differ in the last bits, so they are another entry
    digest = hashlib.sha256(f"{model_key}|{first}|{len(items)}|{batch_size}|{torch.__version__}|"
                            f"{torch.get_num_threads()}".encode())
    for item in items:
        digest.update(item.input_ids.numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def prefix_cache_dir() -> Path:
    """Where frozen-prefix states are kept between runs: $FEDSEC_CACHE/prefix."""
    from fedsec.models import cache_dir

    return cache_dir() / "prefix"


def _load(path: Path, count: int) -> list[torch.Tensor] | None:
    try:
        states = torch.load(path, weights_only=True)
    except Exception as err:  # a damaged entry is computed again and replaced
        progress.note(f"fedsec: frozen-prefix cache {path} is unreadable ({type(err).__name__}); computing it again")
        return None
    return states if isinstance(states, list) and len(states) == count else None


def cache_frozen_prefix(model, items: Sequence[Encoded], first: int, pad_id: int,
                        batch_size: int = 32, model_key: str | None = None) -> list[Encoded]:
    """The items with their frozen-prefix states attached (see module docstring).

    `model_key` names the frozen base model (name, dtype, quantization); given, states
    are reused from earlier calls with the same frozen weights (their digest), items
    (token ids: data and template), layer and batch size: from this process's memo, else
    from the on-disk cache (prefix_cache_dir), where new states are stored.
    """
    if model_key is None:
        states = prefix_states(model, items, first, pad_id, batch_size)
        return [replace(item, hidden=h, hidden_layer=first) for item, h in zip(items, states)]
    key = _memo_key(f"{model_key}|{frozen_fingerprint(model, first)}", first, items, batch_size)
    states = _MEMO.get(key)
    path = prefix_cache_dir() / f"{key[:40]}.pt"
    if states is None and path.is_file():
        states = _load(path, len(items))
        if states is not None:
            progress.note(f"fedsec: frozen prefix of {len(items)} examples read from {path} "
                          f"({_size(path.stat().st_size)})")
    if states is None:
        states = prefix_states(model, items, first, pad_id, batch_size)
        buffer = io.BytesIO()
        torch.save(states, buffer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
            progress.note(f"fedsec: frozen prefix of {len(items)} examples cached in {path} "
                          f"({_size(buffer.tell())}; delete {path.parent} to free it)")
        except OSError as err:  # a full or read-only disk costs the reuse, not the run
            progress.note(f"fedsec: frozen prefix not cached on disk ({err})")
    _MEMO[key] = states
    while len(_MEMO) > _MEMO_ENTRIES:
        _MEMO.pop(next(iter(_MEMO)))
    return [replace(item, hidden=h, hidden_layer=first) for item, h in zip(items, states)]


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
