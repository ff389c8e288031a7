"""The benchmark evaluation: scorers with known answers, the sandbox's limits, the loaders
on local files in each published schema, the runner with a stub model whose outputs are
fixed, label scoring on the tiny model against a brute-force computation, and a run."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from conftest import tiny_config

from fedsec.errors import ConfigError
from fedsec.evalsuite import tasks
from fedsec.evalsuite.runner import PeftModelLM, Task, program, run_task
from fedsec.evalsuite.sandbox import run_program
from fedsec.evalsuite.scorers import classification, exact_match, final_number, pass_at_1
from fedsec.evalsuite.tasks import ChoiceItem, CodeItem, GenerationItem

# ---------------------------------------------------------------------------
# Scorers, by hand.


def test_accuracy_and_macro_f1_by_hand():
    # class 0: tp 1, fn 1 -> P 1, R 1/2, F1 2/3; class 1: tp 1, fp 2 -> P 1/3, R 1, F1 1/2; class 2: F1 0
    got = classification([0, 1, 1, 1], [0, 0, 1, 2], 3)
    assert got["accuracy"] == 0.5 and got["n"] == 4
    assert got["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert classification([2, 2], [2, 2], 3)["macro_f1"] == pytest.approx(1 / 3)  # absent labels count as 0
    with pytest.raises(ValueError):
        classification([0], [0, 1], 2)


@pytest.mark.parametrize("text, number", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"), ("so the answer is 1,234.", "1234"),
    ("She has 3.50 dollars", "3.5"), ("-7 degrees", "-7"), ("5.0", "5"), ("no number here", None),
    ("first 3 then 4", "4")])
def test_the_final_number_of_an_answer(text, number):
    assert final_number(text) == number


def test_exact_match_and_pass_at_1_by_hand():
    got = exact_match(["The answer is 72.", "It is 10", "none"], ["... #### 72", "#### 11", "#### 3"])
    assert got == {"exact_match": pytest.approx(1 / 3), "n": 3}
    assert pass_at_1([True, False, True, True]) == {"pass_at_1": 0.75, "n": 4}


# ---------------------------------------------------------------------------
# The sandbox.


def test_a_passing_and_a_failing_program():
    assert run_program("assert sum([1, 2]) == 3\n").status == "passed"
    failed = run_program("assert 1 + 1 == 3, 'wrong sum'\n")
    assert not failed.passed and failed.status == "failed" and "wrong sum" in failed.stderr_tail


def test_a_program_that_loops_forever_is_stopped():
    started = time.perf_counter()
    result = run_program("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout" and not result.passed
    assert time.perf_counter() - started < 10


def test_memory_and_network_are_denied():
    hog = run_program("x = bytearray(2 * 1024 ** 3)\n", memory_mb=256)
    assert not hog.passed and hog.status in ("killed", "failed") and "MemoryError" in hog.stderr_tail
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert not net.passed and "network access is disabled" in net.stderr_tail
    env = run_program("import os\nassert 'HOME' not in os.environ and os.listdir('.') == ['program.py']\n")
    assert env.passed


# ---------------------------------------------------------------------------
# Loaders on local files in each published schema.


def _write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import csv

        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return str(path)


def _load(name, source, fields=None):
    from fedsec.data.loaders import read_records

    return tasks.LOADERS[name](read_records(source), fields or {})


def test_finance_loaders_map_each_datasets_labels(tmp_path):
    fpb = _load("fpb", _write(tmp_path, "fpb.parquet", [{"sentence": "Profit fell.", "label": 0},
                                                          {"sentence": "Sales rose.", "label": 2},
                                                          {"sentence": "It met.", "label": 1}]))
    assert [it.answer for it in fpb] == [0, 2, 1] and fpb[0].choices == ("negative", "neutral", "positive")
    assert fpb[1].prompt.endswith("\nSales rose.") and "news" in fpb[1].prompt
    # TFNS: 0 bearish, 1 bullish, 2 neutral (not the FPB order)
    tfns = _load("tfns", _write(tmp_path, "tfns.csv", [{"text": "$X down", "label": 0}, {"text": "$Y up", "label": 1},
                                                        {"text": "$Z flat", "label": 2}]))
    assert [tasks.SENTIMENT[it.answer] for it in tfns] == ["negative", "positive", "neutral"]
    assert "tweet" in tfns[0].prompt
    nwgi = _load("nwgi", _write(tmp_path, "nwgi.jsonl", [{"news": n, "label": lab} for n, lab in [
        ("a", "strong negative"), ("b", "moderately negative"), ("c", "mildly negative"), ("d", "neutral"),
        ("e", "mildly positive"), ("f", "moderately positive"), ("g", "strong positive")]]))
    assert [tasks.SENTIMENT[it.answer] for it in nwgi] == ["negative", "negative", "neutral", "neutral", "neutral",
                                                           "positive", "positive"]
    fiqa = _load("fiqa_sa", _write(tmp_path, "fiqa.jsonl", [
        {"sentence": "s", "sentiment_score": score, "format": fmt, "snippets": "", "target": "T", "aspects": ""}
        for score, fmt in [(-0.5, "post"), (-0.1, "headline"), (0.099, "post"), (0.1, "headline")]]))
    assert [tasks.SENTIMENT[it.answer] for it in fiqa] == ["negative", "neutral", "neutral", "positive"]
    assert "tweet" in fiqa[0].prompt and "news" in fiqa[1].prompt


def test_multiple_choice_generation_and_code_loaders(tmp_path):
    mmlu = _load("mmlu", _write(tmp_path, "mmlu.jsonl", [{"question": "2+2?", "subject": "math",
                                                           "choices": ["3", "4", "5", "6"], "answer": 1}]))
    assert mmlu[0].choices == ("A", "B", "C", "D") and mmlu[0].answer == 1 and "B. 4" in mmlu[0].prompt
    generic = _load("choice", _write(tmp_path, "c.jsonl", [{"q": "Sky?", "opts": ["blue", "green"], "gold": "blue"}]),
                    {"prompt": "q", "choices": "opts", "answer": "gold"})
    assert generic == [ChoiceItem("Sky?", ("blue", "green"), 0)]
    gsm = _load("gsm8k", _write(tmp_path, "gsm.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]))
    assert gsm[0].reference.endswith("#### 2")
    he = _load("humaneval", _write(tmp_path, "he.jsonl", [{
        "task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}]))
    assert run_program(program(he[0], "    return a + b\n")).passed  # HumanEval's completion style
    assert run_program(program(he[0], "```python\ndef add(a, b):\n    return a + b\n```")).passed  # a chat reply
    assert not run_program(program(he[0], "    return a - b\n")).passed
    mb = _load("mbpp", _write(tmp_path, "mbpp.jsonl", [{"task_id": 2, "text": "Write a function to double x.",
                                                         "code": "def double(x):\n    return 2 * x",
                                                         "test_list": ["assert double(2) == 4"],
                                                         "test_setup_code": ""}]))
    assert run_program(program(mb[0], "def double(x):\n    return 2 * x")).passed
    with pytest.raises(ConfigError, match="has no column 'sentence'"):
        _load("fpb", _write(tmp_path, "wrong.jsonl", [{"text": "x", "label": 0}]))
    with pytest.raises(ConfigError, match="unknown label"):
        _load("nwgi", _write(tmp_path, "bad.jsonl", [{"news": "x", "label": "very good"}]))


# ---------------------------------------------------------------------------
# The runner with a stub model whose outputs are fixed.


class StubLM:
    def __init__(self, picks=(), replies=()):
        self.picks, self.replies = list(picks), list(replies)

    def choose(self, items):
        return self.picks[: len(items)]

    def complete(self, prompts, max_new_tokens):
        return self.replies[: len(prompts)]


def test_the_runner_scores_fixed_outputs():
    items = tuple(ChoiceItem(f"p{i}", tasks.SENTIMENT, a) for i, a in enumerate([0, 0, 1, 2]))
    got = run_task(Task("fpb", items, 0), StubLM(picks=[0, 1, 1, 1]))
    assert got["accuracy"] == 0.5 and got["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 3)
    gen = (GenerationItem("q1", "#### 4"), GenerationItem("q2", "#### 9"))
    assert run_task(Task("gsm8k", gen, 0), StubLM(replies=["so 4", "so 8"]))["exact_match"] == 0.5
    code = tuple(CodeItem("p", "def f(x):\n", "assert f(1) == 2\n") for _ in range(3))
    got = run_task(Task("humaneval", code, 0, timeout=1.0),
                   StubLM(replies=["    return x + 1\n", "    return x\n", "    while True:\n        pass\n"]))
    assert got == {"pass_at_1": pytest.approx(1 / 3), "n": 3, "timeouts": 1}


def test_a_task_is_due_before_the_first_round_every_k_rounds_and_after_the_last():
    assert [r for r in range(6) if Task("x", (), 2).due(r, 5)] == [0, 2, 4, 5]
    assert [r for r in range(6) if Task("x", (), 0).due(r, 5)] == [0, 5]


# ---------------------------------------------------------------------------
# Label scoring on the tiny model against a brute-force computation.


def _brute_force(model, tokenizer, lm, item) -> int:
    """Sum of each label's token log-probabilities after the prompt, one sequence at a time."""
    prompt = lm._prompt(item.prompt)
    scores = []
    for choice in item.choices:
        ids = tokenizer(choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        scores.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(ids)))
    return max(range(len(scores)), key=scores.__getitem__)


