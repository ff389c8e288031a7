"""The federated round loop, top to bottom.

    setup (once, fedsec.setup): model + LoRA, data, tokenization, evaluation sets
    round t (play_round):  sample -> the clients train (fedsec.clients) -> attackers replace
        their updates (fedsec.attacks) -> the server pipeline: sanitize -> (DP: clip) -> rule
        -> (DP: noise) (fedsec.pipeline) -> the DP release onto the ledger (dp.record) ->
        server optimizer step -> local-only baseline clients train alone -> evaluate when
        due (fedsec.round_eval) -> checkpoint, then metrics.jsonl and the ledger
    end (finish):  local-only evaluation, final adapter, result.json

`RunState` is what a run carries from round to round and what its checkpoint holds.
Every random stream derives from the root seed and (round, client), so a run resumed
from its checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from fedsec.accountants.ledger import format_epsilon
from fedsec.attacks.clients import attack_round, detection
from fedsec.clients import ClientRunner, InProcessClients, scaffold_updates, server_reference
from fedsec.config import ExperimentConfig
from fedsec.console import round_line
from fedsec.devices import PeakMemory, model_device
from fedsec.disclosure import split_result
from fedsec.errors import ConfigError
from fedsec.models import quiet_transformers
from fedsec.pipeline import SERVER, build_pipeline
from fedsec.privacy import (
    RecordLevelDp,
    UserLevelDp,
    plan_privacy,
    reproducible_warning,
    secure_aggregation_terms,
)
from fedsec.progress import showing as progress_bars
from fedsec.progress import shown as setup_bars_shown
from fedsec.results import RoundResult, RunResult, SecureSum
from fedsec.round_eval import audit_outcome, evaluate_model, membership_attack
from fedsec.rundir import RunDir, claimed, default_run_dir, latest_run_dir
from fedsec.scaffold import VariateStore
from fedsec.seeding import derive_seed, torch_generator
from fedsec.server import (
    check_sampling,
    cyclic_cohort,
    ema_step,
    make_server_optimizer,
    poisson_sample,
    sample_clients,
    server_step,
    server_step_scale,
)
from fedsec.setup import Setup, prepare
from fedsec.training import LocalTrainer, round_lr
from fedsec.utility import metric_directions


def run_experiment(cfg: ExperimentConfig, out: str | Path | None = None, resume: bool = False,
                   stop_after: int | None = None, progress: bool = True,
                   log: Callable[[str], None] = print, clients: ClientRunner | None = None) -> RunResult:
    """Run (or resume) one federated experiment; returns its headline numbers.

    `stop_after` ends the run after that many rounds (as a crash would), leaving a
    checkpoint that `resume=True` continues from. `clients` trains the sampled clients
    (default: here, in this process; fedsec.engine.flower: on Flower SuperNodes).

    Crash safety: each round ends with its checkpoint (written atomically), and only
    then its metrics row and ledger are written out; the checkpoint carries the row, so
    a resume restores a row a crash kept from being written. A run killed at any moment
    resumes to the same results.
    """
    clients = clients if clients is not None else InProcessClients()
    path = Path(out) if out is not None else (latest_run_dir(cfg) if resume else default_run_dir(cfg))
    if path is None:
        raise ConfigError("--resume", cfg.name, f"no earlier run of it under {cfg.output_dir}/; "
                          "start one without --resume")
    with claimed(path):  # from here on a second run with this --out fails at once
        run = None
        if resume:
            run = RunDir.reopen(path, cfg)
            run.acquire()
        else:
            RunDir.check_free(path)
        try:
            discover = getattr(clients, "discover", None)  # data.silos on Flower: the organisations' client counts
            silos = discover(cfg, log) if discover is not None else None
            # tokenizing, the frozen prefix, DPO's reference pass; also when a caller showing its
            # own progress turned them on (a sweep, whose runs have no round bars of their own)
            with progress_bars(progress or setup_bars_shown()):
                setup = prepare(cfg, silos, remote=discover is not None)  # bad data or model: fails here
            # the sampling rate q = clients_per_round / population does not depend on which audit
            # canaries are in, so the mechanism (and its accounting) is the same in both worlds
            check_sampling(cfg, setup.trainable)
            dp = UserLevelDp(cfg, plan_privacy(cfg, setup.population)) if cfg.privacy.mode == "user" else None
            record = RecordLevelDp(cfg, setup.record_plan) if setup.record_plan is not None else None
            if run is None:
                run = RunDir.create(path, cfg)
            return _rounds(setup, run, dp, record, resume, stop_after, progress, log, clients)
        finally:
            if run is not None:
                run.close()


class RunState:
    """What a run carries from round to round; `state_dict` is what its checkpoint holds."""

    def __init__(self, setup: Setup, run: RunDir, dp: UserLevelDp | None, record: RecordLevelDp | None):
        cfg, dim = setup.cfg, setup.adapter.layout.numel
        self.dp, self.record = dp, record
        self.private = dp if dp is not None else record  # the run's privacy state, if any
        self.global_vec = setup.adapter.get().to(SERVER)  # the server's copy, beside the aggregates it meets
        self.server = make_server_optimizer(cfg.federation)
        self.pipeline = build_pipeline(cfg, run.path, dim, dp)  # sanitize -> (clip) -> rule -> (noise)
        if dp is not None and cfg.engine == "flower" and cfg.flower.secagg:
            dp.secure = secure_aggregation_terms(cfg, dim)
        self.local = {c: self.global_vec.clone() for c in setup.local_only}  # the local-only baseline
        scaffold = cfg.federation.algorithm == "scaffold"
        self.variates = VariateStore(run.path / "scaffold", dim) if scaffold else None
        self.server_c = torch.zeros(dim, device=SERVER) if scaffold else None
        self.crafted = setup.audit.updates if setup.audit is not None else None  # audit.kind update
        self.average, self.ema_weight = None, 0.0  # federation.ema_decay: the released average of the globals
        self.rounds_done = 0

    @property
    def released(self) -> torch.Tensor:
        """The model the run evaluates and saves: the last global, or their moving average."""
        return self.global_vec if self.average is None else self.average

    @released.setter
    def released(self, vector: torch.Tensor) -> None:
        if self.average is None:
            self.global_vec = vector
        else:
            self.average = vector

    def smooth(self, decay: float) -> None:
        """The round's global model into the moving average (federation.ema_decay; 0: none)."""
        if decay > 0:
            start = self.global_vec if self.average is None else self.average
            self.average, self.ema_weight = ema_step(start, self.ema_weight, self.global_vec, decay)

    def state_dict(self, row: dict) -> dict:
        return {"global": self.global_vec, "server": self.server.state_dict(),
                "local_only": {str(c): v for c, v in self.local.items()}, "scaffold_c": self.server_c,
                "defense": self.pipeline.rule.state_dict(),
                "privacy": self.private.state_dict() if self.private is not None else None,
                "audit_scores": self.crafted.scores if self.crafted is not None else None,
                "ema": (self.average, self.ema_weight) if self.average is not None else None, "row": row}

    def load_state_dict(self, checkpoint: dict) -> None:
        self.rounds_done = int(checkpoint["rounds_done"])
        self.global_vec = checkpoint["global"]
        self.server.load_state_dict(checkpoint["server"])
        self.local = {int(c): v for c, v in checkpoint["local_only"].items()}
        self.server_c = checkpoint.get("scaffold_c")
        self.pipeline.rule.load_state_dict(checkpoint.get("defense"))
        if self.private is not None:
            self.private.load_state_dict(checkpoint["privacy"], self.rounds_done)
        if self.crafted is not None:
            self.crafted.scores = checkpoint["audit_scores"]
        if checkpoint.get("ema") is not None:
            self.average, self.ema_weight = checkpoint["ema"]


