from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_config

from fedsec.adapter import AdapterParams
from fedsec.data import build_federated_data
from fedsec.defenses import sanitize, weighted_mean
from fedsec.encoding import collate, encode_all
from fedsec.errors import ConfigError
from fedsec.loop import run_experiment
from fedsec.models import attach_lora, load_base_model
from fedsec.results import ClientUpdate
from fedsec.seeding import derive_seed, scoped_torch_seed
from fedsec.server import sample_clients
from fedsec.training import round_lr


def _final(run_dir) -> torch.Tensor:
    ckpts = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    return torch.load(ckpts[-1], weights_only=True)["global"]


def aggregate(updates, dim, tmp_path, **defense):
    """The server pipeline without DP (sanitize -> rule): (aggregate, rejected, the rule's report)."""
    from fedsec.pipeline import build_pipeline

    batch = build_pipeline(tiny_config(tmp_path, defense=defense), tmp_path, dim)(updates, 0)
    return batch.aggregate, batch.rejected, batch.info.get("rule")


def test_fedavg_of_known_deltas_is_the_weighted_mean(tmp_path):
    deltas = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, -2.0], [0.0, 8.0, 1.0]])
    weights = torch.tensor([1.0, 3.0, 4.0])
    expected = torch.tensor([(1 + 9 + 0) / 8, (0 + 12 + 32) / 8, (2 - 6 + 4) / 8])
    torch.testing.assert_close(weighted_mean(deltas, weights), expected)
    updates = [ClientUpdate(i, d, int(w)) for i, (d, w) in enumerate(zip(deltas, weights))]
    agg, rejected, info = aggregate(updates, 3, tmp_path)
    torch.testing.assert_close(agg, expected)
    assert rejected == () and info is None


def test_sanitize_rejects_nonfinite_misshapen_and_absurd_updates(tmp_path):
    good = torch.ones(3)
    updates = [good, torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([float("inf"), 0, 0]),
               torch.ones(4), good * 3]
    assert sanitize(updates, 3).rejected == (1, 2, 3)
    agg, rejected, _ = aggregate([ClientUpdate(i, d, 1) for i, d in enumerate(updates)], 3, tmp_path)
    assert rejected == (1, 2, 3)
    torch.testing.assert_close(agg, torch.full((3,), 2.0))
    # norms 1.73, 5.2 and 1e4 * 1.73 against a bound of 10: the huge one is rejected
    huge = [good, good * 3, good * 1e4, good.double(), good.long()]
    assert sanitize(huge, 3, max_norm=10.0).rejected == (2, 3, 4)  # and the float64 and integer tensors
    agg, rejected, _ = aggregate([ClientUpdate(i, d, 1) for i, d in enumerate(huge[:3])], 3, tmp_path,
                                 max_update_norm=10.0)
    assert rejected == (2,)
    torch.testing.assert_close(agg, torch.full((3,), 2.0))


def test_client_sampling_is_uniform_without_replacement():
    counts = torch.zeros(10)
    for r in range(2000):
        picked = sample_clients(10, 3, torch.Generator().manual_seed(r))
        assert len(set(picked)) == 3 and picked == sorted(picked)
        counts[picked] += 1
    assert (counts / 2000 - 0.3).abs().max() < 0.04


