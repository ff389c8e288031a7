"""The server's side of a round: client sampling and the server optimizer.

The server optimizer treats the aggregated client delta Delta_t (the example-weighted
mean of x_i - x) as a pseudo-gradient (Reddi et al. 2021, "Adaptive Federated
Optimization", Alg. 2):

    FedAvg      x <- x + eta * Delta_t                                  (eta = 1)
    FedAvgM     m <- beta * m + Delta_t;  x <- x + eta * m               (Hsu et al. 2019)
    FedAdagrad  m <- b1 m + (1 - b1) Delta;  v <- v + Delta^2
    FedYogi     m <- b1 m + (1 - b1) Delta;  v <- v - (1 - b2) Delta^2 sign(v - Delta^2)
    FedAdam     m <- b1 m + (1 - b1) Delta;  v <- b2 v + (1 - b2) Delta^2
                (adaptive ones) x <- x + eta * m / (sqrt(v) + tau),  m_0 = 0, v_0 = tau^2

Under user-level DP, Delta_t carries Gaussian noise of a known standard deviation per
coordinate (DP-FedAvg's z C / (q N), public: the ledger's z and C over the plan's
expected cohort). An optimizer whose `step` takes a `noise_std` parameter is given it
each round (0.0 without noise; None where no one level is known: record-level DP's
noise is inside the clients' steps, correlated noise's rounds are not independent); one
whose `step` does not is called as before. docs/examples/my_rules.py's adam_bc is one.

Where OpenFedLLM differs: it feeds the *unweighted* mean to the adaptive
optimizers, squares the momentum instead of Delta in FedYogi/FedAdam, and starts
m at Delta; fedsec follows the paper. Every optimizer has state_dict /
load_state_dict, so its state rides in the checkpoint. Each is registered by name
(fedsec.registry, kind server_optimizer; `federation.algorithm` picks it), its
constructor's parameters filled from the federation fields of the same name.
"""

from __future__ import annotations

import inspect

import torch

from fedsec.registry import register, registry

CLIENT_ALGORITHMS = ("fedprox", "scaffold")  # change the clients' training; the server runs FedAvg


def sample_clients(num_clients: int, per_round: int, generator: torch.Generator) -> list[int]:
    """Uniform sampling of `per_round` distinct clients, returned in ascending order."""
    if not 1 <= per_round <= num_clients:
        raise ValueError(f"cannot sample {per_round} of {num_clients} clients")
    return sorted(torch.randperm(num_clients, generator=generator, device=generator.device)[:per_round].tolist())


def cyclic_cohort(num_clients: int, per_round: int, round_idx: int) -> list[int]:
    """Fixed cohorts in turn: the clients in id order cut into cohorts of `per_round`, round r
    taking cohort r mod (num_clients / per_round)."""
    cohorts = num_clients // per_round
    first = (round_idx % cohorts) * per_round
    return list(range(first, first + per_round))


def check_sampling(cfg, num_clients: int) -> None:
    """A fixed or cyclic round fits in the clients, and cyclic cohorts cut them evenly
    (ConfigError before a run starts); Poisson's rate is checked against the population
    at setup (fedsec.setup)."""
    from fedsec.errors import ConfigError

    per_round = cfg.federation.clients_per_round
    if cfg.sampling != "poisson" and per_round > num_clients:
        raise ConfigError("federation.clients_per_round", per_round, f"exceeds the {num_clients} clients")
    if cfg.sampling == "cyclic" and num_clients % per_round:
        divisors = [k for k in range(1, num_clients + 1) if num_clients % k == 0]
        raise ConfigError("federation.clients_per_round", per_round, f"cyclic sampling cuts the {num_clients} "
                          f"clients into equal cohorts; use a divisor of {num_clients} ({divisors[:8]}...)")


def poisson_sample(num_clients: int, rate: float, generator: torch.Generator) -> list[int]:
    """Each client independently with probability `rate` (the DP accountants' assumption).

    The number sampled varies from round to round (it may be 0); its mean is rate * N.
    """
    if not 0 < rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {rate}")
    draws = torch.rand(num_clients, generator=generator, dtype=torch.float64, device=generator.device)
    return (draws < rate).nonzero().flatten().tolist()


def server_step_scale(round_idx: int, rounds: int, server_lr: float, server_min_lr: float | None) -> float:
    """What a round's server step is multiplied by (federation.server_min_lr): cosine from 1 in
    the first round to server_min_lr / server_lr in the last, as training.cosine_lr decays a
    client's lr; 1 with no schedule. A server optimizer's state (momentum, moments) does not
    depend on its lr, so scaling the step is running that round at lr_t."""
    if server_min_lr is None:
        return 1.0
    from fedsec.training import cosine_lr

    return cosine_lr(round_idx, max(rounds - 1, 1), server_lr, server_min_lr) / server_lr


