"""Run an Optax optimizer under rollfast's leaf rules, without changing its numbers."""

from __future__ import annotations


def leaf_guard(inner):
    r"""Wrap ``inner`` so that holes, tree-valued update arguments and non-finite
    gradients are handled the same way for every Optax optimizer.

    * ``None`` leaves reach ``inner`` as Optax ``MaskedNode`` (no state, no
      update) and come back as ``None``;
    * an update argument with the tree structure of the updates (e.g. the
      ``grad`` of ``lbfgs``) gets the same holes as the updates;
    * a step whose gradient has a non-finite entry is skipped: the update is
      zero and the state is kept, :math:`(u_t, s_t) = (0, s_{t-1})`.

    With finite gradients and no holes the updates and states are ``inner``'s.

    Args:
      inner: an ``optax.GradientTransformation``.

    >>> import jax.numpy as jnp, optax
    >>> tx = leaf_guard(optax.adam(0.1))
    >>> params = {"w": jnp.ones(2), "none": None}
    >>> state = tx.init(params)
    >>> tx.update({"w": jnp.array([1.0, -1.0]), "none": None}, state, params)[0]
    {'none': None, 'w': Array([-0.1,  0.1], dtype=float32)}
    >>> tx.update({"w": jnp.array([jnp.nan, 1.0]), "none": None}, state, params)[0]["w"]
    Array([0., 0.], dtype=float32)
    """
    import jax
    import jax.numpy as jnp
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
        hidden = hide(updates)
        extra = {k: align(v, hidden) for k, v in extra.items()}
        new, new_state = inner.update(hidden, state, None if params is None else hide(params),
                                      **extra)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(hidden)]))
        new = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new)
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        restore = lambda u, n: None if u is None else n
        return jax.tree.map(restore, updates, new, is_leaf=lambda x: x is None), new_state

    return optax.GradientTransformationExtraArgs(init, update)
