"""The registry: what every installed plugin contributes, and from whom.

Entry points in the group ``rollfast`` are loaded lazily, on first use, one by
one: a plugin that fails to import, raises in a hook or claims a name that is
taken produces a :class:`~rollfast.RollfastPluginWarning` naming it, and the rest
keeps working. First-party plugins (shipped in the ``rollfast`` distribution) win
name collisions over third-party ones; a loser stays reachable as
``"<plugin>:<name>"``.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable, Iterable, Mapping

import attrs
import importlib_metadata
import pluggy

from rollfast import hookspecs
from rollfast.errors import RollfastPluginWarning, UnknownNameError
from rollfast.signature import Parameter, parameters, summary

GROUP = "rollfast"
FIRST_PARTY = "rollfast"
KINDS = ("family", "mode", "mask", "average", "round", "partition", "export")
HOOK_KIND = {"mask": "mask", "average": "average", "round": "round", "partition": "partition"}
# Leading factory parameters that the core supplies and that are not user options.
_SUPPLIED = {"mask": ("inner", "first_moment"), "average": ("inner",)}

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
        self._add(HOOK_KIND[self._hook], name, factory, _SUPPLIED.get(self._hook, ()), **descr)

    def family(self, name: str, factory: Callable, **descr) -> None:
        self._add("family", name, factory, (), **descr)

    def mode(self, family: str, name: str, *, aliases=(), summary: str | None = None,
             references=(), priority: int = 0, metadata: Mapping | None = None, **impl) -> None:
        if not impl:
            raise TypeError(f"mode {name!r} of {family!r} registers no implementation")
        record = Contribution(
            "mode", name, None, self._provider, family=family.lower(), aliases=tuple(aliases),
            summary=summary if summary is not None else _first_summary(impl.values()),
            references=tuple(references), priority=priority, impl=dict(impl),
            metadata=dict(metadata or {}))
        self._registry._add(record)

    def export(self, name: str, obj: object) -> None:
        self._registry._add(Contribution("export", name, None, self._provider, impl={"object": obj},
                                         summary=summary(obj)))

    def _add(self, kind, name, factory, skip, *, aliases=(), summary: str | None = None,
             references=(), priority: int = 0, constraints: Mapping | None = None, **metadata) -> None:
        if not callable(factory):
            raise TypeError(f"{kind} {name!r}: factory must be callable, got {factory!r}")
        record = Contribution(
            kind, name, factory, self._provider, aliases=tuple(aliases),
            parameters=parameters(factory, skip=skip, constraints=dict(constraints or {})),
            summary=summary if summary is not None else _first_summary([factory]),
            references=tuple(references), priority=priority, metadata=metadata)
        self._registry._add(record)


def _first_summary(objs: Iterable[object]) -> str:
    return next((s for s in map(summary, objs) if s), "")


class Registry:
    """All contributions, keyed by kind and (for modes) family, case-insensitively."""

    def __init__(self, *, autoload: bool = True):
        self._autoload = autoload
        self._loaded = False
        self._records: dict[tuple, Contribution] = {}
        self._qualified: dict[tuple, Contribution] = {}
        self._plugins: list[PluginInfo] = []
        self._pm = pluggy.PluginManager(GROUP)
        self._pm.add_hookspecs(hookspecs)
        self._pending: list[Contribution] | None = None

    # -- loading ----------------------------------------------------------------
    def load(self) -> Registry:
        """Load every entry point once (first-party always; third-party unless
        ``ROLLFAST_DISABLE_PLUGIN_AUTOLOAD=1``)."""
        if self._loaded:
            return self
        self._loaded = True
        if not self._autoload:
            return self
        disabled = os.environ.get("ROLLFAST_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")
        eps = sorted(importlib_metadata.entry_points(group=GROUP),
                     key=lambda ep: (ep.dist.name != FIRST_PARTY if ep.dist else True, ep.name))
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
        contributed: list[Contribution] = []
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
        for record in contributed:
            self._insert(record)
        self._plugins.append(PluginInfo(provider, module))

    def _add(self, record: Contribution) -> None:
        self._pending.append(record)

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

    def _fail(self, provider: Provider, module: str, problem: str) -> None:
        self._plugins.append(PluginInfo(provider, module, problem))
        self._warn(provider, problem)

    @staticmethod
    def _warn(provider: Provider, problem: str) -> None:
        warnings.warn(f"rollfast plugin {provider.plugin!r} from distribution "
                      f"{provider.distribution!r} {problem}", RollfastPluginWarning, stacklevel=4)

    # -- queries ----------------------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        return list(self.load()._plugins)

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
        raise UnknownNameError(kind, str(name), valid, hint=hint)


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
