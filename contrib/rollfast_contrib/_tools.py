"""Pieces every contrib optimizer shares: the non-finite step guard, the
decoupled-decay tail, per-leaf maps over a parameter tree, and Adam's
element-wise direction (the fallback of the matrix methods)."""

from __future__ import annotations

from collections.abc import Callable


def skip_nonfinite(inner):
    r"""Skip every step whose gradients are not all finite.

    .. math::
        (u_t, s_{t+1}) = \begin{cases} \mathrm{inner}(g_t, s_t) & g_t \text{ finite}\\
                                       (0, s_t) & \text{otherwise}\end{cases}

    Unlike ``optax.apply_if_finite`` the state keeps ``inner``'s structure.

    Args:
      inner: the transformation to guard.

    >>> import jax.numpy as jnp, optax
    >>> tx = skip_nonfinite(optax.scale_by_adam())
    >>> s = tx.init(jnp.zeros(2))
    >>> u, s2 = tx.update(jnp.array([1.0, jnp.nan]), s)
    >>> u, bool((s2.mu == s.mu).all())
    (Array([0., 0.], dtype=float32), True)
    """
    import jax
    import jax.numpy as jnp
    import optax

    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, **extra):
        new_updates, new_state = inner.update(updates, state, params, **extra)
        ok = all_finite(updates)
        return (jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates),
                jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state))

    return optax.GradientTransformationExtraArgs(inner.init, update)


def all_finite(tree):
    """``True`` (a traced boolean) when every element of every leaf is finite."""
    import jax
    import jax.numpy as jnp

    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [True]))


def decoupled(direction, learning_rate, weight_decay, weight_decay_mask):
    r"""``-lr·(direction + λ·θ)``, guarded against non-finite gradients.

    The state is the chain's: ``state[0]`` is ``direction``'s.

    Args:
      direction: transformation producing the update direction.
      learning_rate: step size, a float or an Optax schedule.
      weight_decay: decoupled weight decay λ (float or schedule).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.

    >>> import jax.numpy as jnp, optax
    >>> tx = decoupled(optax.identity(), 0.1, 0.5, None)
    >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2))[0]
    Array([-0.15, -0.15], dtype=float32)
    """
    import optax

    return skip_nonfinite(optax.chain(direction,
                                      optax.add_decayed_weights(weight_decay, weight_decay_mask),
                                      optax.scale_by_learning_rate(learning_rate)))


def map_leaves(fn: Callable, updates, *trees):
    """Apply ``fn(index, g, *leaf_states) -> (u, new_leaf_state)`` at every leaf of
    ``updates``; ``trees`` have ``updates``' structure as a prefix (a per-leaf state
    may be a subtree). Returns the tree of ``u`` and the tree of new states.

    >>> import jax.numpy as jnp
    >>> map_leaves(lambda i, g, s: (g + s, s + i), {"a": jnp.ones(1), "b": None}, {"a": 2.0, "b": None})
    ({'a': Array([3.], dtype=float32), 'b': None}, {'a': 2.0, 'b': None})
    """
    import jax

    leaves, treedef = jax.tree.flatten(updates)
    rest = [treedef.flatten_up_to(t) for t in trees]
    outs = [fn(i, g, *s) for i, (g, *s) in enumerate(zip(leaves, *rest))]
    return treedef.unflatten([o[0] for o in outs]), treedef.unflatten([o[1] for o in outs])


def init_leaves(fn: Callable, params):
    """The per-leaf states ``fn(index, p)`` in ``params``' structure (``None`` stays ``None``)."""
    import jax

    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([fn(i, p) for i, p in enumerate(leaves)])


def field(states, name: str, kind: type):
    """Field ``name`` of the per-leaf NamedTuples of type ``kind`` in ``states``."""
    import jax

    return jax.tree.map(lambda s: getattr(s, name), states, is_leaf=lambda x: isinstance(x, kind))


def adam_moments(grads, mu, nu, b1, b2):
    """Adam's moment EMAs in float32, ``(1-β1) g + β1 m`` and ``(1-β2) g² + β2 v``,
    over trees; returns the two new trees."""
    import jax
    import jax.numpy as jnp

    f32 = lambda g: g.astype(jnp.float32)
    return (jax.tree.map(lambda g, m: (1 - b1) * f32(g) + b1 * m, grads, mu),
            jax.tree.map(lambda g, v: (1 - b2) * (f32(g) * f32(g)) + b2 * v, grads, nu))


def adam_direction(m, v, count, b1, b2, eps):
    r"""Adam's bias-corrected direction :math:`\hat m/(\sqrt{\hat v}+\epsilon)` at step ``count`` (≥ 1)."""
    import jax.numpy as jnp

    m_hat = m / (1 - b1**count).astype(m.dtype)
    v_hat = v / (1 - b2**count).astype(v.dtype)
    return m_hat / (jnp.sqrt(v_hat) + eps)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The matrix view of a tensor of rank ≥ 2: all leading axes merged, the last kept
    (``(3, 3, 64, 128) -> (576, 128)``: fan-in × fan-out in JAX's layout)."""
    lead = 1
    for d in shape[:-1]:
        lead *= d
    return lead, shape[-1]
