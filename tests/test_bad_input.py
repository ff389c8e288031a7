"""Bad input everywhere a user touches: each case ends with exit status 2 and one line on
stderr that names the field, with no traceback and no run directory left behind; and
property tests of the config parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsec.cli import main
from fedsec.config import ExperimentConfig, apply_override, dump_config, from_mapping, load_config, to_mapping
from fedsec.errors import ConfigError


def _tiny(**changes) -> dict:
    """TINY with dotted-path changes ({"privacy.epsilon": 0}); None deletes nothing."""
    raw = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def _data_file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


GOOD_ROWS = b"".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}", "uid": str(i % 2)}).encode() + b"\n"
                     for i in range(12))
FILE_DATA = {"data.partition": {"scheme": "natural", "by": "uid"}, "data.fields": {"prompt": "prompt",
                                                                                   "response": "response"}}

# (id, config changes or a callable(tmp) -> changes, extra CLI arguments, the field the line must name)
CONFIG_CASES = [
    ("unknown-top-key", {"federaton": {"rounds": 2}}, "federaton", "did you mean 'federation'"),
    ("unknown-nested-key", {"privacy.epsilonn": 3}, "privacy.epsilonn", "did you mean 'epsilon'"),
    ("unknown-section-key", {"training.learning_rate": 1e-3}, "training.learning_rate", "unknown key"),
    ("rounds-not-int", {"federation.rounds": "ten"}, "federation.rounds", "integer"),
    ("rounds-bool", {"federation.rounds": True}, "federation.rounds", "integer"),
    ("rounds-zero", {"federation.rounds": 0}, "federation.rounds", ">= 1"),
    ("bool-as-string", {"eval.clients": "yes"}, "eval.clients", "true or false"),
    ("lr-not-number", {"training.lr": "fast"}, "training.lr", "number"),
    ("lr-negative", {"training.lr": -1e-3}, "training.lr", "(0, 100]"),
    ("section-not-mapping", {"privacy": 5}, "privacy", "mapping"),
    ("epsilon-zero", {"privacy.mode": "user", "privacy.epsilon": 0}, "privacy.epsilon", "> 0"),
    ("epsilon-negative", {"privacy.mode": "user", "privacy.epsilon": -2.0}, "privacy.epsilon", "> 0"),
    ("epsilon-and-sigma", {"privacy.mode": "user", "privacy.epsilon": 2.0, "privacy.noise_multiplier": 1.0},
     "privacy.epsilon", "exactly one"),
    ("delta-one", {"privacy.mode": "user", "privacy.epsilon": 2.0, "privacy.delta": 1.0}, "privacy.delta",
     "(0, 0.5)"),
    ("delta-half", {"privacy.mode": "user", "privacy.epsilon": 2.0, "privacy.delta": 0.5}, "privacy.delta",
     "(0, 0.5)"),
    ("prv-grid-too-large", {"privacy.mode": "user", "privacy.noise_multiplier": 0.3, "privacy.accountant": "prv",
                            "federation.rounds": 100000, "federation.clients_per_round": 1,
                            "privacy.delta": 1e-5}, "privacy.accountant", "grid"),
    ("delta-above-1-over-n", {"privacy.mode": "user", "privacy.epsilon": 2.0, "privacy.delta": 0.3},
     "privacy.delta", "1 / clients"),
    ("clip-zero", {"privacy.mode": "user", "privacy.epsilon": 2.0, "privacy.clip_norm": 0}, "privacy.clip_norm",
     "> 0"),
    ("clip-negative", {"privacy.clip_norm": -1.0}, "privacy.clip_norm", "> 0"),
    ("privacy-mode-typo", {"privacy.mode": "users"}, "privacy.mode", "one of off, user, record"),
    ("accountant-unknown", {"privacy.accountant": "gdp"}, "privacy.accountant", "rdp"),
    ("budget-zero", {"privacy.mode": "user", "privacy.epsilon": 2.0, "privacy.epsilon_budget": 0},
     "privacy.epsilon_budget", "> 0"),
    ("budget-without-dp", {"privacy.epsilon_budget": 4.0}, "privacy.epsilon_budget", "privacy.mode"),
    ("on-budget-unknown", {"privacy.on_budget": "explode"}, "privacy.on_budget", "stop, warn"),
    ("dp-with-fixed-sampling", {"privacy.mode": "user", "privacy.epsilon": 2.0, "federation.sampling": "fixed"},
     "federation.sampling", "Poisson"),
    ("q-zero", {"federation.clients_per_round": 0}, "federation.clients_per_round", ">= 1"),
    ("q-above-one", {"federation.clients_per_round": 9}, "federation.clients_per_round", "at most"),
    ("more-malicious-than-clients", {"attack.kind": "sign_flip", "attack.malicious": 9}, "attack.malicious",
     "at most"),
    ("malicious-fraction", {"attack.kind": "sign_flip", "attack.fraction": 1.5}, "attack.fraction", "[0, 1]"),
    ("attack-param-typo", {"attack.kind": "sign_flip", "attack.params": {"scal": 2.0}}, "attack.params.scal",
     "did you mean 'scale'"),
    ("krum-too-few", {"defense.aggregator": "krum", "defense.f": 1}, "defense.f", "krum"),
    ("bulyan-too-few", {"defense.aggregator": "bulyan", "defense.f": 1}, "defense.f", "bulyan"),
    ("aggregator-unknown", {"defense.aggregator": "krumm"}, "defense.aggregator", "one of"),
    ("lora-rank-zero", {"lora.rank": 0}, "lora.rank", ">= 1"),
    ("quantization-unknown", {"model.quantization": "3bit"}, "model.quantization", "none, 8bit, 4bit"),
    # this suite runs on machines without CUDA (a GPU machine skips the first: tests/test_precision.py)
    *([("device-cuda-absent", {"model.device": "cuda"}, "model.device", "no CUDA device")]
      if not torch.cuda.is_available() else []),
    ("device-unknown", {"model.device": "gpu0"}, "model.device", "cuda:N"),
    ("device-mps-quantized", {"model.device": "mps", "model.quantization": "4bit"}, "model.device", "not mps"),
    ("precision-unknown", {"training.precision": "fp8"}, "training.precision", "fp32, bf16, fp16"),
    ("record-dp-checkpointing", {"privacy.mode": "record", "privacy.epsilon": 8.0, "privacy.delta": 1e-3,
                                 "training.gradient_checkpointing": True}, "training.gradient_checkpointing",
     "twice"),
    ("record-dp-fp16", {"privacy.mode": "record", "privacy.epsilon": 8.0, "privacy.delta": 1e-3,
                        "training.precision": "fp16"}, "training.precision", "use bf16"),
    ("model-name-unknown", {"model.name": "no-such-model-xyz"}, "model.name", ""),
    ("model-folder-missing", {"model.name": "/nonexistent/my-model"}, "model.name", "no such folder"),
    ("model-folder-a-file", lambda tmp: {"model.name": _data_file(tmp, "weights.bin", b"0")}, "model.name",
     "no such folder (it is a file)"),
    ("seed-negative", {"seed": -1}, "seed", ">= 0"),
    ("name-with-slash", {"name": "a/b"}, "name", "letters"),
    ("eval-every-zero", {"eval.every": 0}, "eval.every", ">= 1"),
    ("keep-checkpoints-zero", {"keep_checkpoints": 0}, "keep_checkpoints", ">= 1"),
    ("max-length-too-small", {"data.max_length": 12}, "data.max_length", "raise it"),
    ("data-missing-file", {"data.source": "/nonexistent/data.jsonl"}, "data.source", "no such file"),
    ("data-non-utf8", lambda tmp: {**FILE_DATA, "data.source": _data_file(tmp, "latin.jsonl",
                                                                          b'{"prompt": "caf\xe9"}\n')},
     "data.source", "UTF-8"),
    ("data-bad-json", lambda tmp: {**FILE_DATA, "data.source": _data_file(tmp, "bad.jsonl", b'{"prompt": \n')},
     "data.source", "invalid JSON"),
    ("data-missing-field", lambda tmp: {**FILE_DATA, "data.fields": {"prompt": "question", "response": "response"},
                                        "data.source": _data_file(tmp, "rows.jsonl", GOOD_ROWS)},
     "data.fields", "no such column"),
    ("data-empty", lambda tmp: {**FILE_DATA, "data.source": _data_file(tmp, "empty.jsonl", b"\n\n")},
     "data.source", "0 usable examples"),
    ("data-giant-line", lambda tmp: {**FILE_DATA, "data.source": _data_file(
        tmp, "giant.jsonl", b'{"prompt": "' + b"x" * (17 << 20) + b'", "response": "a"}\n')},
     "data.source", "longer than"),
    ("data-giant-csv-field", lambda tmp: {**FILE_DATA, "data.source": _data_file(
        tmp, "giant.csv", b"prompt,response,uid\n" + b"y" * (17 << 20) + b",a,0\n")},
     "data.source", "longer than"),
    ("benchmark-unknown", {"eval.benchmarks": [{"name": "mmmlu"}]}, "eval.benchmarks[0].name", "one of"),
    ("benchmark-missing-file", {"eval.benchmarks": [{"name": "fpb", "source": "/nonexistent/fpb.jsonl"}]},
     "eval.benchmarks[fpb].source", "no such file"),
    ("benchmark-wrong-schema", lambda tmp: {"eval.benchmarks": [{"name": "tfns", "source": _data_file(
        tmp, "tfns.jsonl", b'{"tweet": "up", "label": 1}\n')}]}, "eval.benchmarks[tfns]", "no column 'text'"),
    ("silos-and-source", {"data.silos": ["a.jsonl"], "data.source": "b.jsonl"}, "data.source",
     "remove data.source"),
    ("silo-missing-file", {**FILE_DATA, "data.silos": ["/nonexistent/org.jsonl"]}, "data.silos[0]", "no such file"),
    ("embedded-with-test-file", {"data.test": "test.jsonl"}, "data.test", "remove data.test"),
    ("flower-reads-a-local-file", lambda tmp: {**FILE_DATA, "engine": "flower",
                                               "data.source": _data_file(tmp, "all.jsonl", GOOD_ROWS)},
     "data.source", "data.silos"),
    ("flower-silos-membership-inference", {**FILE_DATA, "engine": "flower", "data.silos": ["a.jsonl", "b.jsonl"],
                                           "eval.mia": True}, "eval.mia", "stay on their SuperNodes"),
    ("secagg-with-a-robust-rule", {"engine": "flower", "flower.secagg": True, "defense.aggregator": "median"},
     "defense.aggregator", "secure aggregation hides"),
    ("secagg-in-process", {"flower.secagg": True}, "flower.secagg", "set engine: flower"),
    ("secagg-one-supernode", {"engine": "flower", "flower.secagg": True, "flower.supernodes": 1},
     "flower.supernodes", "at least 2 SuperNodes"),
    ("data-partition-unknown-field", lambda tmp: {**FILE_DATA, "data.partition": {"scheme": "natural", "by": "user"},
                                                  "data.source": _data_file(tmp, "rows2.jsonl", GOOD_ROWS)},
     "data.partition.by", ""),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_config_or_dataset_is_one_line_exit_2_and_leaves_no_run(tmp_path, capsys, case):
    _, changes, field, hint = case
    changes = changes(tmp_path) if callable(changes) else changes
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({**_tiny(**changes), "output_dir": str(tmp_path / "runs")}))
    _check(capsys, ["run", str(config), "--no-progress"], field, hint)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _check(capsys, argv: list[str], field: str, hint: str) -> str:
    with _no_exit() as code:
        code.value = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert code.value == 2, err
    assert len(lines) == 1 and lines[0].startswith("fedsec: error: "), err
    assert field in lines[0] and hint in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


class _no_exit:
    """main() returns a status; argparse's errors raise SystemExit: both become `.value`."""

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is SystemExit:
            self.value = err.code
            return True
        return False


