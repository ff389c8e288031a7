"""DP in the round loop: the plan fixed at setup, and the per-round step.

User-level (mode user) first; record-level (mode record, DP-SGD inside clients) at
the end of the file.

`plan_privacy` resolves the privacy section against the data once: the sample rate
q = clients_per_round / clients, the noise multiplier (given, or calibrated to the
target epsilon over all rounds with the chosen accountant), the split of the noise
under adaptive clipping, and whether the run's epsilon can be certified at all.

`UserLevelDp` holds a run's DP state: the plan, the DP streams' root, the clip norm in
force and the ledger. The server pipeline (fedsec.pipeline) clips with its clip norm
and draws the noise from its stream; `UserLevelDp.record` then puts the round's
release on the ledger and (optionally) moves the clip norm. Only the mean and norm
bounding (clipping to min(C, M)) have a proven sensitivity, so any other rule makes
the run "not certified". Its state (the current clip norm and the ledger) rides in
every checkpoint, so a resumed run continues its budget.

Where the DP randomness comes from (`dp_seed`): by default fresh entropy from the
operating system, drawn when a process starts and never stored, so nobody can
recompute the noise from anything the run leaves behind. With privacy.reproducible
it derives from the run's seed and the round instead (streams no training code
touches), so a run can be repeated and resumed exactly, at the price that anyone who
holds the seed can regenerate the noise and subtract it; the run says so when it
starts. Both ways, nothing computed from a round's noise is written before that
round's checkpoint (fedsec.loop), so a crash never releases a round that a resumed
run then computes again with other noise; if it happens anyway (the newest
checkpoint lost after its round was written out), `charge_released` counts the
released round as one more mechanism.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass

import torch

from fedsec.accountants import ACCOUNTANTS, DpEvent, PrivacyLedger, RecordLedger, calibrate, epsilon
from fedsec.accountants.ledger import LedgerEntry
from fedsec.config import ExperimentConfig
from fedsec.defenses.correlated import Noise, Participation, accounting
from fedsec.defenses.dp import (
    adapt_clip_norm,
    adaptive_update_noise,
    gaussian_noise,
    secagg_sensitivity,
)
from fedsec.defenses.registry import NormBound
from fedsec.errors import ConfigError
from fedsec.seeding import torch_generator


def dp_seed(cfg: ExperimentConfig) -> int:
    """The root of a run's DP streams: the config's seed with privacy.reproducible, else
    63 bits from the operating system (a new draw in every process, never stored)."""
    return cfg.seed if cfg.privacy.reproducible else secrets.randbits(63)


def reproducible_warning(cfg: ExperimentConfig) -> str:
    return (f"fedsec: warning: privacy.reproducible is true: the DP noise and sampling derive from seed "
            f"{cfg.seed}, which config.resolved.yaml records; anyone who holds it can recompute the noise and "
            "subtract it, so the epsilon holds only while the seed stays secret (for tests and debugging)")


def _same(field: str, recorded, now) -> None:
    """A resumed run's privacy parameter must be the one its ledger recorded."""
    same = (math.isclose(recorded, now, rel_tol=1e-12, abs_tol=0.0) if isinstance(now, float)
            else recorded == now)
    if not same:
        raise ConfigError(field, now, f"the run's privacy ledger recorded {recorded!r}; a run's privacy "
                          "parameters cannot change midway (its epsilon would no longer hold): resume with "
                          "the original settings or start a new run")


@dataclass(frozen=True)
class DpPlan:
    noise_multiplier: float  # z, the accounted multiplier of each round's mechanism (correlated: the run's one)
    update_noise: float  # the multiplier on the delta sum (z_delta < z with adaptive clipping)
    sample_rate: float  # q (correlated noise: 1, no amplification)
    expected_clients: float  # q N, the fixed denominator (correlated noise: clients_per_round)
    count_stddev: float | None  # adaptive clipping's sigma_b
    certified: bool
    reason: str | None
    mechanism: str = "dp_fedavg"
    correlated: CorrelatedPlan | None = None  # tree, banded_mf: the factorization's accounting


