"""No tensor on an implicit device: runs with torch's default device set to "meta" once
the model and adapter are built on the CPU, so any tensor created without naming its
device lands on meta and the run fails loudly (a GPU run would have met a CPU tensor
there). Each run covers one family of paths; the SCAFFOLD one also checks that naming
every device changed no number."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_config

import fedsec.models
from fedsec.loop import run_experiment

DP = {"mode": "user", "noise_multiplier": 1.0, "clip_norm": 0.1, "delta": 1e-3}
ONE_SGD_STEP = {"optimizer": "sgd", "local_steps": 1, "lr": 0.5}  # the batched cohort path
EVERYTHING_EVALUATED = {
    "data": {"benchmark": {"num_clients": 4, "examples_per_client": 8, "test_size": 9, "client_test_size": 2,
                           "num_probes": 2, "canaries_per_client": 1}, "max_length": 160},
    "eval": {"clients": True, "refusal": True, "mia": True, "mia_examples": 10, "canaries": True},
    "attack": {"kind": "alie", "malicious": 1}, "defense": {"aggregator": "median"},
    "lora": {"top_layers": 1, "cache_frozen_layers": True},
}
PATHS = {
    "sft, every evaluation, memorization, MIA, an update attack, median, frozen prefix": EVERYTHING_EVALUATED,
    "user-level DP, Poisson sampling, update canaries (audit)": {
        "privacy": DP, "federation": {"sampling": "poisson"}, "audit": {"canaries": 4, "kind": "update"}},
    "user-level DP on the cohort path, FLAME": {
        "privacy": DP, "training": ONE_SGD_STEP, "defense": {"aggregator": "flame"},
        "federation": {"clients_per_round": 4}},
    "record-level DP (per-example gradients), FedProx": {
        "privacy": {**DP, "mode": "record"}, "federation": {"algorithm": "fedprox", "prox_mu": 0.1}},
    "SCAFFOLD, the local-only baseline, secret canaries (audit)": {
        "federation": {"algorithm": "scaffold", "clients_per_round": 4, "local_only_clients": 1},
        "audit": {"canaries": 4, "guesses": 2, "repeats": 2}},
    "DPO": {"task": "dpo"},
    "DPO on the cohort path under user-level DP": {"task": "dpo", "training": ONE_SGD_STEP, "privacy": DP},
    "bf16 autocast, gradient checkpointing, frozen prefix, refusal probes": {
        "training": {"precision": "bf16", "gradient_checkpointing": True},
        "lora": {"top_layers": 1, "cache_frozen_layers": True}, "eval": {"refusal": True}},
    "fp16 loss scaling, DPO": {"task": "dpo", "training": {"precision": "fp16"}},
    "record-level DP under bf16 autocast": {"privacy": {**DP, "mode": "record"}, "training": {"precision": "bf16"}},
}


@contextlib.contextmanager
def strict_default_device(monkeypatch):
    """Build the model and adapter on the CPU as usual, then make "meta" the default."""
    attach = fedsec.models.attach_lora

    def attach_then_meta(*args, **kwargs):
        model = attach(*args, **kwargs)
        torch.set_default_device("meta")
        return model

    with monkeypatch.context() as patch:
        patch.setattr(fedsec.models, "attach_lora", attach_then_meta)
        try:
            yield
        finally:
            torch.set_default_device(None)


def _config(tmp_path, sections: dict):
    base = {"federation": {"rounds": 2, "clients_per_round": 2, "local_only_clients": 0}, "eval": {"clients": False}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return tiny_config(tmp_path, **base)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_run_creates_no_tensor_on_the_default_device(tmp_path, monkeypatch, path):
    cfg = _config(tmp_path, PATHS[path])
    with strict_default_device(monkeypatch):
        result = run_experiment(cfg, out=tmp_path / "strict", progress=False, log=lambda _: None)
    assert result.finished and result.rounds_done == 2
    assert torch.empty(0).device.type == "cpu"  # the default is restored for the rest of the suite
    if path.startswith("SCAFFOLD"):  # naming the devices changed no number
        plain = run_experiment(cfg, out=tmp_path / "plain", progress=False, log=lambda _: None)
        assert result.final == plain.final and result.untuned == plain.untuned


def test_one_computation_allows_rounding_across_processes_and_refuses_a_structural_error():
    """devices.agrees in fp32: a position 3.7e-4 of its largest entry off (what frozen-prefix
    states from the disk cache were, read in another process) is the same computation; a
    position 5% off (measured against its own largest entry, so a massive activation at another
    position hides nothing) or a scaled input is not."""
    from fedsec.config import ModelConfig
    from fedsec.devices import agrees
    from fedsec.models import load_base_model

    model, _ = load_base_model(ModelConfig(name="tiny"))
    b = torch.randn(41, 576, generator=torch.Generator().manual_seed(0))
    b[0, 7] = 24_000.0  # a massive activation at position 0
    off = torch.zeros_like(b)
    off[5, 3] = 3.7e-4 * float(b[5].abs().max())
    assert agrees(b + off, b, model)
    off[5, 3] = 0.05 * float(b[5].abs().max())
    assert not agrees(b + off, b, model)
    assert not agrees(1.5 * b, b, model)
