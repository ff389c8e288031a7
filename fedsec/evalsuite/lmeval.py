"""fedsec's global model inside EleutherAI's lm-evaluation-harness (`pip install 'fedsec[lmeval]'`).

`FedsecLM` is an lm-eval language model (lm_eval.api.model.LM) over any model object
fedsec trains: the base model with its adapter, quantized or not. Its log-likelihoods
come from fedsec's own scoring code (`continuation_logprobs`, the path fedsec's
closed-answer benchmarks use), its generations from fedsec's greedy decoding. Then any
lm-eval task runs by name:

    from fedsec.evalsuite.lmeval import evaluate_tasks
    evaluate_tasks(model, tokenizer, ["hellaswag", "arc_easy"])            # needs network for the data
    evaluate_tasks(model, tokenizer, ["my_task"], include_path="tasks/")   # a local task definition

`fedsec lm-eval RUN_DIR TASK ...` does the same for a finished run's adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsec.encoding import IGNORE, Encoded, collate
from fedsec.evaluation import greedy_replies
from fedsec.training import head_scores, target_hidden


def split_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-eval's HF model splits them: trailing spaces of the
    context move to the continuation, and the continuation is what encoding the whole
    string adds after the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return whole[: len(ctx)], whole[len(ctx):]


@torch.no_grad()
def continuation_logprobs(model, pad_id: int, pairs: Sequence[tuple[list[int], list[int]]],
                          batch_size: int) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding would produce it) per pair."""
    model.eval()
    out: list[tuple[float, bool]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        items = [Encoded(torch.tensor(c + k), torch.tensor([IGNORE] * len(c) + k)) for c, k in chunk]
        hidden, targets, rows = target_hidden(model, collate(items, pad_id))
        head = head_scores(model, hidden, targets)
        picked, greedy = head.target.double(), head.argmax == targets
        for i in range(len(chunk)):
            mine = rows == i
            out.append((float(picked[mine].sum()), bool(greedy[mine].all())))
    return out


def _lm_class():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        from fedsec.errors import ConfigError

        raise ConfigError("lm-eval", "not installed", "pip install 'fedsec[lmeval]' (EleutherAI's "
                          "lm-evaluation-harness)") from None

    class FedsecLM(LM):
        """An lm-eval model over fedsec's model object and tokenizer."""

        def __init__(self, model, tokenizer, batch_size: int = 16, max_gen_toks: int = 256):
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
            pad = tokenizer.pad_token_id
            self.pad_id = pad if pad is not None else tokenizer.eos_token_id

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = []
            for req in requests:
                context, continuation = req.args
                ctx, cont = split_tokens(self.tokenizer, context, continuation)
                if not ctx:  # an empty context is conditioned on the end-of-text token, as lm-eval's HF model does
                    ctx = [self.tokenizer.eos_token_id]
                pairs.append((ctx, cont))
            return continuation_logprobs(self.model, self.pad_id, pairs, self.batch_size)

        def loglikelihood_rolling(self, requests) -> list[float]:
            pairs = [([self.tokenizer.eos_token_id], self.tokenizer(req.args[0], add_special_tokens=False).input_ids)
                     for req in requests]
            return [lp for lp, _ in continuation_logprobs(self.model, self.pad_id, pairs, self.batch_size)]

        def generate_until(self, requests) -> list[str]:
            """Greedy replies cut at the first stop string, the requests of one reply length
            decoded together (evaluation.greedy_replies' batches)."""
            prompts, stops, lengths = [], [], []
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                stops.append([until] if isinstance(until, str) else list(until))
                prompts.append(self.tokenizer(context, add_special_tokens=False).input_ids)
                lengths.append(int(kwargs.get("max_gen_toks", self.max_gen_toks)))
            replies = [""] * len(prompts)
            for length in dict.fromkeys(lengths):
                asked = [i for i, n in enumerate(lengths) if n == length]
                done = greedy_replies(self.model, self.tokenizer, [prompts[i] for i in asked], length, self.batch_size)
                for i, reply in zip(asked, done):
                    replies[i] = reply
            return [reply[:min([reply.find(u) for u in until if u and u in reply], default=len(reply))]
                    for reply, until in zip(replies, stops)]

    return FedsecLM


def fedsec_lm(model, tokenizer, batch_size: int = 16, max_gen_toks: int = 256):
    """The lm-eval model over `model` (an LM instance)."""
    return _lm_class()(model, tokenizer, batch_size, max_gen_toks)


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], include_path: str | None = None,
                   limit: int | None = None, batch_size: int = 16) -> dict:
    """lm-eval's results for `tasks` on the model: {task: {metric: value}}, the adapted layers
    through merged weights where they merge at fp32's rounding (fedsec.merged)."""
    lm = fedsec_lm(model, tokenizer, batch_size)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from fedsec.merged import merged_lora

    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    with merged_lora(model):
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  bootstrap_iters=0, log_samples=False)
    return {name: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for name, metrics in results["results"].items()}
