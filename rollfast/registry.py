"""The registry: what every installed plugin contributes, and from whom.

Entry points in the group ``rollfast`` are loaded lazily, on first use, one by
one: a plugin that fails to import, raises in a hook or claims a name that is
taken produces a :class:`~rollfast.RollfastPluginWarning` naming it, and the rest
keeps working. First-party plugins (shipped in the ``rollfast`` distribution) win
name collisions over third-party ones; a loser stays reachable as
``"<plugin>:<name>"``.
"""

from __future__ import annotations

import inspect
import os
import types
import warnings
from collections.abc import Callable, Iterable, Mapping

import attrs
import importlib_metadata
import pluggy

from rollfast import hookspecs
from rollfast.errors import RollfastPluginWarning, UnknownNameError, closest
from rollfast.signature import Parameter, parameters, summary

GROUP = "rollfast"
FIRST_PARTY = "rollfast"
KINDS = ("family", "mode", "mask", "average", "round", "partition", "export")
HOOK_KIND = {"mask": "mask", "average": "average", "round": "round", "partition": "partition"}
# Leading factory parameters that the core supplies and that are not user options.
_SUPPLIED = {"mask": ("inner", "first_moment"), "average": ("inner",)}
# Descriptive keywords of each ``register`` call, beyond the common ones; free-form data
# goes in ``metadata={...}`` (the one spelling, for every kind).
COMMON_KEYWORDS = ("aliases", "summary", "references", "priority", "metadata")
KIND_KEYWORDS = {"family": ("first_moment", "update_args", "complex_leaves"), "mask": ("auto", "order"),
                 "average": (), "round": (), "partition": ()}

hookimpl = pluggy.HookimplMarker("rollfast")


@attrs.frozen
class Provider:
    """The plugin (entry-point name) and distribution behind a contribution."""

    plugin: str
    distribution: str
    version: str
    first_party: bool


@attrs.frozen
class Contribution:
    """One registered thing: a family, a mode of a family, a mask, an average, a
    rounding rule, a partitioner, or a top-level export."""

    kind: str
    name: str
    factory: Callable | None
    provider: Provider
    family: str | None = None
    aliases: tuple[str, ...] = ()
    parameters: tuple[Parameter, ...] = ()
    summary: str = ""
    references: tuple[str, ...] = ()
    priority: int = 0
    impl: Mapping[str, object] = attrs.field(factory=dict)
    metadata: Mapping[str, object] = attrs.field(factory=dict)

    @property
    def qualified_name(self) -> str:
        return f"{self.provider.plugin}:{self.name}"

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def describe(self) -> str:
        where = f" of {self.family}" if self.family else ""
        return f"{self.kind}{where} {self.name!r} ({self.provider.plugin})"


@attrs.frozen
class PluginInfo:
    """A loaded (or failed) plugin and what went wrong with it, if anything."""

    provider: Provider
    module: str
    error: str | None = None


class Registrar:
    """What a hook receives: call it (or ``.family``/``.mode``) to contribute."""

    def __init__(self, registry: Registry, provider: Provider, hook: str):
        self._registry, self._provider, self._hook = registry, provider, hook

    def __call__(self, name: str, factory: Callable, **descr) -> None:
        if self._hook not in HOOK_KIND:
            raise TypeError(f"the {self._hook!r} hook registers with register.family()/register.mode()")
        self._add(HOOK_KIND[self._hook], name, factory, **descr)

    def family(self, name: str, factory: Callable, **descr) -> None:
        self._add("family", name, factory, **descr)

    def mode(self, family: str, name: str, *, aliases=(), summary: str | None = None,
             references=(), priority: int = 0, metadata: Mapping | None = None, **impl) -> None:
        record = Contribution(
            "mode", name, None, self._provider, family=family.lower(), aliases=tuple(aliases),
            summary=summary if summary is not None else _first_summary(impl.values()),
            references=tuple(references), priority=priority, impl=dict(impl),
            metadata=dict(metadata or {}))
        self._registry._add(record)

    def mode_protocol(self, family: str, *, required: Iterable[str] = (),
                      optional: Iterable[str] = (), prepare: Callable | None = None,
                      conformance: Callable | None = None, scaffold: Callable | None = None) -> None:
        """Declare what a mode of ``family`` must register (see :class:`ModeProtocol`)."""
        self._registry._add_protocol(ModeProtocol(
            family.lower(), tuple(required), tuple(optional), prepare, conformance, scaffold,
            self._provider))

    def export(self, name: str, obj: object) -> None:
        self._registry._add(Contribution("export", name, None, self._provider, impl={"object": obj},
                                         summary=summary(obj)))

    def _add(self, kind, name, factory, *, aliases=(), summary: str | None = None,
             references=(), priority: int = 0, metadata: Mapping | None = None,
             constraints: Mapping | None = None, **descr) -> None:
        unknown = sorted(set(descr) - set(KIND_KEYWORDS[kind]))
        if unknown:
            problem = _unknown_keywords(unknown, KIND_KEYWORDS[kind] + COMMON_KEYWORDS, "keyword")
            self._registry._reject(self._provider, f"{kind} {name!r}", 
                                   f"{problem} (free-form data goes in metadata={{...}})")
            return
        if not callable(factory):
            raise TypeError(f"{kind} {name!r}: factory must be callable, got {factory!r}")
        record = Contribution(
            kind, name, factory, self._provider, aliases=tuple(aliases),
            parameters=parameters(factory, skip=_SUPPLIED.get(kind, ()), constraints=dict(constraints or {})),
            summary=summary if summary is not None else _first_summary([factory]),
            references=tuple(references), priority=priority,
            metadata={**(metadata or {}), **descr})
        self._registry._add(record)