@dataclass(frozen=True)
class CorrelatedPlan:
    """A correlated-noise mechanism's accounting (fedsec.defenses.correlated): the unit
    sensitivity of the whole run for the participation, and of each prefix of rounds."""

    participation: Participation
    sensitivity: float  # sens_T at clip norm 1: each noise coordinate has std z * C * sens_T
    exact: bool  # the max over the participation's patterns (else a proven upper bound)
    prefix: tuple[float, ...]  # sens_t, t = 1..rounds
    seconds: float = 0.0  # what computing them took (fedsec.defenses.correlated.accounting)

    def round_multiplier(self, noise_multiplier: float, rounds_done: int) -> float:
        """The multiplier of the one Gaussian mechanism the first `rounds_done` rounds release."""
        return noise_multiplier * self.sensitivity / self.prefix[rounds_done - 1]


def _noise_multiplier(p, sample_rate: float, steps: int) -> float:
    """The given noise multiplier, 0 for epsilon = inf, or sigma calibrated to the target
    epsilon over `steps` sampled-Gaussian events at `sample_rate`."""
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    if math.isinf(p.epsilon):
        return 0.0
    try:
        return calibrate(p.epsilon, p.delta, sample_rate, steps, p.accountant)
    except ValueError as err:
        raise ConfigError("privacy.epsilon", p.epsilon, str(err)) from None


def _check_horizon(p, z: float, sample_rate: float, steps: int) -> None:
    """The primary accountant must be able to certify the whole planned run: a backend
    that fails there (a grid too large, a delta too small for its floats) is refused now,
    in one line, not after the noise of round 1 is drawn. A calibrated z was found by
    computing exactly this epsilon, so only a given noise multiplier needs the check."""
    if z == 0 or p.noise_multiplier is None:
        return
    try:
        epsilon([DpEvent(z, sample_rate, steps)], p.delta, p.accountant)
    except ValueError as err:
        raise ConfigError("privacy.accountant", p.accountant, f"{err}") from None


def plan_privacy(cfg: ExperimentConfig, num_clients: int) -> DpPlan:
    p, fed = cfg.privacy, cfg.federation
    if p.delta >= 1 / num_clients:
        raise ConfigError("privacy.delta", p.delta, f"must be below 1 / clients = {1 / num_clients:.3g} "
                          f"({num_clients} clients), e.g. 1e-5")
    if p.mechanism != "dp_fedavg":
        return _plan_correlated(cfg, num_clients)
    q = fed.clients_per_round / num_clients
    z = _noise_multiplier(p, q, fed.rounds)
    _check_horizon(p, z, q, fed.rounds)
    stddev = None
    update_noise = z
    if p.adaptive_clipping:
        stddev = p.clip_count_stddev if p.clip_count_stddev is not None else q * num_clients / 20
        try:
            update_noise = adaptive_update_noise(z, stddev)
        except ValueError as err:
            raise ConfigError("privacy.clip_count_stddev", stddev, f"{err}; raise it or clients_per_round") \
                from None
    reason = _uncertified(cfg, z)
    return DpPlan(z, update_noise, q, q * num_clients, stddev, reason is None, reason)


def _uncertified(cfg: ExperimentConfig, z: float) -> str | None:
    """Why a run with noise multiplier z cannot be certified, or None when it can."""
    if z == 0:
        return "no noise (noise_multiplier 0): clipping alone gives no DP guarantee"
    if cfg.federation.algorithm == "scaffold":
        return "SCAFFOLD's control variates reach the server without clipping or noise"
    if not cfg.defense.rule.dp_certified:
        return (f"aggregator {cfg.defense.aggregator} has no proven sensitivity bound under DP "
                "(only mean and norm_bound do)")
    return None


