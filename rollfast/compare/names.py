r"""The name grammar of ``rollfast compare``: one string names one optimizer.

::

    spec    := AVERAGE "(" spec ")" | core
    core    := family [":" MODE] ("+" WRAPPER)*
    family  := FAMILY | PLUGIN ":" FAMILY

* ``FAMILY`` and ``MODE`` are registry names or aliases (case-insensitive), e.g.
  ``kron``, ``kron:EXP``, ``prism:bidirectional``.
* A plugin-qualified name reaches a contribution that lost a name clash or that you
  want to pin to one plugin: ``optax:lion`` (the family ``lion`` of the plugin
  ``optax``), ``kron:kron_cayley:CAYLEY`` (the mode ``CAYLEY`` of the plugin
  ``kron_cayley``; ``kron_cayley:CAYLEY`` alone also works, the family being implied),
  ``psgd:kron:EXP``.
* ``+WRAPPER`` adds a mask (``+magma``) or an average (``+schedule_free``), in any
  number; ``AVERAGE(spec)`` is the same as ``spec+AVERAGE``:
  ``schedule_free(adamw)`` equals ``adamw+schedule_free``.

``A:B`` is read as family ``A`` with mode ``B`` when ``A`` is a family, otherwise as
the plugin-qualified family ``A:B``, otherwise as the mode ``B`` of plugin ``A``. Every name is resolved through the registry, so
third-party families, modes, masks and averages work with no code; an unknown name
raises the registry's :class:`~rollfast.UnknownNameError` with the closest valid names.

>>> spec = parse("schedule_free(kron:EXP+magma)")
>>> spec.family, spec.mode, spec.masks, spec.averages
('kron', 'EXP', ('magma',), ('schedule_free',))
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

import rollfast
from rollfast.errors import UnknownNameError

_CALL = re.compile(r"^\s*([^()\s]+)\s*\((.*)\)\s*$")


@attrs.frozen
class Spec:
    """One parsed optimizer name: the family (maybe plugin-qualified), its mode, masks
    and averages, and the text the user wrote (``label``)."""

    label: str
    family: str
    mode: str | None = None
    masks: tuple[str, ...] = ()
    averages: tuple[str, ...] = ()

    def options(self) -> dict:
        """Keyword arguments of :func:`rollfast.get` beyond the family and learning rate."""
        out: dict = {}
        if self.mode is not None:
            out["mode"] = self.mode
        if self.masks:
            out["mask"] = list(self.masks)
        if self.averages:
            out["average"] = self.averages[0]
        return out

    @property
    def family_name(self) -> str:
        """The family's registry name (``Kron`` and ``psgd:kron`` are ``kron``)."""
        return rollfast.registry().lookup("family", self.family).name

    def build(self, learning_rate):
        """The optimizer this name denotes, as one Optax transformation."""
        return rollfast.get(self.family, learning_rate=learning_rate, **self.options())


def parse(text: str) -> Spec:
    """Parse and resolve one optimizer name (see the module docstring).

    Raises:
      rollfast.UnknownNameError: a family, mode, mask or average that no installed
        plugin registers (with the closest valid names).
      ValueError: a malformed name (empty part, unbalanced parentheses) or more
        than one average.
    """
    averages: list[str] = []
    core = text.strip()
    while (m := _CALL.match(core)) is not None:
        averages.insert(0, m.group(1))
        core = m.group(2).strip()
    if not core or "(" in core or ")" in core:
        raise ValueError(f"malformed optimizer name {text!r}: expected FAMILY[:MODE][+WRAPPER...] "
                         f"or AVERAGE(...), e.g. 'kron:EXP+magma' or 'schedule_free(adamw)'")
    head, *wrappers = [part.strip() for part in core.split("+")]
    if not head or not all(wrappers):
        raise ValueError(f"malformed optimizer name {text!r}: empty part around '+'")
    family, mode = _family_and_mode(head)
    masks = []
    for w in wrappers:
        kind = _wrapper_kind(w)
        (masks if kind == "mask" else averages).append(w)
    for a in averages:
        rollfast.registry().lookup("average", a)
    if len(averages) > 1:
        raise ValueError(f"optimizer {text!r}: at most one average, got {', '.join(averages)}")
    return Spec(text.strip(), family, mode, tuple(masks), tuple(averages))


def parse_all(texts: Sequence[str]) -> list[Spec]:
    """Parse every name up front, so that a typo fails before anything runs; repeated
    labels are an error."""
    specs = [parse(t) for t in texts]
    seen = set()
    for s in specs:
        if s.label in seen:
            raise ValueError(f"optimizer {s.label!r} is named twice")
        seen.add(s.label)
    return specs


def _family_and_mode(head: str) -> tuple[str, str | None]:
    """Split ``family[:mode]`` where the family may be plugin-qualified: try the shortest
    family prefix first. If nothing resolves, the error says the most: a mode error
    (the family exists), else the longest family name's (``optax:lino`` → did you
    mean ``optax:lion``)."""
    reg = rollfast.registry()
    parts = head.split(":")
    errors: list[UnknownNameError] = []
    for cut in (1, 2):
        if cut > len(parts):
            break
        family, mode = ":".join(parts[:cut]), ":".join(parts[cut:]) or None
        try:
            record = reg.lookup("family", family)
        except UnknownNameError as exc:
            errors.append(exc)
            continue
        if mode is None:
            return family, None
        try:
            reg.lookup("mode", mode, record.name)
            return family, mode
        except UnknownNameError as exc:
            errors.insert(0, exc)  # the family exists: its mode error says the most
    qualified_modes = [m for m in reg.records("mode") if m.qualified_name.lower() == head.lower()]
    if len(qualified_modes) == 1:  # PLUGIN:MODE alone: the mode's family is implied
        return qualified_modes[0].family, head
    mode_errors = [e for e in errors if e.kind == "mode"]
    family_errors = [e for e in reversed(errors) if e.kind == "family" and e.suggestions]
    raise (mode_errors or family_errors or errors)[0]


def _wrapper_kind(name: str) -> str:
    """``mask`` or ``average``: what ``+name`` adds (masks are looked up first)."""
    reg = rollfast.registry()
    try:
        reg.lookup("mask", name)
        return "mask"
    except UnknownNameError as mask_error:
        try:
            reg.lookup("average", name)
            return "average"
        except UnknownNameError:
            valid = [n for k in ("mask", "average") for r in reg.records(k) for n in (r.name, *r.aliases)]
            raise UnknownNameError("wrapper", name, valid,
                                   hint="`rollfast list --kind mask` and `--kind average` list them") \
                from mask_error


__all__ = ["Spec", "parse", "parse_all"]
