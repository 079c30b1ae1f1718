"""What values an option allows, declared once on the parameter that takes it.

A factory declares a constraint in its signature with ``typing.Annotated``::

    def adamw(learning_rate: LearningRate, b1: Beta = 0.9, ...): ...

or, where the signature cannot be edited (a wrapped third-party function), at
registration: ``register.family(name, factory, constraints={"b1": BETA})``.
:func:`rollfast.get` checks every option the user gives against its constraint
before building anything; a violation raises :class:`OptionError` (a
``ValueError``) or :class:`OptionTypeError` (a ``TypeError``) naming the option,
the part that declares it, the value and what is allowed. ``rollfast info NAME``
shows the constraints.

This module imports neither jax nor numpy: values are inspected through
``__float__``, ``__index__`` and ``dtype`` attributes only.

>>> str(Interval(0, 1, hi_open=True))
'a number in [0, 1)'
>>> check(BETA, 1.5, option="b1", part="family 'adamw' (rollfast_adam)")
Traceback (most recent call last):
rollfast.constraints.OptionError: b1=1.5 is not allowed by family 'adamw' (rollfast_adam): allowed is a number in [0, 1)
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from typing import Annotated

__all__ = [
    "AllOf", "AnyOf", "BETA", "Beta", "Bool", "Choice", "Constraint", "DTYPE", "Dtype", "FLAG", "Flag",
    "FloatDtype", "Interval",
    "KEY", "Key", "LEARNING_RATE", "LearningRate", "NONNEGATIVE", "NonNegative", "Nullable",
    "OptionError", "OptionTypeError", "POSITIVE", "POSITIVE_INT", "PROBABILITY", "Positive",
    "PositiveInt", "Probability", "Schedule", "Seed", "WeightDecay", "check", "from_annotation",
]


class OptionError(ValueError):
    """An option's value is of the right kind but outside what its parameter allows."""


class OptionTypeError(TypeError):
    """An option's value is of a kind its parameter does not take."""


class Constraint:
    """What one parameter allows. ``problem(value)`` is ``None`` when ``value`` is
    allowed, else the exception class to raise (``OptionError`` for a value out of
    range, ``OptionTypeError`` for a wrong kind); ``str()`` says what is allowed."""

    def problem(self, value) -> type[Exception] | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self}>"


