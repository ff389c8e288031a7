"""Run directories: everything a run leaves behind, written so nothing is lost.

runs/<name>-<timestamp>/
  config.resolved.yaml   the validated config, every default filled in
  env.json               versions, git revision, seed, machine
  metrics.jsonl          one JSON row per evaluated round (and the baselines)
  checkpoints/           round_NNNN.pt: everything needed to continue
  adapter/               the final global adapter (peft format)
  result.json            the headline numbers of a finished run
  privacy_ledger.json    DP runs: one mechanism per round, epsilon so far
  not_covered_by_dp_guarantee/
                         DP runs: what the guarantee does not cover (fedsec.disclosure):
                         metrics.jsonl and result.json parts, a README saying so

Files are written atomically (temp file, fsync, rename); an existing run is never
overwritten, and resuming checks that the config is the one the run started with.
A run directory appears whole (it is built under a temporary name and renamed into
place, which fails if another run got there first), and a running process holds an
exclusive lock on it (`.lock`, released by the kernel even on SIGKILL), so two runs
never write into the same directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from fedsec.config import ExperimentConfig, dump_config
from fedsec.disclosure import HEADER, UNCOVERED, merge_result, merge_rows, split_row
from fedsec.errors import ConfigError

CONFIG = "config.resolved.yaml"
LOCK = ".lock"
STAGING = ".creating"  # suffix of the hidden folder a new run is built in


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """<output_dir>/<name>-<timestamp>, with -2, -3, ... if a run started in the same second."""
    base = Path(cfg.output_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def latest_run_dir(cfg: ExperimentConfig) -> Path | None:
    parent = Path(cfg.output_dir)
    runs = sorted(p for p in parent.glob(f"{cfg.name}-*") if (p / CONFIG).is_file())
    return runs[-1] if runs else None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class RunDir:
    """One run's directory. `guarded` (a DP run): each metrics row is split into what the
    guarantee covers (metrics.jsonl) and what it does not (UNCOVERED/metrics.jsonl)."""

    def __init__(self, path: Path, lock: int | None = None, guarded: bool = False):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"
        self.uncovered = self.path / UNCOVERED
        self.guarded = guarded
        self._lock = lock  # the open, flock'ed .lock file while this process runs in it

    def close(self) -> None:
        """Release the run's lock (the kernel also does when the process ends)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # -- creating and reopening ------------------------------------------------

    @staticmethod
    def check_free(path: Path) -> None:
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError("--out", str(path), "already exists and is not empty; pass --resume "
                              "to continue that run, or choose a new --out")

    @classmethod
    def create(cls, path: Path, cfg: ExperimentConfig, env: dict | None = None) -> RunDir:
        """The new run directory `path`, locked by this process. It is built under a
        temporary name and renamed into place: a crash leaves no half-made run, and a run
        that got there first (the rename fails) is never written into."""
        path = Path(path)
        cls.check_free(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(path)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=STAGING, dir=path.parent))
        lock = None
        try:
            lock = _lock(staging / LOCK, path)  # first: a staging folder without a held lock is a dead one's
            (staging / "checkpoints").mkdir()
            atomic_write_text(staging / CONFIG, dump_config(cfg))
            atomic_write_text(staging / "env.json", json.dumps(env or environment(cfg.seed), indent=2) + "\n")
            try:
                os.rename(staging, path)  # fails unless path is absent or an empty folder
            except OSError:
                raise ConfigError("--out", str(path), "another run created it first; choose a new --out") \
                    from None
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return cls(path, lock, _guarded(cfg))

    @classmethod
    def reopen(cls, path: Path, cfg: ExperimentConfig) -> RunDir:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise ConfigError("--resume", str(path), "is not a fedsec run directory (no "
                              f"{CONFIG}); start a new run without --resume")
        stored = (path / CONFIG).read_text(encoding="utf-8")
        if stored != dump_config(cfg) and not _same_experiment(stored, cfg):
            changed = _first_difference(stored, dump_config(cfg))
            raise ConfigError("--resume", str(path), f"the config differs from the run's ({changed}); "
                              "resume with the same config and overrides")
        return cls(path, guarded=_guarded(cfg))

    def acquire(self) -> None:
        """Lock the run for this process (to continue it) and drop the temporary files of
        atomic writes a crash interrupted (never read, safe to remove)."""
        if self._lock is None:
            self._lock = _lock(self.path / LOCK, self.path)
        for folder in (self.path, self.checkpoints, self.uncovered):
            for tmp in folder.glob("*.tmp"):
                tmp.unlink(missing_ok=True)

    # -- metrics ---------------------------------------------------------------

    def append_metrics(self, row: dict) -> None:
        """Append one row; in a guarded run its uncovered part goes to UNCOVERED/metrics.jsonl."""
        if not self.guarded:
            _append_line(self.metrics, row)
            return
        covered, hidden = split_row(row)
        if hidden is not None:
            self._uncovered_dir()
            _append_line(self.uncovered / "metrics.jsonl", hidden)
        if covered:
            _append_line(self.metrics, covered)

    def read_metrics(self) -> list[dict]:
        """The rows as the run computed them (a guarded run's two files merged)."""
        return merge_rows(_read_rows(self.metrics), _read_rows(self.uncovered / "metrics.jsonl"))

    def read_covered_metrics(self) -> list[dict]:
        """metrics.jsonl alone: in a DP run, what the guarantee covers."""
        return _read_rows(self.metrics)

    def truncate_metrics(self, rounds_done: int) -> None:
        """Drop rows of rounds after the last checkpoint (they will be redone)."""
        for path in (self.metrics, self.uncovered / "metrics.jsonl"):
            if path.is_file() or path == self.metrics:
                keep = [r for r in _read_rows(path) if r.get("round", 0) <= rounds_done
                        and r.get("phase") != "local_only_final"]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    def write_uncovered_json(self, name: str, payload: dict) -> None:
        self._uncovered_dir()
        atomic_write_text(self.uncovered / name, json.dumps(payload, indent=2) + "\n")

    def _uncovered_dir(self) -> None:
        if not self.uncovered.is_dir():
            self.uncovered.mkdir()
            atomic_write_text(self.uncovered / "README.txt", HEADER + "\n")

    # -- checkpoints -----------------------------------------------------------

    def save_checkpoint(self, rounds_done: int, state: dict, keep: int) -> Path:
        import io

        buffer = io.BytesIO()
        torch.save({"rounds_done": rounds_done, **state}, buffer)
        target = self.checkpoints / f"round_{rounds_done:04d}.pt"
        atomic_write_bytes(target, buffer.getvalue())
        for old in sorted(self.checkpoints.glob("round_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
        return target

    def load_latest_checkpoint(self) -> dict | None:
        for path in sorted(self.checkpoints.glob("round_*.pt"), reverse=True):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # corrupt or partial file: fall back to the one before
                print(f"fedsec: checkpoint {path.name} is unreadable ({type(err).__name__}); "
                      "using the previous one", file=sys.stderr)
        return None

    def write_json(self, name: str, payload: dict) -> None:
        atomic_write_text(self.path / name, json.dumps(payload, indent=2) + "\n")

    def write_rows_json(self, name: str, key: str, rows: Iterable[dict], uncovered: bool = False) -> None:
        """{key: rows} as JSON with one row per line, built row by row (a federation's
        100,000 clients cost their text, not a tree of Python objects); `uncovered`: into
        the place the DP guarantee does not cover."""
        if uncovered:
            self._uncovered_dir()
        text = f'{{\n  "{key}": [\n' + ",\n".join("    " + json.dumps(row) for row in rows) + "\n  ]\n}\n"
        atomic_write_text((self.uncovered if uncovered else self.path) / name, text)


def read_result(run_dir: Path) -> dict:
    """A run's result.json with, for a DP run, its not-covered part merged back in: the
    whole result, as the run computed it."""
    result = json.loads((Path(run_dir) / "result.json").read_text(encoding="utf-8"))
    extra = Path(run_dir) / UNCOVERED / "result.json"
    return merge_result(result, json.loads(extra.read_text(encoding="utf-8"))) if extra.is_file() else result


def _guarded(cfg: ExperimentConfig) -> bool:
    return cfg.privacy.mode != "off"


def _append_line(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line after a crash
            break
    return rows


def _remove_stale_staging(path: Path) -> None:
    """Remove the staging folders of `path` whose creator died (killed while creating the
    run): their lock is free, or they never got one and are older than a minute."""
    for folder in path.parent.glob(f".{path.name}.*{STAGING}"):
        lock = folder / LOCK
        if lock.exists():
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being created right now
            finally:
                os.close(fd)
        elif time.time() - folder.stat().st_mtime < 60:
            continue
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def claimed(path: Path) -> Iterator[None]:
    """Hold the claim on run directory `path` from before a run's setup to its end, so a
    second run with the same --out fails at once rather than after minutes of setup. The
    claim is a lock in the system's temp folder (keyed by the absolute path), so nothing
    is written beside the run before its setup has succeeded; the kernel drops it when
    the process ends, however it ends."""
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / "fedsec-claims"
    folder.mkdir(exist_ok=True)
    fd = _lock(folder / f"{key}.lock", path, "another fedsec run is setting up or running in this run directory")
    try:
        yield
    finally:
        os.close(fd)


def _lock(file: Path, run: Path, busy: str = "another fedsec process is running in this run directory") -> int:
    """An exclusive lock on `file` for this process (the fd, holding our pid; closing it
    releases the lock). Held by another: a ConfigError on --out saying `busy`."""
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError("--out", str(run), f"{busy}; wait for it to end or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _same_experiment(stored: str, cfg: ExperimentConfig) -> bool:
    """A run written before a config field existed stores no value for it: it is the same
    experiment when its config, with today's defaults filled in, resolves to `cfg`."""
    import yaml

    from fedsec.config import from_raw
    from fedsec.configfile import load_yaml

    try:
        return dump_config(from_raw(load_yaml(stored))) == dump_config(cfg)
    except (ConfigError, yaml.YAMLError, TypeError, ValueError):
        return False


def _first_difference(a: str, b: str) -> str:
    for left, right in zip(a.splitlines(), b.splitlines()):
        if left != right:
            return f"'{left.strip()}' became '{right.strip()}'"
    return "length differs"


def environment(seed: int) -> dict:
    """Versions, git revision, seed and machine, for env.json."""
    from importlib import metadata

    versions = {}
    for pkg in ("fedsec", "torch", "transformers", "peft", "bitsandbytes", "numpy", "gguf"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "seed": seed,
        "python": sys.version.split()[0],
        "versions": versions,
        "git_revision": _git_revision(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
    }


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
