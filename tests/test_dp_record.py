"""Record-level DP: DP-SGD inside clients (Opacus per-example gradients) and its ledger."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config
from scipy import stats

from fedsec.accountants import DpEvent, RecordLedger, epsilon, worst_record_epsilon
from fedsec.accountants.record import pareto_front
from fedsec.cli import main
from fedsec.defenses.dp import clip_to_norm
from fedsec.loop import run_experiment
from fedsec.setup import prepare
from fedsec.training import per_sample_gradients, poisson_batch


def _flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def _zero(params) -> None:
    for p in params:
        p.grad = None


def _per_example_grads(setup, items) -> torch.Tensor:
    """Each record's gradient, one backward per record (independent of Opacus)."""
    model, params, grads = setup.model, setup.adapter.params, []
    model.train()
    for item in items:
        losses, _ = setup.trainer.objective.record_losses(model, [item])
        losses.sum().backward()
        grads.append(_flat_grad(params))
        _zero(params)
    model.eval()
    return torch.stack(grads)


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_opacus_per_record_gradients_equal_one_backward_per_record(tmp_path, task):
    setup = prepare(tiny_config(tmp_path, task=task))
    items = setup.train_sets[0][:3]
    expected = _per_example_grads(setup, items)
    params = setup.adapter.params
    setup.model.train()
    with per_sample_gradients(setup.model):
        losses, row_record = setup.trainer.objective.record_losses(setup.model, items)
        losses.sum().backward()
        rows = torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in params], 1)
    setup.model.eval()
    assert rows.shape[0] == (2 if task == "dpo" else 1) * len(items)  # DPO: chosen and rejected rows
    per_record = torch.zeros(len(items), rows.shape[1]).index_add(0, row_record, rows)
    torch.testing.assert_close(per_record, expected, atol=1e-5, rtol=1e-4)
    assert all(getattr(p, "grad_sample", None) is None for p in params)  # hooks and samples gone


def _dp_step(setup, data, clip, sigma, seed=0) -> torch.Tensor:
    """The noisy gradient one DP-SGD step sets, read back from .grad."""
    trainer, params = setup.trainer, setup.adapter.params
    trainer.record_dp = type("Dp", (), {"clip_norm": clip, "noise_multiplier": sigma})()
    setup.model.train()
    with per_sample_gradients(setup.model):
        trainer._dp_sgd_gradient(data, torch.Generator().manual_seed(seed),
                                 torch.Generator().manual_seed(seed + 1))
    setup.model.eval()
    grad = _flat_grad(params)
    _zero(params)
    return grad


def test_dp_sgd_step_without_noise_or_clipping_is_the_mean_gradient(tmp_path):
    cfg = tiny_config(tmp_path, training={"batch_size": 64})  # q = 1: every example, every step
    setup = prepare(cfg)
    data = setup.train_sets[1]
    step = _dp_step(setup, data, math.inf, 0.0)
    expected = _per_example_grads(setup, data).mean(0)
    torch.testing.assert_close(step, expected, atol=1e-6, rtol=1e-4)


def test_dp_sgd_step_clips_each_example_then_divides_by_the_expected_batch(tmp_path):
    cfg = tiny_config(tmp_path, training={"batch_size": 64})
    setup = prepare(cfg)
    data = setup.train_sets[1]
    grads = _per_example_grads(setup, data)
    clip = float(grads.norm(dim=1).median())  # about half the examples get clipped
    step = _dp_step(setup, data, clip, 0.0)
    by_hand = torch.stack([g * min(1.0, clip / float(g.norm())) for g in grads]).sum(0) / len(data)
    torch.testing.assert_close(step, by_hand, atol=1e-6, rtol=1e-4)
    assert bool((clip_to_norm(grads, clip).norms > clip).any())  # the clip was active


def test_dp_sgd_noise_has_std_sigma_c_over_the_expected_batch(tmp_path):
    cfg = tiny_config(tmp_path, training={"batch_size": 64})
    setup = prepare(cfg)
    data = setup.train_sets[1]
    clean = _dp_step(setup, data, 0.5, 0.0)
    noisy = _dp_step(setup, data, 0.5, 2.0)
    noise = (noisy - clean) * len(data)  # q = 1, so the expected batch is n
    assert noise.numel() > 1000
    assert stats.kstest((noise / (2.0 * 0.5)).double().numpy(), "norm").pvalue > 0.01
    assert stats.kstest((noise / (1.3 * 2.0 * 0.5)).double().numpy(), "norm").pvalue < 0.01


def test_poisson_batch_rate():
    gen = torch.Generator().manual_seed(0)
    sizes = [len(poisson_batch(50, 5, gen)[0]) for _ in range(2000)]
    assert abs(sum(sizes) / len(sizes) - 5) < 0.15  # q n = 0.1 * 50
    picked, expected = poisson_batch(3, 8, gen)
    assert picked == [0, 1, 2] and expected == 3  # batch >= n: q = 1, everything


