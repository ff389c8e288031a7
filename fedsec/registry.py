"""Extension points by name: what a YAML file can pick, and how a plugin adds to it.

    # my_rules.py, anywhere on the Python path
    import fedsec

    @fedsec.register("aggregator", "my_rule")
    def my_rule(deltas, weights, *, tau: float = 1.0):
        '''deltas [n, d] float, weights [n] -> the aggregate [d]'''
        return ...

    # exp.yaml
    plugins: [my_rules]
    defense: {aggregator: my_rule, params: {tau: 2.0}}

`plugins` modules are imported before the config is validated (and so are the
modules of the entry-point group `fedsec.plugins`), so a plugin's names are
checked, suggested on a typo ("did you mean") and documented like the built-ins,
which sit in the same tables (`fedsec.defenses.registry.AGGREGATORS`). A plugin rule's
keyword parameters become its `defense.params`, typed and defaulted from its
signature. It runs after fedsec's sanitation, sees only the accepted deltas, and
under user-level DP it makes the run "not certified" unless it is registered with
`dp_certified=True` (its author then claims a sensitivity of C for the clipped
deltas, as the mean has).

An update attack is `fn(own, honest, generator, **params) -> delta`: a malicious
client's own trained delta [d], the round's honest deltas [h, d] (the omniscient
attacker of the papers) and the round's attack generator; its keyword parameters
(with defaults) become `attack.params`. Aggregators and update attacks take plugins
so far; the other extension points (data attacks, accountants, server optimizers,
metrics, benchmarks) are named tables inside fedsec that issue 24 moves here.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable, Iterable

KINDS = ("aggregator", "update_attack")
ENTRY_POINTS = "fedsec.plugins"
_entry_points_loaded = False


def register(kind: str, name: str, *, dp_certified: bool = False) -> Callable:
    """Decorator: add `fn` to the `kind` table under `name` (see the module note)."""
    if kind not in KINDS:
        raise ValueError(f"unknown extension point {kind!r}; plugins can register: {', '.join(KINDS)}")

    def add(fn: Callable) -> Callable:
        if kind == "update_attack":
            _add_update_attack(name, fn)
            return fn
        from fedsec.defenses.registry import AGGREGATORS

        taken = AGGREGATORS.get(name)
        if taken is not None and not _same_function(getattr(taken, "plugin", None), fn):
            raise ValueError(f"aggregator {name!r} is taken ({taken.__name__}); register another name")
        AGGREGATORS[name] = _aggregator_rule(name, fn, dp_certified)
        return fn

    return add


def _same_function(a: Callable | None, b: Callable) -> bool:
    """`b` is `a` again (its module imported a second time), not another function."""
    return a is not None and (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _keyword_defaults(kind: str, name: str, fn: Callable, skip: int) -> dict:
    """fn's parameters after the first `skip`, each with its default (they become params)."""
    out = {}
    for p in list(inspect.signature(fn).parameters.values())[skip:]:
        if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is p.empty:
            raise ValueError(f"{kind} {name!r}: parameter {p.name!r} needs a default (it becomes a param)")
        out[p.name] = p.default
    return out


def _add_update_attack(name: str, fn: Callable) -> None:
    """fn(own [d], honest [h, d], generator, **params) -> the malicious delta [d]."""
    from fedsec.attacks.clients import PARAMS, PLUGIN_ATTACKS, UPDATE_ATTACKS
    from fedsec.attacks.poisoning import DATA_ATTACKS

    if name in (*UPDATE_ATTACKS, *DATA_ATTACKS, "none") or (
            name in PLUGIN_ATTACKS and not _same_function(PLUGIN_ATTACKS[name], fn)):
        raise ValueError(f"attack {name!r} is taken; register another name")
    PARAMS[name] = _keyword_defaults("update_attack", name, fn, 3)
    PLUGIN_ATTACKS[name] = fn


def _aggregator_rule(name: str, fn: Callable, dp_certified: bool) -> type:
    """A frozen dataclass of `fn`'s keyword parameters that calls fn(deltas, weights, **params)."""
    from fedsec.defenses.registry import Context, _Rule
    from fedsec.defenses.robust import Aggregated

    hints = inspect.get_annotations(fn, eval_str=True)
    fields = [(key, hints.get(key, type(default)), dataclasses.field(default=default))
              for key, default in _keyword_defaults("aggregator", name, fn, 2).items()]

    def __call__(self, deltas, weights, ctx: Context, f: int) -> Aggregated:
        out = fn(deltas, weights, **{fld.name: getattr(self, fld.name) for fld in dataclasses.fields(self)})
        if not (hasattr(out, "shape") and tuple(out.shape) == (deltas.shape[1],)):
            raise ValueError(f"aggregator {name} returned shape {tuple(getattr(out, 'shape', ()))}, "
                             f"not [{deltas.shape[1]}]")
        return Aggregated(out.to(deltas.dtype), weights.clone().float())

    def check(self, n: int, f: int) -> str | None:
        return None  # a plugin states no assumption on f

    cls = dataclasses.make_dataclass(f"Plugin_{name}", fields, bases=(_Rule,), frozen=True,
                                     namespace={"__call__": __call__, "check": check, "plugin": fn,
                                                "dp_certified": dp_certified,
                                                "__doc__": inspect.getdoc(fn) or f"plugin aggregator {name}"})
    return cls


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Import the entry points of `fedsec.plugins` (once) and `modules` (an experiment's
    `plugins`); an import that fails is a ConfigError naming the module."""
    global _entry_points_loaded
    from fedsec.errors import ConfigError

    if not _entry_points_loaded:
        from importlib.metadata import entry_points

        _entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINTS):
            try:
                ep.load()
            except Exception as err:  # a broken installed plugin is named, not fatal to the traceback
                raise ConfigError(f"entry point {ENTRY_POINTS}", ep.value,
                                  f"cannot be imported ({type(err).__name__}: {err}); fix or uninstall it") from None
    for module in modules or ():
        if not isinstance(module, str) or not module.strip():
            raise ConfigError("plugins", module, "list importable module names, e.g. [my_rules]")
        try:
            importlib.import_module(module)
        except Exception as err:
            raise ConfigError("plugins", module, f"cannot be imported ({type(err).__name__}: {err}); put the "
                              "module on PYTHONPATH or install it") from None
