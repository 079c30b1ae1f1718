"""Standard problems any plugin's tests can reuse: trees of awkward leaves, losses
with known minima, and a jitted training loop.

>>> import rollfast.testing as rt
>>> sorted(rt.mixed_tree())
['bias', 'conv', 'count', 'matrix', 'nothing', 'scalar']
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def mixed_tree(dtype=None, seed: int = 0) -> dict:
    """A parameter tree with a scalar, a vector, a matrix, a 4-D kernel, ``None`` and an int leaf."""
    dtype = dtype or jnp.float32
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {
        "scalar": jnp.asarray(0.5, dtype),
        "bias": jax.random.normal(k[0], (7,), dtype),
        "matrix": jax.random.normal(k[1], (6, 5), dtype) / 3,
        "conv": jax.random.normal(k[2], (3, 3, 2, 4), dtype) / 3,
        "nothing": None,
        "count": jnp.arange(3, dtype=jnp.int32),
    }


def kit_tree(seed: int = 0) -> dict:
    """:func:`mixed_tree` with an ``(8, 5)`` matrix (it shards over 8 devices), plus a
    bfloat16 3-D leaf and an empty leaf: every leaf kind the conformance checks run on.

    >>> t = kit_tree()
    >>> sorted((k, None if v is None else (v.shape, str(v.dtype))) for k, v in t.items())[:3]
    [('bias', ((7,), 'float32')), ('conv', ((3, 3, 2, 4), 'float32')), ('count', ((3,), 'int32'))]
    """
    k = jax.random.split(jax.random.PRNGKey(seed + 100), 2)
    return {**mixed_tree(seed=seed),
            "matrix": jax.random.normal(k[0], (8, 5), jnp.float32) / 3,
            "half": (jax.random.normal(k[1], (2, 3, 4)) / 3).astype(jnp.bfloat16),
            "empty": jnp.zeros((0, 3), jnp.float32)}


def mode_tree(seed: int = 0) -> dict:
    """The leaves whose matrix factors a mode moves: the ``(8, 5)`` matrix, a vector and
    the bfloat16 3-D leaf of :func:`kit_tree`.

    >>> sorted(mode_tree())
    ['bias', 'half', 'matrix']
    """
    tree = kit_tree(seed)
    return {k: tree[k] for k in ("matrix", "bias", "half")}


def quadratic_loss(target: dict) -> Callable:
    """``0.5·Σ (p − target)²`` over the float leaves of ``target`` (convex, minimum 0)."""
    def loss(params):
        diffs = jax.tree.leaves(jax.tree.map(
            lambda p, t: jnp.sum(jnp.square(p.astype(jnp.float32) - t.astype(jnp.float32)))
            if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32(0.0), params, target))
        return 0.5 * sum(diffs)

    return loss


def ill_conditioned_quadratic(dim: int = 16, condition: float = 1e4, seed: int = 0):
    """A quadratic ``½ (w−w*)ᵀ H (w−w*)`` on a ``(dim, dim)`` matrix leaf with a
    known condition number: ``H = A ⊗ B`` with log-spaced eigenvalues in random
    bases, so ``cond(H) = condition``. Returns ``(params, loss)``; the minimum is 0."""
    rng = np.random.default_rng(seed)
    root = np.sqrt(condition)
    bases = [np.linalg.qr(rng.standard_normal((dim, dim)))[0] for _ in range(2)]
    factors = [(q * np.logspace(0, np.log10(root), dim)) @ q.T for q in bases]
    a, b = (jnp.asarray(f, jnp.float32) for f in factors)
    target = jnp.asarray(rng.standard_normal((dim, dim)), jnp.float32)

    def loss(params):
        d = params["w"] - target
        return 0.5 * jnp.sum(d * (a @ d @ b))

    return {"w": jnp.zeros((dim, dim), jnp.float32)}, loss


def mlp_problem(seed: int = 0, n: int = 256, width: int = 32):
    """A small regression MLP (8 → width → width → 1) on a fixed smooth target.
    Returns ``(params, loss)`` where ``loss(params)`` is the mean squared error."""
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(k[0], (n, 8))
    y = jnp.sin(x @ jax.random.normal(k[1], (8, 1))) + 0.1 * jnp.cos(3 * x[:, :1])
    init = lambda key, i, o: jax.random.normal(key, (i, o)) * jnp.sqrt(2.0 / i)
    params = {"w1": init(k[2], 8, width), "b1": jnp.zeros(width),
              "w2": init(k[3], width, width), "b2": jnp.zeros(width),
              "w3": init(k[4], width, 1), "b3": jnp.zeros(1)}

    def loss(p):
        h = jax.nn.tanh(x @ p["w1"] + p["b1"])
        h = jax.nn.tanh(h @ p["w2"] + p["b2"])
        return jnp.mean((h @ p["w3"] + p["b3"] - y) ** 2)

    return params, loss


def run(opt, params, loss: Callable, steps: int, **update_args):
    """Train ``params`` on ``loss`` for ``steps`` jitted steps; returns ``(params, state, losses)``.

    Integer leaves get zero gradients; ``None`` leaves stay ``None``.

    >>> import optax
    >>> target = mixed_tree(seed=1)
    >>> _, _, losses = run(optax.sgd(0.5), mixed_tree(), quadratic_loss(target), 20)
    >>> losses[-1] < 1e-3 * losses[0]
    True
    """
    def float0_to_zero(g, p):  # gradients of integer leaves are float0
        return jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss, allow_int=True)(params)
        grads = jax.tree.map(float0_to_zero, grads, params)
        updates, state = opt.update(grads, state, params, **update_args)
        return optax.apply_updates(params, updates), state, value

    state = opt.init(params)
    losses = []
    for _ in range(steps):
        params, state, value = step(params, state)
        losses.append(float(value))
    losses.append(float(loss(params)))
    return params, state, losses


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree (e.g. an optimizer state)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
