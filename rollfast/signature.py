"""Parameters of a contribution, read once from its factory's signature and docstring."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import attrs

from rollfast.constraints import Constraint, from_annotation

REQUIRED = inspect.Parameter.empty


@attrs.frozen
class Parameter:
    """One option of a contribution: its name, default (``REQUIRED`` if none), doc and
    the :class:`~rollfast.constraints.Constraint` on its values (``None``: anything)."""

    name: str
    default: object = REQUIRED
    doc: str = ""
    constraint: Constraint | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def parameters(factory: Callable, skip: tuple[str, ...] = (),
               constraints: dict[str, Constraint] | None = None) -> tuple[Parameter, ...]:
    """The keyword parameters of ``factory``, with docs from its ``Args:`` section and
    constraints from ``Annotated[..., Constraint]`` annotations (overridden by
    ``constraints``, declared at registration for factories that cannot be annotated).

    Positional-only parameters and ``*args``/``**kwargs`` are not options.

    >>> def f(inner, /, learning_rate=0.1, *, b1=0.9):
    ...     '''Doc.
    ...
    ...     Args:
    ...       learning_rate: step size.
    ...       b1: momentum
    ...         decay.
    ...     '''
    >>> [(p.name, p.default, p.doc) for p in parameters(f)]
    [('learning_rate', 0.1, 'step size.'), ('b1', 0.9, 'momentum decay.')]
    """
    sig = _signature(factory)
    if sig is None:
        return ()
    docs = arg_docs(inspect.getdoc(factory) or "")
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    declared = constraints or {}
    unknown = set(declared) - set(sig.parameters)
    if unknown:
        raise TypeError(f"constraints for {', '.join(sorted(unknown))}, which "
                        f"{getattr(factory, '__name__', factory)!r} does not take")
    return tuple(
        Parameter(p.name, p.default, docs.get(p.name, ""),
                  declared.get(p.name, from_annotation(p.annotation)))
        for p in sig.parameters.values()
        if p.kind in kinds and p.name not in skip
    )


def _signature(factory: Callable) -> inspect.Signature | None:
    """``factory``'s signature with string annotations evaluated where they can be."""
    try:
        return inspect.signature(factory, eval_str=True)
    except Exception:  # an annotation that does not evaluate: keep them as strings
        pass
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


def summary(obj: object) -> str:
    """First line of an object's docstring.

    >>> summary(summary)
    "First line of an object's docstring."
    """
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


_SECTION = re.compile(r"^(Args|Arguments|Parameters|Keyword Args):\s*$")
_ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)(?:\s*\([^)]*\))?\s*:\s*(.*)$")


def arg_docs(doc: str) -> dict[str, str]:
    r"""Map argument name → one-line doc from a Google-style ``Args:`` section; an entry
    ``a, b: text`` documents both ``a`` and ``b``.

    >>> arg_docs("Args:\n  x: one.\n  y, z: two\n    lines.\n")
    {'x': 'one.', 'y': 'two lines.', 'z': 'two lines.'}
    """
    out: dict[str, str] = {}
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        if not _SECTION.match(lines[i].strip()):
            i += 1
            continue
        i += 1
        indent, current = None, None
        while i < len(lines):
            raw = lines[i]
            if not raw.strip():
                i += 1
                continue
            depth = len(raw) - len(raw.lstrip())
            if indent is None:
                indent = depth
            if depth < indent or (depth == 0 and raw.rstrip().endswith(":")):
                break
            match = _ENTRY.match(raw.strip())
            if depth == indent and match:
                current = [name.strip().lstrip("*") for name in match.group(1).split(",")]
                out.update(dict.fromkeys(current, match.group(2).strip()))
            elif current is not None:
                out.update(dict.fromkeys(current, (out[current[0]] + " " + raw.strip()).strip()))
            i += 1
    return out