def _number(value) -> float | None:
    """``value`` as a Python float if it is a real scalar (``None`` otherwise, or when it
    is traced and has no concrete value)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        return None
    if getattr(value, "shape", ()) != ():
        return None
    kind = getattr(getattr(value, "dtype", None), "kind", "f")
    if kind not in "iuf":
        return None
    if _is_traced(value):  # no concrete value to check at build time
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _is_traced(value) -> bool:
    return type(value).__name__.endswith("Tracer")


class Interval(Constraint):
    """A finite real number between ``lo`` and ``hi`` (``integer=True``: an integer).

    >>> Interval(0, None, lo_open=True).problem(-1).__name__, Interval(0, 1).problem("0.1").__name__
    ('OptionError', 'OptionTypeError')
    >>> print(Interval(1, None, integer=True))
    an integer ≥ 1
    """

    def __init__(self, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False,
                 integer: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open, self.integer = lo, hi, lo_open, hi_open, integer

    def problem(self, value):
        x = _number(value)
        if x is None or (self.integer and not hasattr(value, "__index__")):
            return OptionTypeError
        if math.isnan(x) and _is_traced(value):
            return None
        if not math.isfinite(x):
            return OptionError
        below = self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo)
        above = self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi)
        return OptionError if below or above else None

    def __str__(self) -> str:
        what = "an integer" if self.integer else "a number"
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{what} {'>' if self.lo_open else '≥'} {lo}"
        if hi is not None:
            return f"{what} {'<' if self.hi_open else '≤'} {hi}"
        return f"a finite {what[2:] if what.startswith('a ') else what[3:]}"


class Schedule(Constraint):
    """``inner``, or an Optax schedule (a callable of the step count).

    >>> print(Schedule(Interval(0, None, lo_open=True)))
    a number > 0, or a schedule (callable step → value)
    """

    def __init__(self, inner: Constraint):
        self.inner = inner

    def problem(self, value):
        return None if callable(value) else self.inner.problem(value)

    def __str__(self) -> str:
        return f"{self.inner}, or a schedule (callable step → value)"


class Nullable(Constraint):
    """``None`` or ``inner``."""

    def __init__(self, inner: Constraint):
        self.inner = inner

    def problem(self, value):
        return None if value is None else self.inner.problem(value)

    def __str__(self) -> str:
        return f"None or {self.inner}"


class AnyOf(Constraint):
    """Any of several constraints (the first one's problem is reported)."""

    def __init__(self, *options: Constraint):
        self.options = options

    def problem(self, value):
        problems = [c.problem(value) for c in self.options]
        if any(p is None for p in problems):
            return None
        return OptionError if OptionError in problems else problems[0]

    def __str__(self) -> str:
        return " or ".join(map(str, self.options))


class Choice(Constraint):
    """One of the listed strings (case-insensitive; an enum's ``.value`` counts).

    >>> c = Choice("per_tensor_rms", "global_rms")
    >>> c.problem("GLOBAL_RMS"), c.problem("global").__name__, str(c)
    (None, 'OptionError', "one of 'per_tensor_rms', 'global_rms' (any case)")
    """

    def __init__(self, *choices: str):
        self.choices = choices

    def problem(self, value):
        value = getattr(value, "value", value)
        if not isinstance(value, str):
            return OptionTypeError
        return None if value.lower() in (c.lower() for c in self.choices) else OptionError

    def __str__(self) -> str:
        return f"one of {', '.join(map(repr, self.choices))} (any case)"


class Flag(Constraint):
    """``True`` or ``False``."""

    def problem(self, value):
        return None if isinstance(value, bool) or type(value).__name__ == "bool_" else OptionTypeError

    def __str__(self) -> str:
        return "True or False"


class Dtype(Constraint):
    """A floating-point dtype (``jnp.bfloat16``, ``"float32"``, ...).

    >>> Dtype().problem("bfloat16"), Dtype().problem("int8").__name__, Dtype().problem(3).__name__
    (None, 'OptionError', 'OptionTypeError')
    """

    def problem(self, value):
        import numpy as np  # a dependency of jax; only needed once a dtype option is given

        try:
            dtype = np.dtype(value)
        except TypeError:
            return OptionTypeError
        return None if dtype.kind == "f" or dtype.name == "bfloat16" else OptionError

    def __str__(self) -> str:
        return "a floating-point dtype (e.g. jnp.bfloat16, 'float32')"


class Key(Constraint):
    """A PRNG seed (a non-negative int) or key (``jax.random.key`` or ``PRNGKey``).

    >>> Key().problem(7), Key().problem(-1).__name__, Key().problem("7").__name__
    (None, 'OptionError', 'OptionTypeError')
    """

    def problem(self, value):
        if hasattr(value, "dtype") and getattr(value, "shape", None) is not None:
            dtype = str(value.dtype)
            if dtype.startswith("key<") or (dtype == "uint32" and tuple(value.shape)[-1:] == (2,)):
                return None
            return OptionTypeError
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            return OptionTypeError
        return None if value.__index__() >= 0 else OptionError

    def __str__(self) -> str:
        return "an int seed ≥ 0 or a PRNG key (jax.random.key(...) or jax.random.PRNGKey(...))"


DTYPE = Dtype()
POSITIVE = Interval(0, None, lo_open=True)
NONNEGATIVE = Interval(0, None)
PROBABILITY = Interval(0, 1)
BETA = Interval(0, 1, hi_open=True)
POSITIVE_INT = Interval(1, None, integer=True)
LEARNING_RATE = Schedule(POSITIVE)
FLAG = Flag()
KEY = Key()

Positive = Annotated[float, POSITIVE]
NonNegative = Annotated[float, NONNEGATIVE]
Probability = Annotated[float, PROBABILITY]
Beta = Annotated[float, BETA]
PositiveInt = Annotated[int, POSITIVE_INT]
LearningRate = Annotated[float | Callable, LEARNING_RATE]
Bool = Annotated[bool, FLAG]
Seed = Annotated[object, KEY]
FloatDtype = Annotated[object, Nullable(DTYPE)]
WeightDecay = Annotated[float | Callable, Schedule(NONNEGATIVE)]


def from_annotation(annotation) -> Constraint | None:
    """The constraint an ``Annotated[..., Constraint]`` annotation carries (several are
    combined: all must hold), else ``None``.

    >>> print(from_annotation(Beta)), from_annotation(float)
    a number in [0, 1)
    (None, None)
    """
    if typing.get_origin(annotation) is not Annotated:
        return None
    found = [m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, Constraint)]
    if not found:
        return None
    return found[0] if len(found) == 1 else AllOf(*found)


class AllOf(Constraint):
    """Every one of several constraints."""

    def __init__(self, *parts: Constraint):
        self.parts = parts

    def problem(self, value):
        return next((p for p in (c.problem(value) for c in self.parts) if p is not None), None)

    def __str__(self) -> str:
        return " and ".join(map(str, self.parts))


def check(constraint: Constraint | None, value, *, option: str, part: str) -> None:
    """Raise when ``value`` breaks ``constraint``, naming ``option``, ``part`` (who
    declares it), the value and what is allowed.

    >>> check(LEARNING_RATE, None, option="learning_rate", part="family 'kron' (rollfast_psgd)")
    Traceback (most recent call last):
    rollfast.constraints.OptionTypeError: learning_rate=None is not allowed by family 'kron' (rollfast_psgd): allowed is a number > 0, or a schedule (callable step → value)
    """
    if constraint is None:
        return
    error = constraint.problem(value)
    if error is not None:
        raise error(f"{option}={_show(value)} is not allowed by {part}: allowed is {constraint}")


def _show(value) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = type(value).__name__
    return text if kind in ("int", "float", "str", "NoneType", "bool") else f"{text} ({kind})"
