r"""The core's guards around every chain :func:`rollfast.get` builds.

*Leaf rules* (innermost, around the family): only non-empty floating leaves reach
the family; ``None`` leaves come back as ``None``, integer and empty leaves get zero
updates. Their state, :class:`CoreState`, also holds the count of skipped steps.

*Non-finite policy* (outermost, around every wrapper): with ``nonfinite="skip"``
(the default), a step whose gradient :math:`g_t` or floating update argument
:math:`a_t` (e.g. ``value=``) has a NaN or infinite entry changes nothing but the
skip counter:

.. math::
    (u_t, s_{t+1}) = \begin{cases} \mathrm{chain}(g_t, s_t, a_t) & g_t, a_t \text{ finite}\\
                                   (0,\ s_t \text{ with } k \leftarrow k + 1) & \text{otherwise}\end{cases}

so neither the family nor a wrapper (masking, averaging) ever sees the step.
:func:`skipped_steps` reads :math:`k`. ``nonfinite="propagate"`` leaves the
arithmetic to the parts (a non-finite gradient then reaches them).

*Sharding of the state*: a state leaf shaped like a parameter, at a path that
contains that parameter's path (``mu['w']`` for ``params['w']``), is laid out like
the parameter: under ``jax.jit(opt.init)`` through ``shard_alike``, eagerly by
``device_put`` onto the parameter's sharding when that spans several devices.

*Layout check*: ``update`` on a tree that differs from the one given to ``init``
(other keys, another shape) raises a ``ValueError`` naming the first differing path
instead of failing deep inside a family or broadcasting silently.
"""

from __future__ import annotations

import warnings
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike

from rollfast.toolbox import all_finite_fast, apply_unless_skipped, run_unless_skipped

NONFINITE = ("skip", "propagate")

__all__ = ["NONFINITE", "CoreState", "apply_step", "follow_sharding", "guard", "leaf_rules", "skipped_steps"]


# ``update`` of every guarded chain -> its update-and-apply (see :func:`apply_step`).
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CoreState(NamedTuple):
    """The family's state (``None`` leaves as ``optax.MaskedNode``) and the number of
    steps the non-finite policy skipped."""

    inner_state: object
    skipped: jax.Array


def _is_float(x) -> bool:
    return x is not None and jnp.issubdtype(jnp.result_type(x), jnp.inexact) and jnp.size(x) > 0


def _float_mask(tree):
    return jax.tree.map(_is_float, tree, is_leaf=lambda x: x is None)


def leaf_rules(inner: optax.GradientTransformation, needs: tuple[str, ...] = (),
               owner: str = "the family", complex_leaves: bool = False
               ) -> optax.GradientTransformationExtraArgs:
    """``inner`` on the non-empty floating leaves only, with state :class:`CoreState`.

    Args:
      inner: the family's transformation.
      needs: names of update arguments ``inner`` needs at every step.
      owner: how error messages name the family.
      complex_leaves: whether the family handles complex leaves (registered as
        ``complex_leaves=True``); if not, ``init`` rejects them, naming the leaf.

    Returns:
      An ``optax.GradientTransformationExtraArgs``: ``None`` leaves map to ``None``,
      integer and empty leaves to zeros; update arguments shaped like the updates get
      the same holes.

    >>> import jax.numpy as jnp
    >>> tx = leaf_rules(optax.sgd(1.0))
    >>> u, s = tx.update({"w": jnp.ones(2), "i": jnp.arange(2), "n": None},
    ...                  tx.init({"w": jnp.ones(2), "i": jnp.arange(2), "n": None}))
    >>> u["w"].tolist(), u["i"].tolist(), u["n"], int(s.skipped)
    ([-1.0, -1.0], [0, 0], None, 0)
    """
    masked = optax.masked(inner, _float_mask, mask_compatible_extra_args=True)

    def init(params):
        _check_leaf_dtypes(params, owner, complex_leaves)
        return CoreState(masked.init(params).inner_state, jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, **extra):
        missing = [a for a in needs if a not in extra]
        if missing:
            raise TypeError(f"{owner} needs update(..., {', '.join(f'{a}=' for a in missing)}) "
                            f"at every step")
        updates, inner_state = masked.update(updates, optax.MaskedState(state.inner_state), params,
                                             **extra)
        zero_ints = lambda u: u if u is None or _is_float(u) else jnp.zeros_like(u)
        updates = jax.tree.map(zero_ints, updates, is_leaf=lambda x: x is None)
        return updates, CoreState(inner_state.inner_state, state.skipped)

    return optax.GradientTransformationExtraArgs(init, update)


