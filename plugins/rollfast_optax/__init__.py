"""Every optimizer of the installed Optax, by name: ``optax:<name>``.

The families are discovered by introspection (see :mod:`rollfast_optax.discovery`
for the rule), so a newer Optax adds names without a code change. Each family's
factory has the Optax function's exact signature, docstring, parameters and
defaults, and builds exactly what the Optax function builds (the core's leaf rules
hide ``None`` and integer leaves and check ``update_args``); the numbers are
Optax's, bit for bit, also under ``jax.jit``. To skip steps with
non-finite gradients, add ``mask="clip"``. Families register with ``priority=-1``: where a first-party
plugin has the same name (``adam``, ``adamw``) the plain name reaches it, and
``optax:adamw`` always reaches Optax's.

Options are checked when the optimizer is built (:func:`constraints`: the learning
rate and the decay rates ``b1``/``b2``/``b3``). Registration metadata of every family: ``source`` (the dotted Optax name),
``complex_leaves=True`` (complex parameters get Optax's own arithmetic),
``update_args`` (extra keywords that ``update`` needs, e.g. ``("value",)`` for
``polyak_sgd``) and ``first_moment`` (the ``mu`` of the first state of the chain,
when there is one). Public Optax callables that transform gradients but are not
optimizers are listed, with the reason, in the export
``rollfast.optax_catalogue_skipped``; inputs that an installed Optax optimizer cannot
take (:data:`LIMITATIONS`: sm3 on a 0-d leaf; lbfgs, galore, sophia on a tree without a
float leaf; dadapt_adamw, prodigy on a float16 leaf; galore on a float16 matrix) are refused by ``init`` with a ``ValueError`` giving the reason, and listed in
the export ``rollfast.optax_catalogue_limitations``.
"""

from __future__ import annotations

import functools
import inspect
import re

import jax
import jax.numpy as jnp

import rollfast
from rollfast.constraints import BETA, LEARNING_RATE, Nullable

# Options whose meaning is the same in every Optax optimizer that has them.
BETAS = ("b1", "b2", "b3")


@rollfast.hookimpl
def precondition(register):
    from rollfast_optax.discovery import catalogue

    entries, skipped = catalogue()
    for entry in entries:
        register.family(entry.name, wrap(entry), priority=-1,
                        references=references(entry.function), metadata={"source": entry.source},
                        update_args=entry.update_args, first_moment=first_moment,
                        constraints=constraints(entry.function), complex_leaves=True)
    register.export("optax_catalogue_skipped", Skipped(skipped))
    register.export("optax_catalogue_limitations",
                    {name: "; ".join(reason for _, reason in pairs) for name, pairs in LIMITATIONS.items()})


def _no_float_leaf(leaves) -> bool:
    return not leaves


def _scalar_leaf(leaves) -> bool:
    return any(len(x.shape) == 0 for x in leaves)


def _float16_leaf(leaves) -> bool:
    return any(x.dtype == jnp.float16 for x in leaves)


def _float16_matrix(leaves) -> bool:
    return any(x.dtype == jnp.float16 and len(x.shape) == 2 for x in leaves)


_D_ADAPTATION_IN_FLOAT16 = ("a float16 leaf: Optax keeps its distance estimate (starting at 1e-6) and the "
                            "sums behind it in the parameters' dtype, where they underflow float16 and the "
                            "first steps turn the parameters NaN; use float32 or bfloat16")


# Inputs that installed Optax optimizers cannot take: family -> (test on the float leaves
# the family receives, reason). ``init`` turns them into a clear ValueError up front.
LIMITATIONS = {
    "sm3": ((_scalar_leaf, "a 0-d (scalar) leaf: Optax's sm3 keeps one accumulator per axis, "
                           "and a scalar has none (IndexError inside Optax)"),),
    "lbfgs": ((_no_float_leaf, "a tree without a non-empty float leaf: Optax's lbfgs indexes its "
                               "leaves (IndexError inside Optax)"),),
    "galore": ((_no_float_leaf, "a tree without a non-empty float leaf: Optax's galore unflattens "
                                "per-leaf states that do not exist (ValueError inside Optax)"),
               (_float16_matrix, "a float16 matrix leaf: Optax's galore computes its projection in "
                                 "float16 and the parameters turn NaN at the first step; use float32 "
                                 "or bfloat16")),
    "sophia": ((_no_float_leaf, "a tree without a non-empty float leaf: Optax's sophia reduces "
                                "over its leaves without an initial value (TypeError inside Optax)"),),
    "dadapt_adamw": ((_float16_leaf, _D_ADAPTATION_IN_FLOAT16),),
    "prodigy": ((_float16_leaf, _D_ADAPTATION_IN_FLOAT16),),
}


