"""``rollfast new-plugin``: write a complete, installable plugin package that passes
the conformance kit as generated.

The package (``NAME/``) holds ``pyproject.toml`` (build system, version, the
``rollfast`` entry point), ``rollfast_NAME/__init__.py`` (the hook implementation, its
docstring with the update as mathematics, a doctest), ``tests/test_NAME.py`` (the kit,
one case per check) and ``README.md``. The module of a *mode* comes from its family's
mode protocol (``register.mode_protocol(..., scaffold=)``): the core knows no family.

>>> import tempfile
>>> root = write_plugin("halfstep", "mask", dest=tempfile.mkdtemp())
>>> sorted(p.name for p in root.rglob("*") if p.is_file())
['README.md', '__init__.py', 'pyproject.toml', 'test_halfstep.py']
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

KINDS = ("family", "mode", "mask", "average", "round", "partition")
TEMPLATES = Path(__file__).parent / "templates"


class ScaffoldError(ValueError):
    """The scaffold cannot be written (bad name, existing directory, unknown family)."""


def write_plugin(name: str, kind: str, *, family: str | None = None, dest: str | Path = ".") -> Path:
    """Write the package of a new plugin contributing one ``kind`` named ``name``.

    Args:
      name: the plugin's name: a lowercase Python identifier (``my_mode``); the
        contribution is ``name`` too (upper case for a mode: ``MY_MODE``).
      kind: one of :data:`KINDS`.
      family: the family a mode attaches to.
      dest: the directory in which ``name/`` is created.

    Returns:
      The package's root directory.

    Raises:
      ScaffoldError: a bad name or kind, an existing directory, or a mode whose family
        offers no template.
    """
    if kind not in KINDS:
        raise ScaffoldError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise ScaffoldError(f"plugin name must be a lowercase Python identifier (e.g. my_mode), got {name!r}")
    root = Path(dest) / name
    if root.exists():
        raise ScaffoldError(f"{root} already exists")
    files = _files(name, kind, family)
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def _files(name: str, kind: str, family: str | None) -> dict[str, str]:
    """``{relative path: text}`` of the package."""
    package = name if name.startswith("rollfast_") else f"rollfast_{name}"
    contribution = name.upper() if kind == "mode" else name
    if kind == "mode":
        module = _mode_module(contribution, family)
        label = f"the {family} mode {contribution}"
        check_args = f'"mode", "{contribution}", family="{family}"'
    else:
        if family is not None:
            raise ScaffoldError(f"--family is for --kind mode, not {kind}")
        module = (TEMPLATES / f"{kind}.py.tmpl").read_text()
        label = f"the {kind} {contribution}"
        check_args = f'"{kind}", "{contribution}"'
    fill = {"name": name, "package": package, "contribution": contribution, "label": label,
            "dist": f"rollfast-{name.replace('_', '-')}", "check_args": check_args,
            "summary": f"A rollfast plugin: {label}."}
    texts = {"pyproject.toml": "pyproject.toml.tmpl", "README.md": "README.md.tmpl",
             f"tests/test_{name}.py": "test.py.tmpl"}
    out = {path: _fill((TEMPLATES / tmpl).read_text(), fill) for path, tmpl in texts.items()}
    out[f"{package}/__init__.py"] = _fill(module, fill)
    return out


def _mode_module(contribution: str, family: str | None) -> str:
    """The module of a new mode, from the family's mode protocol."""
    from rollfast.registry import registry

    reg = registry()
    offering = sorted(f for r in reg.records("family") if (p := reg.protocol(r.name)) and p.scaffold
                      for f in [r.name])
    if family is None:
        raise ScaffoldError(f"--kind mode needs --family (families with a mode template: {', '.join(offering)})")
    protocol = reg.protocol(family)
    if protocol is None or protocol.scaffold is None:
        raise ScaffoldError(f"family {family!r} offers no mode template; families that do: "
                            f"{', '.join(offering) or 'none'}")
    return protocol.scaffold(contribution)


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


__all__ = ["write_plugin", "ScaffoldError", "KINDS"]
