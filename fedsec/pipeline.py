"""The server's side of a round: one pipeline of stages, built once from the config.

    no DP:           Sanitize -> Rule
    user-level DP:   Sanitize -> Clip -> Rule or FixedDenominatorMean -> Noise
                     (Noise: fresh each round, or correlated across rounds: privacy.mechanism)
    SecAgg+ (Flower): SecureMean (-> Noise under user-level DP)

Every stage is `stage(batch) -> batch` over one `Batch` (the round's updates, the
stacked deltas and their weights, the aggregate, each stage's diagnostics); each calls
the pure functions of fedsec.defenses. The noise stage puts the round's DP release on
the batch (`batch.release`: noise multiplier, sample rate, clip norm, the noise split
under adaptive clipping), and the loop records it on the privacy ledger itself
(`UserLevelDp.record`), where a reader of the loop sees it.

Weighting: without DP each accepted delta weighs its example count (FedAvg). Under
user-level DP each client is one unit (its clipped delta, weight 1), and the certified
rules (mean, norm bounding, which is clipping) become DP-FedAvg's fixed-denominator
mean sum_k d_k / (q N) (McMahan et al. 2018): one user moves it by at most C / (q N),
the sensitivity the noise is scaled to. Any other rule runs over the clipped deltas and
makes the run "not certified" (fedsec.privacy.plan_privacy says why).

The Rule stage keeps what some rules need across rounds: FoolsGold's per-client
histories on disk (one file per client and round, so a redone round reads the rounds
before it), centered clipping's previous aggregate (checkpointed), FLTrust's reference
(computed by the loop, on the batch), FLAME's noise from its own stream. When a
round's sample is too small for the rule's assumption (Poisson sampling varies the
count), the rule raises; the round then applies no update and says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedsec.config import ExperimentConfig
from fedsec.defenses.dp import COUNT_SENSITIVITY, clip_factors, clip_to_norm, fast_scaling, gaussian_noise, row_norms
from fedsec.defenses.registry import Context
from fedsec.defenses.sanitize import stack_sanitized
from fedsec.results import ClientUpdate, SecureSum
from fedsec.scaffold import VariateStore
from fedsec.seeding import torch_generator


@dataclass(frozen=True)
class DpRelease:
    """What the noise stage released this round: the event the ledger records."""

    noise_multiplier: float  # z, the accounted multiplier of the round's mechanism
    sample_rate: float  # q (Poisson)
    clip_norm: float  # C in force this round
    update_noise: float  # the multiplier on the delta sum (z_delta < z with adaptive clipping)
    count_stddev: float | None = None  # adaptive clipping: the count's noise sigma_b
    count_sensitivity: float | None = None  # and its sensitivity (1/2, the centred count)
    # the standard deviation of each coordinate of the noise on the released aggregate (the
    # fixed-denominator mean): z_delta C / (q N), 0 without noise; None under correlated noise,
    # whose rounds' noises are not independent. Public (from the row's z, C and the plan's q N)
    noise_stddev: float | None = None


@dataclass(frozen=True)
class Batch:
    """One round on its way through the stages."""

    round_idx: int  # 0-based
    dim: int  # the adapter's length
    updates: tuple[ClientUpdate, ...]  # as the clients (or attackers) sent them
    reference: torch.Tensor | None = None  # FLTrust: the server's update on its root set
    deltas: torch.Tensor | None = None  # [n, d]: the accepted deltas (clipped, after Clip); Sanitize's buffer
    weights: torch.Tensor | None = None  # [n]: each row's weight in the rule
    clients: tuple[int, ...] = ()  # the client id of each row
    rejected: tuple[int, ...] = ()  # ids whose update sanitation refused
    aggregate: torch.Tensor | None = None  # [d]: the rule's output (plus the noise, after Noise)
    release: DpRelease | None = None  # the noise stage's DP event
    info: dict = field(default_factory=dict)  # stage name -> its diagnostics
    secure: SecureSum | None = None  # secure aggregation: the round's sum, all the server sees
    norms: torch.Tensor | None = None  # [n] float64 norms of `deltas`, set by Sanitize (its own stacked copy)

    def with_info(self, stage: str, diagnostics: dict, **changes) -> Batch:
        return dataclasses.replace(self, info={**self.info, stage: diagnostics}, **changes)


Stage = Callable[[Batch], Batch]

# Where the stages run: host memory, named explicitly (an adapter's deltas are small next to
# the model; a client's delta is moved here from wherever it was trained).
SERVER = torch.device("cpu")


class Sanitize:
    """Drop malformed updates (non-finite, the wrong shape, a norm above the bound);
    stack the rest with their example counts as weights (fedsec.defenses.sanitize), each
    delta read once: copied into the stack with its float64 norm taken on the way.

    The stack is this stage's own buffer, reused round after round (a fresh n x d matrix
    costs its page faults, several passes' time), so `Batch.deltas` holds until the next
    round; the pipeline copies an aggregate that is a view of it."""

    def __init__(self, max_update_norm: float | None):
        self.max_update_norm = max_update_norm
        self.rows: torch.Tensor | None = None  # [>= n, d] float32: the stacked deltas' buffer

    def __call__(self, b: Batch) -> Batch:
        n = len(b.updates)
        if self.rows is None or self.rows.shape[0] < n or self.rows.shape[1] != b.dim:
            self.rows = None  # the old buffer goes before the new one is allocated
            self.rows = torch.empty(n, b.dim, dtype=torch.float32, device=SERVER)
        stacked = stack_sanitized(list(b.updates), b.dim, self.max_update_norm, self.rows)
        weights = torch.tensor([float(u.num_examples) for u in stacked.kept], device=SERVER)
        return dataclasses.replace(b, deltas=stacked.deltas, weights=weights,
                                   clients=tuple(u.client_id for u in stacked.kept),
                                   rejected=stacked.rejected, norms=stacked.norms)


class Clip:
    """User-level DP: each client's delta clipped to L2 norm C (float64 norms, never above
    C), each client one unit. `clip_norm()` is the C in force (adaptive).

    `scale_rows`: the deltas are scaled in place (a robust rule reads the clipped rows);
    False (DP-FedAvg's mean, which only sums them): the rows stay and each row's weight is
    its clipping factor, which the fixed-denominator mean applies in its one product, a pass
    over the deltas saved. Either way one client moves the sum by at most C (the note on
    MARGIN in fedsec.defenses.dp: the factor is rounded once more, inside the margin)."""

    def __init__(self, clip_norm: Callable[[], float], scale_rows: bool = True):
        self.clip_norm, self.scale_rows = clip_norm, scale_rows

    def __call__(self, b: Batch) -> Batch:
        c = self.clip_norm()
        n = len(b.clients)
        norms = b.norms if b.norms is not None else row_norms(b.deltas)
        factors = clip_factors(norms, c)
        if self.scale_rows or not fast_scaling(factors, c, b.deltas.dtype):
            # after Sanitize the deltas are the batch's own stacked copy: scaled in place
            deltas = clip_to_norm(b.deltas, c, norms, in_place=b.norms is not None).clipped
            weights = torch.ones(n, device=SERVER)
        else:
            deltas, weights = b.deltas, factors
        unclipped = int((norms <= c).sum())
        # released: C; hidden (not covered by the guarantee): the exact counts and norms
        return b.with_info("clip", {"clip_norm": c, "clipped": n - unclipped, "unclipped": unclipped,
                                    "median_norm": float(norms.median()) if n else None},
                           deltas=deltas, weights=weights)


class FixedDenominatorMean:
    """DP-FedAvg's mean: sum_k w_k d_k / (q N), a fixed denominator (dividing by the actual
    count would leak it and need about twice the noise); w_k is 1 for a clipped row, or the
    row's clipping factor when Clip left the rows as they were."""

    def __init__(self, expected_clients: float):
        if not expected_clients > 0:
            raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
        self.expected_clients = expected_clients

    def __call__(self, b: Batch) -> Batch:
        n = b.deltas.shape[0]
        w = (b.weights.to(torch.float64) / self.expected_clients).to(b.deltas.dtype)
        aggregate = w @ b.deltas if n else torch.zeros(b.dim, dtype=b.deltas.dtype, device=SERVER)
        return dataclasses.replace(b, aggregate=aggregate)


