"""Running untrusted generated code: a separate process, a time and memory limit, no network.

HumanEval and MBPP score a model by executing the code it wrote against the
benchmark's tests. That code is never run in the evaluator's own process: each
program runs in a fresh `python -I` (isolated: no user site, no PYTHONPATH) in an
empty temporary folder, with

- a wall-clock limit (the process group is killed when it passes),
- an address-space limit (RLIMIT_AS) and a CPU-time limit (RLIMIT_CPU), no core files,
- no network: the socket module's constructors raise before the program starts,
  and proxy variables are cleared,
- no inherited environment beyond PATH and the limits' own variables.

This is containment for accidental damage (an infinite loop, a memory blow-up, a
stray download), as the HumanEval authors recommend running it; it is not a
security boundary against code written to escape (use a container or a VM for that).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Prepended to every program: cut the network before the program's first line runs.
_NO_NETWORK = """\
import socket as _s
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the fedsec sandbox")
_s.socket = _no_network
_s.create_connection = _no_network
_s.socketpair = _no_network
del _s
"""


@dataclass(frozen=True)
class Execution:
    passed: bool  # exit status 0 within the limits
    status: str  # passed, failed, timeout, or killed (a limit: memory or CPU)
    returncode: int | None
    stderr_tail: str  # the last lines of stderr (why it failed)


def _limits(memory_mb: int, cpu_seconds: int):
    def apply() -> None:
        os.setsid()  # its own process group, so a timeout kills everything it started
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024) -> Execution:
    """Run `source` as a Python program in the sandbox; passed when it exits with status 0."""
    with tempfile.TemporaryDirectory(prefix="fedsec-sandbox-") as folder:
        path = os.path.join(folder, "program.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(_NO_NETWORK + "\n" + source)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1",
               "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", path], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=_limits(memory_mb, max(1, int(timeout) + 1)))
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Execution(False, "timeout", None, f"killed after {timeout:g} s")
        tail = "\n".join(err.decode("utf-8", "replace").strip().splitlines()[-3:])
        if proc.returncode == 0:
            return Execution(True, "passed", 0, tail)
        killed = proc.returncode < 0 or "MemoryError" in tail
        return Execution(False, "killed" if killed else "failed", proc.returncode, tail)