def _check_leaf_dtypes(params, owner: str, complex_leaves: bool) -> None:
    """Reject complex leaves a family does not handle; warn where a float64 leaf will be
    computed in float32 because ``jax_enable_x64`` is off."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            continue
        where = jax.tree_util.keystr(path) or "<root>"
        if jnp.issubdtype(dtype, jnp.complexfloating) and not complex_leaves:
            raise TypeError(f"{owner} does not take complex parameters: leaf {where} is "
                            f"{np.dtype(dtype).name} (families that do: adam, adamw and the Optax "
                            f"catalogue; see the dtype table in docs/guide.md)")
        if np.dtype(dtype) == np.float64 and not jax.config.jax_enable_x64:
            warnings.warn(f"leaf {where} is float64 but jax_enable_x64 is off: the optimizer "
                          f"computes and returns float32 for it", RuntimeWarning, stacklevel=4)


def guard(inner: optax.GradientTransformationExtraArgs, nonfinite: str = "skip",
          axis_name=None) -> optax.GradientTransformationExtraArgs:
    """The non-finite policy and the layout check around a whole chain (see the module
    docstring). ``inner``'s state must hold a :class:`CoreState`, reached through
    ``inner_state`` fields.

    Args:
      inner: the chain, leaf rules innermost.
      nonfinite: ``"skip"`` or ``"propagate"``.
      axis_name: mapped axis over which the devices agree to skip (any device's
        non-finite gradient skips the step on all of them).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state.

    >>> import jax.numpy as jnp
    >>> tx = guard(leaf_rules(optax.adam(0.1)))
    >>> s = tx.init({"w": jnp.ones(2)})
    >>> u, s2 = tx.update({"w": jnp.array([1.0, jnp.nan])}, s)
    >>> u["w"].tolist(), int(skipped_steps(s2)), bool((s2.inner_state[0].mu["w"] == 0).all())
    ([0.0, 0.0], 1, True)
    """
    layouts: list[_Layout] = []

    def init(params):
        layout = _Layout.of(params)
        if layout not in layouts:
            layouts.append(layout)
        state = inner.init(params)
        return follow_sharding(state, params) if jax.device_count() > 1 else state

    def finite(updates, extra):
        ok = all_finite_fast([updates, _numeric(extra)])
        if axis_name is not None:
            ok = jax.lax.pmin(ok.astype(jnp.int32), axis_name).astype(bool)
        return ok

    def update(updates, state, params=None, **extra):
        _check_layout(layouts, updates, params)
        step = lambda g, s: inner.update(g, s, params, **extra)
        if nonfinite == "propagate":
            return step(updates, state)
        ok = finite(updates, extra)
        if isinstance(ok, jax.core.Tracer):
            updates, new = run_unless_skipped(ok, step, updates, state)
        else:  # eager: run the step op by op, exactly as the parts alone would
            updates, new = step(updates, state) if bool(ok) else run_unless_skipped(ok, step, updates, state)
        return updates, _bump(new, (~ok).astype(jnp.int32))

    def update_and_apply(grads, state, params, **extra):
        _check_layout(layouts, grads, params)
        if nonfinite == "propagate" or not _traced([grads, params]):  # eager: op by op, as update
            updates, state = update(grads, state, params, **extra)
            return optax.apply_updates(params, updates), state
        ok = finite(grads, extra)
        step = lambda g, s, p: _applied(inner.update(g, s, p, **extra), p)
        params, new = apply_unless_skipped(ok, step, grads, state, params)
        return params, _bump(new, (~ok).astype(jnp.int32))

    guarded = optax.GradientTransformationExtraArgs(init, update)
    _STEPS[update] = update_and_apply
    return guarded


def apply_step(optimizer: optax.GradientTransformation, grads, state, params, **extra):
    r"""One optimizer step, applied: ``optimizer.update`` then ``optax.apply_updates``.

    .. math::
        (\theta_{t+1}, s_{t+1}) = (\theta_t + u_t, s_{t+1}) \quad\text{with}\quad
        (u_t, s_{t+1}) = \mathrm{update}(g_t, s_t, \theta_t)

    For an optimizer built by :func:`rollfast.get` with ``nonfinite="skip"``, the
    non-finite policy's ``lax.cond`` then holds the update *and* its application, so
    under ``jax.jit`` XLA fuses them into one pass as it does for a plain Optax step
    (``update`` alone must hand the updates out of the ``lax.cond``, an extra write
    and read of every parameter). A skipped step returns ``params`` and the state
    unchanged except the skip counter. Any other optimizer gets
    ``update`` + ``apply_updates``.

    Args:
      optimizer: any Optax transformation.
      grads: the gradient, a tree like ``params``.
      state: the optimizer state.
      params: the parameters.
      **extra: update arguments (``value=`` …).

    Returns:
      ``(new_params, new_state)``.

    >>> import jax, jax.numpy as jnp, optax, rollfast
    >>> opt = rollfast.get("adamw", learning_rate=0.1)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> state = opt.init(params)
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> step = jax.jit(lambda p, s: rollfast.apply_step(opt, jax.grad(loss)(p), s, p))
    >>> for _ in range(3):
    ...     params, state = step(params, state)
    ...     print(round(float(loss(params)), 3))
    4.42
    3.881
    3.384
    """
    update_and_apply = _STEPS.get(optimizer.update)
    if update_and_apply is not None:
        return update_and_apply(grads, state, params, **extra)
    updates, state = optimizer.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state


def _applied(step_out, params):
    updates, state = step_out
    return optax.apply_updates(params, updates), state


def _traced(tree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def follow_sharding(state, params):
    """``state`` with every leaf shaped like a parameter, at a path containing that
    parameter's path, laid out like the parameter (see the module docstring).

    Args:
      state: an optimizer state.
      params: the parameters it was built for.

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.ones(2)}
    >>> follow_sharding({"mu": {"w": jnp.zeros(2)}}, p)["mu"]["w"].sharding == p["w"].sharding
    True
    """
    by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if np.ndim(leaf) > 0}

    def follow(path, leaf):
        param = _owner(tuple(path), np.shape(leaf), by_path) if np.ndim(leaf) > 0 else None
        if param is None:
            return leaf
        if isinstance(param, jax.core.Tracer) or isinstance(leaf, jax.core.Tracer):
            return shard_alike(leaf, param)[0]
        sharding = getattr(param, "sharding", None)
        if sharding is None or len(sharding.device_set) < 2:  # keep single-device state uncommitted
            return leaf
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map_with_path(follow, state)


def _owner(path: tuple, shape: tuple, by_path: dict):
    """The parameter of shape ``shape`` whose path is the longest contiguous part of ``path``."""
    for length in range(len(path), 0, -1):
        for start in range(len(path) - length + 1):
            param = by_path.get(path[start:start + length])
            if param is not None and np.shape(param) == shape:
                return param
    return None


def skipped_steps(state) -> jax.Array:
    """How many steps the non-finite policy skipped, from any state of a chain built by
    :func:`rollfast.get` (an int32 scalar; ``int()`` it for logging).

    Args:
      state: the optimizer state (outermost, as ``opt.init`` / ``opt.update`` return it).

    >>> import jax.numpy as jnp, rollfast
    >>> opt = rollfast.get("adamw", learning_rate=0.1)
    >>> p = {"w": jnp.ones(2)}
    >>> _, state = opt.update({"w": jnp.array([jnp.inf, 1.0])}, opt.init(p), p)
    >>> int(rollfast.skipped_steps(state))
    1
    """
    return _core(state).skipped


def _core(state) -> CoreState:
    seen = state
    while not isinstance(seen, CoreState):
        if not hasattr(seen, "inner_state"):
            raise TypeError(f"not a state of an optimizer built by rollfast.get: no CoreState "
                            f"inside {type(state).__name__} (wrappers keep the wrapped state in a "
                            f"field `inner_state`)")
        seen = seen.inner_state
    return seen


def _bump(state, by):
    """``state`` with the :class:`CoreState` counter inside it increased by ``by``."""
    if isinstance(state, CoreState):
        return state._replace(skipped=state.skipped + by)
    if not hasattr(state, "_replace"):
        raise TypeError(f"a wrapper's state must be a NamedTuple with a field `inner_state`; "
                        f"got {type(state).__name__}")
    return state._replace(inner_state=_bump(state.inner_state, by))


def _numeric(extra: dict) -> list:
    """The array and number leaves of the update arguments (not callables such as ``value_fn``)."""
    kinds = (jax.Array, np.ndarray, np.generic, float, complex)
    return [jnp.asarray(x) for x in jax.tree.leaves(extra) if isinstance(x, kinds)]


class _Layout(NamedTuple):
    """Paths and shapes of a parameter tree (``None`` positions included)."""

    treedef: object
    paths: tuple
    shapes: tuple

    @classmethod
    def of(cls, tree) -> _Layout:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
        return cls(treedef, tuple(jax.tree_util.keystr(p) for p, _ in leaves),
                   tuple(_shape(x) for _, x in leaves))


def _shape(x):
    return None if x is None else tuple(np.shape(x))


def _check_layout(layouts: list[_Layout], updates, params) -> None:
    """Raise when ``updates`` matches none of the trees given to ``init`` (or, when
    ``init`` was not called on this object, ``params``)."""
    references = layouts or ([_Layout.of(params)] if params is not None else [])
    if not references:
        return
    seen = _Layout.of(updates)
    if any(seen.treedef == r.treedef and seen.shapes == r.shapes for r in references):
        return
    reference = references[-1]
    got, want = dict(zip(seen.paths, seen.shapes)), dict(zip(reference.paths, reference.shapes))
    order = list(reference.paths) + [p for p in seen.paths if p not in want]
    path = next((p for p in order if got.get(p, "missing") != want.get(p, "missing")),
                order[0] if order else "")
    show = lambda s: "no leaf" if s == "missing" else "None" if s is None else f"shape {s}"
    raise ValueError(
        f"update: the gradient tree differs from the one given to init; first difference at "
        f"{path or '<root>'}: init had {show(want.get(path, 'missing'))}, update has "
        f"{show(got.get(path, 'missing'))} (init: {reference.treedef}; update: {seen.treedef})")