def _rounds(setup: Setup, run: RunDir, dp: UserLevelDp | None, record: RecordLevelDp | None, resume: bool,
            stop_after: int | None, progress: bool, log: Callable[[str], None], clients: ClientRunner) -> RunResult:
    """The rounds of `run_experiment`, from its checkpoint when resuming, then `finish`."""
    cfg, fed = setup.cfg, setup.cfg.federation
    attack = {"kind": cfg.attack.kind, "malicious": list(setup.malicious)} if setup.malicious else None
    setup = dataclasses.replace(setup, answers_dir=run.path / "answers")
    state = RunState(setup, run, dp, record)
    if state.private is not None and cfg.privacy.reproducible:
        log(reproducible_warning(cfg))
    if state.private is not None and getattr(state.private.plan, "correlated", None) is not None:
        c, p = state.private.plan.correlated, cfg.privacy
        log(f"fedsec: {p.mechanism}, {c.participation.kind} participation over {fed.rounds} rounds: sensitivity "
            f"{c.sensitivity * p.clip_norm:.6g} ({'exact' if c.exact else 'an upper bound'}), computed in "
            f"{c.seconds:.2f} s")
        log(f"fedsec: note: {run.path / 'checkpoints'} holds the {cfg.privacy.mechanism} noise's state (the "
            "noise of the rounds to come depends on it): whoever reads it can subtract noise, so keep the "
            "checkpoints as private as the data and publish the adapter, never the checkpoints")
    _start(setup, run, state, resume, log)
    _write_federation(setup, run)
    clients.start(setup, log)
    if hasattr(clients, "evaluate"):  # Flower: each client's held-out examples are evaluated on its node
        setup = dataclasses.replace(setup, remote_eval=lambda vector: clients.evaluate(setup, vector))
    if state.rounds_done == 0 and not any(r.get("round") == 0 for r in run.read_covered_metrics()):
        untuned, clients_eval = evaluate_model(setup, state.global_vec, 0)
        run.append_metrics({"phase": "federated", "round": 0, "global_eval": untuned, "client_eval": clients_eval})
        log(round_line(0, fed.rounds, None, untuned, clients_eval, state.private is not None))
    budget = Budget(cfg, log)
    bar = tqdm(total=fed.rounds, initial=state.rounds_done, desc="rounds", unit="round", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    for round_idx in range(state.rounds_done, fed.rounds):
        lr = round_lr(cfg.training, round_idx, fed.rounds)
        sampled = _sample(setup, state, round_idx)
        if state.private is not None and budget.exceeded(round_idx, state.private, sampled):
            bar.close()
            realigned = _realign_at_end(setup, state, round_idx - 1) if round_idx > 0 else False
            return finish(setup, run, state.released, state.local, state.private.report(), attack,
                          rounds_done=round_idx, stopped=budget.stopped, evaluate=realigned)
        result = play_round(setup, state, clients, round_idx, sampled, lr)
        _save_round(run, state, result, cfg.keep_checkpoints)
        bar.update(1)
        bar.clear()
        log(round_line(round_idx + 1, fed.rounds, result, result.global_eval, result.client_eval,
                       state.private is not None, averaged=fed.ema_decay > 0))
        bar.refresh()
        if stop_after is not None and round_idx + 1 >= stop_after and round_idx + 1 < fed.rounds:
            bar.close()
            return RunResult(str(run.path), round_idx + 1, False, None, None, None, fed.algorithm,
                             state.private.report() if state.private is not None else None, attack,
                             aggregator=setup.cfg.defense.aggregator)
    bar.close()
    return finish(setup, run, state.released, state.local,
                  state.private.report() if state.private is not None else None, attack)


def play_round(setup: Setup, state: RunState, clients: ClientRunner, round_idx: int, sampled: list[int],
               lr: float) -> RoundResult:
    """One round: the sampled clients train, attackers replace their updates, the server
    pipeline aggregates, the ledger records the DP release, the server optimizer steps."""
    started = time.perf_counter()
    memory = PeakMemory(model_device(setup.model))
    memory.reset()
    updates, failed = _client_updates(setup, state, clients, sampled, lr, round_idx)
    secure = None
    if isinstance(updates, SecureSum):  # secure aggregation: the sum, and what the nodes said beside it
        secure, updates = updates, list(updates.updates)
    trained = time.perf_counter() - started
    outcome = None
    if setup.malicious:
        outcome = attack_round(setup.cfg.attack.kind, setup.cfg.attack.params, updates, set(setup.malicious),
                               torch_generator(setup.cfg.seed, "attack", round_idx), setup.cfg.federation.server_lr)
        updates = outcome.updates
    batch = state.pipeline(updates, round_idx, server_reference(setup, state.global_vec, lr, round_idx), secure)
    privacy = None
    if state.dp is not None:
        privacy = state.dp.record(batch)  # the round's DP release onto the ledger: epsilon so far
    if state.record is not None:
        privacy = state.record.record(round_idx, sampled)
    defended = batch.info.get("rule")  # the robust rule's report: who it excluded, its scores
    attacked = None
    if outcome is not None:
        attacked = detection(outcome.malicious, tuple(sampled), batch.rejected, (defended or {}).get("excluded"))
        if outcome.note:
            attacked["note"] = outcome.note
    if state.crafted is not None:  # the audit's attacker sees every released aggregate
        state.crafted.observe(batch.aggregate)
    fed = setup.cfg.federation
    # the DP noise in each coordinate of the aggregate, for a server optimizer that takes it:
    # record-level DP's is inside the clients' own steps, of no one known level (None)
    noise_std = (batch.release.noise_stddev if batch.release is not None
                 else None if state.record is not None else 0.0)
    stepped = server_step(state.server, state.global_vec, batch.aggregate, noise_std)
    scale = server_step_scale(round_idx, fed.rounds, fed.server_lr, fed.server_min_lr)
    state.global_vec = stepped if scale == 1.0 else state.global_vec + scale * (stepped - state.global_vec)
    if setup.realign_set and setup.cfg.defense.realign_at == "round":
        state.global_vec = realign(setup, state.global_vec, lr, round_idx)
    state.smooth(fed.ema_decay)
    if round_idx + 1 == fed.rounds:
        _realign_at_end(setup, state, round_idx)
    if setup.local_only:  # the local-only baseline: each from its own adapter (in lockstep where it applies)
        own = setup.local_only
        alone = setup.trainer.train_clients(torch.stack([state.local[c] for c in own]),
                                            [setup.train_sets[c] for c in own], lr,
                                            [derive_seed(setup.cfg.seed, "local", round_idx, c) for c in own])
        for c, result in zip(own, alone):
            state.local[c] = state.local[c] + result.delta
    global_eval, clients_eval = _evaluate_if_due(setup, state.released, round_idx + 1)
    rejected = set(batch.rejected)
    kept = [u for u in updates if u.client_id not in rejected]
    terms = sum(u.metrics["loss_terms"] for u in kept)
    train_loss = sum(u.metrics["loss"] * u.metrics["loss_terms"] for u in kept) / max(terms, 1)
    tokens = sum(u.metrics.get("tokens", 0) for u in updates)  # an audit's crafted canary trained none
    compute = {"device": str(memory.device), "precision": setup.cfg.training.precision, "train_tokens": tokens,
               "train_seconds": trained, "tokens_per_s": tokens / trained if trained > 0 else None,
               "peak_memory_bytes": memory.read(), "peak_memory_kind": memory.kind}
    return RoundResult(round_idx + 1, lr, tuple(sampled), train_loss, batch.rejected, time.perf_counter() - started,
                       global_eval, clients_eval, privacy, defended, attacked, failed, compute)


def _start(setup: Setup, run: RunDir, state: RunState, resume: bool, log: Callable[[str], None]) -> None:
    """Resuming: the newest readable checkpoint into `state`, and the run files cut back to it."""
    checkpoint = run.load_latest_checkpoint() if resume else None
    if checkpoint is None:
        if resume:
            run.truncate_metrics(0)
        return
    state.load_state_dict(checkpoint)
    done = state.rounds_done
    if state.private is not None:
        _charge_lost_rounds(run, state.private, done, log)
    run.truncate_metrics(done)
    row = checkpoint.get("row")
    if row is not None and not any(r.get("phase") == "federated" and r.get("round") == done
                                   for r in run.read_covered_metrics()):
        run.append_metrics(row)  # the crash came between the checkpoint and its row
    if state.private is not None:
        _write_ledger(run, state.private)
    log(f"resuming {run.path} after round {done}/{setup.cfg.federation.rounds}")


def _sample(setup: Setup, state: RunState, round_idx: int) -> list[int]:
    """The round's clients: Poisson with rate q (from the DP stream under user-level DP, where
    the sample is part of the mechanism), or a uniform fixed-size sample."""
    fed = setup.cfg.federation
    sampler = torch_generator(state.dp.root if state.dp is not None else setup.cfg.seed, "sample", round_idx)
    if setup.cfg.sampling == "poisson":
        return poisson_sample(setup.trainable, fed.clients_per_round / setup.population, sampler)
    if setup.cfg.sampling == "cyclic":
        return cyclic_cohort(setup.trainable, fed.clients_per_round, round_idx)
    return sample_clients(setup.trainable, fed.clients_per_round, sampler)


def _realign_at_end(setup: Setup, state: RunState, last_round: int) -> bool:
    """defense.realign_at: end: the model the run releases re-aligned after its last round,
    the planned last or the one before the epsilon budget stopped it. Whether it did."""
    if not (setup.realign_set and setup.cfg.defense.realign_at == "end"):
        return False
    lr = round_lr(setup.cfg.training, last_round, setup.cfg.federation.rounds)
    state.released = realign(setup, state.released, lr, last_round)
    return True


def realign(setup: Setup, vector: torch.Tensor, lr: float, round_idx: int) -> torch.Tensor:
    """The anchors' defense (defense.realign_steps): the server fine-tunes the global adapter
    on its own aligned set, from the round's global adapter, with the clients' trainer for
    realign_steps steps. Its own data, after the release: post-processing under DP."""
    d = setup.cfg.defense
    trainer = LocalTrainer(setup.model, dataclasses.replace(setup.cfg.training, local_steps=d.realign_steps),
                           setup.trainer.objective)
    result = trainer.train(vector, setup.realign_set, d.realign_lr or lr,
                           derive_seed(setup.cfg.seed, "realign", round_idx))
    return vector + result.delta


def _client_updates(setup: Setup, state: RunState, clients: ClientRunner, sampled: list[int], lr: float,
                    round_idx: int) -> tuple[list, tuple[int, ...]]:
    """The sampled clients' updates (SCAFFOLD's corrected ones; the audit's crafted canaries
    in place of theirs) and the ids of those whose update never came."""
    fed = setup.cfg.federation
    trained = state.crafted.trained(sampled) if state.crafted is not None else sampled
    failed: tuple[int, ...] = ()
    if state.variates is None:
        prox_mu = fed.prox_mu if fed.algorithm == "fedprox" else 0.0
        updates, failed = clients.updates(setup, state.global_vec, trained, lr, round_idx, prox_mu)
    else:
        updates, state.server_c = scaffold_updates(setup, state.variates, state.server_c, state.global_vec,
                                                   trained, lr, round_idx)
    if state.crafted is not None:
        updates = state.crafted.insert(updates, sampled, setup.adapter.layout.numel)
    return updates, failed


def _evaluate_if_due(setup: Setup, vector: torch.Tensor, rounds_done: int) -> tuple[dict | None, dict | None]:
    cfg = setup.cfg
    due = (rounds_done % cfg.eval.every == 0 or rounds_done == cfg.federation.rounds
           or any(t.due(rounds_done, cfg.federation.rounds) for t in setup.tasks))
    return evaluate_model(setup, vector, rounds_done) if due else (None, None)


def _save_round(run: RunDir, state: RunState, result: RoundResult, keep: int) -> None:
    """The checkpoint first: nothing computed from this round leaves the process before it
    is durable; then the metrics row and the ledger."""
    row = result.as_dict()
    run.save_checkpoint(result.round, state.state_dict(row), keep=keep)
    run.append_metrics(row)
    if state.private is not None:
        _write_ledger(run, state.private)


def _write_federation(setup: Setup, run: RunDir) -> None:
    """federation.json: the number of clients (the population N the sampling rate and the
    guarantee assume public); clients.json: each client's id, name, sizes and the user
    values its examples carry (data-derived: under DP it goes to the not-covered place)."""
    clients = setup.data.clients[: setup.federation_clients]
    if setup.silos:  # the counts the organisations reported (public by the guarantee's assumption); no examples here
        run.write_json("federation.json", {"num_clients": len(clients), "source": "silos",
                                           "clients_per_silo": list(setup.silos)})
        return
    run.write_json("federation.json", {"num_clients": len(clients), "source": setup.cfg.data.source})
    detail = ({"client_id": c.client_id, "name": c.name, "train_examples": len(c.train),
               "test_examples": len(c.test), "preference_pairs": len(c.preference),
               "users": sorted({str(e.meta["user"]) for e in (*c.train, *c.test, *c.preference)
                                if e.meta.get("user") is not None})}
              for c in clients)
    run.write_rows_json("clients.json", "clients", detail, uncovered=run.guarded)


def _write_ledger(run: RunDir, private) -> None:
    """privacy_ledger.json: the mechanism's rounds (the record ledger's per-client step counts,
    which say who trained, go to the not-covered place)."""
    run.write_json("privacy_ledger.json", private.public_ledger())
    if isinstance(private, RecordLevelDp):
        run.write_uncovered_json("record_ledger_steps.json", private.ledger.to_dict())


def _charge_lost_rounds(run: RunDir, private, rounds_done: int, log: Callable[[str], None]) -> None:
    """Rounds written out after the checkpoint we resume from were released; the checkpoint
    that followed them is lost (unreadable), and they are computed again. Each redo is a
    second release of the same data, charged: with fresh noise plainly so, and with
    privacy.reproducible too, since nothing verifies that a redo is bit-identical to the
    release (another machine, thread count or library version can change the bits)."""
    lost = [r for r in run.read_metrics() if r.get("phase") == "federated" and r.get("round", 0) > rounds_done
            and r.get("privacy")]
    if not lost:
        return
    for row in lost:
        private.charge_released(row)
    log(f"fedsec: rounds {', '.join(str(r['round']) for r in lost)} were written out before their checkpoint "
        "was lost; each is computed again and charged to the privacy ledger a second time")


class Budget:
    """privacy.epsilon_budget: before each round, would it take epsilon over the budget?"""

    def __init__(self, cfg: ExperimentConfig, log: Callable[[str], None]):
        self.limit, self.action, self.log = cfg.privacy.epsilon_budget, cfg.privacy.on_budget, log
        self.warned = False
        self.stopped: str | None = None

    def exceeded(self, round_idx: int, private, sampled: list[int]) -> bool:
        """True when the run must stop before round `round_idx` (0-based); warns once otherwise."""
        if self.limit is None or self.warned:
            return False
        # user-level DP's mechanism is the same whoever is sampled; record-level DP charges who trains
        after = private.epsilon_after(sampled) if isinstance(private, RecordLevelDp) else private.epsilon_after()
        if after is None:
            self.log(f"fedsec: warning: privacy.epsilon_budget {self.limit:g} cannot be checked: the run's epsilon "
                     f"is not certified ({private.report()['reason']})")
            self.warned = True
            return False
        if after <= self.limit:
            return False
        what = (f"round {round_idx + 1} would take epsilon to {format_epsilon(after)} > privacy.epsilon_budget "
                f"{self.limit:g}")
        if self.action == "stop":
            self.stopped = what
            self.log(f"fedsec: stopping before {what}; the run ends after round {round_idx}")
            return True
        self.log(f"fedsec: warning: {what}; going on (privacy.on_budget: warn)")
        self.warned = True
        return False


def finish(setup: Setup, run: RunDir, global_vec: torch.Tensor, local: dict,
           privacy: dict | None = None, attack: dict | None = None, rounds_done: int | None = None,
           stopped: str | None = None, evaluate: bool = False) -> RunResult:
    """Local-only evaluation, final adapter, result.json. `stopped`: why the run ended after
    `rounds_done` rounds, before the planned ones (the epsilon budget). `evaluate`: the
    adapter changed after its round's evaluation (re-aligned at the stop), evaluate it again."""
    rounds_done = setup.cfg.federation.rounds if rounds_done is None else rounds_done
    rows = run.read_metrics()
    untuned = next(r["global_eval"] for r in rows if r.get("round") == 0)
    last = [r for r in rows if r.get("phase") == "federated" and r.get("round") == rounds_done]
    if evaluate or (stopped is not None and not (last and last[-1].get("global_eval"))):
        final, _ = evaluate_model(setup, global_vec)  # the adapter the run ends with, evaluated
    else:
        final = next((r["global_eval"] for r in reversed(rows) if r.get("global_eval")), {})  # {}: nothing global
    local_only = None
    if local:
        per_client = {}
        for c, vec in sorted(local.items()):
            global_eval, own = evaluate_model(setup, vec)
            own_eval = own["per_client"].get(str(c)) if own else None
            per_client[str(c)] = {"global_eval": global_eval, "own_test": own_eval}
        accs = [v["global_eval"].get("accuracy") for v in per_client.values()]
        accs = [a for a in accs if a is not None]
        losses = [v["global_eval"]["loss"] for v in per_client.values() if v["global_eval"].get("loss") is not None]
        local_only = {"mean_accuracy": sum(accs) / len(accs) if accs else None,
                      "mean_loss": sum(losses) / len(losses) if losses else None,
                      "per_client": per_client}
        run.append_metrics({"phase": "local_only_final", "round": rounds_done, **local_only})
    setup.adapter.set(global_vec)
    # the adapter alone: new-token canaries' embedding rows come from the seed (fedsec.models), not the file
    with quiet_transformers():
        setup.model.save_pretrained(run.path / "adapter", save_embedding_layers=False)
    audit = None
    if setup.audit is not None:
        audit = audit_outcome(setup, privacy)
    membership = None
    if setup.cfg.eval.mia:
        membership = membership_attack(setup)
    result = RunResult(str(run.path), rounds_done, True, untuned, final, local_only,
                       setup.cfg.federation.algorithm, privacy, attack, audit, membership, stopped,
                       setup.cfg.defense.aggregator, metric_directions(setup.cfg.eval.metrics) or None)
    if run.guarded:
        covered, hidden = split_result(asdict(result))
        run.write_uncovered_json("result.json", hidden)
        run.write_json("result.json", covered)
    else:
        run.write_json("result.json", asdict(result))
    return result