def participation_for(cfg: ExperimentConfig, num_clients: int) -> Participation:
    """The participation a correlated mechanism is accounted for, checked against the
    sampling: cyclic cohorts give a client every k-th round, k = clients / clients_per_round."""
    p, fed = cfg.privacy, cfg.federation
    kind = p.participation if p.participation != "auto" else (
        "cyclic" if cfg.sampling == "cyclic" else "every_round")
    if kind == "every_round":
        return Participation("every_round", fed.rounds)
    period = num_clients // fed.clients_per_round
    if kind == "cyclic":
        return Participation("cyclic", fed.rounds, period=period)
    most = math.ceil(fed.rounds / period)
    if period < p.min_separation:
        raise ConfigError("privacy.min_separation", p.min_separation, f"cyclic sampling brings a client back "
                          f"every {period} rounds ({num_clients} clients in cohorts of {fed.clients_per_round}); "
                          f"lower it to {period} or fewer")
    if most > p.max_participations:
        raise ConfigError("privacy.max_participations", p.max_participations, f"cyclic sampling gives a client "
                          f"up to {most} of the {fed.rounds} rounds; raise it to {most} or more")
    return Participation("separated", fed.rounds, max_participations=p.max_participations,
                         min_separation=p.min_separation)


def _plan_correlated(cfg: ExperimentConfig, num_clients: int) -> DpPlan:
    """A correlated mechanism (tree, banded_mf, a plugin's): the factorization's sensitivity
    for the run's participation, and
    z for the one Gaussian mechanism the whole run is (given, or calibrated to the target
    epsilon at sample rate 1 and one step: no amplification)."""
    p, fed = cfg.privacy, cfg.federation
    participation = participation_for(cfg, num_clients)
    try:
        found = accounting(p.matrix_mechanism, fed.rounds, participation)
    except ValueError as err:
        raise ConfigError("federation.rounds", fed.rounds, f"{err}; use fewer rounds or a tree with "
                          "privacy.params.restart") from None
    z = _noise_multiplier(p, 1.0, 1)
    _check_horizon(p, z, 1.0, 1)
    reason = _uncertified(cfg, z)
    correlated = CorrelatedPlan(participation, found.sensitivity, found.exact, found.prefix, found.seconds)
    return DpPlan(z, z, 1.0, float(fed.clients_per_round), None, reason is None, reason, p.mechanism, correlated)


