from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from fedsec.config import (
    ExperimentConfig,
    apply_override,
    dump_config,
    from_mapping,
    load_config,
)
from fedsec.errors import ConfigError


def test_defaults_round_trip_through_yaml():
    cfg = ExperimentConfig()
    again = from_mapping(ExperimentConfig, yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_quickstart_parses_and_overrides_apply():
    cfg = load_config("experiments/quickstart.yaml", ["training.lr=1e-4", "lora.rank=4",
                                                      "lora.target_modules=[q_proj]"])
    assert cfg.training.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.lora.rank == 4 and cfg.lora.target_modules == ("q_proj",)
    assert cfg.model.name == "smollm2-135m-instruct"


def test_override_creates_missing_sections_without_touching_input():
    raw = {"training": {"lr": 0.1}}
    out = apply_override(raw, "eval.every=3")
    assert out["eval"] == {"every": 3} and raw == {"training": {"lr": 0.1}}


@pytest.mark.parametrize("raw, field, words", [
    ({"training": {"lr": -1}}, "training.lr", "(0, 100]"),
    ({"training": {"lr": "fast"}}, "training.lr", "number"),
    ({"lora": {"rank": 0}}, "lora.rank", ">= 1"),
    ({"lora": {"rank": 2.5}}, "lora.rank", "integer"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout", "[0, 1)"),
    ({"model": {"quantization": "3bit"}}, "model.quantization", "none, 8bit, 4bit"),
    ({"federation": {"rounds": 0}}, "federation.rounds", ">= 1"),
    ({"federation": {"clients_per_round": "all"}}, "federation.clients_per_round", "integer"),
    ({"data": {"partition": {"scheme": "iid"}}}, "data.partition.num_clients", "needs"),
    ({"data": {"test_fraction": 1.5}}, "data.test_fraction", "(0, 1)"),
    ({"eval": {"clients": "yes"}}, "eval.clients", "true or false"),
    ({"name": "a b"}, "name", "letters"),
    ({"training": {"lrr": 0.1}}, "training.lrr", "did you mean 'lr'"),
    ({"trainig": {}}, "trainig", "did you mean 'training'"),
    ({"lora": [1, 2]}, "lora", "mapping"),
    # without an attack, labelled "malicious" clients would train honestly and be scored as caught or missed
    ({"attack": {"kind": "none", "fraction": 0.3}}, "attack.fraction", "set attack.fraction: 0"),
    ({"attack": {"malicious": 2}}, "attack.malicious", "name an attack in attack.kind"),
    ({"data": {"benchmark": {"canary_clients": 9}}}, "data.benchmark.canary_clients", "num_clients = 8"),
    # DPO never trains on an SFT record: its canaries' exposure would measure nothing
    ({"task": "dpo", "eval": {"canaries": True}}, "eval.canaries", "none is ever trained on"),
    ({"task": "dpo", "audit": {"canaries": 4}}, "audit.canaries", "audit a task sft run"),
    # a DP setting without a DP mode: the run would look private and be plain FedAvg
    ({"privacy": {"epsilon": 8}}, "privacy.epsilon", "privacy.mode is off"),
    ({"privacy": {"noise_multiplier": 1.0}}, "privacy.noise_multiplier", "set privacy.mode: user"),
    ({"privacy": {"adaptive_clipping": True}}, "privacy.adaptive_clipping", "nothing is clipped"),
])
def test_bad_values_name_field_value_and_fix(raw, field, words):
    with pytest.raises(ConfigError) as info:
        from_mapping(ExperimentConfig, raw)
    assert info.value.field == field
    assert words in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("word", ["off", "on", "yes", "no", "Off", "NO"])
def test_only_true_and_false_are_booleans_in_files_and_overrides(tmp_path, word):
    """YAML 1.2: `mode: off` is the string "off" (YAML 1.1 made it False, refused as "must be a
    string"); a boolean field given such a word is refused naming it and the word."""
    spec = tmp_path / "exp.yaml"
    spec.write_text(f"privacy: {{mode: {word}}}\neval: {{clients: false}}\n")
    for source in (lambda: load_config(spec), lambda: load_config(None, [f"privacy.mode={word}"])):
        if word == "off":
            assert source().privacy.mode == "off"
        else:
            with pytest.raises(ConfigError) as err:
                source()
            assert err.value.field == "privacy.mode" and err.value.value == word
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"eval.clients={word}"])
    assert err.value.field == "eval.clients" and err.value.value == word and "true or false" in str(err.value)
    assert load_config(None, ["eval.clients=True"]).eval.clients is True
    assert load_config(None, ["eval.clients=false"]).eval.clients is False


