"""Which public callables of the installed Optax are complete optimizers.

The rule reads only signatures and names, so a newer Optax adds families without a
code change. A public function (or ``functools.partial``) of ``optax`` or
``optax.contrib`` is an **optimizer** when

1. it returns a ``GradientTransformation`` (by its return annotation; an
   unannotated one counts when rule 2 holds),
2. its first parameter is a learning rate (its name ends in ``learning_rate``),
3. its name does not start with ``scale_by_`` (those are building blocks), and
4. it is not listed in :data:`NOT_APPLICABLE`.

Every other public callable that returns (or wraps) a ``GradientTransformation``
is **skipped** with a reason: wrappers and combinators (their first parameter is a
transformation), building blocks, transformations without a learning rate, and the
entries of :data:`NOT_APPLICABLE`. Losses, schedules and utilities are ignored.

A ``contrib`` name that Optax also defines at top level is registered as
``contrib_<name>``.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import NamedTuple

import optax

# Optimizers by rules 1-3 that cannot run on ordinary gradients.
NOT_APPLICABLE = {
    "dpsgd": "needs per-example gradients (a leading batch axis on every gradient leaf)",
}

# Keyword arguments that an optimizer's ``update`` needs besides ``params``.
UPDATE_ARGS = {
    "polyak_sgd": ("value",),
    "momo": ("value",),
    "momo_adam": ("value",),
    "sophia": ("obj_fn",),
    "lbfgs": ("value", "grad", "value_fn"),
}


class Entry(NamedTuple):
    """One Optax optimizer: registered name, dotted source, callable, update arguments."""

    name: str
    source: str
    function: Callable
    update_args: tuple[str, ...]


def catalogue(namespaces=None) -> tuple[list[Entry], dict[str, str]]:
    """The optimizers of the given Optax namespaces, and the skipped callables with reasons.

    Args:
      namespaces: ``(dotted_name, module)`` pairs, searched in order; default
        ``optax`` then ``optax.contrib``.

    Returns:
      ``(entries, skipped)``: the optimizers as :class:`Entry` records, and a
      mapping from dotted source name to the reason it is not a family.

    >>> entries, skipped = catalogue()
    >>> {"adamw", "lion", "muon", "sophia"} <= {e.name for e in entries}
    True
    >>> skipped["optax.contrib.sam"]
    'wraps or combines other transformations (takes `optimizer`), not an optimizer by itself'
    """
    if namespaces is None:
        import optax.contrib

        namespaces = (("optax", optax), ("optax.contrib", optax.contrib))
    entries: list[Entry] = []
    skipped: dict[str, str] = {}
    taken: dict[str, object] = {}
    for prefix, module in namespaces:
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or inspect.ismodule(obj):
                continue
            verdict = classify(attr, obj)
            source = f"{prefix}.{attr}"
            if isinstance(verdict, str):
                skipped[source] = verdict
            elif verdict and taken.get(attr) is not obj:
                name = attr if attr not in taken else f"{prefix.rsplit('.', 1)[-1]}_{attr}"
                taken.setdefault(attr, obj)
                entries.append(Entry(name, source, obj, UPDATE_ARGS.get(attr, ())))
    return entries, skipped


def classify(name: str, obj: object) -> bool | str:
    """``True`` for an optimizer, a reason (str) for a skipped transformation,
    ``False`` for anything else.

    Args:
      name: the public name of ``obj``.
      obj: a public attribute of an Optax namespace.

    >>> import optax
    >>> classify("adam", optax.adam), classify("scale_by_adam", optax.scale_by_adam)
    (True, 'building block (a scaling transformation), not a complete optimizer')
    >>> classify("softmax_cross_entropy", optax.softmax_cross_entropy)
    False
    """
    if inspect.isclass(obj):
        first = _first_parameter(obj)
        if first is not None and _mentions_transformation(first.annotation):
            return f"wrapper class around another transformation (takes `{first.name}`)"
        return False
    if not (inspect.isfunction(obj) or isinstance(obj, functools.partial)):
        return False
    first = _first_parameter(obj)
    returns = inspect.signature(obj).return_annotation
    takes_lr = first is not None and first.name.endswith("learning_rate")
    if not (_mentions_transformation(returns) or (returns is inspect.Signature.empty and takes_lr)):
        return False
    if first is not None and _mentions_transformation(first.annotation):
        return (f"wraps or combines other transformations (takes `{first.name}`), "
                "not an optimizer by itself")
    if name.startswith("scale_by_"):
        return "building block (a scaling transformation), not a complete optimizer"
    if not takes_lr:
        return "transformation without a learning rate, not a complete optimizer"
    return NOT_APPLICABLE.get(name, True)


def _first_parameter(obj) -> inspect.Parameter | None:
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return None
    return params[0] if params else None


def _mentions_transformation(annotation) -> bool:
    if isinstance(annotation, str):
        return "GradientTransformation" in annotation
    if inspect.isclass(annotation) and issubclass(annotation, optax.GradientTransformation):
        return True
    return any(_mentions_transformation(a) for a in typing.get_args(annotation))
