"""Running the benchmarks on the global model: one evaluator for every kind of item.

A `Task` is a benchmark's items plus how often to run it. `run_task` asks a
`LanguageModel` for what the items need (a choice per closed-answer item, a reply per
generation or code item) and scores it (fedsec.evalsuite.scorers; code through the
sandbox, never in this process). `PeftModelLM` is the language model of a run: base
+ adapter, prompts in the run's template; closed answers are chosen by label
log-likelihood: one forward per item when every label is a single token (the
next-token distribution after the prompt), the full label sequence otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from fedsec.data.schema import ChatExample, InstructionExample, Message
from fedsec.encoding import IGNORE, Encoded, encode_prompt
from fedsec.evalsuite import openended, scorers
from fedsec.evalsuite.openended import OpenItem
from fedsec.evalsuite.sandbox import run_program
from fedsec.evalsuite.tasks import ChoiceItem, CodeItem, GenerationItem
from fedsec.evaluation import first_target_mask, greedy_replies, is_refusal, summed_logprobs, target_batches


@dataclass(frozen=True)
class ChoiceBatch:
    """Closed-answer items as scoring sequences (PeftModelLM.encode_choices)."""

    sequences: tuple[Encoded, ...]
    first_tokens: tuple[tuple[int, ...], ...] | None  # per item, its labels' token ids (single-token labels)
    sizes: tuple[int, ...]  # labels per item
    shared: int = 0  # leading tokens all sequences share, computed once per forward (0: plain batches)


@dataclass(frozen=True)
class Task:
    name: str
    items: tuple
    every: int  # run every `every` rounds (and after the last; 0: only before the first and after the last)
    max_new_tokens: int = 256
    timeout: float = 10.0
    memory_mb: int = 1024
    judge: object = None  # open-ended sets: an openended.Judge, or None (answers only)
    encoded: ChoiceBatch | None = None  # closed-answer items encoded once at setup (frozen-prefix states)

    def due(self, round_done: int, rounds: int) -> bool:
        return round_done in (0, rounds) or (self.every > 0 and round_done % self.every == 0)


class LanguageModel(Protocol):
    def choose(self, items: Sequence[ChoiceItem]) -> list[int]: ...

    def complete(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]: ...

    def converse(self, conversations: Sequence[Sequence[str]], max_new_tokens: int) -> list[str]: ...


def run_task(task: Task, lm: LanguageModel, folder: Path | None = None, round_done: int = 0) -> dict:
    """The task's metrics (accuracy and macro-F1, exact match, pass@1, the harmless rate or
    the judge's mean score) and its item count. Open-ended answers (and the judge's prompt
    and verdicts) are written under `folder` when given."""
    items = task.items
    if not items:
        return {"n": 0}
    if isinstance(items[0], OpenItem):
        answers = openended.answer_all(lm, items, task.max_new_tokens)
        out: dict = {"n": len(items)}
        if folder is not None:
            path = folder / f"round_{round_done:04d}.jsonl"
            openended.write_answers(path, items, answers, f"fedsec-round-{round_done}")
            out["answers"] = str(Path(folder.parent.name) / folder.name / path.name)
        if task.name == "advbench":
            out["harmless_rate"] = sum(is_refusal(a[0]) for a in answers) / len(answers)
        elif task.judge is not None:
            out.update(openended.judge_answers(task.judge, items, answers,
                                               folder / f"round_{round_done:04d}-judge" if folder else None))
        return out
    if isinstance(items[0], ChoiceItem):
        labels = max(len(it.choices) for it in items)
        picks = lm.choose(items) if task.encoded is None else lm.choose(items, task.encoded)
        return scorers.classification(picks, [it.answer for it in items], labels)
    replies = lm.complete([it.prompt for it in items], task.max_new_tokens)
    if isinstance(items[0], GenerationItem):
        return scorers.exact_match(replies, [it.reference for it in items])
    runs = [run_program(program(it, reply), task.timeout, task.memory_mb) for it, reply in zip(items, replies)]
    return {**scorers.pass_at_1([r.passed for r in runs]),
            "timeouts": sum(r.status == "timeout" for r in runs)}


_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.S)


def program(item: CodeItem, reply: str) -> str:
    """The program a reply makes with the item's tests: the code in its first fenced block
    (or the whole reply); a reply that defines functions stands alone (with the prefix's
    imports), one that does not continues the prefix (HumanEval's completion style)."""
    fenced = _FENCE.search(reply)
    code = fenced.group(1) if fenced else reply
    if re.search(r"^\s*def \w+", code, re.M):
        imports = "\n".join(line for line in item.prefix.splitlines() if line.startswith(("import ", "from ")))
        body = imports + "\n" + code
    else:
        body = item.prefix + code
    return body + "\n\n" + item.tests


class PeftModelLM:
    """The run's model as a LanguageModel (greedy decoding, the run's prompt template)."""

    def __init__(self, model, tokenizer, template: str, batch_size: int, raw: bool = False, frozen: int = 0):
        self.model, self.tokenizer, self.template, self.batch_size = model, tokenizer, template, batch_size
        self.raw = raw  # plain text prompts, each choice after a space (lm-eval's multiple-choice format)
        self.frozen = frozen  # the first adapted layer, the ones below frozen (evaluation.greedy_replies)

    def _prompt(self, text: str) -> list[int]:
        if self.raw:
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return encode_prompt(InstructionExample(text, ""), self.tokenizer, self.template)

    def _option(self, prompt: str, choice: str) -> list[int]:
        if self.raw:
            from fedsec.evalsuite.lmeval import split_tokens

            return split_tokens(self.tokenizer, prompt, " " + choice)[1]
        return self.tokenizer(choice, add_special_tokens=False).input_ids

    def encode_choices(self, items: Sequence[ChoiceItem]) -> ChoiceBatch:
        """The sequences that score the items' labels: when every label is one token, one
        sequence per item (the prompt and a label token: the log-distribution at that
        position scores every label); otherwise one per (item, label)."""
        prompts = [self._prompt(it.prompt) for it in items]
        options = [[self._option(it.prompt, c) for c in it.choices] for it in items]
        if all(len(ids) == 1 for opts in options for ids in opts):
            seqs = [Encoded(torch.tensor(p + opts[0]), torch.tensor([IGNORE] * len(p) + opts[0]))
                    for p, opts in zip(prompts, options)]
            return ChoiceBatch(tuple(seqs), tuple(tuple(o[0] for o in opts) for opts in options),
                               tuple(map(len, options)))
        seqs = [Encoded(torch.tensor(p + c), torch.tensor([IGNORE] * len(p) + c))
                for p, opts in zip(prompts, options) for c in opts]
        return ChoiceBatch(tuple(seqs), None, tuple(map(len, options)))

    @torch.no_grad()
    def choose(self, items: Sequence[ChoiceItem], encoded: ChoiceBatch | None = None) -> list[int]:
        """The label each item's prompt makes most likely. `encoded`: the items' sequences
        from `encode_choices`, e.g. with frozen-prefix states attached at setup."""
        self.model.eval()
        batch = encoded if encoded is not None else self.encode_choices(items)
        seqs, pad = batch.sequences, self.tokenizer.pad_token_id
        if batch.first_tokens is not None:
            picks = [0] * len(seqs)
            for start, head, _, rows in target_batches(self.model, seqs, pad, self.batch_size, batch.shared):
                first = first_target_mask(rows).nonzero().squeeze(1)
                owners = [start + row for row in rows[first].tolist()]
                # one head product per number of labels: each position's own labels' first tokens
                by_count: dict[int, list[int]] = {}
                for k, item in enumerate(owners):
                    by_count.setdefault(len(batch.first_tokens[item]), []).append(k)
                for ks in by_count.values():
                    ids = torch.tensor([batch.first_tokens[owners[k]] for k in ks], device=first.device)
                    best = head.words(first[torch.tensor(ks, device=first.device)], ids).argmax(1)
                    for k, label in zip(ks, best.tolist()):
                        picks[owners[k]] = label
            return picks
        totals = summed_logprobs(self.model, seqs, pad, self.batch_size, batch.shared)
        picks, at = [], 0
        for k in batch.sizes:
            picks.append(int(totals[at: at + k].argmax()))
            at += k
        return picks

    def complete(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return self.converse([[p] for p in prompts], max_new_tokens)

    def converse(self, conversations: Sequence[Sequence[str]], max_new_tokens: int) -> list[str]:
        """The greedy next reply to each conversation (user, assistant, ..., user)."""
        self.model.eval()
        encoded = []
        for turns in conversations:
            roles = ["user" if k % 2 == 0 else "assistant" for k in range(len(turns))]
            chat = ChatExample(tuple(Message(r, t) for r, t in zip(roles, turns)) + (Message("assistant", ""),))
            encoded.append(encode_prompt(chat, self.tokenizer, self.template))
        return greedy_replies(self.model, self.tokenizer, encoded, max_new_tokens, self.batch_size, self.frozen)


def load_tasks(cfg) -> tuple[Task, ...]:
    """The config's eval.benchmarks, read and (with max_items) sampled once at setup."""
    from fedsec.data.loaders import read_records
    from fedsec.errors import ConfigError
    from fedsec.registry import registry
    from fedsec.seeding import numpy_generator

    tasks = []
    for b in cfg.eval.benchmarks:
        entry = registry("benchmark").entry(b.name)
        hub_name, hub_split = entry.options["hub"] or ("", "test")
        source = b.source or hub_name
        if not source:
            raise ConfigError(f"eval.benchmarks[{b.name}].source", b.source, "give a local file in the schema "
                              "(this benchmark has no dataset by name)")
        try:
            rows = read_records(source, b.split or hub_split)
        except ConfigError as err:  # the data loader names data.source; this is the benchmark's
            raise ConfigError(f"eval.benchmarks[{b.name}].source", err.value, err.fix) from None
        items = entry.obj(rows, b.fields)
        if not items:
            raise ConfigError(f"eval.benchmarks[{b.name}].source", source, "has no items; check the file")
        if 0 < b.max_items < len(items):
            keep = numpy_generator(cfg.seed, "benchmark", b.name).choice(len(items), b.max_items, replace=False)
            items = [items[i] for i in sorted(keep.tolist())]
        tasks.append(Task(b.name, tuple(items), b.every, b.max_new_tokens, b.timeout, b.memory_mb,
                          _judge(b, cfg)))
    return tuple(tasks)


def _judge(spec, cfg):
    """The benchmark's judge: an OpenAI-compatible endpoint, a local model, or None."""
    if not spec.judge:
        return None
    if spec.judge.startswith(("http://", "https://")):
        return openended.HttpJudge(spec.judge, spec.judge_model, spec.judge_api_key_env)
    from fedsec.config import ModelConfig
    from fedsec.models import load_base_model

    name = spec.judge.removeprefix("model:")
    model, tokenizer = load_base_model(ModelConfig(name=name, device=cfg.model.device))
    return openended.ModelJudge(PeftModelLM(model, tokenizer, cfg.data.template, cfg.eval.batch_size), name)