def constraints(function) -> dict:
    """The constraints rollfast declares for an Optax optimizer's options: a
    ``learning_rate`` is a positive number or a schedule (or ``None`` where that is
    Optax's default, e.g. ``lbfgs``' line search), the decay rates ``b1``, ``b2``,
    ``b3`` are in [0, 1).

    Args:
      function: the Optax optimizer.

    >>> import optax
    >>> {k: str(v) for k, v in constraints(optax.lion).items()}["b1"]
    'a number in [0, 1)'
    >>> str(constraints(optax.lbfgs)["learning_rate"])
    'None or a number > 0, or a schedule (callable step → value)'
    """
    params = inspect.signature(function).parameters
    out = {name: BETA for name in BETAS if name in params}
    if "learning_rate" in params:
        nullable = params["learning_rate"].default is None
        out["learning_rate"] = Nullable(LEARNING_RATE) if nullable else LEARNING_RATE
    return out


class Skipped(dict):
    """Public Optax transformations that are not registered as families: dotted name → reason."""


def wrap(entry):
    """A factory named ``entry.name`` with the signature and docstring of
    ``entry.function``, returning its optimizer.

    Args:
      entry: a :class:`~rollfast_optax.discovery.Entry`.

    >>> import inspect, optax
    >>> from rollfast_optax.discovery import Entry
    >>> factory = wrap(Entry("nadam", "optax.nadam", optax.nadam, ()))
    >>> factory.__name__, inspect.signature(factory).parameters["nesterov"].default
    ('nadam', True)
    """
    @functools.wraps(entry.function)
    def factory(*args, **kwargs):
        tx = entry.function(*args, **kwargs)
        return _refuse_limitation(entry.name, tx) if entry.name in LIMITATIONS else tx

    factory.__name__ = factory.__qualname__ = entry.name
    factory.__module__ = __name__
    return factory


def _refuse_limitation(name: str, tx):
    """``tx`` whose ``init`` raises a ValueError naming the known Optax limitation of
    family ``name`` when the parameters hit it (see :data:`LIMITATIONS`)."""
    def init(params):
        leaves = [x for x in jax.tree.leaves(params) if hasattr(x, "shape") and x.size > 0]
        for hits, reason in LIMITATIONS[name]:
            if hits(leaves):
                raise ValueError(f"optax:{name} cannot take {reason}; known Optax limitations are "
                                 f"listed in rollfast.optax_catalogue_limitations")
        return tx.init(params)

    return tx._replace(init=init)


def first_moment(state):
    """The ``mu`` field of the first state of an Optax chain (or of a single state), else ``None``.

    Args:
      state: an Optax optimizer state.

    >>> import jax.numpy as jnp, optax
    >>> first_moment(optax.adam(0.1).init({"w": jnp.ones(2)}))
    {'w': Array([0., 0.], dtype=float32)}
    >>> first_moment(optax.sgd(0.1).init({"w": jnp.ones(2)})) is None
    True
    """
    is_chain = isinstance(state, tuple) and not hasattr(state, "_fields")
    head = state[0] if is_chain and state else state
    return getattr(head, "mu", None)


_SECTION_END = re.compile(r"^(\.\. |\S.*:$)")


def references(function) -> tuple[str, ...]:
    """The paragraphs of the ``References:`` section of ``function``'s docstring.

    Args:
      function: any documented callable.

    >>> import optax
    >>> references(optax.lion)[0].startswith("Chen et al")
    True
    """
    lines = (inspect.getdoc(function) or "").splitlines()
    if "References:" not in lines:
        return ()
    out, paragraph = [], []
    for line in lines[lines.index("References:") + 1:] + [""]:
        if _SECTION_END.match(line):
            break
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            out.append(" ".join(paragraph))
            paragraph = []
    if paragraph:
        out.append(" ".join(paragraph))
    return tuple(out)
