"""The ``rollfast`` command: list, inspect, diagnose and compare the installed optimizers.

``rollfast list --json`` prints one JSON object (schema ``rollfast.list/1``)::

    {"schema": "rollfast.list/1",
     "contributions": [{"kind", "name", "family", "aliases", "summary",
                        "plugin", "distribution", "version", "first_party",
                        "parameters": [{"name", "default", "required", "doc", "allowed"}],
                        "references", "metadata"}],
     "plugins": [{"plugin", "distribution", "version", "first_party", "module", "error"}]}

``kind`` is one of family, mode, mask, average, round, partition, export;
``family`` is set for modes only; defaults and metadata values that are not JSON
are given as their ``repr``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Mapping

from rollfast.errors import UnknownNameError
from rollfast.registry import KINDS, Contribution, registry
from rollfast.scaffold import KINDS as SCAFFOLD_KINDS
from rollfast.scaffold import ScaffoldError, write_plugin

SCHEMA = "rollfast.list/1"
HEADINGS = {"family": "families", "mode": "modes", "mask": "masks", "average": "averages",
            "round": "rounding rules", "partition": "partitioners", "export": "exports"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rollfast`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:  # imports jax, so only when asked for
        from rollfast.compare.cli import main as compare

        return compare(argv[1:])
    parser = argparse.ArgumentParser(prog="rollfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="every family, mode, mask, average, rounding and partitioner")
    p_list.add_argument("--json", action="store_true", help=f"machine-readable ({SCHEMA})")
    p_list.add_argument("--kind", choices=KINDS, help="only this kind")
    p_list.add_argument("--family", help="only modes of this family")
    p_info = sub.add_parser("info", help="summary, parameters, modes, references and provider")
    p_info.add_argument("name", help="a family, mode, part or plugin name (or plugin:name)")
    p_info.add_argument("--kind", choices=KINDS, help="look only among this kind")
    sub.add_parser("plugins", help="per plugin: what it registered, collisions and load warnings")
    p_new = sub.add_parser("new-plugin", help="write a new plugin package (scaffold) that passes the kit")
    p_new.add_argument("name", help="the plugin's name, e.g. my_mode (the contribution's name too)")
    p_new.add_argument("--kind", required=True, choices=SCAFFOLD_KINDS, help="what it contributes")
    p_new.add_argument("--family", help="the family a mode attaches to (e.g. kron)")
    p_new.add_argument("--dest", default=".", help="directory to create the package in (default: .)")
    sub.add_parser("compare", help="run optimizers side by side (`rollfast compare --help`)")
    args = parser.parse_args(argv)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = registry()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    try:
        if args.command == "list":
            return _list(reg, args)
        if args.command == "info":
            return _info(reg, args.name, args.kind)
        if args.command == "new-plugin":
            return _new_plugin(args)
        return _plugins(reg)
    except (UnknownNameError, ScaffoldError) as exc:
        print(f"rollfast: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `rollfast list | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _list(reg, args) -> int:
    kind = "mode" if args.family and not args.kind else args.kind
    if kind == "mode" and args.family:
        reg.lookup("family", args.family)
    records = reg.records(kind, args.family if kind == "mode" else None)
    if args.json:
        plugins = [_plugin_json(p) for p in reg.plugins()]
        print(json.dumps({"schema": SCHEMA, "contributions": [_json(r) for r in records],
                          "plugins": plugins}, indent=2))
        return 0
    rows = []
    for kind_ in KINDS:
        group = [r for r in records if r.kind == kind_]
        if not group or kind_ == "mode" and kind is None:
            continue
        rows.append((HEADINGS[kind_], "", ""))
        for r in group:
            label = f"{r.family} × {r.name}" if kind_ == "mode" else r.name
            rows.append((f"  {label}", _provider(r), r.summary))
            if kind_ == "family" and kind is None:
                for m in reg.records("mode", r.name):
                    rows.append((f"    × {m.name}", _provider(m), m.summary))
    _table(rows)
    return 0


def _info(reg, name: str, kind: str | None) -> int:
    record = _find(reg, name, kind)
    if record is None:
        plugin = next((p for p in reg.plugins() if p.provider.plugin.lower() == name.lower()), None)
        if plugin is None:
            raise UnknownNameError(kind or "name", name, _all_names(reg),
                                   hint="`rollfast list` shows every name")
        return _plugin_info(reg, plugin)
    r = record
    title = f"{r.family} × {r.name}" if r.kind == "mode" else r.name
    print(f"{title} ({r.kind}) — {r.summary}")
    print(f"provided by {_provider(r)}{'' if r.provider.first_party else ' (third party)'}")
    if r.aliases:
        print(f"aliases: {', '.join(r.aliases)}")
    if r.parameters:
        print("\nparameters:")
        _table([(f"  {p.name}", "(required)" if p.required else f"= {_short(repr(p.default))}",
                 p.doc + (f" [allowed: {p.constraint}]" if p.constraint is not None else ""))
                for p in r.parameters])
    if r.kind == "family":
        modes = reg.records("mode", r.name)
        if modes:
            print("\nmodes:")
            _table([(f"  {m.name}", _provider(m), m.summary) for m in modes])
    for key, value in r.metadata.items():
        if not callable(value) and value not in (None, (), [], {}):
            print(f"\n{key.replace('_', ' ')}: {_text(value)}")
    if r.references:
        print("\nreferences:")
        for ref in r.references:
            print(f"  {ref}")
    return 0


def _plugin_info(reg, plugin) -> int:
    pv = plugin.provider
    print(f"plugin {pv.plugin} — distribution {pv.distribution} {pv.version}, module {plugin.module}")
    if plugin.error:
        print(f"error: {plugin.error}")
    for note in reg.warnings(pv.plugin):
        print(f"warning: {note}")
    own = [r for r in reg.records() if r.provider == pv]
    rows = [(f"  {r.kind}", f"{r.family} × {r.name}" if r.family else r.name, r.summary) for r in own]
    if rows:
        print(f"\ncontributes {len(rows)}:")
        _table(rows)
    for r in own:
        obj = r.impl.get("object") if r.kind == "export" else None
        if isinstance(obj, Mapping) and obj:
            print(f"\n{r.name}:")
            _table([(f"  {k}", "", _text(v)) for k, v in obj.items()])
    return 0


def _plugins(reg) -> int:
    """Per plugin: distribution, status, what it registered, and its load-time warnings."""
    records = reg.records()
    for p in reg.plugins():
        pv = p.provider
        notes = reg.warnings(pv.plugin)
        status = "error" if p.error else f"{len(notes)} warning{'s' * (len(notes) != 1)}" if notes else "ok"
        print(f"{pv.plugin}  {pv.distribution} {pv.version}".rstrip() + f"  [{status}]")
        own = [r for r in records if r.provider == pv]
        for kind in KINDS:
            names = [f"{r.family} × {r.name}" if r.family else r.name for r in own if r.kind == kind]
            if names:
                print(f"  {HEADINGS[kind]}: {', '.join(names)}")
        lost = [f"{r.name} (held by {w.provider.plugin}; reach it as {r.qualified_name})"
                for r, w in reg.shadowed(pv)]
        if lost:
            print(f"  collisions: {', '.join(lost)}")
        if reg.protocol_of(pv):
            print(f"  mode protocols: {', '.join(reg.protocol_of(pv))}")
        for note in ([p.error] if p.error else notes):
            print(f"  {'error' if p.error else 'warning'}: {note}")
    return 0 if not any(p.error for p in reg.plugins()) else 1


def _new_plugin(args) -> int:
    root = write_plugin(args.name, args.kind, family=args.family, dest=args.dest)
    print(f"wrote {root}/ — `pip install -e {root}` then `pytest {root}` runs the conformance kit")
    return 0


def _find(reg, name: str, kind: str | None) -> Contribution | None:
    for k in ([kind] if kind else [k for k in KINDS if k != "mode"]):
        if k == "mode":
            continue
        try:
            return reg.lookup(k, name)
        except UnknownNameError:
            pass
    if kind in (None, "mode"):
        family, _, mode = name.rpartition("/")
        families = [family] if family else sorted({m.family for m in reg.records("mode")})
        for fam in families:
            try:
                return reg.lookup("mode", mode, fam)  # a name, an alias or "plugin:NAME"
            except UnknownNameError:
                pass
    return None


def _all_names(reg) -> list[str]:
    return [n for r in reg.records() for n in (r.name, *r.aliases)] + \
           [p.provider.plugin for p in reg.plugins()]


def _short(text: str, width: int = 32) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _provider(r: Contribution) -> str:
    return f"{r.provider.plugin} ({r.provider.distribution} {r.provider.version})".replace(" )", ")")


def _text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ", ".join(map(str, value))
    return str(value)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _json(r: Contribution) -> dict:
    return {"kind": r.kind, "name": r.name, "family": r.family, "aliases": list(r.aliases),
            "summary": r.summary, "plugin": r.provider.plugin,
            "distribution": r.provider.distribution, "version": r.provider.version,
            "first_party": r.provider.first_party,
            "parameters": [{"name": p.name, "default": None if p.required else _jsonable(p.default),
                            "required": p.required, "doc": p.doc,
                            "allowed": None if p.constraint is None else str(p.constraint)}
                           for p in r.parameters],
            "references": list(r.references),
            "metadata": {k: _jsonable(v) for k, v in r.metadata.items() if not callable(v)}}


def _plugin_json(p) -> dict:
    pv = p.provider
    return {"plugin": pv.plugin, "distribution": pv.distribution, "version": pv.version,
            "first_party": pv.first_party, "module": p.module, "error": p.error}


def _table(rows: list[tuple[str, str, str]]) -> None:
    widths = [max((len(r[i]) for r in rows if r[1] or r[2]), default=0) for i in range(2)]
    for a, b, c in rows:
        if not b and not c:
            print(a)
        else:
            print(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip())


if __name__ == "__main__":
    sys.exit(main())
