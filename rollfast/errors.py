"""Errors and warnings raised by the core, with did-you-mean suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RollfastPluginWarning(UserWarning):
    """A plugin failed to load or register; everything else keeps working."""


class UnknownNameError(LookupError):
    """A family, mode or part name that no installed plugin registers.

    >>> e = UnknownNameError("family", "adamx", ["adam", "adamw", "sgd"])
    >>> e.suggestions
    ('adam', 'adamw')
    >>> print(e)
    unknown family 'adamx'; did you mean 'adam' or 'adamw'? (`rollfast list --kind family` lists them all)
    """

    def __init__(self, kind: str, name: str, valid: Iterable[str], *, hint: str | None = None,
                 note: str | None = None):
        self.kind, self.name, self.note = kind, name, note
        self.suggestions = tuple(closest(name, valid))
        hint = hint or f"`rollfast list --kind {kind}` lists them all"
        message = f"unknown {kind} {name!r}"
        if self.suggestions:
            message += f"; did you mean {_or(self.suggestions)}?"
        if note:
            message += f"; {note}"
        super().__init__(f"{message} ({hint})")

    def __str__(self) -> str:
        return self.args[0]


class CheckFailed(AssertionError):
    """A conformance check failed: which check, on which contribution, where, by how much.

    >>> print(CheckFailed("mode kron 'X'", "reference", "factor 0 (dense 5×5)", "relative error 1e-03 > 1e-05"))
    mode kron 'X': check 'reference' failed at factor 0 (dense 5×5): relative error 1e-03 > 1e-05
    """

    def __init__(self, subject: str, check: str, where: str, detail: str):
        self.subject, self.check, self.where, self.detail = subject, check, where, detail
        super().__init__(f"{subject}: check {check!r} failed at {where}: {detail}")


def closest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to ``name``, best first (case-insensitive).

    >>> closest("leraning_rate", ["learning_rate", "b1", "eps"])
    ['learning_rate']
    """
    by_lower = {}
    for v in valid:
        by_lower.setdefault(v.lower(), v)
    hits = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)
    return [by_lower[h] for h in hits]


def _or(names: tuple[str, ...]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