def test_one_client_one_round_equals_plain_local_training(tmp_path):
    cfg = tiny_config(tmp_path, data={"benchmark": {"num_clients": 1, "examples_per_client": 8,
                                                    "test_size": 3, "client_test_size": 0},
                                      "max_length": 160},
                      federation={"rounds": 1, "clients_per_round": 1},
                      training={"local_steps": 3, "batch_size": 4, "lr": 5e-3, "max_grad_norm": None})
    run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda s: None)
    federated = _final(tmp_path / "run")

    # Plain local training, written independently: HF loss, a plain AdamW loop.
    model, tok = load_base_model(cfg.model)
    model = attach_lora(model, cfg.lora, cfg.seed)
    params = AdapterParams(model)
    data = encode_all(build_federated_data(cfg.data, cfg.seed).clients[0].train, tok, "chat", 160)
    seed = derive_seed(cfg.seed, "client", 0, 0)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen).tolist()
    lr = round_lr(cfg.training, 0, 1)
    opt = torch.optim.AdamW(params.params, lr=lr, weight_decay=0.0)
    model.train()
    with scoped_torch_seed(seed):
        for _ in range(3):
            if len(order) < 4:
                order += torch.randperm(len(data), generator=gen).tolist()
            batch, order = [data[i] for i in order[:4]], order[4:]
            model(**collate(batch, tok.pad_token_id)).loss.backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(federated, params.get(), rtol=0, atol=1e-6)


def test_two_runs_with_one_seed_give_identical_adapters(tmp_path):
    cfg = tiny_config(tmp_path, training={"local_steps": 2, "batch_size": 4, "lr": 1e-3,
                                          "max_grad_norm": 1.0},
                      lora={"rank": 4, "alpha": 8, "dropout": 0.1})
    run_experiment(cfg, out=tmp_path / "a", progress=False, log=lambda s: None)
    run_experiment(cfg, out=tmp_path / "b", progress=False, log=lambda s: None)
    assert torch.equal(_final(tmp_path / "a"), _final(tmp_path / "b"))
    other = tiny_config(tmp_path, seed=4)
    run_experiment(other, out=tmp_path / "c", progress=False, log=lambda s: None)
    assert not torch.equal(_final(tmp_path / "a"), _final(tmp_path / "c"))


def test_resume_after_stop_equals_uninterrupted_run(tmp_path):
    cfg = tiny_config(tmp_path, federation={"rounds": 4, "clients_per_round": 2,
                                            "local_only_clients": 2},
                      lora={"rank": 4, "alpha": 8, "dropout": 0.1})
    full = run_experiment(cfg, out=tmp_path / "full", progress=False, log=lambda s: None)
    part = run_experiment(cfg, out=tmp_path / "part", stop_after=2, progress=False, log=lambda s: None)
    assert not part.finished and part.rounds_done == 2
    resumed = run_experiment(cfg, out=tmp_path / "part", resume=True, progress=False, log=lambda s: None)
    assert torch.equal(_final(tmp_path / "full"), _final(tmp_path / "part"))
    assert resumed.final == full.final and resumed.local_only == full.local_only

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "compute")}
                for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    assert rows("full") == rows("part")


