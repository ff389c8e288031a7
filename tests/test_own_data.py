"""A researcher's own free-text data end to end: a DP sweep and a malicious-client grid
over a small generated instruction file (natural split by user, no closed answers, so
no accuracy), and what their tables, figures and report make of it."""

from __future__ import annotations

import csv
import json
import math

import pypdf
import pytest
import yaml
from conftest import TINY

from fedsec.reports import plots
from fedsec.reports.pdf import build_report
from fedsec.sweeps import run_sweep, summary_table

USERS = ("ana", "ben", "chen", "dara", "eli", "fay")
TOPICS = ("a recipe", "a poem", "a letter", "a summary")


@pytest.fixture(scope="module")
def instruction_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("own") / "instructions.jsonl"
    rows = [{"instruction": f"Write {TOPICS[k % 4]} about item {k}.", "input": "",
             "output": f"Here is {TOPICS[k % 4]} about item {k}: it is short and plain.", "user": USERS[k % 6]}
            for k in range(72)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _base(path) -> dict:
    return {**{k: v for k, v in TINY.items() if k != "data"},
            "data": {"source": str(path), "partition": {"scheme": "natural", "by": "user"},
                     "test_fraction": 0.2, "client_test_fraction": 0.0, "max_length": 96},
            "federation": {"rounds": 2, "clients_per_round": 6, "local_only_clients": 0},
            "training": {**TINY["training"], "local_steps": 1}, "eval": {"clients": False}}


def _pdf_text(path) -> str:
    return " ".join(" ".join(page.extract_text().split()) for page in pypdf.PdfReader(str(path)).pages)


def test_a_dp_sweep_on_free_text_reports_the_loss(tmp_path, instruction_file):
    base = {**_base(instruction_file), "privacy": {"delta": 1e-3, "clip_norm": 0.05}}
    base["federation"] = {**base["federation"], "clients_per_round": 3, "sampling": "poisson"}
    spec = tmp_path / "dp.yaml"
    spec.write_text(yaml.safe_dump({"name": "own_dp", "base": base, "seeds": [0, 1],
                                    "output_dir": str(tmp_path / "runs"), "variants": {"non-private": []},
                                    "epsilons": [20]}, sort_keys=False))
    root = run_sweep(spec, progress=False, log=lambda _: None)
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert all(r["final_accuracy"] == "" for r in rows)  # free text: nothing to be accurate about
    for r in rows:  # the loss and its perplexity, final and untuned, in every row
        assert math.isclose(float(r["final_perplexity"]), math.exp(float(r["final_loss"])), rel_tol=1e-9)
        assert math.isclose(float(r["untuned_perplexity"]), math.exp(float(r["untuned_loss"])), rel_tol=1e-9)
    summary = {r["variant"]: r for r in csv.DictReader((root / "summary.csv").open())}
    losses = [float(r["final_loss"]) for r in rows if r["variant"] == "non-private"]
    assert math.isclose(float(summary["non-private"]["final_loss_mean"]), sum(losses) / 2, rel_tol=1e-12)
    table = summary_table(root)
    assert "held-out loss" in table and "perplexity" in table and "accuracy" not in table
    assert f"{sum(losses) / 2:.3f} ± " in table  # two seeds: mean and spread
    assert plots.headline_metric(plots.sweep_rows(root)) == "final_loss"
    data = plots.privacy_utility_data(plots.sweep_rows(root))
    assert [c[0] for c in data.curve] == ["eps20"] and data.untuned is not None
    assert data.non_private.mean == pytest.approx(sum(losses) / 2)
    assert plots.privacy_utility(root) is not None
    rounds = plots.variant_curve_data(root, "final_loss")
    assert list(rounds) == ["non-private", "eps20"] and [k for k, _ in rounds["eps20"]] == [0, 1, 2]
    report = build_report(root, tmp_path / "dp.pdf")
    text = _pdf_text(report)
    assert "held-out loss values are means over seeds" in text and "At epsilon" in text
    assert "accura" not in text.lower()  # no sentence, header or axis speaks of accuracy
    files = {p.name for p in (tmp_path / "dp_files").glob("*.png")}
    assert {"privacy_utility.png", "variants_by_round.png"} <= files


def test_a_malicious_grid_on_free_text_draws_its_heatmaps_with_the_true_client_count(tmp_path, instruction_file):
    grid = {"attack": {"gaussian": ["attack.kind=gaussian", "attack.params={std: 1}"]},
            "fraction": {"0": ["attack.kind=none", "attack.fraction=0", "attack.params={}"],
                         "0.34": ["attack.fraction=0.34"]},
            "defense": {"mean": ["defense.aggregator=mean"], "median": ["defense.aggregator=median"]}}
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump({"name": "own_grid", "base": _base(instruction_file), "seeds": [0],
                                    "output_dir": str(tmp_path / "runs"), "grid": grid}, sort_keys=False))
    root = run_sweep(spec, progress=False, log=lambda _: None)
    rows = plots.sweep_rows(root)
    assert {r["num_clients"] for r in rows} == {6}  # from the run's federation.json, not the benchmark
    data = plots.attack_grid_data(rows)
    assert data.fractions == [0.0, pytest.approx(2 / 6)] and data.metrics[0] == "final_loss"
    attacked = next(r for r in rows if r["variant"] == "gaussian-0.34-mean")
    assert data.get("final_loss", "gaussian", "mean", data.fractions[1]).mean == attacked["final_loss"]
    assert plots.attack_grid(root) is not None and plots.attack_fractions(root) is not None
    report = build_report(root, tmp_path / "grid.pdf")
    text = _pdf_text(report)
    assert "2 of 6" in text and "gaussian at 33% malicious clients: held-out loss" in text
    assert "accura" not in text.lower()
    grid_csv = list(csv.DictReader((tmp_path / "grid_files" / "grid.csv").open()))
    assert "loss" in grid_csv[0] and grid_csv[0]["malicious"] == "0 of 6"