@attrs.frozen
class ModeProtocol:
    """What a family asks of its modes, declared by the family's plugin with
    ``register.mode_protocol(family, ...)``.

    ``required`` / ``optional``: the implementation keywords of ``register.mode``;
    ``prepare(record) -> impl``: checks the values (raises ``TypeError``/``ValueError``
    with the problem) and may return the ``impl`` mapping with its functions wrapped
    (e.g. shape checks at trace time); ``conformance(record) -> [(check, fn), ...]``:
    the family's own contract for a mode, run by :mod:`rollfast.testing`;
    ``scaffold(name) -> {path: text}``: the files of a new mode package
    (``rollfast new-plugin NAME --kind mode --family FAMILY``), with ``{{name}}``-style
    placeholders already filled.
    """

    family: str
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    prepare: Callable | None = None
    conformance: Callable | None = None
    scaffold: Callable | None = None
    provider: Provider | None = None


def _unknown_keywords(unknown: list[str], valid: Iterable[str], what: str) -> str:
    valid = tuple(valid)
    parts = []
    for word in unknown:
        hint = closest(word, valid)
        parts.append(f"{word!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return f"unknown {what}{'s' if len(parts) > 1 else ''} {', '.join(parts)}; allowed: {', '.join(valid)}"


def _first_summary(objs: Iterable[object]) -> str:
    return next((s for s in map(summary, objs) if s), "")


class Registry:
    """All contributions, keyed by kind and (for modes) family, case-insensitively."""

    def __init__(self, *, autoload: bool = True):
        self._autoload = autoload
        self._loaded = False
        self._loading = False
        self._records: dict[tuple, Contribution] = {}
        self._qualified: dict[tuple, Contribution] = {}
        self._plugins: list[PluginInfo] = []
        self._warnings: dict[str, list[str]] = {}
        self._dropped: dict[tuple, tuple[str, str]] = {}
        self._protocols: dict[str, ModeProtocol] = {}
        self._deferred: list[Contribution] = []
        self._pm = pluggy.PluginManager(GROUP)
        self._pm.add_hookspecs(hookspecs)
        self._pending: list | None = None

    # -- loading ----------------------------------------------------------------
    def load(self) -> Registry:
        """Load every entry point once (first-party always; third-party unless
        ``ROLLFAST_DISABLE_PLUGIN_AUTOLOAD=1``). Modes are checked against their
        family and its mode protocol once every plugin has loaded."""
        if self._loaded:
            return self
        self._loaded = True
        if not self._autoload:
            return self
        disabled = os.environ.get("ROLLFAST_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")
        eps = sorted(importlib_metadata.entry_points(group=GROUP),
                     key=lambda ep: (ep.dist.name != FIRST_PARTY if ep.dist else True, ep.name))
        self._loading = True
        try:
            for ep in eps:
                dist = ep.dist.name if ep.dist else "<unknown>"
                version = ep.dist.version if ep.dist else ""
                first = dist == FIRST_PARTY
                if disabled and not first:
                    continue
                provider = Provider(ep.name, dist, version, first)
                try:
                    plugin = ep.load()
                except Exception as exc:  # a broken plugin must not break the rest
                    self._fail(provider, ep.value, f"failed to import: {exc!r}")
                    continue
                self._register_plugin(plugin, provider, ep.value)
        finally:
            self._loading = False
        self._settle_modes()
        return self

    def register(self, plugin: object, name: str | None = None, *, first_party: bool = False) -> None:
        """Register a plugin module or object at run time (tests, notebooks)."""
        self.load()
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        module = getattr(plugin, "__name__", name)
        self._register_plugin(plugin, Provider(name, "<runtime>", "", first_party), module)

    def _register_plugin(self, plugin, provider: Provider, module: str) -> None:
        try:
            self._pm.register(plugin, name=f"{provider.distribution}:{provider.plugin}")
        except Exception as exc:
            self._fail(provider, module, f"is not a valid plugin: {exc}")
            return
        contributed: list = []
        self._pending = contributed
        try:
            for hook in ("precondition", "mask", "average", "round", "partition"):
                fn = getattr(plugin, hook, None)
                if fn is not None and self._pm.parse_hookimpl_opts(plugin, hook) is not None:
                    fn(Registrar(self, provider, hook))
        except Exception as exc:
            self._pm.unregister(plugin)
            self._fail(provider, module, f"raised in its hook: {exc!r}")
            return
        finally:
            self._pending = None
        self._plugins.append(PluginInfo(provider, module))
        for item in contributed:
            if isinstance(item, ModeProtocol):
                self._protocols[item.family] = item
            elif item.kind == "mode":
                self._deferred.append(item)
            else:
                problem = factory_problem(item)
                if problem:
                    self._reject(provider, item.describe(), problem, item)
                else:
                    self._insert(item)
        if not self._loading:
            self._settle_modes()

    def _add(self, record: Contribution) -> None:
        self._pending.append(record)

    def _add_protocol(self, protocol: ModeProtocol) -> None:
        self._pending.append(protocol)

    def _settle_modes(self) -> None:
        """Check each waiting mode (family registered, keywords of its mode protocol,
        the protocol's own checks) and insert it, or drop it with a warning."""
        waiting, self._deferred = self._deferred, []
        families = {k[2]: r for k, r in self._records.items() if k[0] == "family"}
        for record in waiting:
            if record.family not in families:
                hint = closest(record.family, [r.name for r in families.values()])
                did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
                self._reject(record.provider, record.describe(),
                             f"names unknown family {record.family!r}{did_you_mean}", record)
                continue
            try:
                record = self._prepared(record)
            except (TypeError, ValueError) as exc:
                self._reject(record.provider, record.describe(), str(exc), record)
                continue
            self._insert(record)

    def _prepared(self, record: Contribution) -> Contribution:
        """``record`` checked against its family's mode protocol (if the family declares one)."""
        protocol = self._protocols.get(record.family)
        if protocol is None:
            if not record.impl:
                raise TypeError("registers no implementation keywords")
            return record
        allowed = protocol.required + protocol.optional
        unknown = sorted(set(record.impl) - set(allowed))
        if unknown:
            raise TypeError(_unknown_keywords(unknown, allowed, "implementation keyword"))
        missing = [k for k in protocol.required if k not in record.impl]
        if missing:
            raise TypeError(f"misses implementation keyword{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(repr, missing))} (the {record.family} mode protocol "
                            f"requires {', '.join(protocol.required)})")
        if protocol.prepare is not None:
            record = attrs.evolve(record, impl=dict(protocol.prepare(record)))
        return record

    def _insert(self, record: Contribution) -> None:
        self._qualified[(record.kind, record.family, record.qualified_name.lower())] = record
        for key_name in (record.name, *record.aliases):
            key = (record.kind, record.family, key_name.lower())
            holder = self._records.get(key)
            if holder is None:
                self._records[key] = record
                continue
            new_rank = (record.provider.first_party, record.priority)
            old_rank = (holder.provider.first_party, holder.priority)
            winner, loser = (record, holder) if new_rank > old_rank else (holder, record)
            self._records[key] = winner
            if new_rank == old_rank or not loser.provider.first_party:
                self._warn(loser.provider,
                           f"registers {loser.kind} {key_name!r}, which {winner.provider.plugin!r} "
                           f"({winner.provider.distribution}) already has; "
                           f"use {loser.qualified_name!r} to reach it")

    def _reject(self, provider: Provider, what: str, problem: str,
                record: Contribution | None = None) -> None:
        """Drop one registration that cannot work, with a warning naming plugin and problem."""
        if record is not None:
            for key_name in (record.name, *record.aliases):
                self._dropped[(record.kind, record.family, key_name.lower())] = (provider.plugin, problem)
        self._warn(provider, f"registration of {what} dropped: {problem}")

    def _fail(self, provider: Provider, module: str, problem: str) -> None:
        self._plugins.append(PluginInfo(provider, module, problem))
        self._warn(provider, problem)

    def _warn(self, provider: Provider, problem: str) -> None:
        self._warnings.setdefault(provider.plugin, []).append(problem)
        warnings.warn(f"rollfast plugin {provider.plugin!r} from distribution "
                      f"{provider.distribution!r} {problem}", RollfastPluginWarning, stacklevel=4)

    # -- queries ----------------------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        return list(self.load()._plugins)

    def warnings(self, plugin: str) -> list[str]:
        """The load-time warnings of one plugin (collisions, dropped registrations)."""
        return list(self.load()._warnings.get(plugin, ()))

    def shadowed(self, provider: Provider) -> list[tuple[Contribution, Contribution]]:
        """``(record, winner)`` for each name of ``provider``'s that another plugin holds
        (the record stays reachable as ``"plugin:name"``)."""
        out = []
        for (kind, fam, _), record in self.load()._qualified.items():
            if record.provider != provider:
                continue
            winner = self._records.get((kind, fam, record.name.lower()))
            if winner is not None and winner is not record:
                out.append((record, winner))
        return out

    def protocol_of(self, provider: Provider) -> list[str]:
        """The families whose mode protocol ``provider`` declared."""
        return sorted(f for f, p in self.load()._protocols.items() if p.provider == provider)

    def protocol(self, family: str) -> ModeProtocol | None:
        """The mode protocol a family's plugin declared, if any."""
        return self.load()._protocols.get(family.lower())

    def records(self, kind: str | None = None, family: str | None = None) -> list[Contribution]:
        """Every winning contribution, optionally of one kind (and family, for modes)."""
        self.load()
        seen, out = set(), []
        for (k, fam, _), rec in self._records.items():
            if (kind is None or k == kind) and (family is None or fam == family.lower()) and id(rec) not in seen:
                seen.add(id(rec))
                out.append(rec)
        return sorted(out, key=lambda r: (KINDS.index(r.kind), r.family or "", r.name.lower()))

    def lookup(self, kind: str, name: str, family: str | None = None) -> Contribution:
        """Find a contribution by name, alias or ``"plugin:name"``, case-insensitively."""
        self.load()
        fam = family.lower() if family else None
        key = (kind, fam, str(name).lower())
        found = self._records.get(key) or self._qualified.get(key)
        if found is not None:
            return found
        valid = [n for r in self.records(kind, family) for n in (r.name, *r.aliases)]
        valid += [r.qualified_name for (k, f, _), r in self._qualified.items() if (k, f) == (kind, fam)]
        hint = (f"`rollfast list --kind mode --family {family}` lists them all"
                if kind == "mode" else None)
        raise UnknownNameError(kind, str(name), valid, hint=hint, note=self._why_missing(key))

    def _why_missing(self, key: tuple) -> str | None:
        """A note for an unknown name: the plugin whose registration of it was dropped,
        or the plugins that failed to load."""
        if key in self._dropped:
            plugin, problem = self._dropped[key]
            return (f"plugin {plugin!r} registers it but the registration was dropped: {problem}; "
                    f"`rollfast plugins` shows every warning")
        failed = [p.provider.plugin for p in self._plugins if p.error]
        if failed:
            return (f"plugin{'s' if len(failed) > 1 else ''} {', '.join(map(repr, failed))} "
                    f"failed to load; `rollfast plugins` shows why")
        return None


def factory_problem(record: Contribution) -> str | None:
    """Why the core could not call ``record.factory`` the way its kind requires, or ``None``.

    Families, rounding rules and partitioners are called with keyword options only;
    masks and averages with the optimizer to wrap as the first positional argument
    (a mask also with ``first_moment=``).

    >>> def mask(*, first_moment=None): ...
    >>> factory_problem(Contribution("mask", "m", mask, Provider("p", "d", "", False)))
    'mask factory must take the optimizer to wrap as its first positional argument'
    """
    try:
        params = list(inspect.signature(record.factory).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    if record.kind in ("mask", "average"):
        if not params or params[0].kind not in positional:
            return f"{record.kind} factory must take the optimizer to wrap as its first positional argument"
        params = params[1:] if params[0].kind != inspect.Parameter.VAR_POSITIONAL else params
        takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        if record.kind == "mask" and not takes_any and "first_moment" not in [p.name for p in params]:
            return "mask factory must accept the keyword first_moment= (None or a state accessor)"
    stuck = [p.name for p in params if p.kind == inspect.Parameter.POSITIONAL_ONLY
             and p.default is inspect.Parameter.empty]
    if stuck:
        return (f"{record.kind} factory takes positional-only {', '.join(map(repr, stuck))} "
                f"without a default; the core passes options by keyword")
    return None


_REGISTRY: Registry | None = None


def registry() -> Registry:
    """The process-wide registry (loaded on first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY.load()


def reset(*, autoload: bool = True) -> Registry:
    """Forget every plugin and start a new registry (for tests)."""
    global _REGISTRY
    _REGISTRY = Registry(autoload=autoload)
    return _REGISTRY


def as_plugin(**hooks: Callable) -> types.SimpleNamespace:
    """A plugin object from hook functions, for notebooks and tests.

    >>> p = as_plugin(mask=lambda register: None)
    >>> callable(p.mask)
    True
    """
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})
