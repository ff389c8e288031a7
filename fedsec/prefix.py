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
import itertools
import shutil
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedsec import progress
from fedsec.devices import ROWS_DEPEND, agrees, autocast, model_device, rows_independent, to_device
from fedsec.encoding import (
    DATA,
    Encoded,
    additive_mask,
    attention_weight,
    collate,
    collate_packed_rows,
    pack_rows,
    shared_prefix_length,
    split_rows,
)
from fedsec.errors import ConfigError
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


# Where frozen-prefix states live (`plan_cache`): a device's memory, or a folder on disk whose
# memory-mapped files the OS pages in as batches read them (`MappedStates`).
Home = torch.device | Path


class MappedStates:
    """Frozen-prefix states in one memory-mapped file: item i's state is rows
    offsets[i]:offsets[i + 1] of a [positions, width] tensor backed by `path`, so a federation
    whose states exceed the host's memory keeps them on disk and reads what a batch needs."""

    def __init__(self, path: Path, lengths: Sequence[int], width: int, dtype: torch.dtype):
        self.offsets = [0, *itertools.accumulate(lengths)]
        total = self.offsets[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.flat = torch.from_file(str(path), shared=True, size=total * width, dtype=dtype).view(total, width)

    def __call__(self, i: int, state: torch.Tensor) -> torch.Tensor:
        """Write item i's state into the file; its rows there (a view) stand for it."""
        if state.dtype != self.flat.dtype:
            raise RuntimeError(f"a {state.dtype} state for a {self.flat.dtype} file")
        rows = self.flat[self.offsets[i]: self.offsets[i + 1]]
        rows.copy_(state)
        return rows

    def views(self) -> list[torch.Tensor]:
        return [self.flat[a:b] for a, b in itertools.pairwise(self.offsets)]


def _batches(items: Sequence[Encoded], batch_size: int, groups: Sequence[int] | None) -> Iterator[list[int]]:
    """Item indices in batches of at most `batch_size`, within each group, by length
    (batches of similar length waste little on padding)."""
    bounds = [0, *itertools.accumulate(groups if groups is not None else [len(items)])]
    if bounds[-1] != len(items) or any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"groups {list(groups or ())} do not partition {len(items)} items")
    for a, b in itertools.pairwise(bounds):
        order = sorted(range(a, b), key=lambda i: items[i].input_ids.numel())
        for start in range(0, len(order), batch_size):
            yield order[start: start + batch_size]


# Items per packed row when the prefix is computed packed, at most (fewer where
# encoding.pack_rows finds it cheaper): the row's attention is dense over its length, so rows
# of many items would spend on masked-out pairs what packing saves
PACK_ROW = 8


@contextlib.contextmanager
def _stopping_at(decoder, first: int) -> Iterator[None]:
    """Inside the block, every forward of `decoder` (in any thread) stops at the input of layer
    `first`, raising `_Captured` with it: one hook for a whole `prefix_states` call, whose
    forwards may run on several threads at once (`_in_order`)."""
    def capture(_module, args, kwargs):
        raise _Captured(args[0] if args else kwargs["hidden_states"])

    handle = decoder.layers[first].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _forward_to(decoder, batch: dict[str, torch.Tensor], model) -> torch.Tensor:
    """The hidden state entering the layer `_stopping_at` names for a collated batch ([rows,
    width, hidden]): the decoder run until that layer's input, then stopped."""
    extra, mask = {}, batch["attention_mask"]
    if mask.dim() == 4:  # packed rows (encoding.collate_packed_rows): their own mask and positions
        mask = additive_mask(mask, decoder.embed_tokens.weight.dtype)
        extra["position_ids"] = batch["position_ids"]
    try:
        with torch.no_grad(), autocast(model):  # grad and autocast modes are per thread
            decoder(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False, **extra)
    except _Captured as hit:
        return hit.hidden
    raise RuntimeError("the decoder never reached the first adapted layer")