class UserLevelDp:
    """DP-FedAvg's server side for one run: current clip norm + the privacy ledger."""

    def __init__(self, cfg: ExperimentConfig, plan: DpPlan, root: int | None = None):
        self.cfg, self.plan = cfg, plan
        self.root = dp_seed(cfg) if root is None else root  # the DP streams' root (noise, sampling)
        self.clip_norm = cfg.privacy.clip_norm
        self.secure: dict | None = None  # SecAgg+ on Flower: the sum's sensitivity and what the guarantee assumes
        self.ledger = PrivacyLedger(cfg.privacy.delta, ACCOUNTANTS, cfg.privacy.accountant,
                                    plan.certified, plan.reason)
        self.noise: Noise | None = None  # correlated noise's state (secret: only in checkpoints)
        self._noise_state: dict | None = None  # a checkpoint's, applied when the noise is first drawn

    def epsilon_after(self) -> float | None:
        """Epsilon after one more round (None: not certified)."""
        return self.ledger.epsilon_after(self.round_multiplier(len(self.ledger.entries) + 1),
                                         self.plan.sample_rate, self._mechanism)

    @property
    def _mechanism(self) -> str | None:
        return self.plan.mechanism if self.plan.correlated is not None else None

    def round_multiplier(self, rounds_done: int) -> float:
        """The accounted multiplier of the rounds so far: each round's under DP-FedAvg; under
        correlated noise the one Gaussian mechanism's of the first `rounds_done` rounds."""
        c = self.plan.correlated
        if c is None or self.plan.noise_multiplier == 0:
            return self.plan.noise_multiplier
        return c.round_multiplier(self.plan.noise_multiplier, min(rounds_done, len(c.prefix)))

    def correlated_noise(self, dim: int, clip_norm: float, round_idx: int, dtype: torch.dtype) -> torch.Tensor:
        """Round `round_idx`'s correlated noise on the clipped sum: each fresh draw has std
        z * C * sens_T (fedsec.defenses.correlated); the noise state rides in the checkpoint."""
        plan = self.plan
        if self.noise is None:
            self.noise = self.cfg.privacy.matrix_mechanism.noise(self.cfg.federation.rounds, dim)
            if self._noise_state is not None:
                self.noise.load_state_dict(self._noise_state)
        std = plan.noise_multiplier * clip_norm * plan.correlated.sensitivity
        stream = torch_generator(self.root, "dp-noise", round_idx)
        return self.noise.next(lambda: gaussian_noise(dim, std, stream, dtype))

    def charge_released(self, row: dict) -> None:
        """Count the round of metrics row `row` again (see the module note)."""
        p = row["privacy"]
        self.ledger.charge_released(LedgerEntry(row["round"], p["noise_multiplier"], self.plan.sample_rate,
                                                p["clip_norm"], None, mechanism=self._mechanism))

    def clip_in_force(self) -> float:
        """The clip norm C of the coming round (fedsec.pipeline's Clip and Noise stages)."""
        return self._clip_for(self.clip_norm)

    def record(self, batch) -> dict:
        """The round's DP release (`batch.release`, from the pipeline's noise stage) onto the
        ledger, then the adaptive clip-norm update; returns the round's privacy row.

        A rejected update (non-finite, wrong shape, absurd norm) counted as a zero delta:
        the client was sampled, so the denominator and the accounting stay as planned; so
        does a sampled client whose update never came. Neither moves the adaptive count.
        """
        e, clip = batch.release, batch.info["clip"]
        c = self.plan.correlated
        correlated = {} if c is None else {
            "mechanism": self.plan.mechanism, "sensitivity": c.prefix[batch.round_idx] * e.clip_norm,
            "noise_stddev": self.plan.noise_multiplier * e.clip_norm * c.sensitivity}
        entry = self.ledger.record(batch.round_idx + 1, e.noise_multiplier, e.sample_rate, e.clip_norm,
                                   e.update_noise, e.count_stddev, e.count_sensitivity, **correlated)
        if self.cfg.privacy.adaptive_clipping:
            p = self.cfg.privacy
            self.clip_norm, _ = adapt_clip_norm(self.clip_norm, clip["unclipped"], clip["clipped"],
                                                self.plan.expected_clients, p.target_quantile, p.clip_lr,
                                                self.plan.count_stddev,
                                                torch_generator(self.root, "dp-clip-count", batch.round_idx))
        # what the mechanism releases (clip norm, noise, epsilon) and, under "hidden", what it
        # does not: the exact counts and norms, which go to the run's not-covered place only
        row = {"clip_norm": e.clip_norm, "noise_multiplier": e.noise_multiplier, "epsilon": entry.epsilon,
               **({"mechanism": self.plan.mechanism, "sensitivity": correlated["sensitivity"]} if correlated else {}),
               "hidden": {k: clip[k] for k in ("clipped", "unclipped", "median_norm") if k in clip}}
        if clip.get("sensitivity") is not None:  # SecAgg+: the noise is scaled to the sum's rounding-inclusive bound
            row["sensitivity"] = clip["sensitivity"]
        return row

    def _clip_for(self, clip_norm: float) -> float:
        """The clip norm in force: norm bounding is clipping too, and the tighter bound wins."""
        rule = self.cfg.defense.rule
        return min(clip_norm, rule.max_norm) if isinstance(rule, NormBound) else clip_norm

    def report(self) -> dict:
        rep = self.ledger.report()
        return {"certified": rep.certified, "reason": rep.reason, "delta": rep.delta,
                "accountant": rep.accountant, "epsilon": rep.epsilon, "epsilons": self.ledger.epsilons_now(),
                "noise_multiplier": self.plan.noise_multiplier, "sample_rate": self.plan.sample_rate,
                "clip_norm": self.cfg.privacy.clip_norm, "adaptive_clipping":
                self.cfg.privacy.adaptive_clipping, "rounds": len(self.ledger.entries),
                "noise": noise_source(self.cfg), "released_again": len(self.ledger.released_again),
                "unavailable": self.ledger.entries[-1].unavailable if self.ledger.entries else None,
                "mechanism": self.plan.mechanism, **self._correlated_report(),
                **({"secure_aggregation": self.secure} if self.secure is not None else {})}

    def _correlated_report(self) -> dict:
        """A correlated mechanism: what the epsilon rests on (its parameters, the participation,
        the sensitivity and whether it is the exact max or a proven upper bound)."""
        c = self.plan.correlated
        if c is None:
            return {}
        return {"participation": dataclasses.asdict(c.participation),
                "sensitivity": c.sensitivity * self.cfg.privacy.clip_norm, "sensitivity_exact": c.exact,
                "mechanism_params": dataclasses.asdict(self.cfg.privacy.matrix_mechanism)}

    def public_ledger(self) -> dict:
        return self.ledger.to_dict()

    def state_dict(self) -> dict:
        state = {"clip_norm": self.clip_norm, "ledger": self.ledger.to_dict()}
        if self.noise is not None:  # secret: whoever reads it can subtract the correlated noise
            state["noise"] = self.noise.state_dict()
        return state

    def load_state_dict(self, state: dict, rounds_done: int) -> None:
        """Continue from a checkpoint's state; refuses (ConfigError) a config whose privacy
        parameters differ from the ones the ledger recorded."""
        ledger = PrivacyLedger.from_dict(state["ledger"])
        p, plan = self.cfg.privacy, self.plan
        _same("privacy.delta", ledger.delta, p.delta)
        _same("privacy.accountant", ledger.primary, p.accountant)
        for e in ledger.entries:  # the mechanism first: a change there moves every multiplier
            _same("privacy.mechanism", e.mechanism or "dp_fedavg", plan.mechanism)
            if not p.adaptive_clipping:
                _same("privacy.clip_norm", e.clip_norm, self._clip_for(p.clip_norm))
            if plan.correlated is not None:  # the same factorization (privacy.params) for the same participation
                _same("privacy.params (the sensitivity so far)", e.sensitivity,
                      plan.correlated.prefix[e.round - 1] * e.clip_norm)
        for e in ledger.entries:
            _same("privacy.noise_multiplier", e.noise_multiplier, self.round_multiplier(e.round))
            _same("federation.clients_per_round (sample rate)", e.sample_rate, plan.sample_rate)
        self.clip_norm = float(state["clip_norm"])
        self.ledger = ledger
        self.noise, self._noise_state = None, state.get("noise")
        if len(self.ledger.entries) != rounds_done:
            raise ValueError(f"checkpoint ledger has {len(self.ledger.entries)} rounds, expected "
                             f"{rounds_done}")


