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

Each extension point is one `Registry` (name -> entry); the built-ins register into
it with the same decorator, from the module named in `BUILTINS`, which the registry
imports the first time it is read (so the core never imports a plugin by name, and
there is no import cycle). `plugins` modules are imported before a config is
validated (and so are the modules of the entry-point group `fedsec.plugins`), so a
plugin's names are checked, suggested on a typo ("did you mean") and documented
like the built-ins.

What each kind's entry is (every keyword parameter with a default becomes a
parameter in YAML, typed from its annotation):

    aggregator        fn(deltas [n, d], weights [n], **params) -> aggregate [d], or a
                      frozen dataclass subclassing defenses.registry's rule base;
                      `dp_certified=True` claims a sensitivity of C for clipped deltas
                      (without it a DP run with the rule is "not certified")
    update_attack     fn(own [d], honest [h, d], ctx: AttackContext, **params) -> delta [d];
                      `shared=True`: the vector does not depend on `own` (computed once a
                      round and sent by every attacker); `min_honest=k`: needs k honest deltas
    data_attack       fn(client: ClientData, seed: int, **params) -> ClientData (the malicious
                      client's data, poisoned once before training); `tasks=("sft",)`
    accountant        fn(history: list[DpEvent], delta) -> epsilon, an upper bound for the
                      composed Poisson-subsampled Gaussian mechanism (the contract suite
                      checks it against the exact Gaussian mechanism)
    server_optimizer  a class: __init__(**params), step(params, delta) -> params, state_dict(),
                      load_state_dict(state); a parameter named like a federation field
                      (server_lr, server_momentum, beta1, beta2, tau) takes that field's value,
                      any other is the optimizer's own (federation.params); a step that takes
                      `noise_std` is told each round's DP noise level per coordinate of delta
                      (fedsec.server's module note)
    benchmark         fn(rows, fields) -> items (fedsec.evalsuite.tasks: ChoiceItem, GenerationItem,
                      CodeItem, or fedsec.evalsuite.openended's OpenItem), the rows read from
                      eval.benchmarks[].source; `hub=("dataset", "split")`: its default source
    metric            fn(ctx: fedsec.metrics.MetricContext, **params) -> float or {name: float}, the
                      global model measured at each evaluation (eval.metrics: {name: {params}});
                      `covered=True` claims it reads only the released model and data outside the
                      clients' (under DP it is then published; otherwise it goes to the not-covered place);
                      `higher_is_better=True` or False (or {key: bool} for a mapping's values) lets the
                      tables and reports weigh it: a run without accuracy then speaks of it
    dp_mechanism      a frozen dataclass subclassing fedsec.defenses.correlated.MatrixMechanism (its
                      fields are privacy.params): matrix(rounds) -> C, square lower-triangular with
                      C^T C >= 0; noise(rounds, dim) -> the noise C^-1 z one round at a time (the
                      default solves C w = z over every past round; override it to keep less).
                      fedsec computes the sensitivity and epsilon from C (privacy.mechanism: name)
    preference_loss   fn(pairs: fedsec.preference.PairLogps, **params) -> one loss per pair [n] (task
                      dpo: dpo.loss, dpo.params; a parameter named beta takes dpo.beta); a pair's
                      loss depends on that pair alone (per-record gradients under DP);
                      `reference=False`: it reads no reference log-probabilities (zeros), so the
                      training pairs get no reference pass

`tests/contracts/` checks every entry of every registry; `FEDSEC_PLUGINS=my_rules
pytest tests/contracts` checks a plugin's entries beside the built-ins.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

ENTRY_POINTS = "fedsec.plugins"

# The module that registers each kind's built-ins (imported on the registry's first read).
BUILTINS = {
    "aggregator": "fedsec.defenses.registry",
    "update_attack": "fedsec.attacks.updates",
    "data_attack": "fedsec.attacks.poisoning",
    "accountant": "fedsec.accountants.backends",
    "server_optimizer": "fedsec.server",
    "benchmark": "fedsec.evalsuite.tasks",
    "metric": "fedsec.metrics",
    "dp_mechanism": "fedsec.defenses.correlated",
    "preference_loss": "fedsec.preference",
}
KINDS = tuple(BUILTINS)
ATTACK_KINDS = ("update_attack", "data_attack")  # one namespace: attack.kind names either

# What register() accepts beside the name, per kind (the entry's declared properties).
OPTIONS = {
    "aggregator": {"dp_certified": False},
    "update_attack": {"shared": False, "min_honest": 0},
    "data_attack": {"tasks": ("sft", "dpo")},
    "accountant": {},
    "server_optimizer": {},
    "benchmark": {"hub": None},
    "metric": {"covered": False, "higher_is_better": None},
    "dp_mechanism": {},
    "preference_loss": {"reference": True},
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered name: the object the extension point calls, its parameters with
    their defaults, the declared options, and whether fedsec ships it."""

    kind: str
    name: str
    obj: Any
    params: Mapping[str, Any]
    options: Mapping[str, Any]
    builtin: bool

    @property
    def doc(self) -> str:
        return (inspect.getdoc(self.obj) or "").split("\n\n")[0]


class Registry(Mapping[str, Any]):
    """name -> the registered object, built-ins and plugins alike; `entry(name)` has the rest."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._loading = False

    def _load(self) -> None:
        if not self._loading:  # the built-ins module registers itself into this registry
            self._loading = True
            importlib.import_module(BUILTINS[self.kind])

    def add(self, entry: Entry) -> None:
        self._load()
        taken = self._entries.get(entry.name)
        if taken is not None and not _same_object(taken.obj, entry.obj):
            raise ValueError(f"{self.kind} {entry.name!r} is taken ({_qualname(taken.obj)}); register another name")
        self._entries[entry.name] = entry

    def entry(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            near = difflib.get_close_matches(str(name), list(self._entries), n=1)
            raise KeyError(f"unknown {self.kind} {name!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                              f"; known: {', '.join(self._entries)}"))
        return self._entries[name]

    def __getitem__(self, name: str) -> Any:
        return self.entry(name).obj

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries


REGISTRIES = {kind: Registry(kind) for kind in KINDS}


def registry(kind: str) -> Registry:
    """The registry of one extension point (fedsec.registry.KINDS)."""
    if kind not in REGISTRIES:
        raise ValueError(f"unknown extension point {kind!r}; plugins can register: {', '.join(KINDS)}")
    return REGISTRIES[kind]


def register(kind: str, name: str, **options: Any) -> Callable:
    """Decorator: add the function (or class) to the `kind` registry under `name`."""
    table = registry(kind)
    unknown = set(options) - set(OPTIONS[kind])
    if unknown:
        raise ValueError(f"register({kind!r}): unknown option(s) {sorted(unknown)}; "
                         f"{kind} takes {', '.join(OPTIONS[kind]) or 'none'}")
    declared = {**OPTIONS[kind], **options}
    direction = declared.get("higher_is_better")
    if direction is not None and not isinstance(direction, bool) and not (
            isinstance(direction, Mapping) and all(isinstance(v, bool) for v in direction.values())):
        raise ValueError(f"register({kind!r}, {name!r}): higher_is_better={direction!r}; give True, False, "
                         "None (not known) or a mapping of the metric's keys to True or False")

    def add(obj: Any) -> Any:
        for other in ATTACK_KINDS if kind in ATTACK_KINDS else ():
            if other != kind and name in registry(other) or name == "none":
                raise ValueError(f"attack {name!r} is taken; register another name")
        builtin = obj.__module__ == BUILTINS[kind]
        stored, params = _ADAPT[kind](name, obj, declared)
        table.add(Entry(kind, name, stored, params, declared, builtin))
        return obj

    return add


def _qualname(obj: Any) -> str:
    obj = getattr(obj, "plugin", obj)
    return f"{obj.__module__}.{obj.__qualname__}"


def _same_object(a: Any, b: Any) -> bool:
    """`b` is `a` again (its module imported a second time), not another object."""
    return _qualname(a) == _qualname(b)


def keyword_defaults(kind: str, name: str, fn: Callable, skip: int) -> dict[str, Any]:
    """fn's parameters after the first `skip`, each with its default (they become params)."""
    out = {}
    for p in list(inspect.signature(fn).parameters.values())[skip:]:
        if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is p.empty:
            raise ValueError(f"{kind} {name!r}: parameter {p.name!r} needs a default (it becomes a param)")
        out[p.name] = p.default
    return out


def typed_params(entry: Entry, given: Mapping[str, Any], path: str, skip: set[str] = frozenset()) -> dict[str, Any]:
    """`entry`'s params: its defaults, overridden by `given`, each given value checked and typed
    from the annotation of its parameter (or its default's type) as a config field is; an unknown
    key or a wrong type is a ConfigError naming `<path>.<key>` (keys in `skip` are not params)."""
    from fedsec.configfile import _coerce
    from fedsec.errors import ConfigError

    known = {key: value for key, value in entry.params.items() if key not in skip}
    fn = entry.obj.__init__ if inspect.isclass(entry.obj) else getattr(entry.obj, "plugin", entry.obj)
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: the values stay untyped
        hints = {}
    out = dict(known)
    for key, value in given.items():
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=1)
            raise ConfigError(f"{path}.{key}", value, f"unknown for {entry.kind} {entry.name}; " + (
                f"did you mean '{near[0]}'?" if near else f"its parameters: {', '.join(known) or 'none'}"))
        tp = hints.get(key, Any if known[key] is None else type(known[key]))
        try:
            out[key] = _coerce(tp, value, f"{path}.{key}")
        except TypeError:  # a type configs do not have (a tensor, a callable): passed as given
            out[key] = value
    return out


def _function(kind: str) -> Callable:
    """A plain function entry: its parameters after the fixed ones (_FIXED[kind]) are params."""
    def adapt(name: str, fn: Callable, options: dict) -> tuple[Any, dict]:
        return fn, keyword_defaults(kind, name, fn, _FIXED[kind])
    return adapt


def _aggregator(name: str, obj: Any, options: dict) -> tuple[Any, dict]:
    """A rule class is stored as it is; a function becomes a frozen dataclass of its
    keyword parameters that calls fn(deltas, weights, **params)."""
    if inspect.isclass(obj):
        obj.dp_certified = options["dp_certified"]  # the registration is the one place it is declared
        return obj, {f.name: f.default for f in dataclasses.fields(obj)}
    from fedsec.defenses.registry import plugin_rule

    params = keyword_defaults("aggregator", name, obj, 2)
    return plugin_rule(name, obj, params, options["dp_certified"]), params


def _server_optimizer(name: str, cls: Any, options: dict) -> tuple[Any, dict]:
    if not inspect.isclass(cls):
        raise ValueError(f"server_optimizer {name!r}: register a class (step, state_dict, load_state_dict)")
    return cls, keyword_defaults("server_optimizer", name, cls.__init__, 1)


def _dp_mechanism(name: str, cls: Any, options: dict) -> tuple[Any, dict]:
    from fedsec.defenses.correlated import MatrixMechanism

    if not (inspect.isclass(cls) and issubclass(cls, MatrixMechanism) and dataclasses.is_dataclass(cls)
            and cls.__dataclass_params__.frozen):
        raise ValueError(f"dp_mechanism {name!r}: register a frozen dataclass subclassing "
                         f"fedsec.defenses.correlated.MatrixMechanism (its fields are privacy.params)")
    bare = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    if bare:
        raise ValueError(f"dp_mechanism {name!r}: field(s) {bare} need a default (they become privacy.params)")
    return cls, {f.name: f.default for f in dataclasses.fields(cls)}


_FIXED = {"update_attack": 3, "data_attack": 2, "accountant": 2, "benchmark": 2,
          "metric": 1, "preference_loss": 1}  # the positional arguments before the params
_ADAPT = {"aggregator": _aggregator, "update_attack": _function("update_attack"),
          "data_attack": _function("data_attack"), "accountant": _function("accountant"),
          "server_optimizer": _server_optimizer, "benchmark": _function("benchmark"),
          "metric": _function("metric"), "dp_mechanism": _dp_mechanism,
          "preference_loss": _function("preference_loss")}


_entry_points_loaded = False


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
