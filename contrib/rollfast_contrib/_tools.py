"""Pieces every contrib optimizer shares: the
decoupled-decay tail, per-leaf maps over a parameter tree, and Adam's
element-wise direction (the fallback of the matrix methods)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax



def decoupled(direction, learning_rate, weight_decay, weight_decay_mask):
    r"""``-lr·(direction + λ·θ)``.

    The state is the chain's: ``state[0]`` is ``direction``'s. Steps with non-finite
    gradients are skipped by the core's policy around every chain ``rollfast.get``
    builds (:mod:`rollfast.policy`), not here.

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
    return optax.chain(direction, optax.add_decayed_weights(weight_decay, weight_decay_mask),
                       optax.scale_by_learning_rate(learning_rate))


def map_leaves(fn: Callable, updates, *trees):
    """Apply ``fn(index, g, *leaf_states) -> (u, new_leaf_state)`` at every leaf of
    ``updates``; ``trees`` have ``updates``' structure as a prefix (a per-leaf state
    may be a subtree). Returns the tree of ``u`` and the tree of new states.

    >>> import jax.numpy as jnp
    >>> map_leaves(lambda i, g, s: (g + s, s + i), {"a": jnp.ones(1), "b": None}, {"a": 2.0, "b": None})
    ({'a': Array([3.], dtype=float32), 'b': None}, {'a': 2.0, 'b': None})
    """
    leaves, treedef = jax.tree.flatten(updates)
    rest = [treedef.flatten_up_to(t) for t in trees]
    outs = [fn(i, g, *s) for i, (g, *s) in enumerate(zip(leaves, *rest))]
    return treedef.unflatten([o[0] for o in outs]), treedef.unflatten([o[1] for o in outs])


def init_leaves(fn: Callable, params):
    """The per-leaf states ``fn(index, p)`` in ``params``' structure (``None`` stays ``None``)."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([fn(i, p) for i, p in enumerate(leaves)])


def field(states, name: str, kind: type):
    """Field ``name`` of the per-leaf NamedTuples of type ``kind`` in ``states``."""
    return jax.tree.map(lambda s: getattr(s, name), states, is_leaf=lambda x: isinstance(x, kind))


def adam_moments(grads, mu, nu, b1, b2):
    """Adam's moment EMAs in float32, ``(1-β1) g + β1 m`` and ``(1-β2) g² + β2 v``,
    over trees; returns the two new trees."""
    f32 = lambda g: g.astype(jnp.float32)
    return (jax.tree.map(lambda g, m: (1 - b1) * f32(g) + b1 * m, grads, mu),
            jax.tree.map(lambda g, v: (1 - b2) * (f32(g) * f32(g)) + b2 * v, grads, nu))


def adam_direction(m, v, count, b1, b2, eps):
    r"""Adam's bias-corrected direction :math:`\hat m/(\sqrt{\hat v}+\epsilon)` at step ``count`` (≥ 1)."""
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