def _chunk_states(decoder, model, chunk: list[Encoded], pad_id: int, shared: int) -> list[torch.Tensor]:
    """Each item's state entering the layer `_stopping_at` names ([T_i, hidden] each). With `shared` > 0 (their
    shared opening, encoding.shared_prefix_length), the items go through in rows of PACK_ROW,
    or fewer where that is cheaper (encoding.pack_rows: long items), behind it (computed once
    per row, then copied to each item's state), the plain batch's numbers up to float
    rounding; 0: a plain batch."""
    if shared < 1:
        hidden = _forward_to(decoder, to_device(collate(chunk, pad_id), model_device(model)), model)
        return [hidden[row, : item.input_ids.numel()] for row, item in enumerate(chunk)]
    return _rows_states(decoder, model, [(row, shared) for row in _row_plan(model, chunk, shared)], pad_id)


def _row_plan(model, chunk: Sequence[Encoded], shared: int) -> list[list[Encoded]]:
    """The packed rows `_chunk_states` runs `chunk` in: PACK_ROW items at most, fewer where
    encoding.pack_rows finds that cheaper."""
    weight = attention_weight(model.config)
    return [row for k in range(0, len(chunk), PACK_ROW)
            for row in split_rows(chunk[k: k + PACK_ROW], pack_rows(
                [item.input_ids.numel() for item in chunk[k: k + PACK_ROW]], shared, weight))]


def _rows_states(decoder, model, rows: list[tuple[list[Encoded], int]], pad_id: int) -> list[torch.Tensor]:
    """Each item's state from one forward of packed rows, a row per (items, shared opening)."""
    batch = to_device(collate_packed_rows(rows, pad_id), model_device(model))
    hidden = _forward_to(decoder, batch, model)
    out, owner = [], batch["owner"]
    for r, (row, shared) in enumerate(rows):
        for _ in row:
            out.append(torch.cat([hidden[r, :shared], hidden[r, owner[r] == len(out)]]))
    return out


# Single-row chunks of one width (a client's few examples each) that go through the frozen
# layers together, at most: one forward of a few rows runs its products nearer the CPU's peak
# than a forward per row (1.11-1.16x on the DP sweep's clients of 4, benchmarks/RESULTS.md)
JOIN_ROWS = 4

# Whether rows joined in one forward give each row's states bit for bit as its own forward does
# (`_joined_states`), by model, first layer and number of rows (a product's kernel may depend on
# how many rows it carries): checked once per process on the first such forward
_JOINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _joined_states(decoder, model, first: int, chunks: list[list[Encoded]], pad_id: int) -> list[torch.Tensor]:
    """The states of single-row chunks of one width (`_join`: no padding), in one forward, where
    the first joined forward of as many rows showed that gives every row's own forward's bits; else
    a forward per chunk. Bit for bit, not up to rounding: a group's states must not depend on which
    others share its call, so that a Flower SuperNode and the in-process setup start from the same
    states."""
    def alone() -> list[torch.Tensor]:
        return [s for c in chunks for s in _packed_states(decoder, model, first, c, pad_id, shared_prefix_length(c))]

    known, key = _JOINS.setdefault(model, {}), (first, len(chunks))
    if known.get(key) is False or _PACKS.get(model, {}).get(first) is False:
        return alone()
    joined = _rows_states(decoder, model, [(c, shared_prefix_length(c)) for c in chunks], pad_id)
    if key not in known:
        own = alone()
        known[key] = all(torch.equal(a, b) for a, b in zip(joined, own, strict=True))
        if not known[key]:
            return own
    return joined


