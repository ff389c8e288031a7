"""A SuperNode's persistent fedsec worker: the model and the prepared clients stay alive
across Flower messages.

Flower 1.41 starts a new ClientApp process for every message (`flwr-clientapp` runs one
task and exits), so a ClientApp that trained by itself would import torch and
transformers, load the model and read its clients' prepared items on every round. Here
the ClientApp (fedsec.engine.flower_client, which imports neither) relays each message to
one worker process per SuperNode, started by the first message and kept until its
SuperNode is gone (or idle for IDLE_SECONDS): the worker loads the model and prepares its
node's clients once per experiment, then each round costs what training costs.

The worker listens on a Unix socket in a folder only its user can enter, named after the
SuperNode's process id, and serves one request at a time; it accepts connections from
its own user only (SO_PEERCRED). A request and its reply are one frame each: an 8-byte
length, a JSON header, then the raw bytes of the float32 arrays the header names
(`pack`/`unpack`: exact, no pickle). The worker computes with the same functions as the
in-process engine (fedsec.clients.prepare_clients, client_updates), so the numbers are
the same.

    python -m fedsec.engine.worker SOCKET SUPERNODE_PID
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

IDLE_SECONDS = 1800.0
START_SECONDS = 300.0  # the worker's imports and first setup, on a busy machine


def runtime_dir() -> Path:
    """A folder of this user's only, for the workers' sockets (short: a socket path is <= 107 bytes)."""
    folder = Path(tempfile.gettempdir()) / f"fedsec-workers-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise PermissionError(f"{folder} must belong to this user alone (mode 700)")
    return folder


# ---------------------------------------------------------------------------
# Frames.


def pack(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """One frame: meta and float32 arrays, exactly."""
    parts, index = [], []
    for name, array in arrays.items():
        data = np.ascontiguousarray(array, dtype=np.float32)
        index.append({"name": name, "shape": list(data.shape)})
        parts.append(data.tobytes())
    header = json.dumps({"meta": meta, "arrays": index}).encode()
    body = struct.pack("<Q", len(header)) + header + b"".join(parts)
    return struct.pack("<Q", len(body)) + body


def unpack(body: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    (size,) = struct.unpack_from("<Q", body)
    header = json.loads(body[8: 8 + size])
    arrays, at = {}, 8 + size
    for entry in header["arrays"]:
        count = int(np.prod(entry["shape"], dtype=np.int64))
        arrays[entry["name"]] = np.frombuffer(body, dtype=np.float32, count=count, offset=at).reshape(entry["shape"])
        at += 4 * count
    return header["meta"], arrays


def _receive(conn: socket.socket) -> bytes:
    (size,) = struct.unpack("<Q", _exactly(conn, 8))
    return _exactly(conn, size)


def _exactly(conn: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the other side closed the connection mid-frame")
        got += k
    return bytes(buffer)


# ---------------------------------------------------------------------------
# The ClientApp's side: find (or start) the worker, send, receive.


def call(supernode: int, meta: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """Send one request to the SuperNode's worker (started if none is listening); its reply.
    A reply holding "error" is raised as RuntimeError."""
    path = runtime_dir() / f"{supernode}.sock"
    conn = _connect(path) or _start(path, supernode)
    with conn:
        conn.sendall(pack(meta, arrays))
        reply, out = unpack(_receive(conn))
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply, out


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        return conn
    except OSError:
        conn.close()
        return None


def _start(path: Path, supernode: int) -> socket.socket:
    """Start the worker (one at a time: a lock beside the socket) and wait until it listens."""
    import fcntl
    import subprocess

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)  # another ClientApp started it while we waited
        if conn is not None:
            return conn
        _sweep(path.parent)
        with open(path.with_suffix(".log"), "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "fedsec.engine.worker", str(path), str(supernode)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            conn = _connect(path)
            if conn is not None:
                return conn
            if process.poll() is not None:
                tail = path.with_suffix(".log").read_text(errors="replace")[-600:]
                raise RuntimeError(f"the fedsec worker exited with status {process.returncode}: {tail}")
            time.sleep(0.05)
        raise RuntimeError(f"the fedsec worker did not listen on {path} within {START_SECONDS:g} s")


def _sweep(folder: Path) -> None:
    """Remove the files (socket, lock, log) of workers whose SuperNode is gone."""
    for lock in folder.glob("*.lock"):
        if lock.stem.isdigit() and not alive(int(lock.stem)):
            for suffix in (".sock", ".lock", ".log"):
                with contextlib.suppress(OSError):
                    lock.with_suffix(suffix).unlink()


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie awaiting its reaper counts as gone;
    without /proc, any process that exists)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False
    except (OSError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------
# The worker.


class Worker:
    """The prepared client sides of one SuperNode, by experiment (config text, data path,
    working directory, partition, record-level noise, first client id)."""

    def __init__(self):
        self.sides: dict[tuple, object] = {}

    def handle(self, meta: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
        cfg, part = self._config(meta)
        if meta["op"] == "describe":
            return {"clients": self._describe(cfg, part, meta)}, {}
        if meta["op"] == "train":
            return self._train(cfg, part, meta, arrays["global"])
        if meta["op"] == "evaluate":
            return self._evaluate(cfg, part, meta, arrays["global"])
        raise ValueError(f"unknown request {meta['op']!r}")

    @staticmethod
    def _config(meta: dict):

        from fedsec.engine.flower import config_from_text
        from fedsec.models import require_converted

        if os.path.isdir(meta["workdir"]):
            os.chdir(meta["workdir"])  # relative paths in the config mean what they meant there
        cfg = config_from_text(meta["config"])
        if meta.get("data_path") and not cfg.data.silos:
            raise ValueError(f"data-path={meta['data_path']!r} names this organisation's file, but the experiment "
                             "has no data.silos: list one file per organisation there")
        require_converted(cfg.model.name)
        return cfg, (int(meta["partition"]), int(meta["partitions"]))

    @staticmethod
    def _describe(cfg, part: tuple[int, int], meta: dict) -> int:
        """How many clients this node builds: its organisation's (data.silos), else the federation's."""
        from fedsec.data import silo_clients
        from fedsec.setup import build_federation

        if not cfg.data.silos:
            return len(build_federation(cfg).data.clients)
        p, count = part
        if count != len(cfg.data.silos):
            return 0  # the server names the mismatch (num-partitions against data.silos)
        return len(silo_clients(cfg.data, cfg.seed, cfg.task, p, 0, meta.get("data_path") or None))

    def _side(self, cfg, part: tuple[int, int], meta: dict):
        """This node's clients, prepared once per experiment (a new one frees the last one's model)."""
        from fedsec.clients import client_cache_key, prepare_clients
        from fedsec.models import cache_dir
        from fedsec.setup import node_federation

        p, count = part
        noise = float(meta.get("record_noise", -1.0))
        first, total = int(meta["first"]), int(meta["total"])
        key = (meta["config"], meta.get("data_path"), meta["workdir"], p, count, noise, first, total)
        side = self.sides.get(key)
        if side is not None:
            return side
        self.sides.clear()
        if cfg.data.silos:  # this organisation's own file, its clients numbered from `first`
            federation = node_federation(cfg, p, first, total, meta.get("data_path") or None)
            hosted, cache_key = (lambda c: True), f"{client_cache_key(cfg)}-silo{p}-{first}-{total}"
            cache_key += "-" + _file_key(Path(meta.get("data_path") or cfg.data.silos[p]))
        else:
            federation = None
            hosted, cache_key = (lambda c: c % count == p), client_cache_key(cfg)
        side = prepare_clients(cfg, hosted, noise if noise >= 0 else None,
                               cache=cache_dir() / "flower-clients" / cache_key, federation=federation)
        self.sides[key] = side
        return side

    def _train(self, cfg, part: tuple[int, int], meta: dict, start: np.ndarray):
        import torch

        from fedsec.clients import client_updates

        side = self._side(cfg, part, meta)
        clients = [int(c) for c in meta["clients"] if int(c) in side.train_sets]
        vector = torch.from_numpy(np.array(start, dtype=np.float32))
        updates = client_updates(side, vector, clients, float(meta["lr"]), int(meta["round"]), float(meta["prox_mu"]))
        if "secure" in meta:  # SecAgg+: the server sees no single update, so its sanitation runs here
            from fedsec.defenses.sanitize import stack_sanitized

            stacked = stack_sanitized(updates, vector.numel(), cfg.defense.max_update_norm)
            updates, deltas = stacked.kept, stacked.deltas
        elif updates:
            deltas = torch.stack([u.delta for u in updates])
        else:
            deltas = torch.zeros(0, vector.numel(), device="cpu")
        reply = {"clients": [u.client_id for u in updates], "num_examples": [int(u.num_examples) for u in updates],
                 "loss": [float(u.metrics["loss"]) for u in updates],
                 "loss_terms": [int(u.metrics["loss_terms"]) for u in updates],
                 "tokens": [int(u.metrics["tokens"]) for u in updates]}
        if "secure" in meta:  # SecAgg+: only the sum leaves, each delta clipped here under user-level DP
            return reply, {"sum": secure_sum(deltas, float(meta["secure"]["clip"])).numpy()}
        return reply, {"deltas": deltas.numpy()}

    def _evaluate(self, cfg, part: tuple[int, int], meta: dict, start: np.ndarray):
        import torch

        side = self._side(cfg, part, meta)
        results = side.evaluate(torch.from_numpy(np.array(start, dtype=np.float32)))
        return {"clients": list(results), "loss": [r.loss for r in results.values()],
                "accuracy": [-1.0 if r.accuracy is None else r.accuracy for r in results.values()],
                "n": [r.num_examples for r in results.values()]}, {}


def secure_sum(deltas, clip: float):
    """What a node puts into the secure sum: its clients' deltas [n, d] summed, each clipped to
    L2 norm `clip` first when it is > 0 (the server's Clip stage, run where the deltas are)."""
    from fedsec.defenses.dp import clip_to_norm

    if clip > 0 and deltas.shape[0]:
        deltas = clip_to_norm(deltas, clip).clipped
    return deltas.sum(dim=0)


def _file_key(path: Path) -> str:
    """A data file's identity for the prepared-clients cache: where it is, its size and when it
    last changed (an edited file is prepared again)."""
    import hashlib

    stat = path.stat() if path.is_file() else None
    text = f"{path.resolve()}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def serve(path: Path, supernode: int, idle: float = IDLE_SECONDS) -> None:
    """Answer requests on `path` until the SuperNode `supernode` is gone or `idle` seconds
    pass without one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def watch() -> None:  # the SuperNode gone (killed, stopped): so is its worker, at once
        while alive(supernode):
            time.sleep(0.5)
        with contextlib.suppress(OSError):
            path.unlink()
        os._exit(0)

    with contextlib.suppress(OSError):
        path.unlink()  # a stale socket of a worker that died (the lock is held by the starter)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(8)
    listener.settimeout(1.0)
    threading.Thread(target=watch, daemon=True).start()
    from fedsec.cli import _quiet_libraries

    _quiet_libraries()
    worker, last = Worker(), time.monotonic()
    try:
        while time.monotonic() - last < idle:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                if not _same_user(conn):
                    continue
                try:
                    meta, arrays = unpack(_receive(conn))
                    reply, out = worker.handle(meta, arrays)
                except Exception as err:  # the ClientApp reports it as this node's failure
                    reply, out = {"error": f"{type(err).__name__}: {err}"[:2000]}, {}
                with contextlib.suppress(OSError):
                    conn.sendall(pack(reply, out))
            last = time.monotonic()
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _same_user(conn: socket.socket) -> bool:
    """The peer runs as this user (Linux SO_PEERCRED: pid, uid, gid)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True  # other systems: the socket's folder and mode (700, 600) keep others out
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid == os.getuid()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