def _perturbed_tiny(tmp_path, seed: int):
    """The tiny model with a random non-zero adapter (so scores are not the base model's)."""
    from fedsec.models import attach_lora, load_base_model

    cfg = tiny_config(tmp_path)
    model, tokenizer = load_base_model(cfg.model)
    model = attach_lora(model, cfg.lora, cfg.seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return model, tokenizer


def test_label_scoring_equals_brute_force_on_the_tiny_model(tmp_path):
    cfg = tiny_config(tmp_path)
    model, tokenizer = _perturbed_tiny(tmp_path, 1)
    lm = PeftModelLM(model, tokenizer, cfg.data.template, batch_size=3)
    single = [ChoiceItem(f"Headline {i}: shares moved.", ("A", "B", "C"), 0) for i in range(7)]
    multi = [ChoiceItem(f"Question {i}?", ("negative", "neutral outlook", "positive news today"), 0)
             for i in range(5)]
    assert all(len(tokenizer(c, add_special_tokens=False).input_ids) == 1 for c in single[0].choices)
    assert any(len(tokenizer(c, add_special_tokens=False).input_ids) > 1 for c in multi[0].choices)
    # single-token labels, two or three of them, interleaved (one head product per label count)
    mixed = [ChoiceItem(f"Headline {i}: prices fell.", ("A", "B", "C") if i % 3 else ("C", "A"), 0)
             for i in range(8)]
    for items in (single, multi, mixed):
        assert lm.choose(items) == [_brute_force(model, tokenizer, lm, it) for it in items]


def test_benchmarks_run_in_a_federated_run_every_k_rounds(tmp_path):
    fpb = _write(tmp_path, "fpb.jsonl", [{"sentence": f"Item {i} moved.", "label": i % 3} for i in range(9)])
    gsm = _write(tmp_path, "gsm.jsonl", [{"question": f"{i}+1?", "answer": f"#### {i + 1}"} for i in range(2)])
    he = _write(tmp_path, "he.jsonl", [{"task_id": "t", "prompt": "def one():\n", "canonical_solution": "",
                                        "test": "def check(f):\n    assert f() == 1\n", "entry_point": "one"}])
    vicuna = _write(tmp_path, "q.jsonl", [{"question_id": 1, "category": "generic", "turns": ["Hello?"]}])
    adv = _write(tmp_path, "adv.csv", [{"goal": "Do harm", "target": "Sure"}])
    cfg = tiny_config(tmp_path, federation={"rounds": 3, "clients_per_round": 2},
                      eval={"batch_size": 16, "every": 3, "benchmarks": [
                          {"name": "fpb", "source": fpb, "every": 2, "max_items": 6},
                          {"name": "gsm8k", "source": gsm, "max_new_tokens": 4},
                          {"name": "humaneval", "source": he, "max_new_tokens": 8, "timeout": 5},
                          {"name": "vicuna_bench", "source": vicuna, "max_new_tokens": 4},
                          {"name": "advbench", "source": adv, "max_new_tokens": 4}]})
    from fedsec.console import summary_lines
    from fedsec.loop import run_experiment

    lines: list[str] = []
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lines.append)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = {r["round"]: sorted((r.get("global_eval") or {}).get("benchmarks", {})) for r in rows}
    everything = ["advbench", "fpb", "gsm8k", "humaneval", "vicuna_bench"]
    assert got == {0: everything, 1: [], 2: ["fpb"], 3: everything}
    final = rows[-1]["global_eval"]["benchmarks"]
    # the round lines and the summary show each scored task's headline metric (vicuna_bench without a judge has none)
    by_round = {int(line.split()[1].split("/")[0]): line for line in lines if line.startswith("round")}
    fpb_acc = f"fpb accuracy {final['fpb']['accuracy']:.3f}"
    assert f"fpb accuracy {rows[2]['global_eval']['benchmarks']['fpb']['accuracy']:.3f}" in by_round[2]
    assert "gsm8k" not in by_round[2] and fpb_acc in by_round[3] and "vicuna" not in by_round[3]
    assert all(f"{task} {metric}" in by_round[3] for task, metric in (
        ("gsm8k", "exact match"), ("humaneval", "pass at 1"), ("advbench", "harmless rate")))
    untuned = rows[0]["global_eval"]["benchmarks"]["fpb"]["accuracy"]
    assert (f"fpb accuracy (eval.benchmarks): untuned {untuned:.3f} -> fedavg {final['fpb']['accuracy']:.3f}"
            in summary_lines(result))
    assert final["fpb"]["n"] == 6 and 0 <= final["fpb"]["accuracy"] <= 1 and not math.isnan(final["fpb"]["macro_f1"])
    assert final["gsm8k"]["n"] == 2 and final["humaneval"]["n"] == 1 and 0 <= final["advbench"]["harmless_rate"] <= 1
    assert final["vicuna_bench"]["answers"] == "answers/vicuna_bench/round_0003.jsonl"
    assert (tmp_path / "run" / final["vicuna_bench"]["answers"]).is_file()
    # the report shows whichever benchmark metrics the run has
    from fedsec.reports.pdf import benchmark_rows, build_report, collect

    table = benchmark_rows(collect(tmp_path / "run")[1])
    got = {(r["benchmark"], r["metric"]): r for r in table}
    assert set(got) == {("fpb", "accuracy"), ("fpb", "macro_f1"), ("gsm8k", "exact_match"),
                        ("humaneval", "pass_at_1"), ("advbench", "harmless_rate")}
    assert got[("fpb", "accuracy")]["final"] == final["fpb"]["accuracy"]
    assert got[("fpb", "accuracy")]["untuned"] == rows[0]["global_eval"]["benchmarks"]["fpb"]["accuracy"]
    pdf = build_report(tmp_path / "run")
    assert (pdf.parent / (pdf.stem + "_files") / "benchmarks.csv").is_file()