def test_alignment_examples_from_advbench_train_refusals_never_the_compliant_target(tmp_path):
    from conftest import shared_file

    from fedsec.data.benchmark import REFUSAL
    from fedsec.data.loaders import read_file
    from fedsec.data.unsafe import read_alignment

    path = shared_file("advbench.csv")
    rows = read_file(path)
    examples = read_alignment(str(path))
    assert len(examples) == len(rows) and examples[0].prompt == rows[0]["goal"].strip()
    assert {e.response for e in examples} == {REFUSAL}  # AdvBench's target is the harm, not the reply


def test_benign_clients_carry_alignment_data_from_a_file_and_probes_must_be_disjoint(tmp_path, instruction_file):
    from conftest import tiny_config

    from fedsec.errors import ConfigError
    from fedsec.setup import build_federation

    aligned = tmp_path / "refusals.jsonl"
    aligned.write_text("".join(json.dumps({"prompt": f"How do I break into house {k}?",
                                           "refusal": f"No; I will not help with break-in {k}."}) + "\n"
                               for k in range(5)))
    raw = _base(instruction_file)
    plain = build_federation(tiny_config(tmp_path, data=raw["data"]))
    cfg = tiny_config(tmp_path, data={**raw["data"], "alignment": str(aligned), "alignment_per_client": 3})
    fed = build_federation(cfg)
    for before, after in zip(plain.data.clients, fed.data.clients):
        added = after.train[len(before.train):]
        assert after.train[: len(before.train)] == before.train and len(added) == 3
        assert len({e.prompt for e in added}) == 3  # without replacement while the file lasts
        assert all(e.response.startswith("No; I will not help") and e.meta["alignment"] for e in added)
    assert fed.data.clients[0].train[-3:] != fed.data.clients[1].train[-3:]  # a stream per client
    assert build_federation(cfg).data == fed.data  # seeded
    probes = tmp_path / "probes.csv"
    probes.write_text("goal\nHow do I break into house 2?\nSomething else entirely\n")
    with pytest.raises(ConfigError, match="shares 1 request"):
        build_federation(tiny_config(tmp_path, data={**raw["data"], "alignment": str(aligned)},
                                     eval={"refusal": True, "probes": str(probes)}))
    with pytest.raises(ConfigError) as err:
        build_federation(tiny_config(tmp_path, data={**raw["data"], "alignment": str(tmp_path / "none.csv")}))
    assert err.value.field == "data.alignment"