def test_yaml_syntax_error_reports_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(bad)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedsec", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, words", [
    (["run", "does-not-exist.yaml"], "no such file"),
    (["run", "experiments/quickstart.yaml", "--set", "training.lr=-3"], "training.lr = -3.0"),
    (["run", "experiments/quickstart.yaml", "--set", "trainingLR"], "--set"),
    (["run", "experiments/quickstart.yaml", "--set", "lora.rnk=4"], "did you mean 'rank'"),
    (["run"], "config"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_bad_input_is_one_line_exit_2(args, words):
    proc = _cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert words in lines[0] and "Traceback" not in proc.stderr


def test_cli_config_prints_annotated_resolved_config():
    proc = _cli("config", "experiments/quickstart.yaml", "--set", "federation.rounds=7")
    assert proc.returncode == 0
    assert "rounds: 7  # number of federated rounds" in proc.stdout


def test_cli_datasets_lists_the_anchor_sets():
    out = _cli("datasets").stdout
    for name in ("vicgalle/alpaca-gpt4", "Anthropic/hh-rlhf", "TIGER-Lab/MathInstruct",
                 "HuggingFaceH4/ultrafeedback_binarized", "FedLLM-Bench/Fed-Aya"):
        assert name in out


def test_sweep_expands_variants_times_seeds_and_validates(tmp_path):
    from fedsec.sweeps import expand

    root, runs, base_file, _ = expand("experiments/algorithms.yaml")
    assert len(runs) == 7 * 3 and base_file.name == "quickstart.yaml"
    assert runs[0].overrides[-1] == "seed=0" and "federation.local_only_clients=2" in runs[0].overrides
    assert root.name == "algorithms"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nseeds: [0]\nvariants: {a: [lora.rank=2]}\nbse: {}\n")
    with pytest.raises(ConfigError, match="sweep.bse"):
        expand(bad)


def test_every_shipped_experiment_and_sweep_validates():
    """Each file in experiments/ is a config or a sweep whose every run's config loads."""
    from pathlib import Path

    from fedsec.sweeps import expand

    checked = 0
    for path in sorted(Path("experiments").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if "variants" in spec or "grid" in spec or "epsilons" in spec:
            _, runs, base_file, _ = expand(path)
            for run in runs:
                load_config(base_file, list(run.overrides))
                checked += 1
        else:
            load_config(path)
            checked += 1
    assert checked > 50  # the grids alone hold 35 runs


def test_settings_the_run_never_reads_are_named_with_what_leaves_them_unread(capsys):
    """FedProx's mu under FedAvg, FedAdam's tau under FedAvgM, dpo.beta for task sft, the
    re-alignment's rate without its steps: each was dropped without a word. They are noted at
    setup (a sweep's base may set them for some variants), and the ones in use are not."""
    from fedsec import progress
    from fedsec.setup import build_federation

    base = {"model": {"name": "tiny"}, "data": {"benchmark": {"num_clients": 4, "examples_per_client": 2}}}
    cfg = load_config(base, ["federation.prox_mu=0.5", "federation.tau=0.1", "federation.algorithm=fedavgm",
                             "federation.server_momentum=0.5", "dpo.beta=0.5", "defense.realign_lr=0.1",
                             "privacy.clip_lr=0.1"])
    assert cfg.unused_fields() == {"federation.tau": "federation.algorithm fedavgm",
                                   "federation.prox_mu": "federation.algorithm fedavgm",
                                   "dpo.beta": "task sft", "defense.realign_lr": "defense.realign_steps 0",
                                   "privacy.clip_lr": "privacy.adaptive_clipping false"}
    with progress.showing(True):
        build_federation(cfg)
    assert capsys.readouterr().err == (
        "fedsec: set but not used by this run: federation.tau (federation.algorithm fedavgm), federation.prox_mu "
        "(federation.algorithm fedavgm), dpo.beta (task sft), defense.realign_lr (defense.realign_steps 0), "
        "privacy.clip_lr (privacy.adaptive_clipping false)\n")
    # in use: FedProx reads mu, FedAdam tau, DPO beta; defaults are never named
    used = load_config(base, ["federation.algorithm=fedprox", "federation.prox_mu=0.5"])
    assert used.unused_fields() == {} and load_config(base).unused_fields() == {}
    assert load_config(base, ["federation.algorithm=fedadam", "federation.tau=0.1"]).unused_fields() == {}
    assert load_config(base, ["task=dpo", "dpo.beta=0.5"]).unused_fields() == {}
    # a plugin's federation fields count as read when its constructor names them
    assert "federation.server_momentum" not in cfg.unused_fields()
    more = load_config(base, ["training.lr_schedule=constant", "training.min_lr=1e-6", "eval.canary_candidates=500",
                              "eval.mia_examples=50"])
    assert more.unused_fields() == {"training.min_lr": "training.lr_schedule constant",
                                    "eval.canary_candidates": "eval.canaries false",
                                    "eval.mia_examples": "eval.mia false"}
    assert load_config(base, ["training.min_lr=1e-6"]).unused_fields() == {}  # the cosine schedule's floor
    # a file's split settings do nothing to the embedded benchmark, and test_fraction nothing beside data.test
    split = load_config(base, ["data.test_fraction=0.3", "data.partition={scheme: iid, num_clients: 3}"])
    assert split.unused_fields() == {"data.test_fraction": "data.source embedded",
                                     "data.partition": "data.source embedded"}
    # canaries are SFT records: DPO trains on none of them (eval.canaries is refused outright)
    planted = load_config(base, ["task=dpo", "data.benchmark.canaries_per_client=1", "data.benchmark.canary_repeats=3"])
    assert planted.unused_fields() == {
        "data.benchmark.canaries_per_client": "task dpo: canaries are planted in SFT records, which DPO never "
                                              "trains on",
        "data.benchmark.canary_repeats": "task dpo: canaries are planted in SFT records, which DPO never trains on"}
    assert load_config(base, ["data.benchmark.canaries_per_client=1"]).unused_fields() == {}
    beside = load_config(base, ["data.source=mine.jsonl", "data.test=test.jsonl", "data.test_fraction=0.3"])
    files = "the data come from files: it shapes the embedded benchmark only"
    assert beside.unused_fields() == {"data.test_fraction": "data.test or data.silos: nothing is carved for the "
                                                            "global test set",
                                      "data.benchmark.num_clients": files,  # the base's, for the embedded benchmark
                                      "data.benchmark.examples_per_client": files}
