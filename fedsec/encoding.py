"""Tokenization, done once per example at setup (never per round).

An example becomes input ids plus labels where every prompt token is masked with
-100, so the loss is completion-only. `chat` formats with the tokenizer's own chat
template; `alpaca` with the Alpaca prompt (OpenFedLLM's default for base models).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedsec.data.schema import Message, SftExample

IGNORE = -100
# Encoded examples live in host memory; a batch goes to the model's device when it is run.
DATA = torch.device("cpu")
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")


@dataclass(frozen=True)
class Encoded:
    """One tokenized example, stored as int32 (half of int64's memory; batches are int64)."""

    input_ids: torch.Tensor  # int32 [T]
    labels: torch.Tensor  # int32 [T], IGNORE on prompt tokens
    hidden: torch.Tensor | None = None  # [T, H]: cached input of layer `hidden_layer` (fedsec.prefix)
    hidden_layer: int = 0


def _render(tokenizer, messages: Sequence[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         tokenize=False, add_generation_prompt=generation_prompt)


def segments(example: SftExample, tokenizer, template: str) -> list[tuple[str, bool]]:
    """The example's text as (piece, is_target) segments, in order."""
    msgs = example.messages()
    if template == "alpaca":
        if sum(m.role == "assistant" for m in msgs) != 1 or msgs[-1].role != "assistant":
            raise ValueError("the alpaca template takes single-turn examples; use template: chat")
        system = "".join(m.content + "\n\n" for m in msgs if m.role == "system")
        prompt = next(m.content for m in msgs if m.role == "user")
        return [(system + ALPACA.format(prompt=prompt), False),
                (msgs[-1].content + tokenizer.eos_token, True)]
    out, done = [], ""
    for k, message in enumerate(msgs):
        if message.role != "assistant":
            continue
        before = _render(tokenizer, msgs[:k], True)
        upto = _render(tokenizer, msgs[: k + 1], False)
        if not before.startswith(done) or not upto.startswith(before):
            raise ValueError("the chat template is not prefix-consistent; use template: alpaca")
        out += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    return out


def encode(example: SftExample, tokenizer, template: str, max_length: int) -> Encoded | None:
    """Token ids and completion-only labels; None if truncation leaves no target."""
    ids: list[int] = []
    labels: list[int] = []
    for text, target in segments(example, tokenizer, template):
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if target else [IGNORE] * len(piece)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels[1:]):
        return None
    return Encoded(torch.tensor(ids, dtype=torch.int32, device=DATA),
                   torch.tensor(labels, dtype=torch.int32, device=DATA))


def encode_prompt(example: SftExample, tokenizer, template: str) -> list[int]:
    """Token ids of everything before the final response (the scoring context)."""
    pieces = segments(example, tokenizer, template)
    text = "".join(t for t, _ in pieces[:-1])
    return tokenizer(text, add_special_tokens=False).input_ids


def encoding_key(tokenizer, template: str, max_length: int) -> str:
    """What `encode` gives depends on: the tokenizer (its whole serialized state where it has
    one: vocabulary, merges, normalizer; and its chat template), the template and max_length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest = hashlib.sha256(state.encode())
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return f"encode-v1|{digest.hexdigest()[:24]}|{template}|{max_length}"


def encode_all(examples: Sequence[SftExample], tokenizer, template: str, max_length: int) -> list[Encoded]:
    out = [encode(e, tokenizer, template, max_length) for e in examples]
    return [e for e in out if e is not None]


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest member."""
    width, on = max(e.input_ids.numel() for e in batch), batch[0].input_ids.device
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=on)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long, device=on)
    mask = torch.zeros((len(batch), width), dtype=torch.long, device=on)
    for i, e in enumerate(batch):
        n = e.input_ids.numel()
        ids[i, :n], labels[i, :n], mask[i, :n] = e.input_ids, e.labels, 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if batch[0].hidden is not None:  # frozen-prefix states: the forward starts at hidden_layer
        layers = {e.hidden_layer for e in batch}
        if len(layers) != 1 or any(e.hidden is None for e in batch):
            raise ValueError("a batch mixes examples with and without the same cached prefix")
        hidden = torch.zeros(len(batch), width, batch[0].hidden.shape[-1], dtype=batch[0].hidden.dtype,
                             device=batch[0].hidden.device)
        for i, e in enumerate(batch):
            hidden[i, : e.hidden.shape[0]] = e.hidden
        out["inputs_embeds"], out["start_layer"] = hidden, layers.pop()
    return out


