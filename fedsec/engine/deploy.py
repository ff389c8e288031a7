"""Start a Flower deployment on 127.0.0.1 and submit a fedsec run to it.

`LocalDeployment` starts one SuperLink and N SuperNodes as separate processes (each
in its own process group, logs in its home folder), optionally with TLS and SuperNode
authentication, and stops every one of them by its process id. `run_on_flower` is what
`fedsec run` does with `engine: flower`: write the Flower App (two lines that import
fedsec's apps) and its run config, submit it with `flwr run`, stream the server's log,
and read the run directory the ServerApp wrote.

Telemetry and update checks are off (FLWR_TELEMETRY_ENABLED=0,
FLWR_DISABLE_UPDATE_CHECK=1) and no dependency is installed at run time: the
processes use the Python environment fedsec is installed in.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedsec.config import ExperimentConfig, dump_config
from fedsec.disclosure import UNCOVERED
from fedsec.engine.worker import alive
from fedsec.errors import ConfigError, FedsecError
from fedsec.results import RunResult
from fedsec.rundir import RunDir, default_run_dir, latest_run_dir

APP_NAME = "fedsecapp"
CONNECTION = "fedsec"
APP_PYPROJECT = """[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "fedsecapp"
version = "1.0.0"
description = "fedsec's federated round loop as a Flower App"
license = "Apache-2.0"
dependencies = []  # none installed at run time: fedsec's own environment runs the apps

[tool.flwr.app]
publisher = "fedsec"

[tool.flwr.app.components]
serverapp = "fedsec_server_app:server_app"
clientapp = "fedsec_client_app:client_app"

[tool.flwr.app.config]
config = ""
out = ""
workdir = ""
resume = false
stop-after = 0
error-file = ""
"""
# One module per side, so a ClientApp process (one per message) never imports torch: it
# relays to the SuperNode's worker (fedsec.engine.flower_client, fedsec.engine.worker).
# (Assignments: `flwr run` finds an app's names by reading the module, without importing it.)
APP_MODULES = {"fedsec_server_app.py": "from fedsec.engine import flower\n\nserver_app = flower.server_app\n",
               "fedsec_client_app.py": ("from fedsec.engine import flower_client\n\n"
                                        "client_app = flower_client.client_app\n")}


def flower_env(home: Path) -> dict[str, str]:
    """The environment of every Flower process fedsec starts."""
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               # a SuperExec looks for a message to start an app for every second by default, and
               # each round waits on it; each look costs the SuperLink CPU time, so not much less
               # (the SuperNodes' own waits: fedsec.engine.supernode)
               FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2")
    bin_dir = str(Path(sys.executable).parent)  # flower-superlink, flwr-serverapp, ... of this environment
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FedsecError(f"engine = 'flower': {name} is not installed; pip install 'fedsec[flower]'")
    return str(path)


@dataclass(frozen=True)
class Tls:
    """A throwaway CA and a SuperLink certificate for 127.0.0.1 (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def make_tls(folder: Path, host: str = "127.0.0.1") -> Tls:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsec local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                         x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    tls = Tls(folder / "ca.pem", folder / "superlink.pem", folder / "superlink.key")
    tls.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return tls


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format): (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    private.chmod(0o600)
    return private, public


class LocalDeployment:
    """One SuperLink and SuperNodes on 127.0.0.1, each process in its own group.

    with LocalDeployment(home, tls=True, auth=True) as d:
        d.start_supernode(0, 2); d.start_supernode(1, 2)
        d.submit(...)
    """

    def __init__(self, home: Path, tls: bool = False, auth: bool = False):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.tls = make_tls(self.home / "tls") if tls else None
        self.auth = auth
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.stopped: set[int] = set()  # every process id stop() or kill() signalled
        self.cli_home = self.home / "cli"
        self.cli_home.mkdir(exist_ok=True)
        write_connection(self.cli_home, self.address, self.tls.ca if self.tls else None)

    def __enter__(self) -> LocalDeployment:
        self.start_superlink()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str], threads: int | None = None) -> subprocess.Popen:
        home = self.home / name
        home.mkdir(exist_ok=True)
        env = flower_env(home)
        if threads is not None:  # what the ClientApps it starts use for torch
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        log = open(self.home / f"{name}.log", "ab")
        try:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, cwd=home, start_new_session=True)
        finally:
            log.close()
        self.processes[name] = process
        return process

    def start_superlink(self, timeout: float = 60.0) -> None:
        argv = [_tool("flower-superlink"), "--port", str(self.port), "--host", "127.0.0.1",
                "--disable-runtime-dependency-installation", "--database", str(self.home / "superlink.db")]
        argv += (["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                  "--ssl-keyfile", str(self.tls.key)] if self.tls else ["--insecure"])
        if self.auth:
            argv.append("--enable-supernode-auth")
        process = self._spawn("superlink", argv)
        deadline = time.monotonic() + timeout
        while not self._listening(self.port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise FedsecError(f"the SuperLink did not start; see {self.home / 'superlink.log'}")
            time.sleep(0.2)

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def register(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink (authentication on)."""
        self.flwr(["supernode", "register", str(public_key), CONNECTION], timeout=120)

    def flwr(self, args: list[str], timeout: float) -> str:
        done = subprocess.run([_tool("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                              env=flower_env(self.cli_home), cwd=self.cli_home, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise FedsecError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''} failed "
                              f"({done.returncode}): {(done.stdout + done.stderr).strip()[-400:]}")
        return done.stdout

    def start_supernode(self, partition: int, partitions: int, key: Path | None = None,
                        name: str | None = None, extra_config: str = "", threads: int | None = None) -> str:
        """Start SuperNode `partition` of `partitions`; `threads` caps torch's threads in its
        ClientApps (SuperNodes sharing one machine should split its cores)."""
        name = name or f"supernode-{partition}"
        _tool("flower-supernode")  # Flower is installed; its SuperNode runs with shorter idle waits
        argv = [sys.executable, "-m", "fedsec.engine.supernode", "--superlink", self.address,
                "--port", str(free_port()),
                "--node-config", f"partition-id={partition} num-partitions={partitions} {extra_config}".strip()]
        argv += ["--root-certificates", str(self.tls.ca)] if self.tls else ["--insecure"]
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key)]
        self._spawn(name, argv, threads)
        return name

    def kill(self, name: str) -> None:
        """SIGKILL a process and every process under it (a SuperNode, its SuperExec and
        ClientApp), as a machine failure would."""
        process = self.processes[name]
        family = [process.pid, *_descendants(process.pid)]
        self.stopped.update(family)
        _signal(family, signal.SIGKILL)
        process.wait(timeout=30)
        _wait_gone(family, 10)

    def stop(self) -> None:
        """Stop every process started here and everything they started (the SuperLink runs
        its SuperExec in a session of its own): SIGTERM, then SIGKILL after 10 s."""
        family = [pid for process in self.processes.values() if process.poll() is None
                  for pid in (process.pid, *_descendants(process.pid))]
        # a SuperExec outlives a SuperNode that exited by itself (refused, crashed): it names
        # its parent on its command line
        family += _watching({p.pid for p in self.processes.values()}, exclude=set(family))
        self.stopped.update(family)
        _signal(family, signal.SIGTERM)
        _wait_gone(family, 10)
        family += [pid for p in family for pid in _descendants(p) if pid not in self.stopped]  # started meanwhile
        self.stopped.update(family)
        _signal(family, signal.SIGKILL)
        for process in self.processes.values():
            process.wait()
        _wait_gone(family, 10)

    def log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def submit(self, app: Path, run_config: Path, echo: Callable[[str], None] = print) -> tuple[int, list[str]]:
        return submit(self.cli_home, app, run_config, echo, self.processes)


def _descendants(root: int) -> list[int]:
    """Every process below `root` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _watching(parents: set[int], exclude: set[int]) -> list[int]:
    """Processes started with `--parent-pid P` for P in `parents` (Flower's SuperExec)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) not in exclude:
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            for flag, value in zip(argv, argv[1:]):
                if flag == b"--parent-pid" and value.isdigit() and int(value) in parents:
                    found.append(int(entry.name))
                    found.extend(_descendants(int(entry.name)))
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], seconds: float) -> None:
    give_up = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < give_up:
        time.sleep(0.05)


def write_connection(cli_home: Path, address: str, root_certificates: Path | None) -> None:
    """The `flwr` CLI's connection to the SuperLink, named "fedsec"."""
    cli_home.mkdir(parents=True, exist_ok=True)
    security = (f'root-certificates = "{root_certificates}"' if root_certificates is not None
                else "insecure = true")
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\n{security}\n', encoding="utf-8")


def submit(cli_home: Path, app: Path, run_config: Path, echo: Callable[[str], None] = print,
           processes: dict | None = None) -> tuple[int, list[str]]:
    """`flwr run` the app on the "fedsec" connection and stream its log; returns (exit
    status, the log's lines)."""
    argv = [_tool("flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config), "--stream"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=flower_env(cli_home), cwd=cli_home, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    if processes is not None:
        processes["flwr-run"] = process
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        echo(line.rstrip("\n"))
    return process.wait(), lines


def write_app(folder: Path) -> Path:
    """The Flower App: a pyproject and two modules importing fedsec's ServerApp and ClientApp."""
    app = folder / APP_NAME
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    for name, text in APP_MODULES.items():
        (app / name).write_text(text, encoding="utf-8")
    return app


def write_run_config(path: Path, cfg: ExperimentConfig, out: Path, resume: bool, stop_after: int | None) -> Path:
    values = {"config": dump_config(cfg), "out": str(out), "workdir": os.getcwd(), "resume": resume,
              "stop-after": stop_after or 0, "error-file": str(path.parent / "error.txt")}
    path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in values.items()), encoding="utf-8")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)  # a basic TOML string: JSON's escapes are TOML's


def run_on_flower(cfg: ExperimentConfig, out: str | Path | None = None, resume: bool = False,
                  stop_after: int | None = None, echo: Callable[[str], None] = print,
                  deployment: LocalDeployment | None = None, progress: bool = True) -> RunResult:
    """Run `cfg` on Flower: on `deployment`, on cfg.flower.superlink, or on a local
    deployment of cfg.flower.supernodes SuperNodes started and stopped here. `progress`:
    the one-time model conversion says so on stderr."""
    from fedsec.models import resolve_model_path
    from fedsec.progress import showing

    remote = deployment is None and bool(cfg.flower.superlink)
    if remote:  # the run directory lives on the SuperLink's machine, which checks it
        if out is None:
            raise ConfigError("--out", None, "with flower.superlink give the run directory, a path on the "
                              "SuperLink's machine")
        path = Path(out)
    elif resume:
        path = Path(out) if out is not None else latest_run_dir(cfg)
        if path is None:
            raise ConfigError("--resume", cfg.name, f"no earlier run of it under {cfg.output_dir}/; "
                              "start one without --resume")
        RunDir.reopen(path, cfg)
        path = path.resolve()
    else:
        path = Path(out) if out is not None else default_run_dir(cfg)
        RunDir.check_free(path)
        path = path.resolve()
    if not remote:
        with showing(progress):
            resolve_model_path(cfg.model.name)  # convert once here, so the ClientApps only read the cache
    own = deployment is None and not cfg.flower.superlink
    made_home = deployment is None  # a temporary folder of this call's: removed unless the run broke off
    home = Path(tempfile.mkdtemp(prefix="fedsec-flower-")) if made_home else deployment.home
    try:
        if own:
            echo(f"flower: starting a SuperLink and {cfg.flower.supernodes} SuperNode(s) on 127.0.0.1 "
                 f"(logs in {home})")
            deployment = LocalDeployment(home)
            deployment.start_superlink()
            threads = max(1, (os.cpu_count() or 1) // cfg.flower.supernodes)
            for k in range(cfg.flower.supernodes):
                deployment.start_supernode(k, cfg.flower.supernodes, threads=threads)
        app = write_app(home)
        run_config = write_run_config(home / "run.toml", cfg, path, resume, stop_after)
        if deployment is not None:
            status, lines = deployment.submit(app, run_config, echo=_server_lines(echo))
        else:  # a SuperLink somebody else runs
            root = cfg.flower.root_certificates
            write_connection(home / "cli", cfg.flower.superlink, Path(root).resolve() if root else None)
            status, lines = submit(home / "cli", app, run_config, echo=_server_lines(echo))
    finally:
        if own and deployment is not None:
            deployment.stop()
            _keep_logs(home, path, private=cfg.privacy.mode != "off")
    errors = [line[line.index("fedsec: error: ") + len("fedsec: error: "):] for line in lines
              if "fedsec: error: " in line]
    if (home / "error.txt").exists():
        errors.append((home / "error.txt").read_text(encoding="utf-8").strip())
    outcome = _outcome(cfg, path, errors, lines, remote, stop_after)
    if made_home and outcome is not None:  # its logs are in the run directory (_keep_logs) or said in one line
        shutil.rmtree(home, ignore_errors=True)
    if isinstance(outcome, FedsecError):
        raise outcome
    if outcome is not None:
        return outcome
    raise FedsecError(f"the Flower run ended (flwr run exit status {status}) before the experiment finished; "
                      f"see the server's log above and the logs in {home}")


def _outcome(cfg: ExperimentConfig, path: Path, errors: list[str], lines: list[str], remote: bool,
             stop_after: int | None) -> RunResult | FedsecError | None:
    """How a Flower run ended: its result, the one-line error it reported, or None when it
    broke off before the experiment finished."""
    if errors:
        return FedsecError(errors[-1])
    finished = any("fedsec: run finished" in x for x in lines)
    if (path / "result.json").exists() and (stop_after is None or finished):
        return RunResult.read(path)  # a DP run's not-covered part merged back in
    if remote and finished:  # the numbers are in the run directory on the SuperLink's machine
        return RunResult(str(path), cfg.federation.rounds, True, None, None, None, cfg.federation.algorithm)
    rows = RunDir.reopen(path, cfg).read_metrics() if (path / "metrics.jsonl").exists() else []
    done = max((r["round"] for r in rows if r.get("phase") == "federated"), default=0)
    if stop_after is not None and done >= stop_after:
        return RunResult(str(path), done, False, None, None, None, cfg.federation.algorithm)
    return None


# Flower's own log records as `flwr run --stream` shows them: "12/06/2026 12:27:14:DEBUG:...",
# and its level prefixes, colored or not, with nothing after them ("INFO :", "12/06/2026 ...:INFO:")
_FLOWER_DEBUG = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:DEBUG:")
_FLOWER_EMPTY = re.compile(r"^(?:\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:)?(?:DEBUG|INFO|WARNING)\s*:\s*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _server_lines(echo: Callable[[str], None]) -> Callable[[str], None]:
    """Pass the ServerApp's lines through; drop Flower's own bookkeeping chatter (its log
    stream's notes, its DEBUG records and empty records; all of it stays in the logs)."""
    def show(line: str) -> None:
        plain = _ANSI.sub("", line).strip()
        if "INFO" in plain and ("logstream" in plain.lower() or "Start `flwr-serverapp`" in plain):
            return
        if plain and not _FLOWER_DEBUG.match(plain) and not _FLOWER_EMPTY.match(plain):
            echo(line)
    return show


def _keep_logs(home: Path, run: Path, private: bool = False) -> None:
    """Copy the deployment's logs into the run directory (flower/), when it exists. Under
    DP they go to the not-covered folder: Flower's own lines say which SuperNodes got
    messages each round, and so something of who was sampled."""
    if not run.is_dir():
        return
    target = run / UNCOVERED / "flower" if private else run / "flower"
    target.mkdir(parents=True, exist_ok=True)
    for log in home.glob("*.log"):
        shutil.copyfile(log, target / log.name)