def noise_source(cfg: ExperimentConfig) -> str:
    """'os' (fresh entropy, never stored) or 'seed' (privacy.reproducible)."""
    return "seed" if cfg.privacy.reproducible else "os"


# ---------------------------------------------------------------------------
# Record-level DP: DP-SGD inside each client (fedsec.training.RecordDp).


@dataclass(frozen=True)
class RecordPlan:
    noise_multiplier: float  # sigma of every DP-SGD step
    sample_rates: dict[int, float]  # client -> q_k = min(1, batch_size / n_k)
    max_steps: int  # rounds x local_steps: no client can take more
    certified: bool
    reason: str | None


def plan_record_privacy(cfg: ExperimentConfig, client_sizes: list[int]) -> RecordPlan:
    """Sample rates per client and the step noise; a target epsilon is met by the worst client.

    The worst case is the largest q_k (the smallest client) taking a step in every round,
    rounds x local_steps steps; calibrating sigma for it bounds every client's epsilon.
    """
    p = cfg.privacy
    largest = max(client_sizes)
    if p.delta >= 1 / largest:
        raise ConfigError("privacy.delta", p.delta, f"must be below 1 / examples of the largest client = "
                          f"{1 / largest:.3g} ({largest} examples), e.g. 1e-5")
    rates = {k: min(1.0, cfg.training.batch_size / n) for k, n in enumerate(client_sizes)}
    steps = cfg.federation.rounds * cfg.training.local_steps
    z = _noise_multiplier(p, max(rates.values()), steps)
    _check_horizon(p, z, max(rates.values()), steps)
    reason = "no noise (noise_multiplier 0): clipping alone gives no DP guarantee" if z == 0 else None
    return RecordPlan(z, rates, steps, reason is None, reason)


