"""fedsec: federated fine-tuning of LLMs with privacy and robustness instruments.

From Python (fedsec.api):

    import fedsec
    result = fedsec.run("experiments/quickstart.yaml", overrides=["federation.rounds=3"], out="runs/x")
    result.run_dir, result.final, result.privacy

`fedsec.load_config`, `fedsec.run`, `fedsec.sweep` and `fedsec.report` are what the
CLI calls; `fedsec.register` adds a plugin's entry to an extension point
(fedsec.registry: aggregators, update and data attacks, accountants, server
optimizers). The core package holds the shared types (configs, updates, results),
data, models, local training and the round loop; `fedsec.defenses`,
`fedsec.attacks`, `fedsec.accountants` and `fedsec.reports` build on them.
"""

__version__ = "0.1.0"

__all__ = ["ConfigError", "FedsecError", "RunResult", "SweepResult", "__version__", "load_config", "register",
           "report", "run", "sweep"]

_PUBLIC = {"load_config": "fedsec.api", "run": "fedsec.api", "sweep": "fedsec.api", "report": "fedsec.api",
           "register": "fedsec.registry", "ConfigError": "fedsec.errors", "FedsecError": "fedsec.errors",
           "RunResult": "fedsec.results", "SweepResult": "fedsec.results"}


def __getattr__(name: str):
    """The public names, imported on first use: `import fedsec` (and every `fedsec.cli`
    start) stays as quick as before."""
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fedsec' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names with the public ones `__getattr__` provides: what `dir(fedsec)` and a
    notebook's completion list."""
    return sorted({*globals(), *__all__})
