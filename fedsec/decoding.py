"""Greedy decoding that computes the frozen layers' keys and values of a prompt once.

With adapters on the top layers only (lora.top_layers), what the layers below them compute
for a prompt (their keys and values, and the state entering the first adapted layer) does
not depend on the adapter. An evaluation that asks for the same prompts' greedy replies
every few rounds (the refusal probes) therefore runs the frozen layers' prefill once per
process (`_frozen`, kept by the frozen weights' digest, the layer and the batch's tokens, so
the runs of a sweep share it) and from then on only the adapted layers' prefill; each new
token then runs every layer, as `generate` does.

`greedy_tokens` makes the calls `generate` makes for greedy decoding (the position ids from
the attention mask, no mask when nothing is padded, the logits of the last position, a
finished row fed the pad token), so its tokens are `generate`'s (tests: token for token, on
padded batches, with and without a frozen bottom). A model whose generation config changes
the arg-max (a repetition penalty, suppressed or forced tokens, a minimum length), or whose
cache is not one plain key-value layer per decoder layer (sliding windows, recurrent
layers), or that is in training mode (dropout, and a checkpointed model keeps no cache), goes
through `generate` itself.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer

from fedsec.devices import autocast, autocast_dtype
from fedsec.prefix import _Captured, _stopping_at, frozen_fingerprint, top_layers_only
from fedsec.training import _causal_lm

# Generation settings that change which token greedy decoding picks: with any of them away
# from its default, decoding goes through generate and its logits processors.
_PROCESSORS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
               "min_length", "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
               "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty", "renormalize_logits",
               "guidance_scale", "stop_strings", "max_time", "watermarking_config")


def plain_greedy(model) -> bool:
    """Whether greedy `generate` on `model` picks each token by the arg-max of its logits alone
    (False for a model without a generation config: it decodes as its own `generate` does)."""
    config, default = getattr(_causal_lm(model), "generation_config", None), GenerationConfig()
    return config is not None and all(getattr(config, name, None) == getattr(default, name, None)
                                      for name in _PROCESSORS)


def _plain_cache(lm, cache: DynamicCache) -> bool:
    """Whether the model's forward takes a cache and the logits to keep as `generate` passes
    them, and its cache (`cache`, new) is one plain key-value layer per decoder layer."""
    takes = inspect.signature(lm.forward).parameters
    return "cache" in takes and "logits_to_keep" in takes and all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass(frozen=True)
class _Frozen:
    hidden: torch.Tensor  # [B, T, d]: the state entering the first adapted layer
    keys: tuple[torch.Tensor, ...]  # per frozen layer, [B, kv heads, T, head dim]
    values: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, *self.keys, *self.values))


# The frozen layers' prefills kept in this process by what they are a function of (the frozen
# weights' digest, so a sweep's runs, each loading its own copy of the base, share them), the
# oldest out past this many bytes (on the model's device: SmolLM2's 40 refusal probes take about 75 MB)
FROZEN_BYTES = 256 * 2 ** 20
_FROZEN: dict[tuple, _Frozen] = {}


def _frozen(model, first: int, ids: torch.Tensor, mask: torch.Tensor | None, position: torch.Tensor) -> _Frozen:
    """The frozen layers' prefill of a batch: computed once per process for the frozen weights,
    the layer, the batch's tokens, the device, the precision and the threads (`_FROZEN`)."""
    lm = _causal_lm(model)
    key = (frozen_fingerprint(model, first), lm.config.to_json_string(), first, str(ids.device), tuple(ids.shape),
           ids.cpu().numpy().tobytes(), None if mask is None else mask.cpu().numpy().tobytes(),
           autocast_dtype(model), torch.get_num_threads())
    if key in _FROZEN:
        _FROZEN[key] = _FROZEN.pop(key)  # most recently used last
        return _FROZEN[key]
    cache = DynamicCache(config=lm.config)
    try:
        with _stopping_at(lm.get_decoder(), first):
            lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
    except _Captured as hit:
        hidden = hit.hidden
    else:
        raise RuntimeError("the decoder never reached the first adapted layer")
    layers = cache.layers[:first]
    entry = _Frozen(hidden, tuple(layer.keys for layer in layers), tuple(layer.values for layer in layers))
    _FROZEN[key] = entry
    while _FROZEN and sum(e.nbytes for e in _FROZEN.values()) > FROZEN_BYTES:  # a batch above it is not kept
        _FROZEN.pop(next(iter(_FROZEN)))
    return entry


@torch.no_grad()
def greedy_tokens(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad_id: int,
                  first: int = 0) -> torch.Tensor:
    """The greedy continuation [B, max_new_tokens] of left-padded prompts `ids` [B, T] (`mask`
    1 on their tokens), as `generate(do_sample=False)` gives it: rows that end (an EOS token)
    are filled with `pad_id`, and decoding stops early once every row has ended. With
    `first` > 0 (the layers below it frozen), their prefill comes from `_frozen`."""
    lm = _causal_lm(model)
    if max_new_tokens < 1:
        return ids.new_empty(len(ids), 0)
    # training mode: dropout, and no cache under gradient checkpointing
    cache = DynamicCache(config=lm.config) if plain_greedy(model) and not lm.training else None
    if cache is None or not _plain_cache(lm, cache):
        with autocast(model):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_id)
        return out[:, ids.shape[1]:]
    eos = lm.generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long,
                       device=ids.device)
    position = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    attention = None if bool(mask.all()) else mask  # as generate: no mask when nothing is padded
    tokens, live = [], torch.ones(len(ids), dtype=torch.bool, device=ids.device)
    with autocast(model):
        if first:
            frozen = _frozen(model, first, ids, attention, position)
            with top_layers_only(model, first):
                out = lm(inputs_embeds=frozen.hidden, attention_mask=attention, position_ids=position, cache=cache,
                         use_cache=True, logits_to_keep=1)
            for layer, (k, v) in enumerate(zip(frozen.keys, frozen.values)):
                cache.update(k, v, layer)  # copied into the cache, which decoding extends
        else:
            out = lm(input_ids=ids, attention_mask=attention, position_ids=position, cache=cache, use_cache=True,
                     logits_to_keep=1)
        for step in range(max_new_tokens):
            pick = out.logits[:, -1, :].float().argmax(-1)
            pick = torch.where(live, pick, torch.full_like(pick, pad_id))
            tokens.append(pick)
            live &= ~torch.isin(pick, eos)
            if step == max_new_tokens - 1 or not bool(live.any()):
                break
            position = position[:, -1:] + 1
            if attention is not None:
                attention = torch.cat([attention, attention.new_ones(len(ids), 1)], dim=1)
            out = lm(input_ids=pick[:, None], attention_mask=attention, position_ids=position, cache=cache,
                     use_cache=True, logits_to_keep=1)
    return torch.stack(tokens, dim=1)