def _files(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_bad_command_lines_are_one_line_exit_2_and_overwrite_nothing(tmp_path, capsys):
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({**_tiny(**{"federation.rounds": 2}), "output_dir": str(tmp_path / "runs")}))
    broken = tmp_path / "broken.yaml"
    broken.write_text("federation:\n  rounds: [1,\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- rounds: 1\n")
    existing = tmp_path / "runs" / "taken"
    existing.mkdir(parents=True)
    (existing / "notes.txt").write_text("my notes")
    before = _files(tmp_path / "runs")
    cases = [
        (["run", str(tmp_path / "missing.yaml")], "config", "no such file"),
        (["run", str(broken)], "config", "YAML syntax error at line"),
        (["run", str(listed)], "config", "top level must be a mapping"),
        (["run", str(config), "--set", "federation.rounds"], "--set", "key.path=value"),
        (["run", str(config), "--set", "a..b=1"], "--set", "dotted path"),
        (["run", str(config), "--set", "seed.x=1"], "seed", "not a section"),
        (["run", str(config), "--set", "federation.rounds=many"], "federation.rounds", "integer"),
        (["run", str(config), "--stop-after", "0"], "--stop-after", ">= 1"),
        (["run", str(config), "--stop-after", "two"], "--stop-after", "invalid int"),
        (["run", str(config), "--engine", "mpi"], "--engine", "invalid choice"),
        (["run", str(config), "--out", str(existing)], "--out", "already exists"),
        (["run", str(config), "--out", str(existing), "--resume"], "--resume", "not a fedsec run directory"),
        (["run", str(config), "--resume"], "--resume", "no earlier run"),
        (["runn", str(config)], "runn", "invalid choice"),
        (["sweep", str(tmp_path / "nope.yaml")], "nope.yaml", "no such file"),
        (["report", str(tmp_path / "nowhere")], "nowhere", ""),
        (["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5", "--rounds", "10"],
         "sample", "(0, 1]"),
        (["privacy", "calibrate", "--epsilon", "-1", "--sample-rate", "0.1", "--rounds", "10"], "epsilon", "> 0"),
        (["audit", "bound", "--canaries", "10", "--guesses", "20", "--correct", "5", "--delta", "1e-5"],
         "guesses", ""),
        (["cache-model", "gpt-5"], "model", "invalid choice"),
    ]
    for argv, field, hint in cases:
        _check(capsys, argv, field, hint)
    assert _files(tmp_path / "runs") == before  # nothing existing touched, nothing new


