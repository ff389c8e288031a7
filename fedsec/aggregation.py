"""The server's aggregation rule in the round loop, with the state some rules keep.

`ServerDefense.combine` runs the configured rule (fedsec.defenses.registry) over the
round's accepted deltas:

- FoolsGold's per-client update histories live on disk, one file per client and
  round (the same store as SCAFFOLD's variates), never in a RAM-resident list of
  all clients; a redone round reads the histories of the rounds before it, so a
  resumed run equals an uninterrupted one.
- Centered clipping starts from the previous round's aggregate (checkpointed).
- FLTrust's reference update g0 is computed by the loop (the server trains on its
  root set) and passed in.
- FLAME's noise comes from its own stream (seed, "defense-noise", round).

When a round's sample is too small for the rule's assumption (Poisson sampling
varies the count), the rule raises; the round then applies no update and its
metrics say why, rather than silently falling back to another rule.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedsec.config import ExperimentConfig
from fedsec.defenses.registry import Context
from fedsec.scaffold import VariateStore
from fedsec.seeding import torch_generator


class ServerDefense:
    def __init__(self, cfg: ExperimentConfig, folder: Path, dim: int):
        self.cfg, self.dim = cfg, dim
        self.rule = cfg.defense.rule
        self.histories = VariateStore(folder / "foolsgold", dim) if self.rule.needs_histories else None
        self.center: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.cfg.defense.aggregator

    def combine(self, deltas: torch.Tensor, weights: torch.Tensor, clients: list[int], round_idx: int,
                reference: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(aggregate [d], diagnostics) of the accepted deltas [n, d] of `clients`."""
        if deltas.shape[0] == 0:
            return torch.zeros(self.dim), {"aggregator": self.name, "skipped": "no accepted update"}
        histories = None
        if self.histories is not None:
            rows = []
            for client, delta in zip(clients, deltas):
                history = self.histories.get(client, round_idx) + delta
                self.histories.put(client, round_idx, history)
                rows.append(history)
            histories = torch.stack(rows)
        ctx = Context(torch_generator(self.cfg.seed, "defense-noise", round_idx), reference,
                      self.center, histories)
        try:
            out = self.rule(deltas, weights, ctx, self.cfg.defense.f)
        except ValueError as err:
            return torch.zeros(self.dim), {"aggregator": self.name, "skipped": str(err)}
        if self.rule.needs_center:
            self.center = out.vector.clone()
        info = {"aggregator": self.name,
                "excluded": [c for c, w in zip(clients, out.weights.tolist()) if w == 0]}
        info.update({k: v for k, v in out.info.items() if isinstance(v, (int, float, str))})
        return out.vector, info

    def state_dict(self) -> dict:
        return {"center": self.center}

    def load_state_dict(self, state: dict | None) -> None:
        self.center = (state or {}).get("center")
