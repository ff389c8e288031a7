"""Devices, mixed precision, gradient checkpointing, the frozen-prefix cache's placement and
the per-round compute figures, all checked on the CPU (a GPU run of the same paths is
benchmarks/gpu.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from fedsec import prefix
from fedsec.devices import autocast, resolve_device
from fedsec.encoding import DATA
from fedsec.errors import ConfigError
from fedsec.loop import run_experiment
from fedsec.models import load_model
from fedsec.objectives import objective_for
from fedsec.setup import positions, prepare, train_set
from fedsec.training import LocalTrainer

LEARNING = {"federation": {"rounds": 4}, "training": {"local_steps": 4, "lr": 3e-3}}


def _run(tmp_path, name: str, **sections):
    merged = {k: {**LEARNING.get(k, {}), **sections.get(k, {})} for k in {*LEARNING, *sections}}
    cfg = tiny_config(tmp_path, name=name, **merged)
    return run_experiment(cfg, out=tmp_path / name, progress=False, log=lambda _: None)


def _adapter(result) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(f"{result.run_dir}/adapter/adapter_model.safetensors")
    return torch.cat([weights[k].flatten() for k in sorted(weights)])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_learns_and_matches_fp32_within_two_percent(tmp_path, precision):
    """The tiny model, 4 rounds of 4 local AdamW steps: measured final held-out loss fp32 1.8415,
    bf16 1.8453, fp16 (loss scaling) 1.8417; the tolerance is 2% of the fp32 loss."""
    plain = _run(tmp_path, "fp32")
    mixed = _run(tmp_path, precision, training={"precision": precision})
    assert mixed.untuned["loss"] == pytest.approx(plain.untuned["loss"], rel=1e-2)  # the same model, rounded
    assert mixed.final["loss"] < 0.5 * mixed.untuned["loss"]  # it learns (5.03 -> 1.84)
    assert mixed.final["loss"] == pytest.approx(plain.final["loss"], rel=0.02)
    assert not torch.equal(_adapter(mixed), _adapter(plain))  # autocast was really on


def test_autocast_computes_in_half_precision_and_the_adapter_stays_float32(tmp_path):
    cfg = tiny_config(tmp_path, training={"precision": "bf16", "local_steps": 2})
    model, tokenizer = load_model(cfg)
    objective = objective_for(cfg, tokenizer.pad_token_id)
    seen = []
    lora_a = next(m for name, m in model.named_modules() if name.endswith("lora_A.default"))
    lora_a.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    items = train_set(objective, prepare_data(cfg).clients[0], tokenizer, cfg)
    loss, _ = objective.loss(model, items[:2])
    assert seen and set(seen) == {torch.bfloat16} and loss.dtype == torch.float32
    trainer = LocalTrainer(model, cfg.training, objective)
    start = trainer.adapter.get()
    result = trainer.train(start, items, lr=1e-2, seed=0)
    assert all(p.dtype == torch.float32 for p in trainer.adapter.params)  # master weights
    assert result.delta.dtype == torch.float32 and result.delta.abs().max() > 0
    with autocast(model):  # the context names the model's device type and dtype
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def prepare_data(cfg):
    from fedsec.data import build_federated_data

    return build_federated_data(cfg.data, cfg.seed, cfg.task)


def test_gradient_checkpointing_recomputes_the_forward_and_gives_the_same_update(tmp_path):
    deltas, calls = {}, {}
    for checkpointing in (False, True):
        cfg = tiny_config(tmp_path, training={"gradient_checkpointing": checkpointing, "local_steps": 3,
                                              "pack": False})  # packing's first-batch check runs forwards too
        model, tokenizer = load_model(cfg)
        objective = objective_for(cfg, tokenizer.pad_token_id)
        items = train_set(objective, prepare_data(cfg).clients[0], tokenizer, cfg)
        attention = model.get_base_model().get_decoder().layers[0].self_attn  # recomputed in the backward
        count = []  # forwards with gradients: the read-out check's (fedsec.readout) run without
        attention.register_forward_hook(lambda *_, seen=count: seen.append(1) if torch.is_grad_enabled() else None)
        trainer = LocalTrainer(model, cfg.training, objective)
        assert trainer.one_step_batchable is False  # adamw here; and never with checkpointing
        deltas[checkpointing] = trainer.train(trainer.adapter.get(), items, lr=1e-2, seed=1).delta
        calls[checkpointing] = len(count)
    assert calls[False] == 3 and calls[True] == 6  # one recomputed forward per step
    assert torch.allclose(deltas[True], deltas[False], atol=1e-7, rtol=1e-5)


def test_the_prefix_cache_says_its_size_and_where_and_refuses_what_cannot_fit(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    model, _ = load_model(cfg)
    lines = []
    # tiny: hidden size 64, float32 -> 256 bytes a position; 1,000 positions are 250 KiB
    monkeypatch.setattr(prefix, "_host_available", lambda: 10**9)
    assert prefix.plan_cache(model, 1, 1000, log=lines.append) == DATA
    assert lines[-1] == "fedsec: frozen prefix: 1,000 positions, 250 KiB, kept in host memory"
    prefix.plan_cache(model, 1, 1000, private=True, log=lines.append)  # under DP: no data-derived size
    assert lines[-1] == ("fedsec: frozen prefix kept in host memory (its size follows the clients' data: "
                         "not printed under DP)")
    monkeypatch.setattr(prefix, "_host_available", lambda: 300_000)  # 80%: 240,000 bytes
    assert prefix.plan_cache(model, 1, 900, log=lines.append) == DATA  # 230,400 bytes fit
    monkeypatch.setattr(prefix, "_disk_free", lambda _folder: 10**9)
    home = prefix.plan_cache(model, 1, 1000, log=lines.append)  # 256,000 bytes: to disk
    assert home == prefix.prefix_cache_dir() / "mapped" and "on disk, memory-mapped" in lines[-1]
    monkeypatch.setattr(prefix, "_disk_free", lambda _folder: 300_000)
    with pytest.raises(ConfigError) as err:
        prefix.plan_cache(model, 1, 1000, log=lines.append)  # fits neither
    assert err.value.field == "lora.cache_frozen_layers" and "250 KiB" in str(err.value)
    assert "FEDSEC_CACHE" in str(err.value)


@pytest.mark.parametrize("pack", [False, True])
def test_a_run_counts_its_training_tokens_and_peak_memory_each_round(tmp_path, pack):
    # every client every round, each step's batch its whole data: 2 steps x all tokens (packed:
    # each batch's shared opening once)
    cfg = tiny_config(tmp_path, federation={"rounds": 2, "clients_per_round": 4},
                      training={"batch_size": 64, "local_steps": 2, "pack": pack})
    setup = prepare(cfg)
    expected = 2 * positions(*setup.train_sets)
    if pack:
        packed = 2 * sum(setup.trainer.objective.positions(setup.model, data) for data in setup.train_sets)
        assert packed < expected
        expected = packed
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    rows = [json.loads(line) for line in open(f"{result.run_dir}/metrics.jsonl")]
    federated = [r for r in rows if r.get("phase") == "federated" and r["round"] >= 1]
    assert len(federated) == 2
    for row in federated:
        compute = row["compute"]
        assert compute["train_tokens"] == expected and compute["device"] == "cpu"
        assert compute["precision"] == "fp32" and compute["peak_memory_kind"] == "rss_process_peak"
        assert compute["tokens_per_s"] == pytest.approx(expected / compute["train_seconds"])
        assert compute["peak_memory_bytes"] > 50 * 2**20  # python + torch + the model: well above 50 MiB


def test_model_device_resolves_here():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_states_beyond_the_hosts_memory_are_memory_mapped_on_disk_with_the_same_results(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, lora={"top_layers": 1, "cache_frozen_layers": True}, federation={"rounds": 2})
    in_memory = run_experiment(cfg, out=tmp_path / "memory", progress=False, log=lambda _: None)
    monkeypatch.setattr(prefix, "_host_available", lambda: 1000)  # no state set fits in memory now
    mapped = run_experiment(cfg, out=tmp_path / "mapped", progress=False, log=lambda _: None)
    files = sorted((prefix.prefix_cache_dir() / "mapped").glob("*.bin"))
    assert files and all(f.with_suffix(".done").is_file() for f in files)
    widths = {int(f.with_suffix(".done").read_text().split()[1]) for f in files}
    assert widths == {64}  # tiny's hidden size; each file holds positions x 64 float32
    assert all(f.stat().st_size == int(f.with_suffix(".done").read_text().split()[0]) * 64 * 4 for f in files)
    assert mapped.final == in_memory.final and mapped.untuned == in_memory.untuned
    assert torch.equal(_adapter(mapped), _adapter(in_memory))

    def no_pass(*_args, **_kwargs):
        raise AssertionError("a complete mapped file is read, not computed again")

    monkeypatch.setattr(prefix, "prefix_states", no_pass)
    again = run_experiment(cfg, out=tmp_path / "again", progress=False, log=lambda _: None)
    assert torch.equal(_adapter(again), _adapter(in_memory))
