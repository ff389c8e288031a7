"""The internal example schemas: instruction, chat and preference.

Every loader maps its source into these, so training and evaluation never see a
dataset's own column names. `meta` carries fields used for partitioning and
analysis (label, user id, sector), never fed to the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class InstructionExample:
    prompt: str
    response: str
    system: str | None = None
    meta: Mapping[str, object] = field(default_factory=dict, compare=False)

    def messages(self) -> tuple[Message, ...]:
        head = (Message("system", self.system),) if self.system else ()
        return head + (Message("user", self.prompt), Message("assistant", self.response))


@dataclass(frozen=True)
class ChatExample:
    turns: tuple[Message, ...]
    meta: Mapping[str, object] = field(default_factory=dict, compare=False)

    def messages(self) -> tuple[Message, ...]:
        return self.turns


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    system: str | None = None
    meta: Mapping[str, object] = field(default_factory=dict, compare=False)


SftExample = InstructionExample | ChatExample


@dataclass(frozen=True)
class Canary:
    client_id: int
    text: str  # the full sentence planted in training data
    prefix: str  # what an extraction attack is given
    secret: str  # what it must complete


@dataclass(frozen=True)
class ClientData:
    """One client's examples: tuples, or rows of a file's table read when used (fedsec.data.table)."""

    client_id: int
    name: str
    train: Sequence[SftExample]
    test: Sequence[SftExample]
    preference: Sequence[PreferenceExample] = ()


@dataclass(frozen=True)
class FederatedData:
    """Clients with train/test splits, a global test set and the evaluation extras."""

    clients: tuple[ClientData, ...]
    global_test: tuple[InstructionExample, ...]
    choices: tuple[str, ...] | None
    probes: tuple[InstructionExample, ...] = ()
    canaries: tuple[Canary, ...] = ()
    preference_test: tuple[PreferenceExample, ...] = ()
    server_root: ClientData | None = None  # the server's own small clean set (FLTrust)
