"""The package's shape: one namespace installed, and no import cycle among its modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"fedsec": "fedsec", "fedsec.attacks": "attacks", "fedsec.defenses": "defenses",
           "fedsec.accountants": "accountants", "fedsec.reports": "reports"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _top_level_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The fedsec modules `path` imports when it is imported (not inside functions)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        out |= {t for t in targets if t in known}
    # a package's __init__ that imports its own modules is not a cycle with them
    ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
    return out - {name} - ancestors


def test_no_import_cycle_among_fedsec_modules():
    modules = _modules()
    graph = {m: _top_level_imports(p, m, set(modules)) for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert len(graph) > 40  # the walk saw the whole package


def test_only_the_fedsec_namespace_is_importable_outside_the_repository(tmp_path):
    code = ("import importlib.util as u; import fedsec.attacks, fedsec.defenses, fedsec.accountants, "
            "fedsec.reports; print([u.find_spec(n) is None for n in ('attacks', 'defenses', 'accountants', "
            "'reports')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.strip() == "[True, True, True, True]"
