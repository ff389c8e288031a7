"""A plugin module of the kind docs/extending.md walks through: an aggregator, an update
attack and an evaluation metric, registered by name, used from YAML (my_experiment.yaml)
and checked with fedsec's contract suites (FEDSEC_PLUGINS=my_rules pytest tests/contracts)."""

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
