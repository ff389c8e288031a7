"""The FL algorithms: one update of each checked against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from fedsec.config import (
    ALGORITHMS,
    ConfigError,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    TrainingConfig,
)
from fedsec.loop import run_experiment
from fedsec.models import attach_lora, load_base_model
from fedsec.objectives import SftObjective
from fedsec.scaffold import VariateStore, client_variate, server_variate
from fedsec.server import (
    AdaptiveServer,
    FedAvgMServer,
    FedAvgServer,
    make_server_optimizer,
    server_step_scale,
)
from fedsec.training import LocalTrainer

X0 = torch.tensor([1.0, -1.0])
D1 = torch.tensor([0.1, -0.2])
D2 = torch.tensor([-0.3, 0.05])


def test_fedavg_server_step():
    torch.testing.assert_close(FedAvgServer(1.0).step(X0, D1), torch.tensor([1.1, -1.2]))
    torch.testing.assert_close(FedAvgServer(0.5).step(X0, D1), torch.tensor([1.05, -1.1]))


def test_fedavgm_two_steps_by_hand():
    opt = FedAvgMServer(server_lr=0.5, server_momentum=0.9)
    x1 = opt.step(X0, D1)  # m = D1
    torch.testing.assert_close(x1, torch.tensor([1.0 + 0.05, -1.0 - 0.1]))
    x2 = opt.step(x1, D2)  # m = 0.9 * D1 + D2 = [-0.21, -0.13]
    torch.testing.assert_close(x2, torch.tensor([1.05 - 0.105, -1.1 - 0.065]))


def _adaptive_by_hand(rule, deltas, eta=0.01, b1=0.9, b2=0.99, tau=1e-3):
    x = [1.0, -1.0]
    m = [0.0, 0.0]
    v = [tau ** 2, tau ** 2]
    for d in deltas:
        for j in range(2):
            m[j] = b1 * m[j] + (1 - b1) * d[j]
            sq = d[j] ** 2
            if rule == "adagrad":
                v[j] = v[j] + sq
            elif rule == "yogi":
                v[j] = v[j] - (1 - b2) * sq * (1 if v[j] > sq else -1 if v[j] < sq else 0)
            else:
                v[j] = b2 * v[j] + (1 - b2) * sq
            x[j] = x[j] + eta * m[j] / (math.sqrt(v[j]) + tau)
    return torch.tensor(x)


@pytest.mark.parametrize("rule", ["adagrad", "yogi", "adam"])
def test_adaptive_server_optimizers_two_steps_by_hand(rule):
    opt = AdaptiveServer(rule, server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    x = opt.step(X0, D1)
    torch.testing.assert_close(x, _adaptive_by_hand(rule, [D1.tolist()]))
    state = opt.state_dict()
    resumed = AdaptiveServer(rule, server_lr=0.01)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.step(x, D2), _adaptive_by_hand(rule, [D1.tolist(), D2.tolist()]))


def test_first_adam_step_in_closed_form():
    # m = 0.1 * D, v = 0.99 tau^2 + 0.01 D^2; for |D| >> tau the step is ~ eta * 0.1 * D / (0.1 |D|)
    x = AdaptiveServer("adam", server_lr=0.01).step(X0, D1)
    expected = X0 + 0.01 * 0.1 * D1 / ((0.99e-6 + 0.01 * D1 ** 2).sqrt() + 1e-3)
    torch.testing.assert_close(x, expected)


def test_config_resolves_server_lr_per_algorithm():
    assert FederationConfig(algorithm="fedadam").server_lr == 1e-3
    assert FederationConfig(algorithm="fedavgm").server_lr == 1.0
    assert isinstance(make_server_optimizer(FederationConfig(algorithm="fedyogi")), AdaptiveServer)


def test_server_lr_schedule_by_hand_and_as_the_optimizer_run_at_each_rounds_lr():
    assert server_step_scale(5, 30, 1e-2, None) == 1.0  # no schedule: constant
    assert server_step_scale(0, 3, 1e-2, 1e-3) == pytest.approx(1.0)
    assert server_step_scale(1, 3, 1e-2, 1e-3) == pytest.approx((1e-3 + 0.5 * 9e-3) / 1e-2)  # cos(pi / 2) = 0
    assert server_step_scale(2, 3, 1e-2, 1e-3) == pytest.approx(0.1)  # the last round reaches server_min_lr
    assert server_step_scale(0, 1, 1e-2, 1e-3) == pytest.approx(1.0)  # one round: its lr is server_lr
    # scaling each round's step is running the optimizer at that round's lr: its state
    # (momentum, moments) does not depend on the lr
    fed = FederationConfig(algorithm="fedadam", server_lr=1e-2, server_min_lr=1e-3, rounds=3)
    scaled, at_lr = make_server_optimizer(fed), make_server_optimizer(fed)
    x = y = X0
    for t, d in enumerate((D1, D2, D1)):
        scale = server_step_scale(t, fed.rounds, fed.server_lr, fed.server_min_lr)
        x = x + scale * (scaled.step(x, d) - x)
        at_lr.server_lr = fed.server_lr * scale
        y = at_lr.step(y, d)
        torch.testing.assert_close(x, y)
    with pytest.raises(ConfigError, match="server_min_lr"):
        FederationConfig(algorithm="fedadam", server_lr=1e-2, server_min_lr=0.1)


def test_scaffold_variates_by_hand():
    c_i, c = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    start, end = torch.tensor([1.0, 1.0]), torch.tensor([0.8, 1.2])
    new = client_variate(c_i, c, start, end, steps=2, lr=0.1)
    torch.testing.assert_close(new, torch.tensor([1.0 - 0.5 + 0.2 / 0.2, 2.0 - 0.5 - 0.2 / 0.2]))
    moved = server_variate(c, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 4.0])], num_clients=4)
    torch.testing.assert_close(moved, torch.tensor([0.5 + 0.5, 0.5 + 1.0]))


def test_variate_store_reads_only_earlier_rounds(tmp_path):
    store = VariateStore(tmp_path, 3)
    assert torch.equal(store.get(7, 0), torch.zeros(3))
    store.put(7, 0, torch.ones(3))
    assert torch.equal(store.get(7, 0), torch.zeros(3))  # a redone round 0 starts from zero
    assert torch.equal(store.get(7, 1), torch.ones(3))
    store.put(7, 3, torch.full((3,), 2.0))
    store.put(7, 5, torch.full((3,), 3.0))
    assert torch.equal(store.get(7, 5), torch.full((3,), 2.0))
    assert torch.equal(store.get(7, 9), torch.full((3,), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client_00007_r0003.pt", "client_00007_r0005.pt"]


def _trainer():
    model, tok = load_base_model(ModelConfig(name="tiny"))
    model = attach_lora(model, LoraConfig(rank=2, alpha=4), seed=0)
    return LocalTrainer(model, TrainingConfig(local_steps=1, batch_size=2), SftObjective(tok.pad_token_id))


def test_prox_term_is_added_to_the_gradient():
    trainer = _trainer()
    params = trainer.adapter
    start = params.get()
    moved = start + 0.5
    params.set(moved)
    for p in params.params:
        p.grad = torch.zeros_like(p)
    trainer._add_proximal_gradient(0.2, list(params.layout.unflatten(start).values()))
    grad = torch.cat([p.grad.reshape(-1) for p in params.params])
    torch.testing.assert_close(grad, 0.2 * (moved - start))


def test_scaffold_correction_is_an_sgd_step_after_the_optimizer_step():
    from fedsec.config import BenchmarkConfig
    from fedsec.data.benchmark import make_benchmark
    from fedsec.encoding import encode_all

    trainer = _trainer()
    _, tok = load_base_model(ModelConfig(name="tiny"))
    data = encode_all(make_benchmark(BenchmarkConfig(num_clients=1, examples_per_client=4), 0)
                      .clients[0].train, tok, "chat", 256)
    start = trainer.adapter.get()
    correction = torch.linspace(-1, 1, start.numel())
    plain = trainer.train(start, data, 0.01, seed=5).delta
    corrected = trainer.train(start, data, 0.01, seed=5, correction=correction).delta
    # one local step: the AdamW step is the same, then y <- y - lr (c - c_i)
    torch.testing.assert_close(corrected - plain, -0.01 * correction, rtol=0, atol=1e-6)


def test_ffa_lora_trains_b_only_and_keeps_a_fixed():
    from fedsec.config import BenchmarkConfig
    from fedsec.data.benchmark import make_benchmark
    from fedsec.encoding import encode_all

    model, tok = load_base_model(ModelConfig(name="tiny"))
    model = attach_lora(model, LoraConfig(rank=2, alpha=4, freeze_a=True), seed=0)
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)
    a_before = {n: p.detach().clone() for n, p in named.items() if "lora_A" in n}
    assert all(p.abs().sum() > 0 for p in a_before.values())  # random A, shared via the seed
    data = encode_all(make_benchmark(BenchmarkConfig(num_clients=1, examples_per_client=6), 0)
                      .clients[0].train, tok, "chat", 160)
    trainer = LocalTrainer(model, TrainingConfig(local_steps=2, batch_size=3, lr=1e-2), SftObjective(tok.pad_token_id))
    start = trainer.adapter.get()
    deltas = [trainer.train(start, data, 1e-2, seed=s).delta for s in range(3)]
    assert all(torch.equal(named[n].detach(), a) for n, a in a_before.items())
    assert all(d.abs().sum() > 0 for d in deltas) and start.numel() == sum(
        p.numel() for n, p in named.items() if "lora_B" in n)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_runs_sft_and_resumes_exactly(tmp_path, algorithm):
    cfg = tiny_config(tmp_path, federation={"rounds": 3, "clients_per_round": 2, "algorithm": algorithm,
                                            "prox_mu": 0.1})
    full = run_experiment(cfg, out=tmp_path / "full", progress=False, log=lambda s: None)
    run_experiment(cfg, out=tmp_path / "part", stop_after=1, progress=False, log=lambda s: None)
    resumed = run_experiment(cfg, out=tmp_path / "part", resume=True, progress=False, log=lambda s: None)

    def final(d):
        return torch.load(sorted((tmp_path / d / "checkpoints").glob("*.pt"))[-1], weights_only=True)

    a, b = final("full"), final("part")
    assert torch.isfinite(a["global"]).all() and a["global"].abs().sum() > 0
    assert torch.equal(a["global"], b["global"]) and resumed.final == full.final
    if algorithm == "scaffold":
        assert a["scaffold_c"].abs().sum() > 0 and torch.equal(a["scaffold_c"], b["scaffold_c"])
        assert list((tmp_path / "full" / "scaffold").glob("client_*.pt"))