def shared_prefix_length(items: Sequence[Encoded]) -> int:
    """How many leading tokens all items share and none predicts a target from.

    The hidden state at position t predicts the label at t + 1; the prefix stops
    before any such position, so every target is predicted inside an item's own
    suffix. 0 for fewer than two items.
    """
    if len(items) < 2:
        return 0
    first = items[0].input_ids
    width = min(e.input_ids.numel() for e in items)
    same = torch.ones(width, dtype=torch.bool, device=first.device)
    for e in items[1:]:
        same &= e.input_ids[:width] == first[:width]
    common = min(int(same.cumprod(0).sum()), width - 1)  # every item keeps a token of its own
    first_target = min((int((e.labels != IGNORE).nonzero()[0, 0]) for e in items if (e.labels != IGNORE).any()),
                       default=width)
    return max(0, min(common, first_target - 1))


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: may attend) as the additive float mask a decoder
    takes with custom masks: 0 where allowed, the dtype's lowest value elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def collate_packed(batch: Sequence[Encoded], shared: int) -> dict[str, torch.Tensor]:
    """The items as one sequence: their shared first `shared` tokens once, then each
    item's own suffix, which attends to the shared tokens and causally to itself only
    (a [1, 1, L, L] boolean mask) at its own positions. Exactly the computation of the
    items run one by one, with the shared tokens computed once instead of per item
    (`shared` 0: the items side by side, each attending to itself only).

    `owner` gives each position's item; `labels` are laid out so that position k
    predicts labels[k + 1] within one item, as in `collate`.
    """
    suffixes = [e.input_ids.numel() - shared for e in batch]
    head = batch[0].input_ids[:shared]
    if shared < 0 or min(suffixes) < 1 or any(not torch.equal(e.input_ids[:shared], head) for e in batch):
        raise ValueError("collate_packed needs items that share their first `shared` tokens, and more")
    if any((e.labels[: shared + 1] != IGNORE).any() for e in batch):
        raise ValueError("a target inside the shared prefix (see shared_prefix_length)")
    total, on = shared + sum(suffixes), head.device
    ids = torch.empty(total, dtype=torch.long, device=on)
    labels = torch.full((total,), IGNORE, dtype=torch.long, device=on)
    owner = torch.full((total,), -1, dtype=torch.long, device=on)
    positions = torch.empty(total, dtype=torch.long, device=on)
    allowed = torch.zeros(total, total, dtype=torch.bool, device=on)
    ids[:shared], positions[:shared] = batch[0].input_ids[:shared], torch.arange(shared, device=on)
    allowed[:shared, :shared] = torch.ones(shared, shared, dtype=torch.bool, device=on).tril()
    hidden = None
    if batch[0].hidden is not None:
        if len({e.hidden_layer for e in batch}) != 1 or any(e.hidden is None for e in batch):
            raise ValueError("a batch mixes examples with and without the same cached prefix")
        hidden = torch.empty(total, batch[0].hidden.shape[-1], dtype=batch[0].hidden.dtype,
                             device=batch[0].hidden.device)
        hidden[:shared] = batch[0].hidden[:shared]
    at = shared
    for i, (e, n) in enumerate(zip(batch, suffixes)):
        end = at + n
        ids[at:end], owner[at:end] = e.input_ids[shared:], i
        labels[at + 1: end] = e.labels[shared + 1:]  # the suffix's first label is predicted from the prefix
        positions[at:end] = torch.arange(shared, shared + n, device=on)
        allowed[at:end, :shared] = True
        allowed[at:end, at:end] = torch.ones(n, n, dtype=torch.bool, device=on).tril()
        if hidden is not None:
            hidden[at:end] = e.hidden[shared:]
        at = end
    out = {"input_ids": ids[None], "labels": labels[None], "attention_mask": allowed[None, None],
           "position_ids": positions[None], "owner": owner[None]}
    if hidden is not None:
        out["inputs_embeds"], out["start_layer"] = hidden[None], batch[0].hidden_layer
    return out