def _join(model, items: Sequence[Encoded], batches: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """`batches` as units of work: on the CPU (one thread a forward, `_side_by_side`), a unit of up
    to JOIN_ROWS batches that each pack into one row of the same width (`_joined_states`), or a
    batch alone."""
    if model_device(model).type != "cpu":
        return [[chunk] for chunk in batches]
    units, open_rows = [], {}
    for chunk in batches:
        members = [items[i] for i in chunk]
        shared = shared_prefix_length(members)
        if shared < 1 or len(_row_plan(model, members, shared)) != 1:
            units.append([chunk])
            continue
        width = shared + sum(item.input_ids.numel() - shared for item in members)
        unit = open_rows.setdefault(width, [])
        if unit and (len(unit) == JOIN_ROWS or sum(map(len, unit)) + len(chunk) > batch_size):
            units.append(unit)
            unit = open_rows[width] = []
        unit.append(chunk)
    return units + [unit for unit in open_rows.values() if unit]


# Whether packing the prefix gives the plain batch's states on a model, by first layer: checked
# once per process on the first packed batch (an architecture that ignored custom masks or
# position ids would not), as training and evaluation check theirs (evaluation.packable_prefix)
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packed_states(decoder, model, first: int, chunk: list[Encoded], pad_id: int, shared: int) -> list[torch.Tensor]:
    """The chunk's states packed behind its `shared` opening, or plain on a model where
    packing was seen to change them (`_PACKS`; the first packed chunk decides, and the
    check's plain states stand in then)."""
    known = _PACKS.setdefault(model, {})
    if known.get(first) is False:
        return _chunk_states(decoder, model, chunk, pad_id, 0)
    packed = _chunk_states(decoder, model, chunk, pad_id, shared)
    if first not in known:
        plain = _chunk_states(decoder, model, chunk, pad_id, 0)
        known[first] = all(agrees(a, b, model) for a, b in zip(packed, plain))
        if not known[first]:
            return plain
    return packed


# Whether the adapted layers run from cached states reproduce the model's own forward, by model
# and first layer: checked once on the first item a run attaches states to (`_check_reproduces`)
_EXACT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_architecture(model) -> None:
    """The frozen-prefix cache cuts the decoder's `layers` and feeds states as `inputs_embeds`
    (Llama, Mistral, Qwen2 and their kin) and computes several examples per forward; a model
    built otherwise (GPT-2's `h` and position table), or one whose rows depend on each other
    (devices.rows_independent), is refused in one line."""
    decoder = _decoder(model)
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList) or not hasattr(decoder, "embed_tokens"):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        raise ConfigError("lora.cache_frozen_layers", True,
                          f"needs a decoder with a `layers` list and `embed_tokens` (Llama, Mistral, Qwen2 and their "
                          f"kin); {type(base).__name__} is built otherwise: set it to false")
    if not rows_independent(model):  # a state would depend on the examples (other clients') beside it
        raise ConfigError("lora.cache_frozen_layers", True,
                          f"{ROWS_DEPEND}, so a cached state would depend on the examples computed beside it; "
                          "set it to false, or use model.quantization: 4bit")


@torch.no_grad()
def _check_reproduces(decoder, model, first: int, item: Encoded, pad_id: int, state: torch.Tensor) -> None:
    """Once per model and first layer: the top layers run from `state` (the item's cached
    input of layer `first`) give the full forward's last hidden state, else a ConfigError.
    A model whose forward transforms what it is given as input embeddings (a scale, a
    position table) would otherwise train and evaluate on wrong numbers without a word."""
    known = _EXACT.setdefault(model, {})
    if known.get(first):
        return
    batch = to_device(collate([item], pad_id), model_device(model))
    with autocast(model):
        full = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).last_hidden_state[0]
        with top_layers_only(model, first):
            top = decoder(inputs_embeds=state[None].to(full.device), attention_mask=batch["attention_mask"],
                          use_cache=False).last_hidden_state[0]
    if not agrees(top, full, model):
        raise ConfigError("lora.cache_frozen_layers", True,
                          f"the adapted layers run from cached states do not reproduce this model's forward "
                          f"({type(decoder).__name__} changes what it is given as input embeddings): set it to false")
    known[first] = True