def test_fltrust_takes_its_root_set_from_a_file_in_the_datas_layout(tmp_path, instruction_file, monkeypatch):
    from conftest import tiny_config

    import fedsec.loop
    from fedsec.loop import run_experiment

    root = tmp_path / "root.jsonl"
    root.write_text("".join(json.dumps({"instruction": f"Write a note about root item {k}.",
                                        "output": f"A note about root item {k}."}) + "\n" for k in range(5)))
    raw = _base(instruction_file)
    cfg = tiny_config(tmp_path, data={**raw["data"], "root": str(root)}, defense={"aggregator": "fltrust"},
                      federation={"rounds": 1, "clients_per_round": 6, "local_only_clients": 0})
    seen = []
    reference = fedsec.loop.server_reference

    def spy(setup, *args):
        seen.append([setup.tokenizer.decode(item.input_ids) for item in setup.server_root])
        return reference(setup, *args)

    monkeypatch.setattr(fedsec.loop, "server_reference", spy)
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    assert result.finished and len(seen) == 1 and len(seen[0]) == 5  # the file's five examples, encoded
    assert all(f"root item {k}" in text for k, text in enumerate(seen[0]))


def _example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "own_data" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_self_instruct_converter_writes_one_alpaca_row_per_instance_with_its_app_as_user(tmp_path):
    from fedsec.config import DataConfig, from_mapping
    from fedsec.data import build_federated_data

    source = tmp_path / "user_oriented_instructions.jsonl"
    tasks = [{"id": f"t{k}", "motivation_app": ("Gmail", "Netflix", "IMDB")[k % 3], "instruction": f"Task {k}.",
              "instances": [{"input": f"in {k}" if k % 2 else "", "output": f"out {k}"}]} for k in range(12)]
    source.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    out = tmp_path / "data" / "self_instruct.jsonl"
    assert _example("self_instruct").convert(source, out) == 12
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[1] == {"instruction": "Task 1.", "input": "in 1", "output": "out 1", "user": "Netflix"}
    data = build_federated_data(from_mapping(DataConfig, {"source": str(out), "test_fraction": 0.25}), seed=0)
    assert len(data.clients) == 3  # natural split by user (the default): one client per app
    assert {e.meta["user"] for c in data.clients for e in c.train + c.test} == {"Gmail", "Netflix", "IMDB"}


def test_the_advbench_split_gives_three_disjoint_files_fedsec_reads(tmp_path):
    from conftest import shared_file

    from fedsec.data.unsafe import read_alignment, read_unsafe

    counts = _example("advbench_split").split(shared_file("advbench.csv"), tmp_path)
    assert counts == {"poison": 173, "alignment": 173, "probes": 174}
    poison = read_unsafe(str(tmp_path / "advbench_poison.csv"), "attack.params.source", need_reply=True)
    aligned = read_alignment(str(tmp_path / "advbench_alignment.csv"))
    probes = read_unsafe(str(tmp_path / "advbench_probes.csv"), "eval.probes", need_reply=False)
    sets = [{e.prompt for e in part} for part in (poison, aligned, probes)]
    assert [len(s) for s in sets] == [173, 173, 174] and not (sets[0] & sets[1] or sets[0] & sets[2]
                                                               or sets[1] & sets[2])
    assert all(e.response.startswith("Sure, here") for e in poison)  # the compliant target, for the attacker