def ema_step(average: torch.Tensor, weight: float, vector: torch.Tensor, decay: float) -> tuple[torch.Tensor, float]:
    """One more vector into the bias-corrected exponential moving average (federation.ema_decay):
    sum_t decay^(T-t) v_t / sum_t decay^(T-t) over the vectors so far, where `weight` is the
    denominator before this one (0: `vector` is the first, and its own average)."""
    weight = decay * weight + 1.0
    return average + (vector - average) / weight, weight


@register("server_optimizer", "fedavg")
class FedAvgServer:
    """x <- x + server_lr * Delta (FedAvg when server_lr = 1). Stateless."""

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr

    def step(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return params + self.server_lr * delta

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


@register("server_optimizer", "fedavgm")
class FedAvgMServer:
    """Server momentum (Hsu et al. 2019): m <- beta m + Delta; x <- x + eta m."""

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9):
        self.server_lr, self.momentum = server_lr, server_momentum
        self.m: torch.Tensor | None = None

    def step(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        self.m = delta.clone() if self.m is None else self.momentum * self.m + delta
        return params + self.server_lr * self.m

    def state_dict(self) -> dict:
        return {"m": self.m}

    def load_state_dict(self, state: dict) -> None:
        self.m = state["m"]


class AdaptiveServer:
    """FedAdagrad / FedYogi / FedAdam (Reddi et al. 2021, Alg. 2)."""

    def __init__(self, rule: str, server_lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3):
        if rule not in ("adagrad", "yogi", "adam"):
            raise ValueError(f"unknown adaptive rule {rule!r}")
        self.rule, self.server_lr, self.beta1, self.beta2, self.tau = rule, server_lr, beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def step(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.m is None:
            self.m = torch.zeros_like(delta)
            self.v = torch.full_like(delta, self.tau ** 2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        square = delta * delta
        if self.rule == "adagrad":
            self.v = self.v + square
        elif self.rule == "yogi":
            self.v = self.v - (1 - self.beta2) * square * torch.sign(self.v - square)
        else:
            self.v = self.beta2 * self.v + (1 - self.beta2) * square
        return params + self.server_lr * self.m / (self.v.sqrt() + self.tau)

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v = state["m"], state["v"]


@register("server_optimizer", "fedadagrad")
class FedAdagrad(AdaptiveServer):
    """FedAdagrad: v <- v + Delta^2."""

    def __init__(self, server_lr: float = 1e-3, beta1: float = 0.9, tau: float = 1e-3):
        super().__init__("adagrad", server_lr, beta1, 0.99, tau)


@register("server_optimizer", "fedyogi")
class FedYogi(AdaptiveServer):
    """FedYogi: v <- v - (1 - b2) Delta^2 sign(v - Delta^2)."""

    def __init__(self, server_lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__("yogi", server_lr, beta1, beta2, tau)


@register("server_optimizer", "fedadam")
class FedAdam(AdaptiveServer):
    """FedAdam: v <- b2 v + (1 - b2) Delta^2."""

    def __init__(self, server_lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__("adam", server_lr, beta1, beta2, tau)


def takes_noise(optimizer) -> bool:
    """Whether a server optimizer's `step` takes the round's DP noise level (`noise_std`)."""
    return "noise_std" in inspect.signature(optimizer.step).parameters


def server_step(optimizer, params: torch.Tensor, delta: torch.Tensor, noise_std: float | None) -> torch.Tensor:
    """The server optimizer's step on the round's aggregate, told the standard deviation of the
    DP noise in each coordinate of `delta` where its step takes it (see the module note)."""
    if takes_noise(optimizer):
        return optimizer.step(params, delta, noise_std=noise_std)
    return optimizer.step(params, delta)


def server_optimizer_name(algorithm: str) -> str:
    """The registered server optimizer behind `federation.algorithm`."""
    return "fedavg" if algorithm in CLIENT_ALGORITHMS else algorithm


def make_server_optimizer(fed):
    """The server optimizer a FederationConfig names: a parameter named like a federation field
    takes that field's value, the others `fed.params` (or their defaults), typed from the
    constructor's annotations."""
    entry = registry("server_optimizer").entry(server_optimizer_name(fed.algorithm))
    return entry.obj(**optimizer_kwargs(fed, entry))


def optimizer_kwargs(fed, entry) -> dict:
    """The keyword arguments of `entry`'s constructor from the federation config: the federation
    fields it names, and its own parameters from `fed.params` (ConfigError naming
    federation.params.<key> for an unknown or mistyped one, or a federation field set there)."""
    import dataclasses

    from fedsec.errors import ConfigError
    from fedsec.registry import typed_params

    fields = {f.name for f in dataclasses.fields(fed)}
    for key, value in fed.params.items():
        if key in fields:
            raise ConfigError(f"params.{key}", value, f"{key} is a federation field; set federation.{key} instead")
    return {**{key: getattr(fed, key) for key in entry.params if key in fields},
            **typed_params(entry, fed.params, "params", skip=fields)}