@torch.no_grad()
def prefix_states(model, items: Sequence[Encoded], first: int, pad_id: int,
                  batch_size: int = 32, home: torch.device = DATA,
                  sink: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                  groups: Sequence[int] | None = None, pack: bool = False) -> list[torch.Tensor]:
    """The hidden state entering layer `first` for each item, [T_i, hidden] each, kept on
    `home` (host memory by default; see `plan_cache`), or where `sink(i, state)` puts it.

    `groups`: the sizes of consecutive runs of items (e.g. one per client) that batches
    never cross. A group's states are then bit for bit what a call on that group alone
    gives (float products batched differently differ in the last bits): the in-process
    setup, which computes all clients in one call, and a Flower SuperNode, which computes
    its own clients, start from the same states. Packed, groups whose batch is one row of
    the same width share a forward (`_join`), where the first such forward showed that gives
    each row's own bits (`_joined_states`).

    `pack` (training.pack): each batch runs in packed rows behind its items' shared opening
    (the chat template, an instruction), which then goes through the frozen layers once per
    row instead of once per item, where a first batch shows that gives the plain states up
    to float rounding on this model."""
    decoder = _decoder(model)
    pin = home.type == "cpu" and model_device(model).type == "cuda"
    if sink is None:
        def sink(_i, state):
            return _placed(state, home, pin)

    def states(unit: list[list[int]]) -> list[torch.Tensor]:
        if len(unit) > 1:
            return _joined_states(decoder, model, first, [[items[i] for i in chunk] for chunk in unit], pad_id)
        members = [items[i] for i in unit[0]]
        shared = shared_prefix_length(members) if pack else 0
        return (_packed_states(decoder, model, first, members, pad_id, shared) if shared > 0
                else _chunk_states(decoder, model, members, pad_id, 0))

    out: list[torch.Tensor | None] = [None] * len(items)
    batches = list(_batches(items, batch_size, groups))
    units = _join(model, items, batches, batch_size) if pack and groups is not None else [[b] for b in batches]
    shown = progress.bar(len(items), "frozen prefix", "example")
    try:
        with _stopping_at(decoder, first), _side_by_side(model) as workers:
            for unit, computed in zip(units, _in_order(states, units, workers)):
                chunk = [i for batch in unit for i in batch]
                for i, state in zip(chunk, computed, strict=True):
                    out[i] = sink(i, state)
                shown.update(len(chunk))
    finally:
        shown.close()
    return out


def _threads_per_forward(model) -> int:
    """The intra-op threads each frozen-prefix forward runs on: one on the CPU (`_side_by_side`),
    the process's setting elsewhere. Part of a state's memo key: float sums split over threads
    differ in the last bits."""
    return 1 if model_device(model).type == "cpu" else torch.get_num_threads()


@contextlib.contextmanager
def _side_by_side(model) -> Iterator[int]:
    """On the CPU, every forward of the block on one torch thread, and as many forwards at once
    as torch had threads (the number yielded): a batch's states are then the same bits whichever
    thread computes them and however many the process has, so a SuperNode given one core and an
    in-process run given all of them start from the same states. A forward of one client's few
    rows runs its products far from the CPU's peak; side by side, one per core, they come closer
    (1.2x on 2 cores for the DP sweep's clients of 4). Elsewhere one forward at a time (1)."""
    if model_device(model).type != "cpu":
        yield 1
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def _in_order(fn: Callable, work: Sequence, workers: int) -> Iterator:
    """fn over `work`, in order: the first in this thread (a one-time check that it runs, as
    `_packed_states`' does, runs once), the rest on `workers` threads, at most two each ahead of
    what has been taken; an error cancels what has not started."""
    if not work:
        return
    yield fn(work[0])
    if workers < 2:
        yield from map(fn, work[1:])
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for unit in work[1:]:
                pending.append(pool.submit(fn, unit))
                if len(pending) > 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


@dataclass
class _Entry:
    """A memo entry: a call's states, and where each of its groups' states lie in them (by
    the key of a call on that group alone, `_group_spans`)."""

    states: list[torch.Tensor]
    groups: dict[str, tuple[int, int]]


