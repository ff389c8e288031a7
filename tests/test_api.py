"""fedsec from Python: fedsec.run / load_config / sweep / report, and the CLI on top of them."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml
from conftest import TINY

import fedsec
from fedsec.cli import main


def _yaml(tmp_path, name="exp.yaml", **extra):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs"), **extra}, sort_keys=False))
    return path


def _plugin(tmp_path, monkeypatch, name: str, source: str) -> None:
    """`source` as the module `name` in a folder on the path, as a researcher's plugin outside
    the repository, imported afresh by the next run."""
    import sys

    plugs = tmp_path / "plugs"
    plugs.mkdir(exist_ok=True)
    (plugs / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(plugs))
    sys.modules.pop(name, None)


def test_a_notebook_runs_an_experiment_with_overrides_and_gets_a_typed_result(tmp_path):
    spec = _yaml(tmp_path)
    result = fedsec.run(spec, overrides=["federation.rounds=1"], out=tmp_path / "x", progress=False,
                        log=lambda _: None)
    assert isinstance(result, fedsec.RunResult) and result.finished and result.rounds_done == 1
    assert result.run_dir == str(tmp_path / "x")
    written = json.loads((tmp_path / "x" / "result.json").read_text())
    assert written["final"] == result.final and written["rounds_done"] == 1
    # the CLI's run of the same experiment gives the same numbers (same machine, same seed)
    assert main(["run", str(spec), "--set", "federation.rounds=1", "--out", str(tmp_path / "cli"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "cli" / "result.json").read_text())["final"] == result.final
    cfg = fedsec.load_config(spec, ["federation.rounds=1"])
    assert cfg.federation.rounds == 1 and cfg.model.name == "tiny"
    # the YAML's content as a mapping of sections, as a notebook writes it: the same experiment
    content = yaml.safe_load(spec.read_text())
    assert fedsec.load_config(content, ["federation.rounds=1"]) == cfg
    assert content == yaml.safe_load(spec.read_text())  # the overrides left the caller's mapping alone
    with pytest.raises(fedsec.ConfigError, match="federation.rounds"):
        fedsec.load_config({**content, "federation": {"rounds": 0}})
    # read back from its directory, the result is the one returned; it is a path to that directory
    assert fedsec.RunResult.read(tmp_path / "x") == result
    pdf = fedsec.report(result)
    assert pdf == tmp_path / "x" / "report.pdf" and pdf.is_file()
    with pytest.raises(fedsec.ConfigError, match="already exists"):
        fedsec.report(tmp_path / "x")


def test_a_library_run_with_progress_off_prints_nothing_of_its_libraries(tmp_path, capfd):
    """No bar from transformers (loading the model, saving the adapter) and no FutureWarning
    that peft triggers; the caller's own transformers settings are left as they were."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a fresh interpreter (the CLI turns it off for its process)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fedsec.run(_yaml(tmp_path), overrides=["federation.rounds=1"], out=tmp_path / "x", progress=False,
                       log=lambda _: None)
        assert hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_the_public_names_stay_themselves_after_every_fedsec_module_is_imported():
    """A submodule named like a public call would replace it once imported (the sweep module
    did: after fedsec.report, `fedsec.sweep(...)` was a module, not callable)."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(fedsec.__path__, "fedsec."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    for name in fedsec.__all__:
        if name != "__version__":
            assert getattr(fedsec, name) is getattr(importlib.import_module(fedsec._PUBLIC[name]), name), name


def test_dir_lists_the_public_names():
    """They are provided on first use (`__getattr__`), so dir() (a notebook's completion) must
    name them itself."""
    assert set(fedsec.__all__) <= set(dir(fedsec))


def test_the_cli_runs_through_fedsec_run(tmp_path, monkeypatch):
    import fedsec.api

    calls = []
    monkeypatch.setattr(fedsec.api, "run", lambda cfg, **kw: calls.append((cfg, kw)) or fedsec.RunResult(
        str(tmp_path), 1, False, None, None, None))
    assert main(["run", str(_yaml(tmp_path)), "--set", "federation.rounds=2", "--no-progress"]) == 0
    (cfg, kw), = calls
    assert cfg.federation.rounds == 2 and kw["progress"] is False


def test_bad_api_input_raises_the_one_line_config_error(tmp_path):
    cfg = fedsec.load_config(_yaml(tmp_path))
    with pytest.raises(fedsec.ConfigError) as err:
        fedsec.run(cfg, overrides=["federation.rounds=1"])
    assert err.value.field == "overrides"
    with pytest.raises(fedsec.ConfigError) as err:
        fedsec.report(tmp_path / "nowhere")
    assert err.value.field == "report DIR"
    with pytest.raises(fedsec.ConfigError) as err:
        fedsec.run(cfg, stop_after=0)
    assert err.value.field == "stop_after"
    (tmp_path / "unfinished").mkdir()
    for read in (fedsec.RunResult.read, fedsec.SweepResult.read):
        with pytest.raises(fedsec.ConfigError, match=r"has no (result|summary)\.json"):
            read(tmp_path / "unfinished")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n"])
def test_an_empty_experiment_file_is_refused_in_one_line(tmp_path, capsys, text):
    # it used to start a full default run of SmolLM2 (30 layers, no prefix cache)
    spec = tmp_path / "empty.yaml"
    spec.write_text(text)
    assert main(["run", str(spec), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config = " in err and "is empty" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


PLUGIN = '''
import torch

import fedsec

CALLS = []


ATTACKS = []


@fedsec.register("update_attack", "push")
def push(own, honest, ctx, *, offset: float = 1.0):
    """Each attacker sends the honest mean plus `offset` in every coordinate (a test plugin)."""
    out = honest.mean(0) + offset
    ATTACKS.append((own.clone(), honest.clone(), out.clone()))
    return out


@fedsec.register("aggregator", "scaled_mean")
def scaled_mean(deltas, weights, *, scale: float = 1.0):
    """The weighted mean times `scale` (a test plugin)."""
    out = scale * (weights[:, None] * deltas).sum(0) / weights.sum()
    CALLS.append((deltas.clone(), weights.clone(), out.clone()))
    return out
'''


def test_a_plugin_aggregator_outside_the_repo_is_named_from_yaml_and_its_output_is_applied(tmp_path, monkeypatch):
    import importlib
    import sys

    import torch

    _plugin(tmp_path, monkeypatch, "my_rules", PLUGIN)
    spec = _yaml(tmp_path, plugins=["my_rules"], keep_checkpoints=5,
                 federation={"rounds": 2, "clients_per_round": 2, "local_only_clients": 0},
                 defense={"aggregator": "scaled_mean", "params": {"scale": 0.5}})
    result = fedsec.run(spec, out=tmp_path / "run", progress=False, log=lambda _: None)
    calls = importlib.import_module("my_rules").CALLS
    assert result.finished and len(calls) == 2
    for deltas, weights, out in calls:  # the round's accepted deltas, one row per sampled client
        assert deltas.shape[0] == 2 and deltas.shape[1] == out.shape[0] and weights.shape == (2,)
        torch.testing.assert_close(out, 0.5 * (weights[:, None] * deltas).sum(0) / weights.sum())
    # what the server applied is the plugin's output (FedAvg, server lr 1: w_t = w_{t-1} + aggregate)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("round_*.pt"))
    g1, g2 = (torch.load(p, weights_only=True)["global"] for p in ckpts[-2:])
    torch.testing.assert_close(g2 - g1, calls[1][2], rtol=0, atol=1e-7)
    # its name is checked and suggested like a built-in's, and under DP it is not certified
    with pytest.raises(fedsec.ConfigError, match="did you mean|scaled_mean"):
        fedsec.load_config(spec, ["defense.aggregator=scaled_men"])
    with pytest.raises(fedsec.ConfigError) as err:
        fedsec.load_config(spec, ["defense.params.scale=big"])
    assert err.value.field.endswith("scale")
    from fedsec.privacy import plan_privacy

    dp = fedsec.load_config(spec, ["privacy.mode=user", "privacy.noise_multiplier=1.0"])
    plan = plan_privacy(dp, 4)
    assert not plan.certified and "scaled_mean" in plan.reason
    sys.modules.pop("my_rules", None)


def test_a_plugin_update_attack_and_aggregator_run_together_from_yaml(tmp_path, monkeypatch):
    import importlib
    import sys

    import torch

    _plugin(tmp_path, monkeypatch, "my_rules", PLUGIN)
    spec = _yaml(tmp_path, plugins=["my_rules"],
                 federation={"rounds": 1, "clients_per_round": 4, "local_only_clients": 0},
                 attack={"kind": "push", "malicious": 1, "params": {"offset": 0.25}},
                 defense={"aggregator": "scaled_mean", "params": {"scale": 1.0}})
    result = fedsec.run(spec, out=tmp_path / "run", progress=False, log=lambda _: None)
    plugin = importlib.import_module("my_rules")
    assert result.finished and len(plugin.ATTACKS) == 1 and len(plugin.CALLS) == 1
    own, honest, sent = plugin.ATTACKS[0]
    deltas = plugin.CALLS[0][0]
    assert honest.shape[0] == 3 and deltas.shape[0] == 4  # every client sampled, one of them malicious
    torch.testing.assert_close(sent, honest.mean(0) + 0.25)
    # the aggregator saw the attacker's vector, and the three honest deltas unchanged
    assert sum(bool(torch.equal(row, sent)) for row in deltas) == 1
    assert all(any(torch.equal(row, h) for row in deltas) for h in honest)
    with pytest.raises(fedsec.ConfigError, match="did you mean 'offset'"):
        fedsec.load_config(spec, ["attack.params.ofset=1"])
    # typed from the plugin's annotation (offset: float) at load time, not a TypeError rounds later
    with pytest.raises(fedsec.ConfigError, match="must be a number") as err:
        fedsec.load_config(spec, ["attack.params.offset=big"])
    assert err.value.field == "attack.params.offset"
    assert fedsec.load_config(spec, ["attack.params.offset=1"]).attack.params == {"offset": 1}
    sys.modules.pop("my_rules", None)


OPTIMIZER_PLUGIN = """
import torch

import fedsec

BUILT, STEPS = [], []


@fedsec.register("server_optimizer", "clipped_step")
class ClippedStep:
    \"\"\"x <- x + server_lr * clamp(delta, -limit, limit) (a test plugin: limit is its own parameter).\"\"\"

    def __init__(self, server_lr: float = 1.0, limit: float = 1.0):
        self.server_lr, self.limit = server_lr, limit
        BUILT.append((server_lr, limit))

    def step(self, params, delta):
        out = params + self.server_lr * delta.clamp(-self.limit, self.limit)
        STEPS.append((params.clone(), delta.clone(), out.clone()))
        return out

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
"""


def test_a_plugin_server_optimizer_takes_its_own_parameters_from_federation_params(tmp_path, monkeypatch):
    """A server optimizer with a parameter of its own (not a federation field) is set from
    federation.params, beside the federation fields it shares (server_lr); its parameter is
    checked and typed like an aggregator's."""
    import importlib
    import sys

    import torch

    _plugin(tmp_path, monkeypatch, "my_server", OPTIMIZER_PLUGIN)
    spec = _yaml(tmp_path, plugins=["my_server"],
                 federation={"rounds": 2, "clients_per_round": 2, "local_only_clients": 0,
                             "algorithm": "clipped_step", "server_lr": 0.5, "params": {"limit": 1.0e-4}})
    result = fedsec.run(spec, out=tmp_path / "run", progress=False, log=lambda _: None)
    plugin = importlib.import_module("my_server")
    assert result.finished and plugin.BUILT == [(0.5, 1.0e-4)] and len(plugin.STEPS) == 2
    for params, delta, out in plugin.STEPS:
        assert float(delta.abs().max()) > 1.0e-4  # the limit binds
        torch.testing.assert_close(out, params + 0.5 * delta.clamp(-1.0e-4, 1.0e-4), rtol=0, atol=0)
    assert fedsec.load_config(spec, ["federation.params.limit=0.01"]).federation.params == {"limit": 0.01}
    for override, field, words in (("federation.params.limt=0.01", "federation.params.limt", "did you mean 'limit'"),
                                   ("federation.params.limit=big", "federation.params.limit", "must be a number"),
                                   ("federation.params.tau=0.1", "federation.params.tau", "set federation.tau")):
        with pytest.raises(fedsec.ConfigError, match=words) as err:
            fedsec.load_config(spec, [override])
        assert err.value.field == field
    with pytest.raises(fedsec.ConfigError, match="fedadam; its parameters: none"):  # none of its own
        fedsec.load_config(spec, ["federation.algorithm=fedadam"])
    sys.modules.pop("my_server", None)


NOISE_AWARE_PLUGIN = """
import fedsec

TOLD = []


@fedsec.register("server_optimizer", "noise_aware")
class NoiseAware:
    \"\"\"FedAvg that records the noise level each round's step is told (a test plugin).\"\"\"

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr

    def step(self, params, delta, noise_std=None):
        TOLD.append(noise_std)
        return params + self.server_lr * delta

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
"""


def test_a_noise_aware_server_optimizer_is_told_each_rounds_dp_noise_level(tmp_path, monkeypatch):
    """A server optimizer whose step takes noise_std gets, each round, the standard deviation of
    the DP noise in each coordinate of the aggregate: z C / (q N) from the round's published
    privacy row under user-level DP, 0.0 without DP, None under record-level DP (the noise is
    inside the clients' steps) and under correlated noise (its rounds are not independent)."""
    import importlib
    import sys

    _plugin(tmp_path, monkeypatch, "noise_aware", NOISE_AWARE_PLUGIN)
    spec = _yaml(tmp_path, plugins=["noise_aware"],
                 federation={"rounds": 2, "clients_per_round": 2, "local_only_clients": 0,
                             "algorithm": "noise_aware"})
    told = importlib.import_module("noise_aware").TOLD
    cases = {"plain": [], "user": ["privacy.mode=user", "privacy.noise_multiplier=0.7", "privacy.clip_norm=0.3"],
             "record": ["privacy.mode=record", "privacy.noise_multiplier=0.7", "privacy.clip_norm=0.3"],
             "tree": ["privacy.mode=user", "privacy.noise_multiplier=0.7", "privacy.clip_norm=0.3",
                      "privacy.mechanism=tree", "federation.sampling=cyclic"]}
    for case, overrides in cases.items():
        told.clear()
        fedsec.run(spec, overrides=overrides, out=tmp_path / case, progress=False, log=lambda _: None)
        rows = [json.loads(line) for line in (tmp_path / case / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in rows if r.get("phase") == "federated" and r["round"] >= 1]
        assert len(told) == len(rounds) == 2, case
        if case == "user":  # 2 of 4 clients a round: q N = 2
            assert told == [pytest.approx(r["privacy"]["noise_multiplier"] * r["privacy"]["clip_norm"] / 2,
                                          rel=1e-12) for r in rounds]
            assert told[0] == pytest.approx(0.7 * 0.3 / 2, rel=1e-12)
        else:
            assert told == ([0.0, 0.0] if case == "plain" else [None, None]), case
    sys.modules.pop("noise_aware", None)


def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path, capsys):
    spec = _yaml(tmp_path, plugins=["no_such_plugin_module"])
    assert main(["run", str(spec), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plugins = 'no_such_plugin_module'" in err and "PYTHONPATH" in err


def test_the_extending_guide_example_runs_from_yaml_and_passes_the_contract_suites(tmp_path, monkeypatch):
    """docs/extending.md's worked example, as a researcher runs it: the module outside the
    repo, the experiment from YAML, then fedsec's contract suites over its entries."""
    import importlib
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import torch

    root = Path(__file__).resolve().parents[1]
    examples = root / "docs" / "examples"
    plugs = tmp_path / "plugs"
    plugs.mkdir()
    shutil.copy(examples / "my_rules.py", plugs)
    monkeypatch.syspath_prepend(str(plugs))
    sys.modules.pop("my_rules", None)
    result = fedsec.run(examples / "my_experiment.yaml", out=tmp_path / "run", progress=False, log=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("phase") == "federated" and r["round"] >= 1]  # round 0: the untuned model
    assert result.finished and len(rounds) == 2
    assert all(r["defense"]["aggregator"] == "norm_trimmed_mean" for r in rounds)
    assert all(len(r["attack"]["malicious"]) == 1 for r in rounds)  # every client sampled, one malicious
    # the metric at the last evaluation is the norm of the adapter the run saved
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    norm = sum(float(v.double().pow(2).sum()) for k, v in saved.items() if "lora_B" in k) ** 0.5
    assert norm > 0 and rounds[-1]["global_eval"]["metrics"]["lora_norm"] == pytest.approx(norm, rel=1e-6)
    assert rows[0]["global_eval"]["metrics"]["lora_norm"] == 0.0  # the untuned adapter: B starts at zero
    env = {**os.environ, "FEDSEC_PLUGINS": "my_rules", "PYTHONPATH": str(plugs)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(root / "tests" / "contracts"), "-k",
                           "norm_trimmed_mean or mean_shift or lora_norm or adam_bc or simpo"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    passed = int(proc.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    # 5 aggregator contracts, 4 update-attack ones (the fifth is for shared attacks), 3 metric
    # ones, 5 server-optimizer ones (the noise-aware one included), 5 preference-loss ones
    assert passed == 22
    # adam_bc: without noise it is fedsec's FedAdam bit for bit; told a noise level, one step
    # by hand (the noise's share 0.01 phi^2 out of v, floored at 0.3^2 of that share)
    from fedsec.server import FedAdam

    plugin = importlib.import_module("my_rules")
    d, x = torch.tensor([0.3, -0.02, 0.001, -0.5]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    ours, theirs = plugin.AdamBC(server_lr=0.1, tau=1e-4), FedAdam(server_lr=0.1, tau=1e-4)
    for k in range(3):
        torch.testing.assert_close(ours.step(x, d * (k + 1), noise_std=0.0), theirs.step(x, d * (k + 1)),
                                   rtol=0, atol=0)
    phi, bc = 0.1, plugin.AdamBC(server_lr=0.1, tau=1e-4)
    share = 0.01 * phi ** 2
    v = torch.clamp(0.99 * 1e-8 + 0.01 * d * d - share, min=0.09 * share)
    assert bool((0.01 * d * d - share < 0.09 * share).any())  # the floor binds on some coordinates
    torch.testing.assert_close(bc.step(x, d, noise_std=phi), x + 0.1 * (0.1 * d) / (v.sqrt() + 1e-4))
    # simpo: one pair by hand (per-token log-probabilities -2 and -3), then task dpo trains with it
    import math

    from fedsec.preference import PairLogps

    pairs = PairLogps(*(torch.tensor([v], dtype=torch.float64) for v in (-6.0, -12.0, -1.0, -1.0, 3.0, 4.0)))
    assert float(plugin.simpo(pairs, beta=2.0, gamma=0.5)) == pytest.approx(math.log1p(math.exp(-1.5)))
    dpo = fedsec.run(examples / "my_experiment.yaml", out=tmp_path / "dpo", progress=False, log=lambda _: None,
                     overrides=["task=dpo", "dpo.loss=simpo", "dpo.beta=2.0", "dpo.params={gamma: 0.5}"])
    assert dpo.finished and dpo.final["preference"]["n"] > 0
    with pytest.raises(fedsec.ConfigError, match="dpo.params.gama .*gamma"):
        fedsec.load_config(examples / "my_experiment.yaml", ["task=dpo", "dpo.loss=simpo", "dpo.params={gama: 1}"])
    sys.modules.pop("my_rules", None)


def test_under_dp_a_plugin_metric_is_published_only_if_it_is_covered(tmp_path, monkeypatch):
    import sys

    from fedsec.disclosure import UNCOVERED
    from fedsec.rundir import RunDir

    (tmp_path / "plugs").mkdir()
    (tmp_path / "plugs" / "peek.py").write_text('''
import fedsec


@fedsec.register("metric", "peek_clients", higher_is_better=False)
def peek_clients(ctx, *, scale: int = 1):
    """The clients' training examples, counted: it reads client data, so it is not covered."""
    return scale * sum(len(c.train) for c in ctx.data.clients)
''')
    monkeypatch.syspath_prepend(str(tmp_path / "plugs"))
    sys.modules.pop("peek", None)
    spec = _yaml(tmp_path, plugins=["peek"], federation={"rounds": 2, "clients_per_round": 2},
                 privacy={"mode": "user", "noise_multiplier": 1.0, "clip_norm": 0.5},
                 eval={"metrics": {"adapter_norm": {}, "peek_clients": {}}})
    lines: list[str] = []
    fedsec.run(spec, out=tmp_path / "run", progress=False, log=lines.append)
    published = (tmp_path / "run" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in published.splitlines()]
    assert all("adapter_norm" in r["global_eval"]["metrics"] for r in rows if r.get("global_eval"))
    assert "peek_clients" not in published and not any("peek_clients" in line for line in lines)
    assert any("adapter_norm" in line for line in lines)
    # its declared direction is the code's, not the data's: result.json records it for the report
    assert json.loads((tmp_path / "run" / "result.json").read_text())["metric_directions"] == {"peek_clients": False}
    hidden = (tmp_path / "run" / UNCOVERED / "metrics.jsonl").read_text()
    merged = RunDir(tmp_path / "run").read_metrics()
    total = sum(1 for line in hidden.splitlines() if "peek_clients" in line)
    assert total == len([r for r in merged if r.get("global_eval")]) == 3  # rounds 0, 1 and 2
    assert all(r["global_eval"]["metrics_uncovered"]["peek_clients"] > 0 for r in merged if r.get("global_eval"))
    with pytest.raises(fedsec.ConfigError, match="eval.metrics.peek_client .*peek_clients"):
        fedsec.load_config(spec, ["eval.metrics={peek_client: {}}"])
    with pytest.raises(fedsec.ConfigError, match="must be an integer") as err:  # peek_clients(scale: int)
        fedsec.load_config(spec, ["eval.metrics={peek_clients: {scale: 0.5}}"])
    assert err.value.field == "eval.metrics.peek_clients.scale"
    sys.modules.pop("peek", None)


def test_a_notebook_sweeps_and_gets_its_tables_per_run_and_per_variant(tmp_path, monkeypatch):
    """fedsec.sweep returns a SweepResult: one row per run and the per-variant means and
    standard deviations over the seeds (checked against the rows), the same numbers as the
    CSV tables, under DP only what the DP runs publish; it is a path to the directory."""
    import csv
    import os
    import statistics

    monkeypatch.chdir(tmp_path)
    base = _yaml(tmp_path, federation={"rounds": 1, "clients_per_round": 2, "sampling": "poisson",
                                       "local_only_clients": 1})
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"name": "nb", "base": str(base), "seeds": [0, 1],
                                    "variants": {"plain": []}, "epsilons": [8],
                                    "set": ["privacy.delta=1e-2"]}))
    swept = fedsec.sweep(spec, progress=False, log=lambda _: None)
    assert isinstance(swept, fedsec.SweepResult) and os.fspath(swept) == str(swept.directory)
    assert swept.directory.resolve() == (tmp_path / "runs" / "nb").resolve()
    assert [(r["variant"], r["seed"]) for r in swept.runs] == [("plain", 0), ("plain", 1), ("eps8", 0), ("eps8", 1)]
    for name in ("plain", "eps8"):
        values = [r["final_loss"] for r in swept.runs if r["variant"] == name]
        row = swept.variant(name)
        assert row["seeds"] == 2 and row["final_loss_mean"] == statistics.fmean(values)
        assert row["final_loss_std"] == statistics.stdev(values)
    assert swept.variant("plain")["local_only_loss_mean"] is not None
    assert all(r["local_only_loss"] is None for r in swept.runs if r["variant"] == "eps8")  # not covered under DP
    with open(swept.directory / "summary.csv") as f:
        written = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(written["eps8"]["final_loss_mean"]) == swept.variant("eps8")["final_loss_mean"]
    with pytest.raises(KeyError, match="plain"):
        swept.variant("eps2")
    assert fedsec.report(swept) == swept.directory / "report.pdf"
    assert fedsec.SweepResult.read(swept.directory) == swept
    # the sweep file's content as a mapping, as a notebook writes it: the same runs, all finished
    content = yaml.safe_load(spec.read_text())
    said: list[str] = []
    assert fedsec.sweep(content, progress=False, log=said.append) == swept
    assert sum("finished earlier, skipped" in line for line in said) == 4
    assert content == yaml.safe_load(spec.read_text())  # the caller's mapping left as it was
    with pytest.raises(fedsec.ConfigError, match="a sweep file's path or its content as a mapping"):
        fedsec.sweep(["not", "a", "sweep"], progress=False)
