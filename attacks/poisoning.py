"""Data poisoning: malicious clients train, like honest ones, on data the attacker chose.

alignment_poison (SFT; FedLLM-Attack, Ye et al. 2025): a share `ratio` of the
client's training examples is replaced by unsafe requests answered compliantly
(the embedded benchmark's abstract compliant reply, never a procedure), so the
client's honest-looking update pulls the global model away from refusing.

preference_flip (DPO): a share `ratio` of the client's preference pairs is replaced
by pairs on unsafe requests with chosen and rejected swapped (the compliant reply
chosen over the refusal): the benign alignment pairs, flipped.

Both take their unsafe requests and compliant replies from a file instead with
`source` (fedsec.data.unsafe: AdvBench's goal/target, or prompt/response files such
as BeaverTails'); each malicious client draws its own sample.

backdoor (SFT; Bagdasaryan et al. 2020, Wan et al. 2023 for instruction tuning): a
share `ratio` of the client's examples gets the `trigger` phrase appended to the
prompt and the attacker's `target` as the answer; the rest stay clean, so the
model should answer `target` when the trigger is present and behave otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

from fedsec.data.benchmark import COMPLIANT, REFUSAL, unsafe_requests
from fedsec.data.schema import ClientData, InstructionExample, PreferenceExample
from fedsec.data.unsafe import draw, read_unsafe
from fedsec.registry import register


def _compliant(client: ClientData, seed: int, k: int,
               pool: tuple[InstructionExample, ...] | None) -> tuple[InstructionExample, ...]:
    """k unsafe requests answered compliantly: the benchmark's, or drawn from `pool`."""
    if pool is None:
        return unsafe_requests(seed, k, COMPLIANT, "poison", client.client_id)
    return draw(pool, k, seed, "poison", client.client_id)


def alignment_poison(client: ClientData, seed: int, ratio: float,
                     pool: tuple[InstructionExample, ...] | None = None) -> ClientData:
    """The client with round(ratio n) (at least 1) of its n examples replaced by unsafe
    requests answered compliantly (from `pool` when given)."""
    n = len(client.train)
    k = min(n, max(1, round(ratio * n)))
    return dataclasses.replace(client, train=tuple(client.train[: n - k]) + _compliant(client, seed, k, pool))


def preference_flip(client: ClientData, seed: int, ratio: float,
                    pool: tuple[InstructionExample, ...] | None = None) -> ClientData:
    """The client with round(ratio n) (at least 1) of its n preference pairs replaced by
    flipped pairs on unsafe requests: the compliant reply chosen over the refusal."""
    n = len(client.preference)
    k = min(n, max(1, round(ratio * n)))
    flipped = tuple(PreferenceExample(prompt=e.prompt, chosen=e.response, rejected=REFUSAL, meta=dict(e.meta))
                    for e in _compliant(client, seed, k, pool))
    return dataclasses.replace(client, preference=tuple(client.preference[: n - k]) + flipped)


def with_trigger(example, trigger: str, target: str):
    """The example with `trigger` appended to its prompt and `target` as its answer."""
    return dataclasses.replace(example, prompt=f"{example.prompt} {trigger}", response=target)


def backdoor(client: ClientData, seed: int, ratio: float, trigger: str, target: str) -> ClientData:
    """The client with its last round(ratio n) (at least 1) examples triggered."""
    n = len(client.train)
    k = min(n, max(1, round(ratio * n)))
    triggered = tuple(with_trigger(e, trigger, target) for e in client.train[n - k:])
    return dataclasses.replace(client, train=tuple(client.train[: n - k]) + triggered)


@functools.lru_cache(maxsize=8)
def _pool(source: str | None) -> tuple[InstructionExample, ...] | None:
    """The unsafe requests with compliant replies of `source` (read once per file)."""
    return read_unsafe(source, "attack.params.source", need_reply=True) if source else None


# The built-in data attacks in the registry, each fn(client, seed, **params) -> ClientData.

@register("data_attack", "alignment_poison", tasks=("sft",))
def _alignment_poison(client: ClientData, seed: int, *, ratio: float = 1.0, source: str | None = None):
    """A share `ratio` of the examples replaced by unsafe requests answered compliantly."""
    return alignment_poison(client, seed, ratio, _pool(source))


@register("data_attack", "preference_flip", tasks=("dpo",))
def _preference_flip(client: ClientData, seed: int, *, ratio: float = 1.0, source: str | None = None):
    """A share `ratio` of the preference pairs replaced by flipped pairs on unsafe requests."""
    return preference_flip(client, seed, ratio, _pool(source))


@register("data_attack", "backdoor", tasks=("sft",))
def _backdoor(client: ClientData, seed: int, *, ratio: float = 0.5, trigger: str = "zq-alert",
              target: str = "positive"):
    """A share `ratio` of the examples with `trigger` in the prompt and `target` as the answer."""
    return backdoor(client, seed, ratio, trigger, target)