def test_run_directory_contents_and_no_overwrite(tmp_path):
    cfg = tiny_config(tmp_path, federation={"rounds": 2, "clients_per_round": 2, "local_only_clients": 1})
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda s: None)
    run = tmp_path / "run"
    for name in ("config.resolved.yaml", "env.json", "metrics.jsonl", "result.json",
                 "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == cfg.seed and env["versions"]["torch"] == torch.__version__.split("+")[0] \
        or env["versions"]["torch"] == torch.__version__
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["phase"] == "federated"] == [0, 1, 2]
    assert rows[-1]["phase"] == "local_only_final"
    assert result.untuned == rows[0]["global_eval"] and result.final == rows[2]["global_eval"]
    assert len(list((run / "checkpoints").glob("round_*.pt"))) == cfg.keep_checkpoints
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        run_experiment(cfg, out=run, progress=False, log=lambda s: None)
    assert (run / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = tiny_config(tmp_path, federation={"rounds": 2, "clients_per_round": 2})
    run_experiment(cfg, out=tmp_path / "run", stop_after=1, progress=False, log=lambda s: None)
    changed = tiny_config(tmp_path, federation={"rounds": 2, "clients_per_round": 1})
    with pytest.raises(ConfigError, match="differs"):
        run_experiment(changed, out=tmp_path / "run", resume=True, progress=False, log=lambda s: None)


def test_a_run_from_before_a_new_config_field_still_resumes(tmp_path):
    """A stored config without a field added later (here the whole audit section and
    eval.canaries) is the same experiment when that field is at its default."""
    import yaml

    from fedsec.rundir import CONFIG, RunDir

    cfg = tiny_config(tmp_path, federation={"rounds": 2, "clients_per_round": 2})
    run_experiment(cfg, out=tmp_path / "run", stop_after=1, progress=False, log=lambda s: None)
    stored = yaml.safe_load((tmp_path / "run" / CONFIG).read_text())
    del stored["audit"], stored["eval"]["canaries"]
    (tmp_path / "run" / CONFIG).write_text(yaml.safe_dump(stored, sort_keys=False))
    RunDir.reopen(tmp_path / "run", cfg)  # accepted
    with pytest.raises(ConfigError, match="differs"):  # a value that is not the default still counts
        RunDir.reopen(tmp_path / "run", tiny_config(tmp_path, federation={"rounds": 2, "clients_per_round": 2},
                                                    audit={"canaries": 4}))


def test_bad_data_leaves_no_run_directory(tmp_path):
    cfg = tiny_config(tmp_path, federation={"rounds": 1, "clients_per_round": 9})
    with pytest.raises(ConfigError, match="clients_per_round"):
        run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_ema_step_by_hand():
    from fedsec.server import ema_step

    v1, v2, v3 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([4.0, 4.0])
    average, weight = ema_step(torch.zeros(2), 0.0, v1, 0.5)  # the first vector is its own average
    assert torch.equal(average, v1) and weight == 1.0
    for v in (v2, v3):
        average, weight = ema_step(average, weight, v, 0.5)
    torch.testing.assert_close(average, (0.25 * v1 + 0.5 * v2 + v3) / 1.75)
    assert weight == 1.75


def test_ema_release_averages_the_globals_and_leaves_training_alone(tmp_path):
    common = dict(federation={"rounds": 3, "clients_per_round": 2}, keep_checkpoints=3)
    plain_lines, lines = [], []
    plain = run_experiment(tiny_config(tmp_path, **common), out=tmp_path / "plain", progress=False,
                           log=plain_lines.append)
    cfg = tiny_config(tmp_path, federation={**common["federation"], "ema_decay": 0.5}, keep_checkpoints=3)
    smoothed = run_experiment(cfg, out=tmp_path / "ema", progress=False, log=lines.append)
    # the round lines say whose evaluation they print: the average's after a round, the untuned model's before
    assert "global (moving average) acc" in next(x for x in lines if x.startswith("round   3/3"))
    assert "moving average" not in next(x for x in lines if x.startswith("round   0/3"))
    assert not any("moving average" in x for x in plain_lines)
    ckpts = [torch.load(tmp_path / "ema" / "checkpoints" / f"round_{t:04d}.pt", weights_only=True)
             for t in (1, 2, 3)]
    g1, g2, g3 = (c["global"] for c in ckpts)
    assert torch.equal(g3, _final(tmp_path / "plain"))  # training goes on from the last global
    expected = (0.25 * g1 + 0.5 * g2 + g3) / 1.75
    torch.testing.assert_close(ckpts[-1]["ema"][0], expected)
    # the saved adapter and the final evaluation are the average's, not the last global's
    model, _ = load_base_model(cfg.model)
    model = attach_lora(model, dataclasses.replace(cfg.lora, init_from=str(tmp_path / "ema" / "adapter")), cfg.seed)
    torch.testing.assert_close(AdapterParams(model).get(), expected)
    assert smoothed.final["loss"] != plain.final["loss"]
    # resumed from its checkpoint, the average goes on as in the uninterrupted run
    run_experiment(cfg, out=tmp_path / "part", stop_after=2, progress=False, log=lambda s: None)
    resumed = run_experiment(cfg, out=tmp_path / "part", resume=True, progress=False, log=lambda s: None)
    assert resumed.final == smoothed.final
    with pytest.raises(ConfigError, match="ema_decay"):
        tiny_config(tmp_path, federation={"ema_decay": 1.0})