class SecureMean:
    """Secure aggregation: the clients' deltas arrive as one sum (clipped on their nodes
    under user-level DP). With DP: DP-FedAvg's fixed denominator, sum / (q N), and the
    noise stage scales to the sum's sensitivity (the clip norm plus SecAgg+'s rounding,
    fedsec.defenses.dp.secagg_sensitivity). Without DP: each client weighs 1, sum / n
    (an example-weighted mean would need each node's counts inside the secure sum)."""

    def __init__(self, clip_norm: float | None = None, expected_clients: float | None = None,
                 sensitivity: float | None = None):
        self.clip_norm, self.expected_clients, self.sensitivity = clip_norm, expected_clients, sensitivity

    def __call__(self, b: Batch) -> Batch:
        s = b.secure
        total = s.total.to(SERVER)
        clients = tuple(u.client_id for u in s.updates)
        if self.expected_clients is None:
            aggregate = total / len(clients) if clients else torch.zeros(b.dim, device=SERVER)
            return dataclasses.replace(b, aggregate=aggregate, clients=clients)
        return b.with_info("clip", {"clip_norm": self.clip_norm, "sensitivity": self.sensitivity},
                           aggregate=total / self.expected_clients, clients=clients)


class Rule:
    """The configured aggregator (fedsec.defenses.registry) over the batch's deltas and
    weights, with the state some rules keep (see the module note)."""

    def __init__(self, cfg: ExperimentConfig, folder: Path, dim: int):
        self.cfg, self.dim = cfg, dim
        self.rule = cfg.defense.rule
        self.histories = VariateStore(folder / "foolsgold", dim) if self.rule.needs_histories else None
        self.center: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.cfg.defense.aggregator

    def __call__(self, b: Batch) -> Batch:
        vector, info = self.combine(b.deltas, b.weights, list(b.clients), b.round_idx, b.reference)
        if not self.rule.diagnostics:  # FedAvg's mean: nothing to report
            return dataclasses.replace(b, aggregate=vector)
        return b.with_info("rule", info, aggregate=vector)

    def combine(self, deltas: torch.Tensor, weights: torch.Tensor, clients: list[int], round_idx: int,
                reference: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(aggregate [d], diagnostics) of the accepted deltas [n, d] of `clients`."""
        if deltas.shape[0] == 0:
            return torch.zeros(self.dim, device=SERVER), {"aggregator": self.name, "skipped": "no accepted update"}
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
            return torch.zeros(self.dim, device=SERVER), {"aggregator": self.name, "skipped": str(err)}
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


class Noise:
    """User-level DP: + N(0, (z_delta C)^2 I) / (q N) from the DP noise stream, and the
    round's release for the ledger. `dp` is the run's UserLevelDp (its plan and stream)."""

    def __init__(self, dp):
        self.dp = dp

    def __call__(self, b: Batch) -> Batch:
        plan, c = self.dp.plan, b.info["clip"]["clip_norm"]
        bound = b.info["clip"].get("sensitivity") or c  # SecAgg+: the clip norm plus the rounding
        aggregate = b.aggregate
        if plan.correlated is not None and plan.noise_multiplier > 0:  # tree, banded_mf: correlated across rounds
            noise = self.dp.correlated_noise(b.dim, c, b.round_idx, aggregate.dtype)
            aggregate = aggregate + noise / plan.expected_clients
        elif plan.update_noise > 0:
            noise = gaussian_noise(b.dim, plan.update_noise * bound,
                                   torch_generator(self.dp.root, "dp-noise", b.round_idx), aggregate.dtype)
            aggregate = aggregate + noise.div_(plan.expected_clients)
        adaptive = self.dp.cfg.privacy.adaptive_clipping
        # correlated noise: the multiplier of the one Gaussian mechanism the rounds so far are
        z = self.dp.round_multiplier(b.round_idx + 1)
        independent = plan.correlated is None
        release = DpRelease(z, plan.sample_rate, c, plan.update_noise if independent else z,
                            plan.count_stddev if adaptive else None, COUNT_SENSITIVITY if adaptive else None,
                            plan.update_noise * bound / plan.expected_clients if independent
                            else 0.0 if plan.noise_multiplier == 0 else None)
        return dataclasses.replace(b, aggregate=aggregate, release=release)


class ServerPipeline:
    """The stages in order; `pipeline(updates, round_idx, reference)` runs one round."""

    def __init__(self, stages: Sequence[Stage], dim: int, rule: Rule):
        self.stages, self.dim = tuple(stages), dim
        self.rule = rule  # the Rule stage (its state rides in the checkpoint); one is always built

    def __call__(self, updates: Sequence[ClientUpdate], round_idx: int,
                 reference: torch.Tensor | None = None, secure: SecureSum | None = None) -> Batch:
        batch = Batch(round_idx, self.dim, tuple(updates), reference, secure=secure)
        for stage in self.stages:
            batch = stage(batch)
        if _views(batch.aggregate, batch.deltas):  # a rule that returned a row: Sanitize's buffer is reused
            batch = dataclasses.replace(batch, aggregate=batch.aggregate.clone())
        return batch

    def __repr__(self) -> str:
        return " -> ".join(type(s).__name__ for s in self.stages)


def _views(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is not None and b is not None and b.numel() > 0
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def build_pipeline(cfg: ExperimentConfig, folder: Path, dim: int, dp=None) -> ServerPipeline:
    """The run's server pipeline; `dp` the run's UserLevelDp (None: no user-level DP)."""
    rule = Rule(cfg, folder, dim)
    if cfg.engine == "flower" and cfg.flower.secagg:
        if dp is None:
            return ServerPipeline([SecureMean()], dim, rule)
        from fedsec.privacy import secure_aggregation_terms  # the bound the privacy report states

        bound = secure_aggregation_terms(cfg, dim)["sensitivity"]
        return ServerPipeline([SecureMean(dp.clip_in_force(), dp.plan.expected_clients, bound), Noise(dp)], dim, rule)
    if dp is None:
        stages = [Sanitize(cfg.defense.max_update_norm), rule]
    else:
        certified = rule.rule.dp_certified  # DP-FedAvg's mean, which needs no clipped rows, only their sum
        combine = FixedDenominatorMean(dp.plan.expected_clients) if certified else rule
        stages = [Sanitize(cfg.defense.max_update_norm), Clip(dp.clip_in_force, scale_rows=not certified), combine,
                  Noise(dp)]
    return ServerPipeline(stages, dim, rule)