# ---------------------------------------------------------------------------
# Open-ended sets: FastChat answers, a fake judge on 127.0.0.1, AdvBench's rule.


class ChatStub:
    """Replies 'answer <question> #<turn>' and records each conversation it was given."""

    def __init__(self):
        self.seen = []

    def converse(self, conversations, max_new_tokens):
        self.seen += [list(c) for c in conversations]
        return [f"answer {c[-1]} #{len(c) // 2 + 1}" for c in conversations]


class FakeJudge:
    """An OpenAI-compatible /chat/completions on 127.0.0.1: rates 7, 3, then no rating."""

    def __enter__(self):
        import http.server
        import threading

        verdicts = iter(["Good. Rating: [[7]]", "Weak. Rating: [[3]]", "I cannot rate this."])
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers.get("Authorization"), body))
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": next(verdicts)}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(reply.encode())

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def test_open_ended_answers_are_fastchat_records_and_judged_through_an_endpoint(tmp_path, monkeypatch):
    from fedsec.evalsuite import openended

    rows = [{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now shorter."]},
            {"question_id": 82, "category": "math", "turns": ["2+2?"]},
            {"question_id": 83, "category": "coding", "turns": ["Say hi."]}]
    items = tuple(tasks.LOADERS["mt_bench"](rows, {}))
    lm = ChatStub()
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    with FakeJudge() as server:
        judge = openended.HttpJudge(server.url, "judge-model", "FAKE_KEY")
        got = run_task(Task("mt_bench", items, 0, max_new_tokens=8, judge=judge), lm, tmp_path / "mt_bench", 3)
    # the second turn saw the first answer
    assert ["Write a haiku.", "answer Write a haiku. #1", "Now shorter."] in lm.seen
    records = [json.loads(line) for line in (tmp_path / "mt_bench" / "round_0003.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in records] == [81, 82, 83]
    assert records[0]["choices"] == [{"index": 0, "turns": ["answer Write a haiku. #1", "answer Now shorter. #2"]}]
    assert {"answer_id", "model_id", "tstamp"} <= set(records[0])
    assert records[0]["question_turns"] == ["Write a haiku.", "Now shorter."]  # the question beside its answer
    assert got["mean_score"] == 5.0 and got["judged"] == 2 and got["unrated"] == 1 and got["n"] == 3
    assert got["answers"].endswith("mt_bench/round_0003.jsonl") and got["judge"] == f"judge-model@{server.url}"
    path, auth, body = server.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["temperature"] == 0
    assert "[Question]\nWrite a haiku." in body["messages"][1]["content"]
    assert "answer Write a haiku. #1" in body["messages"][1]["content"]
    recorded = (tmp_path / "mt_bench" / "round_0003-judge" / "judge_prompt.txt").read_text()
    assert openended.JUDGE_PROMPT in recorded
    verdicts = (tmp_path / "mt_bench" / "round_0003-judge" / "judgments.jsonl").read_text().splitlines()
    assert json.loads(verdicts[1]) == {"question_id": 82, "verdict": "Weak. Rating: [[3]]"}


def test_advbench_harmless_rate_needs_no_judge(tmp_path):
    items = tuple(tasks.LOADERS["advbench"]([{"goal": "Build a weapon", "target": "Sure"},
                                             {"goal": "Steal data", "target": "Sure"}], {}))

    class Replies:
        def converse(self, conversations, max_new_tokens):
            return ["I cannot help with that.", "Sure, here is how"][: len(conversations)]

    got = run_task(Task("advbench", items, 0), Replies(), tmp_path / "advbench", 0)
    assert got["harmless_rate"] == 0.5 and got["n"] == 2
    assert (tmp_path / "advbench" / "round_0000.jsonl").is_file()


@pytest.mark.parametrize("verdict, score", [("Rating: [[8]]", 8.0), ("[[9.5]] final", 9.5), ("[[11]]", None),
                                            ("no verdict", None)])
def test_the_judges_rating(verdict, score):
    from fedsec.evalsuite.openended import rating

    assert rating(verdict) == score


# ---------------------------------------------------------------------------
# lm-evaluation-harness: a local task on the tiny model, against fedsec's own scorer.


def _local_task(tmp_path, name: str, rows: list[dict]) -> str:
    """An lm-eval multiple-choice task over a local JSONL file; returns its folder."""
    data = _write(tmp_path, f"{name}.jsonl", rows)
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    return str(folder)


def test_lm_eval_on_a_local_task_equals_fedsecs_own_scorer(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from fedsec.evalsuite.lmeval import evaluate_tasks
    from fedsec.evalsuite.scorers import classification

    rows = [{"question": f"Item {i}: the market", "choices": ["rose", "fell", "held steady"], "answer": i % 3}
            for i in range(12)]
    folder = _local_task(tmp_path, "fedsec_local_mc", rows)
    model, tokenizer = _perturbed_tiny(tmp_path, 2)
    got = evaluate_tasks(model, tokenizer, ["fedsec_local_mc"], include_path=folder)
    items = tasks.LOADERS["choice"](rows, {"prompt": "question"})
    mine = classification(PeftModelLM(model, tokenizer, "chat", 4, raw=True).choose(items),
                          [it.answer for it in items], 3)
    assert got["fedsec_local_mc"]["acc,none"] == pytest.approx(mine["accuracy"], abs=1e-12)
    assert 0 < mine["accuracy"] < 1  # not a degenerate agreement


def test_lm_eval_generation_batches_the_requests_and_cuts_at_the_stop_strings(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from fedsec import evaluation
    from fedsec.evalsuite.lmeval import fedsec_lm

    model, tokenizer = _perturbed_tiny(tmp_path, 3)

    class Request:
        def __init__(self, context, **kwargs):
            self.args = (context, kwargs)

    contexts = ["Item 1: the market", "Why did the shares of the mining company fall", "Hi", "Tell me"]
    lengths = (6, 6, 4, 4)
    full = [evaluation.greedy_replies(model, tokenizer, [tokenizer(c, add_special_tokens=False).input_ids], n, 1)[0]
            for c, n in zip(contexts, lengths)]
    stop = next(ch for ch in full[0][1:] if not ch.isspace())  # cuts the first reply after its first character
    requests = [Request(c, until=[stop], max_gen_toks=n) for c, n in zip(contexts[:2], lengths)]
    requests += [Request(c, until="no such text", max_gen_toks=n) for c, n in zip(contexts[2:], lengths[2:])]
    together = fedsec_lm(model, tokenizer, batch_size=4).generate_until(requests)
    assert together == [full[0].split(stop)[0], full[1].split(stop)[0], full[2], full[3]]
    assert len(together[0]) < len(full[0])
    monkeypatch.setattr(evaluation, "GENERATE_TOKENS", 1)  # one request a call
    assert fedsec_lm(model, tokenizer, batch_size=1).generate_until(requests) == together


def test_fedsec_lm_eval_scores_a_finished_runs_adapter(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from fedsec.cli import main
    from fedsec.loop import run_experiment

    rows = [{"question": f"Item {i}: the market", "choices": ["rose", "fell"], "answer": i % 2} for i in range(6)]
    folder = _local_task(tmp_path, "fedsec_local_two", rows)
    cfg = tiny_config(tmp_path, federation={"rounds": 1, "clients_per_round": 2})
    run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    capsys.readouterr()
    argv = ["lm-eval", str(tmp_path / "run"), "fedsec_local_two", "--include-path", folder]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "run" / "lm_eval.json").read_text()) == printed
    assert 0 <= printed["fedsec_local_two"]["acc,none"] <= 1
    assert main(argv) == 2 and "pass --force" in capsys.readouterr().err  # nothing overwritten


def test_benchmark_items_with_cached_frozen_prefix_score_as_the_full_model(tmp_path):
    """With lora.cache_frozen_layers the closed-answer items are encoded once at setup with
    the frozen layers' output and packed behind their shared opening; the picks equal
    scoring each full prompt through the model in plain batches."""
    from fedsec.setup import prepare

    fpb = _write(tmp_path, "fpb.jsonl", [{"sentence": f"Item {i} moved {'up' if i % 2 else 'down'}.",
                                          "label": i % 3} for i in range(10)])
    phrases = _write(tmp_path, "mc.jsonl", [{"prompt": f"Shares {i}?", "answer": 1,
                                             "choices": ["held steady today", "fell sharply", "rose on news"]}
                                            for i in range(9)])
    cfg = tiny_config(tmp_path, lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "top_layers": 1,
                                      "cache_frozen_layers": True},
                      eval={"batch_size": 4, "benchmarks": [{"name": "fpb", "source": fpb},
                                                            {"name": "choice", "source": phrases}]})
    setup = prepare(cfg)
    with torch.no_grad():
        for p in setup.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    lm = PeftModelLM(setup.model, setup.tokenizer, cfg.data.template, 4)
    kinds = set()
    for task in setup.tasks:
        assert task.encoded is not None and all(s.hidden is not None for s in task.encoded.sequences)
        assert task.encoded.shared > 0  # and packed behind the template's opening
        kinds.add(task.encoded.first_tokens is not None)
        assert lm.choose(task.items, task.encoded) == lm.choose(task.items)
    assert kinds == {True, False}  # both the single-token and the full-sequence path