def test_pareto_front_and_the_worst_client_by_hand():
    assert pareto_front({(0.1, 10), (0.2, 5), (0.05, 10), (0.2, 3), (0.1, 4)}) == [(0.2, 5), (0.1, 10)]
    rates, steps = {0: 0.1, 1: 0.2, 2: 0.05}, {0: 10, 1: 5, 2: 10}
    expected = max(epsilon([DpEvent(1.2, 0.1, 10)], 1e-5), epsilon([DpEvent(1.2, 0.2, 5)], 1e-5))
    assert worst_record_epsilon(1.2, rates, steps, 1e-5, "rdp") == pytest.approx(expected, rel=1e-12)
    assert worst_record_epsilon(1.2, rates, {}, 1e-5, "rdp") == 0.0


def test_record_ledger_counts_each_clients_steps():
    ledger = RecordLedger(1e-5, 1.0, {0: 0.5, 1: 0.25, 2: 0.5})
    ledger.record(1, {0: 3, 1: 3})
    ledger.record(2, {1: 3, 2: 3})
    assert ledger.steps == {0: 3, 1: 6, 2: 3}
    worst = max(epsilon([DpEvent(1.0, 0.5, 3)], 1e-5), epsilon([DpEvent(1.0, 0.25, 6)], 1e-5))
    assert ledger.rounds[-1]["epsilon"] == pytest.approx(worst)
    assert RecordLedger.from_dict(json.loads(json.dumps(ledger.to_dict()))).to_dict() == ledger.to_dict()
    with pytest.raises(ValueError, match="cannot record round 4"):
        ledger.record(4, {0: 1})


def _record_cfg(tmp_path, **extra):
    privacy = {"mode": "record", "reproducible": True, "epsilon": 3.0, "clip_norm": 1.0, **extra.pop("privacy", {})}
    return tiny_config(tmp_path, privacy=privacy, **extra)


def test_record_run_meets_its_target_and_resumes_to_the_same_ledger(tmp_path):
    cfg = _record_cfg(tmp_path)
    full = run_experiment(cfg, out=tmp_path / "full", progress=False, log=lambda s: None)
    p = full.privacy
    assert p["mode"] == "record" and p["certified"]
    assert 0 < p["epsilon"] <= 3.0
    # the target is met for the worst case (smallest client, every round); the report
    # is the worst client's composition of the steps it took
    ledger = json.loads((tmp_path / "full" / "privacy_ledger.json").read_text())
    assert "steps" not in ledger and all(set(r) == {"round", "epsilon"} for r in ledger["rounds"])
    # each client's step count says who trained: it is in the not-covered place
    counts = json.loads((tmp_path / "full" / "not_covered_by_dp_guarantee" / "record_ledger_steps.json").read_text())
    steps = {int(k): v for k, v in counts["steps"].items()}
    rates = {int(k): v for k, v in ledger["sample_rates"].items()}
    assert sum(steps.values()) == cfg.federation.rounds * cfg.federation.clients_per_round * 2
    assert p["epsilon"] == pytest.approx(worst_record_epsilon(p["noise_multiplier"], rates, steps,
                                                              1e-5, "rdp"))
    assert p["epsilons"]["pld"] <= p["epsilons"]["rdp"] * 1.001
    run_experiment(cfg, out=tmp_path / "cut", stop_after=2, progress=False, log=lambda s: None)
    resumed = run_experiment(cfg, out=tmp_path / "cut", resume=True, progress=False, log=lambda s: None)
    assert resumed.privacy == full.privacy
    assert (json.loads((tmp_path / "cut" / "privacy_ledger.json").read_text()) == ledger)
    torch.testing.assert_close(torch.load(tmp_path / "cut" / "checkpoints" / "round_0003.pt")["global"],
                               torch.load(tmp_path / "full" / "checkpoints" / "round_0003.pt")["global"],
                               rtol=0, atol=0)


def test_record_dpo_with_scaffold_is_certified(tmp_path):
    """SCAFFOLD's variates are computed from the client's DP-SGD output: post-processing."""
    cfg = _record_cfg(tmp_path, task="dpo", federation={"algorithm": "scaffold"},
                      privacy={"epsilon": None, "noise_multiplier": 1.0})
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda s: None)
    assert result.privacy["certified"] and math.isfinite(result.privacy["epsilon"])


def test_record_without_noise_is_not_certified(tmp_path):
    cfg = _record_cfg(tmp_path, privacy={"epsilon": None, "noise_multiplier": 0.0})
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda s: None)
    assert not result.privacy["certified"] and result.privacy["epsilon"] is None
    assert "no noise" in result.privacy["reason"]


