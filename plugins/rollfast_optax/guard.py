"""Run an Optax optimizer under rollfast's leaf rules, without changing its numbers.

The guard adds no operation to the computation, so a jitted step is the Optax
step bit for bit. It does not skip non-finite gradients (that would change how
XLA fuses Optax's arithmetic); ``mask="clip"`` does, for any family.
"""

from __future__ import annotations


def leaf_guard(inner, update_args=(), name="optimizer"):
    """Wrap ``inner`` so that holes and update arguments are handled the same
    way for every Optax optimizer.

    * ``None`` leaves reach ``inner`` as Optax ``MaskedNode`` (no state, no
      update) and come back as ``None``;
    * an update argument with the tree structure of the updates (e.g. the
      ``grad`` of ``lbfgs``) gets the same holes as the updates;
    * a missing update argument that ``inner`` needs is a ``TypeError`` naming it.

    The updates and states are ``inner``'s.

    Args:
      inner: an ``optax.GradientTransformation``.
      update_args: names of the keyword arguments that ``inner.update`` needs.
      name: how error messages call the optimizer.

    >>> import jax.numpy as jnp, optax
    >>> tx = leaf_guard(optax.adam(0.1))
    >>> params = {"w": jnp.ones(2), "none": None}
    >>> state = tx.init(params)
    >>> tx.update({"w": jnp.array([1.0, -1.0]), "none": None}, state, params)[0]
    {'none': None, 'w': Array([-0.1,  0.1], dtype=float32)}
    """
    import jax
    import optax
    from optax.transforms import MaskedNode

    is_hole = lambda x: x is None or isinstance(x, MaskedNode)

    def hide(tree):
        return jax.tree.map(lambda x: MaskedNode() if x is None else x, tree, is_leaf=is_hole)

    def align(value, like):
        if jax.tree.structure(value, is_leaf=is_hole) != jax.tree.structure(like, is_leaf=is_hole):
            return value
        return jax.tree.map(lambda u, v: u if is_hole(u) else v, like, value, is_leaf=is_hole)

    def init(params):
        return inner.init(hide(params))

    def update(updates, state, params=None, **extra):
        missing = [a for a in update_args if a not in extra]
        if missing:
            raise TypeError(f"{name} needs update(..., {', '.join(f'{a}=' for a in missing)}) "
                            "at every step")
        hidden = hide(updates)
        extra = {k: align(v, hidden) for k, v in extra.items()}
        new, new_state = inner.update(hidden, state, None if params is None else hide(params),
                                      **extra)
        restore = lambda u, n: None if u is None else n
        return jax.tree.map(restore, updates, new, is_leaf=lambda x: x is None), new_state

    return optax.GradientTransformationExtraArgs(init, update)