def test_a_changed_config_on_resume_is_refused_without_touching_the_run(tmp_path, capsys):
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({**_tiny(**{"federation.rounds": 2}), "output_dir": str(tmp_path / "runs")}))
    out = tmp_path / "runs" / "one"
    assert main(["run", str(config), "--out", str(out), "--stop-after", "1", "--no-progress"]) == 0
    capsys.readouterr()
    before = _files(out)
    _check(capsys, ["run", str(config), "--out", str(out), "--resume", "--set", "training.lr=0.01"], "--resume",
           "config differs")
    assert _files(out) == before


# ---------------------------------------------------------------------------
# Property tests of the config parser.

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=10), inner, max_size=3)),
                       max_leaves=8)
_sections = [f.name for f in ExperimentConfig.__dataclass_fields__.values()]


@st.composite
def _near_configs(draw):
    """TINY with a few fields replaced by arbitrary values, keys sometimes misspelled."""
    raw = json.loads(json.dumps(TINY))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(_sections))
        field_type = ExperimentConfig.__dataclass_fields__[section].type
        if "Config" in str(field_type):
            sub = draw(st.sampled_from(list(getattr(ExperimentConfig(), section).__dataclass_fields__)))
            key = sub if draw(st.integers(0, 5)) else sub + draw(st.text(min_size=1, max_size=2))
            raw.setdefault(section, {})
            if isinstance(raw[section], dict):
                raw[section][key] = draw(_values)
        else:
            raw[section] = draw(_values)
    return raw