@pytest.mark.parametrize("sets, field", [
    (["privacy.adaptive_clipping=true"], "privacy.adaptive_clipping"),
    (["training.grad_accum=2"], "training.grad_accum"),
    (["privacy.delta=0.2"], "privacy.delta"),
])
def test_bad_record_config_is_one_line(tmp_path, capsys, sets, field):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("name: r\nmodel: {name: tiny}\nfederation: {rounds: 1, clients_per_round: 2}\n"
                   "data: {benchmark: {num_clients: 4, examples_per_client: 8, test_size: 9}}\n"
                   f"output_dir: {tmp_path / 'runs'}\n"
                   "privacy: {mode: record, epsilon: 2, clip_norm: 1}\n")
    code = main(["run", str(cfg), *[arg for s in sets for arg in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"fedsec: error: {field} = ")
    assert not (tmp_path / "runs").exists()


def test_sweep_over_record_level_epsilons(tmp_path):
    import csv

    import yaml
    from conftest import TINY

    from fedsec.sweeps import run_sweep

    spec = tmp_path / "dp.yaml"
    base = {**TINY, "federation": {"rounds": 1, "clients_per_round": 2},
            "privacy": {"clip_norm": 1.0}}
    spec.write_text(yaml.safe_dump({"name": "rec", "base": base, "seeds": [0], "privacy_mode": "record",
                                    "output_dir": str(tmp_path / "runs"), "epsilons": [6]}))
    root = run_sweep(spec, progress=False, log=lambda _: None)
    row = next(csv.DictReader((root / "results.csv").open()))
    assert row["variant"] == "eps6" and row["certified"] == "True"
    assert 0 < float(row["epsilon"]) <= 6
    ledger = json.loads((root / "eps6-s0" / "privacy_ledger.json").read_text())
    assert ledger["kind"] == "record"


def _mean_loss(setup, data) -> float:
    """The mean per-record loss of `data` under the model as it stands (no hooks)."""
    with torch.no_grad():
        losses, row_record = setup.trainer.objective.record_losses(setup.model, data)
    return float(torch.zeros(len(data)).index_add(0, row_record, losses.float()).mean())


def test_dp_sgd_through_opacus_on_the_peft_model_takes_the_plain_step(tmp_path):
    # opacus issue 820: LoRA models trained under Opacus with normal-looking losses but unusable.
    # Sigma 0, no clipping, q = 1, one SGD step: the adapter must move by exactly -lr times the
    # mean of the records' gradients, each from its own backward on the PEFT model (no Opacus)
    from fedsec.training import RecordDp

    cfg = tiny_config(tmp_path, training={"batch_size": 64, "local_steps": 1, "optimizer": "sgd", "lr": 0.05,
                                          "max_grad_norm": None, "weight_decay": 0.0})
    setup = prepare(cfg)
    data, start = setup.train_sets[1], setup.adapter.get().clone()
    expected = -0.05 * _per_example_grads(setup, data).mean(0)
    setup.trainer.record_dp = RecordDp(math.inf, 0.0, None)
    delta = setup.trainer.train(start, data, 0.05, seed=4).delta
    torch.testing.assert_close(delta, expected, atol=1e-7, rtol=1e-4)
    assert float(delta.norm()) > 0  # the gradient reached the LoRA parameters
    assert not any(getattr(m, "_forward_hooks", None) and any("GradSample" in type(h).__qualname__ or
                   "capture" in getattr(h, "__name__", "") for h in m._forward_hooks.values())
                   for m in setup.model.modules())  # Opacus left no hook behind


def test_dp_training_moves_the_adapter_to_a_lower_loss(tmp_path):
    # clipped and noised (sigma 1, C at the median norm), five steps: the loss on the client's data,
    # with the adapter as saved and the model unhooked, goes down, and the delta points downhill
    from fedsec.training import RecordDp

    cfg = tiny_config(tmp_path, training={"batch_size": 64, "local_steps": 5, "optimizer": "sgd", "lr": 0.05,
                                          "max_grad_norm": None, "weight_decay": 0.0})
    setup = prepare(cfg)
    data, start = setup.train_sets[1], setup.adapter.get().clone()
    grads = _per_example_grads(setup, data)
    clip = float(grads.norm(dim=1).median())
    before = _mean_loss(setup, data)
    setup.trainer.record_dp = RecordDp(clip, 1.0, None)
    delta = setup.trainer.train(start, data, 0.05, seed=4).delta
    setup.adapter.set(start + delta)
    after = _mean_loss(setup, data)
    downhill = float(delta @ -grads.mean(0)) / (float(delta.norm()) * float(grads.mean(0).norm()))
    assert after < before - 0.05 * abs(before - _plain_loss_after(setup, start, data))
    # the noise (sigma C / 8 per coordinate) dominates the delta's norm, so its cosine with the
    # descent direction is small, but a direction unrelated to the loss has cosine ~ N(0, 1/d)
    assert downhill > 5 / math.sqrt(delta.numel()), (downhill, delta.numel())  # 0.163, d 1792 measured


def _plain_loss_after(setup, start, data) -> float:
    """The loss after the same five steps without DP (the scale the DP gain is measured on)."""
    setup.trainer.record_dp = None
    delta = setup.trainer.train(start, data, 0.05, seed=4).delta
    setup.adapter.set(start + delta)
    loss = _mean_loss(setup, data)
    setup.adapter.set(start)
    return loss