def attention_weight(config) -> float:
    """What one (query, key) position pair costs a decoder layer's attention, in units of
    what one position costs its projections and MLP (forward FLOPs, a gated MLP as Llama's):
    4 q / (2 (2 h q + 2 h kv + 3 h i)), with h the hidden size, q and kv the query and
    key-value widths, i the MLP's. SmolLM2-135M: 3.3e-4; a 64-wide test model: 3.5e-3."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    query, kv = heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    per_position = 2 * (2 * hidden * query + 2 * hidden * kv + 3 * hidden * mlp)
    return 4 * query / per_position


def pack_rows(lengths: Sequence[int], shared: int, weight: float) -> list[int]:
    """How many consecutive items each packed row holds, for the cheapest forward: items of
    `lengths` tokens sharing their first `shared`, in k rows of as equal counts as can be,
    each row its shared opening once and then its items' suffixes, the rows padded to the
    widest. A row's attention is dense over its length (a custom mask computes every pair,
    masked or not), so k rows of width W cost about k W (1 + `weight` W) (attention_weight),
    W taken as the widest a row of ceil(n / k) of these items can be, so that the choice
    depends on the lengths, not their order. The k that minimises it wins, the fewest rows
    on a tie; k = n is the plain batch (a row per item): long items stay plain, where one
    packed row would spend on masked-out pairs far more than it saves on the opening."""
    n = len(lengths)
    suffixes = sorted((length - shared for length in lengths), reverse=True)
    best, best_cost = n, float("inf")
    for k in range(1, n + 1):
        width = shared + sum(suffixes[: -(-n // k)])
        cost = k * width * (1 + weight * width)
        if cost < best_cost:
            best, best_cost = k, cost
    return [n // best + (r < n % best) for r in range(best)]


def split_rows(items: Sequence, sizes: Sequence[int]) -> list[list]:
    """`items` cut into consecutive runs of `sizes` (pack_rows)."""
    out, at = [], 0
    for size in sizes:
        out.append(list(items[at: at + size]))
        at += size
    return out


def collate_packed_rows(groups: Sequence[tuple[Sequence[Encoded], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Several packed sequences as one batch, a row each: every (items, shared) group
    packed by `collate_packed`, the rows padded to the longest. A padding position attends
    to itself only and predicts nothing; `owner` numbers the items across the rows in
    order, so a row's items are rows' items of the plain batch of all of them."""
    packed = [collate_packed(items, shared) for items, shared in groups]
    width, on = max(p["input_ids"].shape[1] for p in packed), packed[0]["input_ids"].device
    n = len(packed)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=on)
    labels = torch.full((n, width), IGNORE, dtype=torch.long, device=on)
    owner = torch.full((n, width), -1, dtype=torch.long, device=on)
    positions = torch.zeros(n, width, dtype=torch.long, device=on)
    allowed = torch.eye(width, dtype=torch.bool, device=on).repeat(n, 1, 1, 1)
    hidden = None
    if "inputs_embeds" in packed[0]:
        if len({p.get("start_layer") for p in packed}) != 1:
            raise ValueError("a batch mixes examples with and without the same cached prefix")
        first = packed[0]["inputs_embeds"]
        hidden = torch.zeros(n, width, first.shape[-1], dtype=first.dtype, device=first.device)
    base = 0
    for r, (p, (items, _)) in enumerate(zip(packed, groups)):
        length = p["input_ids"].shape[1]
        ids[r, :length], labels[r, :length] = p["input_ids"][0], p["labels"][0]
        positions[r, :length] = p["position_ids"][0]
        owner[r, :length] = torch.where(p["owner"][0] >= 0, p["owner"][0] + base, -1)
        allowed[r, 0, :length, :length] = p["attention_mask"][0, 0]
        if hidden is not None:
            hidden[r, :length] = p["inputs_embeds"][0]
        base += len(items)
    out = {"input_ids": ids, "labels": labels, "attention_mask": allowed, "position_ids": positions, "owner": owner}
    if hidden is not None:
        out["inputs_embeds"], out["start_layer"] = hidden, packed[0]["start_layer"]
    return out
