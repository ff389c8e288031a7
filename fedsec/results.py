"""Typed results that travel through a run and into its directory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch


@dataclass(frozen=True)
class ClientUpdate:
    client_id: int
    delta: torch.Tensor
    num_examples: int
    metrics: dict = field(default_factory=dict)
    malicious: bool = False


@dataclass(frozen=True)
class SecureSum:
    """A round's updates as secure aggregation releases them: only their sum. `updates`
    says which clients are in it and what their nodes reported beside it (example count,
    loss); their deltas are empty, never seen by the server."""

    total: torch.Tensor  # [d]: the sum of the clients' deltas (each clipped on its node under user-level DP)
    updates: tuple[ClientUpdate, ...]


@dataclass(frozen=True)
class AttackContext:
    """What an update attack sees of its round beyond the deltas (fedsec.registry)."""

    generator: torch.Generator  # the round's attack stream: draw randomness from it, so a run repeats
    clients: int  # updates in the round, n
    attackers: int  # malicious among them, f
    server_lr: float  # the server optimizer's learning rate (model replacement scales by n / lr)


@dataclass(frozen=True)
class RoundResult:
    round: int  # 1-based index of the finished round
    lr: float
    clients: tuple[int, ...]
    train_loss: float
    rejected: tuple[int, ...]
    seconds: float
    global_eval: dict | None = None  # {"loss", "accuracy", "n"}
    client_eval: dict | None = None  # {"mean_accuracy", "min_accuracy", "per_client": {...}}
    privacy: dict | None = None  # DP runs: clip norm, clipped count, epsilon so far per accountant
    defense: dict | None = None  # robust aggregator: its name, excluded clients, diagnostics
    attack: dict | None = None  # malicious clients sampled; the defense's true/false positives
    failed: tuple[int, ...] = ()  # sampled clients whose update never came (a SuperNode down or late)
    # where and how fast it ran: device, precision, training tokens and tokens/s (the clients'
    # phase; on Flower the SuperNodes' time with transport), peak memory (CUDA: allocated bytes
    # in the round; CPU: the process's peak resident set so far); under DP not covered (data-sized)
    compute: dict | None = None

    def as_dict(self) -> dict:
        return {"phase": "federated", **asdict(self)}


@dataclass(frozen=True)
class RunResult:
    run_dir: str
    rounds_done: int
    finished: bool
    untuned: dict | None  # global eval of the base model with a zero adapter
    final: dict | None  # global eval of the final federated adapter
    local_only: dict | None  # {"mean_accuracy", "per_client": {...}}
    algorithm: str = "fedavg"
    privacy: dict | None = None  # DP runs: certified, reason, epsilon per accountant, sigma, q, C
    attack: dict | None = None  # runs with malicious clients: the attack and their identities
    audit: dict | None = None  # privacy audit: guesses, correct, the epsilon lower bound
    membership: dict | None = None  # eval.mia: per score, AUC and TPR at low FPR
    stopped: str | None = None  # why the run ended before its planned rounds (privacy.epsilon_budget)
    aggregator: str = "mean"  # defense.aggregator: the server's rule over the clients' deltas
    # eval.metrics' registered higher_is_better, by name (those that declare one): what the tables weigh
    metric_directions: dict | None = None

    def __fspath__(self) -> str:
        return self.run_dir

    @classmethod
    def read(cls, run_dir: str | Path) -> RunResult:
        """The result a finished run wrote in `run_dir` (result.json), as `fedsec.run` returned it:
        for a DP run with its not-covered part (the run directory's not_covered_by_dp_guarantee/)
        merged back in, as the researcher's own process holds it."""
        from fedsec.rundir import read_result

        path = Path(run_dir)
        if not (path / "result.json").is_file():
            from fedsec.errors import ConfigError

            raise ConfigError("run_dir", str(run_dir), "has no result.json: give a finished run's directory "
                              "(an unfinished one continues with fedsec run CONFIG --out DIR --resume)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in read_result(path).items() if k in known})


@dataclass(frozen=True)
class SweepResult:
    """A sweep's tables, as `fedsec.sweep` returns them: `runs`, one row per run (variant x
    seed; results.json), and `summary`, one per variant or grid cell (summary.json: each
    metric's `<column>_mean` and `<column>_std` over the seeds). Under DP the rows hold
    only what the DP runs may publish; the full tables are in `directory /
    not_covered_by_dp_guarantee`. The result is a path to its directory, so
    `fedsec.report(result)` and `Path(result)` work."""

    directory: Path
    runs: tuple[dict, ...]
    summary: tuple[dict, ...]

    def __fspath__(self) -> str:
        return str(self.directory)

    def variant(self, name: str) -> dict:
        """The summary row of one variant (a grid cell's name)."""
        for row in self.summary:
            if row["variant"] == name:
                return row
        raise KeyError(f"no variant {name!r} in {self.directory}; it has {[r['variant'] for r in self.summary]}")

    @classmethod
    def read(cls, directory: str | Path) -> SweepResult:
        """The tables a sweep wrote in `directory`."""
        import json

        root = Path(directory)
        if not (root / "summary.json").is_file():
            from fedsec.errors import ConfigError

            raise ConfigError("directory", str(directory), "has no summary.json: give a sweep's directory (fedsec "
                              "sweep SPEC writes its tables there once its runs finish)")
        runs = json.loads((root / "results.json").read_text(encoding="utf-8"))
        summary = json.loads((root / "summary.json").read_text(encoding="utf-8"))
        return cls(root, tuple(runs), tuple(summary))