@pytest.mark.parametrize("key", ["name\n", "na\tme", "name\x00", "\u2028name"])
def test_an_unknown_key_with_control_characters_is_named_on_one_line(key):
    """Found by the property below in CI: a key "name\n" made a two-line message."""
    with pytest.raises(ConfigError) as caught:
        from_mapping(ExperimentConfig, {"name": "x", "model": {"name": "tiny", key: None}})
    err = caught.value
    assert err.field == "model." + key.encode("unicode_escape").decode()
    assert str(err).splitlines() == [str(err)] and "unknown key" in str(err)


def test_a_long_value_keeps_both_ends_in_its_one_line():
    """A long path is cut in the middle: the message still names the file (under a deep
    temporary directory the old cut at 77 characters dropped "nope.yaml")."""
    path = "/tmp/" + "deep/" * 30 + "nope.yaml"
    message = str(ConfigError("config", path, "no such file"))
    shown = message.removeprefix("config = ").removesuffix(": no such file")
    assert len(shown) == 80 and shown.startswith("'/tmp/deep/") and shown.endswith("/nope.yaml'")
    assert shown == repr(path)[:38] + "..." + repr(path)[-39:]
    assert str(ConfigError("config", "short.yaml", "x")) == "config = 'short.yaml': x"  # kept whole


@settings(max_examples=400, deadline=None)
@given(_near_configs())
def test_the_parser_returns_a_valid_config_or_one_config_error_naming_a_field(raw):
    try:
        cfg = from_mapping(ExperimentConfig, raw)
    except ConfigError as err:
        assert err.field and "\n" not in str(err) and str(err).startswith(err.field)
        return
    # a config that parses survives the round trip through its resolved YAML unchanged
    again = from_mapping(ExperimentConfig, yaml.safe_load(dump_config(cfg)))
    assert again == cfg and dump_config(again) == dump_config(cfg)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["federation.rounds", "training.local_steps", "lora.rank", "eval.every"]),
       st.integers(1, 10**6))
def test_an_override_sets_exactly_that_field(key, value):
    cfg = load_config(None, [f"{key}={value}"])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value
    mapping = to_mapping(cfg)
    mapping[section][name] = to_mapping(ExperimentConfig())[section][name]
    assert from_mapping(ExperimentConfig, mapping) == ExperimentConfig()
    assert apply_override({}, f"{key}={value}") == {section: {name: value}}