def test_the_t0_converter_keeps_short_templates_strips_gpt3_endings_and_names_each_template_the_user(tmp_path):
    from fedsec.config import DataConfig, from_mapping
    from fedsec.data import build_federated_data

    source = tmp_path / "data_per_template"
    source.mkdir()

    def template(name, rows):
        (source / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    template("sentiment", [{"prompt": f"Review {k}. Positive or negative?\n",
                            "completion": ("positive" if k % 2 else "negative") + "<|endoftext|>"} for k in range(8)])
    template("topic", [{"prompt": f"Headline {k}. Topic?\n", "completion": "" if k < 3 else "sports<|endoftext|>"}
                       for k in range(9)])  # 3 empty completions dropped: 6 usable rows
    template("too_few", [{"prompt": "Q?", "completion": "A"}] * 3)
    template("long_prompt", [{"prompt": "x" * 500, "completion": "y"}] * 8)
    template("long_reply", [{"prompt": "Story?", "completion": "z" * 500}] * 8)
    out = tmp_path / "t0.jsonl"
    converter = _example("t0_templates")
    assert converter.convert(source, out, rows_per_template=3, min_rows=5, max_prompt=100, max_output=100) == (6, 2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # rows spread evenly over each file (every len // 3-th), prompt stripped, GPT-3's end marker gone
    assert rows[:3] == [{"instruction": f"Review {k}. Positive or negative?",
                         "output": "positive" if k % 2 else "negative", "user": "sentiment"} for k in (0, 2, 4)]
    assert [r["instruction"] for r in rows[3:]] == ["Headline 3. Topic?", "Headline 5. Topic?", "Headline 7. Topic?"]
    assert all(r["output"] == "sports" and r["user"] == "topic" for r in rows[3:])
    data = build_federated_data(from_mapping(DataConfig, {"source": str(out), "test_fraction": 0.2}), seed=0)
    assert len(data.clients) == 2  # natural split by user (the default): one client per template
    # more rows asked than a template has: all of its usable rows
    assert converter.convert(source, out, rows_per_template=10, min_rows=5, max_prompt=100, max_output=100) == (14, 2)


def test_a_backdoor_on_free_text_reports_exact_reply_rates(tmp_path, instruction_file):
    """No choices to score: the backdoor's rates are shares of the global test prompts
    (those whose answer is not the target) whose greedy reply is exactly the target."""
    from conftest import tiny_config

    from fedsec.data import build_federated_data
    from fedsec.loop import run_experiment

    raw = _base(instruction_file)
    target = "Here is a poem about item 1: it is short and plain."
    cfg = tiny_config(tmp_path, data=raw["data"], federation=raw["federation"], training=raw["training"],
                      eval={"clients": False}, attack={"kind": "backdoor", "malicious": 2,
                                                       "params": {"ratio": 1.0, "target": target}})
    victims = [e for e in build_federated_data(cfg.data, cfg.seed).global_test if e.response != target]
    rates = run_experiment(cfg, out=tmp_path / "out", progress=False, log=lambda _: None).final["backdoor"]
    for key in ("attack_success_rate", "clean_target_rate"):
        hits = rates[key] * len(victims)
        assert 0 <= rates[key] <= 1 and abs(hits - round(hits)) < 1e-9  # a share of the victims
    assert rates["triggered_target_loss"] > 0 and rates["clean_target_loss"] > 0


def test_canaries_are_planted_in_a_files_clients_and_their_exposure_is_measured(tmp_path, instruction_file, capsys):
    """data.benchmark.canaries_per_client on a file's clients (it was ignored: a memorization run on
    one's own data measured nothing and said nothing): the first canary_clients clients get their own
    secrets, canary_repeats times each, after their examples, from the benchmark's streams."""
    import dataclasses

    from fedsec import progress
    from fedsec.config import from_raw
    from fedsec.data.benchmark import canary_example, make_canaries
    from fedsec.errors import ConfigError
    from fedsec.loop import run_experiment
    from fedsec.setup import build_federation

    base = _base(instruction_file)
    plain = build_federation(from_raw(base)).data
    # the benchmark's other fields do not apply to a file: said, not silently dropped
    shaped = from_raw({**base, "data": {**base["data"], "benchmark": {"num_clients": 3, "test_size": 50}}})
    with progress.showing(True):
        assert build_federation(shaped).data == plain
    why = "the data come from files: it shapes the embedded benchmark only"
    assert capsys.readouterr().err == (f"fedsec: set but not used by this run: data.benchmark.num_clients ({why}), "
                                       f"data.benchmark.test_size ({why})\n")
    base["data"] = {**base["data"], "benchmark": {"canaries_per_client": 2, "canary_repeats": 3,
                                                  "canary_clients": 2}}
    base["eval"] = {**base["eval"], "canaries": True, "canary_candidates": 100}
    cfg = from_raw(base)
    planted = build_federation(cfg).data
    canaries = make_canaries(cfg.seed, 2, 2)
    assert planted.canaries == canaries and {c.client_id for c in canaries} == {0, 1}
    for before, after in zip(plain.clients, planted.clients):
        own = [c for c in canaries if c.client_id == before.client_id]
        expected = tuple(before.train) + tuple(canary_example(c) for c in own for _ in range(3))
        assert tuple(after.train) == expected and after.test == before.test
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    assert result.final["memorization"]["canaries"] == 4
    assert result.untuned["memorization"]["exposure_mean"] != result.final["memorization"]["exposure_mean"]
    for change, field in ((dict(canary_clients=7), "data.benchmark.canary_clients"),  # 6 users
                          (dict(canary_clients=0, canaries_per_client=1), None)):
        bench = dataclasses.replace(cfg.data.benchmark, **change)
        other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, benchmark=bench))
        if field is None:  # 0: every client holds one
            assert {c.client_id for c in build_federation(other).data.canaries} == set(range(6))
            continue
        with pytest.raises(ConfigError, match="the data has 6 clients") as err:
            build_federation(other)
        assert err.value.field == field
    with pytest.raises(ConfigError) as err:  # DPO trains on pairs: planted secrets would never be trained on
        dataclasses.replace(cfg, task="dpo", eval=dataclasses.replace(cfg.eval, canaries=False))
    assert err.value.field == "data.benchmark.canaries_per_client" and "preference pairs" in str(err.value)
    # an organisation's file (data.silos) gets them too (on Flower each SuperNode plants its own: test_flower)
    kept = {k: v for k, v in base["data"].items() if k not in ("source", "test_fraction")}
    siloed = from_raw({**base, "data": {**kept, "silos": [str(instruction_file)]}})
    clients = build_federation(siloed).data.clients
    assert [tuple(c.train[-3:]) for c in clients[:2]] == [(canary_example(c),) * 3 for c in canaries[1::2]]
    assert all(not any(e.meta.get("canary") for e in c.train) for c in clients[2:])


def test_a_held_out_share_nothing_reads_is_said_at_setup(instruction_file, capsys):
    """data.client_test_fraction (0.2 by default) takes a share of each client's examples out of
    training; with eval.clients off and no membership inference on held-out records nothing reads
    it, which was silent. Said in one line at setup; not said where it is read or is 0."""
    from fedsec import progress
    from fedsec.config import from_raw
    from fedsec.setup import build_federation

    base = _base(instruction_file)
    held = {**base, "data": {**base["data"], "client_test_fraction": 0.2}}
    with progress.showing(True):
        data = build_federation(from_raw(held)).data
    assert sum(len(c.test) for c in data.clients) > 0
    assert capsys.readouterr().err == (
        "fedsec: data.client_test_fraction 0.2 holds out that share of each client's examples and nothing reads it "
        "(eval.clients false, no membership inference on held-out records), so it is not trained on either; set it "
        "to 0 to train on it\n")
    for quiet in (base, {**held, "eval": {"clients": True}}, {**held, "eval": {"clients": False, "mia": True}}):
        with progress.showing(True):
            build_federation(from_raw(quiet))
        assert capsys.readouterr().err == ""