# States computed in this process, by (model, layer, token ids): the runs of a sweep share
# their base model and often their data (an epsilon sweep differs only in the noise), so
# the frozen prefix is computed once per sweep, not once per run; a run whose clients
# differ in a few (an attack's, the server's own set) computes only those (`_reuse_groups`).
# Bounded: oldest out.
_MEMO: dict[str, _Entry] = {}
_MEMO_ENTRIES = 8
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def frozen_fingerprint(model, first: int) -> str:
    """A digest of the weights below layer `first` (the embeddings and layers[:first]):
    what the frozen prefix is a function of, whatever the model's name says."""
    if model in _FINGERPRINTS and first in _FINGERPRINTS[model]:
        return _FINGERPRINTS[model][first]
    decoder = _decoder(model)
    modules = [("embed", decoder.embed_tokens), *((f"layer{k}", decoder.layers[k]) for k in range(first))]
    _FINGERPRINTS.setdefault(model, {})[first] = tensors_digest(
        (f"{name}.{pname}", param) for name, module in modules for pname, param in module.state_dict().items())
    return _FINGERPRINTS[model][first]


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over named tensors: each name, dtype and shape, then its bytes (read in place)."""
    digest = hashlib.sha256()
    for name, tensor in named:
        flat = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{flat.dtype}|{tuple(flat.shape)}".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b"")
    return digest.hexdigest()


def _memo_key(model_key: str, first: int, items: Sequence[Encoded], batch_size: int, threads: int,
              groups: Sequence[int] | None = None, pack: bool = False) -> str:
    # the batches (size, groups, packing) and each forward's threads (`_threads_per_forward`) shape the
    # kernels' float sums: states computed under others could differ in the last bits, so they
    # are another entry
    # unpacked keys stay what they were; packed rows of at most PACK_ROW items, split as pack_rows says
    packed = f"|packed{PACK_ROW}|planned" if pack else ""
    digest = hashlib.sha256(f"{model_key}|{first}|{len(items)}|{batch_size}|{torch.__version__}|"
                            f"{threads}|{list(groups) if groups is not None else ''}{packed}".encode())
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


@dataclass(frozen=True)
class FrozenPrefix:
    """How a run caches the frozen layers below its adapters (`fedsec.setup.frozen_prefix`):
    the first adapted layer, the memo key naming the frozen base (`cache_frozen_prefix`),
    whether states are computed packed behind the items' shared opening (training.pack),
    and where they live (`plan_cache`)."""

    first: int
    model_key: str
    pack: bool = False
    home: Home = DATA

    def attach(self, model, items: Sequence[Encoded], pad_id: int, batch_size: int,
               groups: Sequence[int] | None = None) -> list[Encoded]:
        """`items` with their frozen-prefix states (`cache_frozen_prefix`), the first checked
        against the model's own forward once per model (`_check_reproduces`), wherever the
        states came from (computed, the memo, the disk cache)."""
        out = cache_frozen_prefix(model, list(items), self.first, pad_id, batch_size, self.model_key, self.home,
                                  groups=groups, pack=self.pack)
        if out:
            _check_reproduces(_decoder(model), model, self.first, out[0], pad_id, out[0].hidden)
        return out


def cache_frozen_prefix(model, items: Sequence[Encoded], first: int, pad_id: int,
                        batch_size: int = 32, model_key: str | None = None,
                        home: Home = DATA, groups: Sequence[int] | None = None,
                        pack: bool = False) -> list[Encoded]:
    """The items with their frozen-prefix states attached (see module docstring), computed
    in batches that never cross `groups`, packed behind their shared opening with `pack`
    (see `prefix_states`).

    `model_key` names the frozen base model (name, dtype, quantization); given, states
    are reused from earlier calls with the same frozen weights (their digest), items
    (token ids: data and template), layer and batch size: from this process's memo, else
    from the on-disk cache (prefix_cache_dir), where new states are stored. With `groups`,
    a call that misses both still takes each group an earlier call of this process holds
    from the memo and computes only the others (`_reuse_groups`). `home`: where the states
    are kept (`plan_cache`); a folder: memory-mapped there (`_mapped`).
    """
    mapped = isinstance(home, Path)
    if model_key is None and not mapped:
        states = prefix_states(model, items, first, pad_id, batch_size, home, groups=groups, pack=pack)
        return [replace(item, hidden=h, hidden_layer=first) for item, h in zip(items, states)]
    key = _memo_key(f"{model_key or 'unnamed'}|{frozen_fingerprint(model, first)}", first, items, batch_size,
                    _threads_per_forward(model), groups, pack)
    if mapped:
        return _mapped(model, items, first, pad_id, batch_size, home / key[:40], groups, pack)
    pin = home.type == "cpu" and model_device(model).type == "cuda"
    entry = _MEMO.get(key)
    states = entry.states if entry is not None else None
    spans = _group_spans(model_key, model, first, items, batch_size, groups, pack) if entry is None else []
    path = prefix_cache_dir() / f"{key[:40]}.pt"
    if states is None and path.is_file():
        states = _load(path, len(items))
        if states is not None:
            states = [_placed(h, home, pin, copy=False) for h in states]
            progress.note(f"fedsec: frozen prefix of {len(items)} examples read from {path} "
                          f"({_size(path.stat().st_size)})")
    if states is None:
        states = _reuse_groups(model, items, first, pad_id, batch_size, home, spans, pack)
        buffer = io.BytesIO()
        torch.save([h.to(DATA) for h in states], buffer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
            progress.note(f"fedsec: frozen prefix of {len(items)} examples cached in {path} "
                          f"({_size(buffer.tell())}; delete {path.parent} to free it)")
        except OSError as err:  # a full or read-only disk costs the reuse, not the run
            progress.note(f"fedsec: frozen prefix not cached on disk ({err})")
    states = [_placed(h, home, pin, copy=False) for h in states]  # a memo entry another run kept elsewhere
    # a memo hit keeps its groups; a repeated group is found at its first span
    _MEMO[key] = _Entry(states, entry.groups if entry is not None else {k: (a, b) for k, a, b in reversed(spans)})
    while len(_MEMO) > _MEMO_ENTRIES:
        _MEMO.pop(next(iter(_MEMO)))
    return [replace(item, hidden=h, hidden_layer=first) for item, h in zip(items, states)]


def _group_spans(model_key: str | None, model, first: int, items: Sequence[Encoded], batch_size: int,
                 groups: Sequence[int] | None, pack: bool) -> list[tuple[str, int, int]]:
    """Each group's span of `items` with the memo key a call on that group alone would have
    (none without `groups`: batches that cross the items make no group's states its own)."""
    if groups is None:
        return []
    base, threads = f"{model_key or 'unnamed'}|{frozen_fingerprint(model, first)}", _threads_per_forward(model)
    return [(_memo_key(base, first, items[a:b], batch_size, threads, [b - a], pack), a, b)
            for a, b in itertools.pairwise([0, *itertools.accumulate(groups)])]


def _reuse_groups(model, items: Sequence[Encoded], first: int, pad_id: int, batch_size: int, home: Home,
                  spans: list[tuple[str, int, int]], pack: bool) -> list[torch.Tensor]:
    """The items' states: a group a memo entry holds is taken from it (bit for bit what
    computing it gives, `prefix_states`), the other groups are computed
    in one call, each distinct group once. Without groups (`spans` empty) all are computed."""
    if not spans:
        return prefix_states(model, items, first, pad_id, batch_size, home, pack=pack)
    found = {k: entry.states[a:b] for entry in _MEMO.values() for k, (a, b) in entry.groups.items()}
    todo = {}
    for k, a, b in spans:
        if k not in found and k not in todo:
            todo[k] = (a, b)
    if todo:
        computed = prefix_states(model, [items[i] for a, b in todo.values() for i in range(a, b)], first, pad_id,
                                 batch_size, home, groups=[b - a for a, b in todo.values()], pack=pack)
        at = 0
        for k, (a, b) in todo.items():
            found[k], at = computed[at: at + b - a], at + b - a
    return [state for k, _, _ in spans for state in found[k]]


def _mapped(model, items: Sequence[Encoded], first: int, pad_id: int, batch_size: int,
            stem: Path, groups: Sequence[int] | None = None, pack: bool = False) -> list[Encoded]:
    """The items with their states in the memory-mapped file `stem`.bin (named by the disk
    cache's key); a complete file (its marker `stem`.done names its shape) is reused, not
    recomputed."""
    path, marker = stem.with_suffix(".bin"), stem.with_suffix(".done")
    embed = _decoder(model).embed_tokens
    lengths = [int(item.input_ids.numel()) for item in items]
    shape = f"{sum(lengths)} {embed.embedding_dim} {embed.weight.dtype}"
    complete = marker.is_file() and marker.read_text() == shape
    if not complete:
        marker.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    mapped = MappedStates(path, lengths, embed.embedding_dim, embed.weight.dtype)
    if complete:
        progress.note(f"fedsec: frozen prefix of {len(items)} examples mapped from {path}")
    else:
        prefix_states(model, items, first, pad_id, batch_size, sink=mapped, groups=groups, pack=pack)
        marker.write_text(shape)
    return [replace(item, hidden=h, hidden_layer=first) for item, h in zip(items, mapped.views())]


def _placed(state: torch.Tensor, home: torch.device, pin: bool, copy: bool = True) -> torch.Tensor:
    """`state` on `home` (a tensor of its own with `copy`, not a view into a batch), in pinned
    host memory with `pin` (a CUDA model: page-locked memory copies to it asynchronously)."""
    if state.device == home and (not pin or state.is_pinned()):
        return state.clone() if copy else state
    moved = state.to(home)
    return moved.pin_memory() if pin else moved


# Shares of free memory the frozen-prefix states may take: on the GPU they compete with the
# model, its activations and the per-example gradients; in host memory with everything else.
GPU_SHARE, HOST_SHARE = 0.25, 0.8


def plan_cache(model, first: int, tokens: int, private: bool = False, log=progress.note) -> Home:
    """Where `tokens` positions of frozen-prefix states live, from their size: in GPU memory
    while they take at most GPU_SHARE of its free bytes, else in (pinned) host memory while
    they fit HOST_SHARE of what the machine has available, else memory-mapped on disk
    (prefix_cache_dir()/mapped) while they fit HOST_SHARE of its free space; larger is a
    ConfigError. The size and the choice are printed (under DP, `private`, only the choice:
    the size follows the clients' data)."""
    decoder = _decoder(model)
    width = decoder.embed_tokens.embedding_dim
    per_position = width * decoder.embed_tokens.weight.element_size()
    size = tokens * per_position
    on, host = model_device(model), _host_available()
    where, home = "host memory", DATA
    if on.type == "cuda":
        free, _ = torch.cuda.mem_get_info(on)
        if size <= GPU_SHARE * free:
            where, home = f"{on} memory", on
        else:
            where = f"pinned host memory (above {GPU_SHARE:.0%} of the {_size(free)} free on {on})"
    if home == DATA and host is not None and size > HOST_SHARE * host:
        folder = prefix_cache_dir() / "mapped"
        disk = _disk_free(folder)
        if size > HOST_SHARE * disk:
            raise ConfigError("lora.cache_frozen_layers", True, f"the frozen-prefix states need {_size(size)} "
                              f"({tokens:,} positions x {width} x {per_position // width} bytes), more than "
                              f"{HOST_SHARE:.0%} of the {_size(host)} of memory available and of the "
                              f"{_size(disk)} free under {folder.parent}; set it to false, lower data.max_length "
                              "or the number of examples, or point FEDSEC_CACHE at a larger disk")
        where, home = (f"{folder} on disk, memory-mapped (above {HOST_SHARE:.0%} of the {_size(host)} of "
                       "memory available)"), folder
    if private:
        log(f"fedsec: frozen prefix kept in {where} (its size follows the clients' data: not printed under DP)")
    else:
        log(f"fedsec: frozen prefix: {tokens:,} positions, {_size(size)}, kept in {where}")
    return home


def _disk_free(folder: Path) -> int:
    """Free bytes on the file system that holds (or would hold) `folder`."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _host_available() -> int | None:
    """MemAvailable of this machine in bytes (Linux), else None (no check)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _size(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
