"""A plugin module of the kind docs/extending.md walks through: an aggregator, an update
attack, an evaluation metric, a DP-aware server optimizer and a preference loss, registered
by name, used from YAML (my_experiment.yaml) and checked with fedsec's contract suites
(FEDSEC_PLUGINS=my_rules pytest tests/contracts)."""

import torch

import fedsec


@fedsec.register("aggregator", "norm_trimmed_mean")
def norm_trimmed_mean(deltas: torch.Tensor, weights: torch.Tensor, *, drop: float = 0.2) -> torch.Tensor:
    """The weighted mean of the deltas left after dropping the share `drop` with the largest L2 norms."""
    n = deltas.shape[0]
    keep = torch.argsort(deltas.norm(dim=1), stable=True)[: max(1, n - int(drop * n))]
    w = weights[keep].to(deltas.dtype)
    return (w[:, None] * deltas[keep]).sum(0) / w.sum()


@fedsec.register("update_attack", "mean_shift")
def mean_shift(own: torch.Tensor, honest: torch.Tensor, ctx, *, offset: float = 1.0) -> torch.Tensor:
    """The honest mean shifted by `offset` in every coordinate (the attacker's own delta
    where it sees no honest one)."""
    base = honest.mean(0) if honest.shape[0] else own
    return base + offset


@fedsec.register("metric", "lora_norm", covered=True)
def lora_norm(ctx, *, which: str = "B") -> float:
    """The L2 norm of the adapter's lora_<which> matrices: it reads the released model
    only, so under DP it is published (covered=True)."""
    squares = sum(float(p.detach().double().pow(2).sum()) for name, p in ctx.model.named_parameters()
                  if f"lora_{which}" in name)
    return squares ** 0.5


@fedsec.register("server_optimizer", "adam_bc")
class AdamBC:
    """FedAdam with the DP noise's variance taken out of its second moment (DP-AdamBC, Tang et
    al. 2024). Under user-level DP each coordinate of the aggregate carries Gaussian noise of
    standard deviation `noise_std` (fedsec passes it to a step that takes it), so FedAdam's v
    tracks signal^2 + noise_std^2 and its steps shrink to the signal-to-noise ratio. This one
    subtracts the noise's share, flooring what is left at `floor`^2 times that share. With no
    noise (0.0) or no known level (None, correlated noise) it is FedAdam."""

    def __init__(self, server_lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 floor: float = 0.3):
        self.server_lr, self.beta1, self.beta2, self.tau, self.floor = server_lr, beta1, beta2, tau, floor
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.noise = 0.0  # the noise's share of v: the same moving average of noise_std^2

    def step(self, params: torch.Tensor, delta: torch.Tensor, noise_std: float | None = None) -> torch.Tensor:
        if self.m is None:
            self.m, self.v = torch.zeros_like(delta), torch.full_like(delta, self.tau ** 2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self.beta2 * self.v + (1 - self.beta2) * delta * delta
        self.noise = self.beta2 * self.noise + (1 - self.beta2) * (noise_std or 0.0) ** 2
        v = (self.v - self.noise).clamp(min=self.floor ** 2 * self.noise) if self.noise > 0 else self.v
        return params + self.server_lr * self.m / (v.sqrt() + self.tau)

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "noise": self.noise}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v, self.noise = state["m"], state["v"], state["noise"]


@fedsec.register("preference_loss", "simpo", reference=False)  # no reference pass over the training pairs
def simpo(pairs, *, beta: float = 2.0, gamma: float = 0.5) -> torch.Tensor:
    """SimPO (Meng et al. 2024): reference-free, on the replies' per-token log-probabilities,
    -log sigmoid(beta (log pi(y_w|x) / |y_w| - log pi(y_l|x) / |y_l|) - gamma). Its beta is
    dpo.beta (the paper's 2.0 to 2.5), gamma a dpo.params entry (task dpo, dpo.loss: simpo)."""
    margin = pairs.chosen / pairs.chosen_tokens - pairs.rejected / pairs.rejected_tokens
    return -torch.nn.functional.logsigmoid(beta * margin - gamma)