class RecordLevelDp:
    """The record-level ledger of one run: each client's DP-SGD steps, the worst epsilon."""

    def __init__(self, cfg: ExperimentConfig, plan: RecordPlan):
        self.cfg, self.plan = cfg, plan
        self.ledger = RecordLedger(cfg.privacy.delta, plan.noise_multiplier, plan.sample_rates,
                                   cfg.privacy.accountant, plan.certified, plan.reason)

    def epsilon_after(self, sampled: list[int]) -> float | None:
        """The worst record's epsilon after `sampled` take one more round of steps."""
        return self.ledger.epsilon_after({c: self.cfg.training.local_steps for c in sampled})

    def charge_released(self, row: dict) -> None:
        self.ledger.charge_released(row["round"], {c: self.cfg.training.local_steps for c in row["clients"]})

    def record(self, round_idx: int, clients: list[int]) -> dict:
        """Round `round_idx` (0-based) trained `clients`, each for local_steps DP-SGD steps."""
        eps = self.ledger.record(round_idx + 1, {c: self.cfg.training.local_steps for c in clients})
        return {"mode": "record", "clip_norm": self.cfg.privacy.clip_norm,
                "noise_multiplier": self.plan.noise_multiplier,
                "epsilon": None if eps is None else {self.cfg.privacy.accountant: eps}}

    def report(self) -> dict:
        ledger = self.ledger  # the primary's epsilon is computed once, in the side-by-side table
        epsilons, unavailable = ledger.epsilons(ACCOUNTANTS) if ledger.certified else (None, None)
        return {"mode": "record", "certified": ledger.certified, "reason": ledger.reason, "delta": ledger.delta,
                "accountant": ledger.primary, "epsilon": epsilons[ledger.primary] if epsilons else None,
                "epsilons": epsilons,
                "unavailable": unavailable,
                "noise_multiplier": self.plan.noise_multiplier,
                "sample_rate": max(self.plan.sample_rates.values()),
                "clip_norm": self.cfg.privacy.clip_norm, "adaptive_clipping": False,
                "rounds": len(self.ledger.rounds), "noise": noise_source(self.cfg),
                "released_again": len(self.ledger.released_again)}

    def public_ledger(self) -> dict:
        """The ledger without per-client step counts or per-round client counts (who trained)."""
        return self.ledger.public_dict()

    def state_dict(self) -> dict:
        return {"ledger": self.ledger.to_dict()}

    def load_state_dict(self, state: dict, rounds_done: int) -> None:
        """As UserLevelDp.load_state_dict: the recorded privacy parameters must be today's."""
        ledger = RecordLedger.from_dict(state["ledger"])
        _same("privacy.delta", ledger.delta, self.cfg.privacy.delta)
        _same("privacy.accountant", ledger.primary, self.cfg.privacy.accountant)
        _same("privacy.noise_multiplier", ledger.noise_multiplier, self.plan.noise_multiplier)
        for client, q in ledger.sample_rates.items():
            _same("training.batch_size (record sample rate)", q, self.plan.sample_rates.get(client, -1.0))
        self.ledger = ledger
        if len(self.ledger.rounds) != rounds_done:
            raise ValueError(f"checkpoint ledger has {len(self.ledger.rounds)} rounds, expected "
                             f"{rounds_done}")


def secure_aggregation_terms(cfg: ExperimentConfig, dim: int) -> dict:
    """What a user-level DP guarantee under SecAgg+ rests on, for the run's privacy report."""
    f = cfg.flower
    return {"protocol": "SecAgg+ (Flower)", "clip_range": f.secagg_clip_range, "bits": f.secagg_bits,
            "sensitivity": secagg_sensitivity(cfg.privacy.clip_norm, dim, f.secagg_clip_range, f.secagg_bits),
            "assumes": "the server follows the protocol and adds the noise to the unmasked sum (honest but "
                       "curious); every SuperNode clips each of its clients' deltas to clip_norm before the "
                       "secure sum (the server cannot check it); the noise is scaled to the sensitivity, which "
                       "includes SecAgg+'s stochastic rounding (fedsec.defenses.dp.secagg_sensitivity)"}
