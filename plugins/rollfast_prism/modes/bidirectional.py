"""PRISM mode ``bidirectional``: two-sided inverse fourth roots (Cesista, Shampoo-style).

With ``T̂, D̂`` the target and innovation scaled to unit joint Frobenius norm,

.. math::
    H_L = \\hat T \\hat T^\\top + \\gamma_L^2 \\hat D \\hat D^\\top + \\epsilon I_R,\\qquad
    H_R = \\hat T^\\top \\hat T + \\gamma_R^2 \\hat D^\\top \\hat D + \\epsilon I_O,\\qquad
    \\operatorname{Shape}(T, D) \\approx H_L^{-1/4}\\,\\hat T\\,H_R^{-1/4}.

The inverse fourth roots come from a coupled polynomial iteration, one side
after the other (the two sides commute). Each side is computed where it is
cheaper: ``H_R = AᵀA + εI`` with ``A = [T̂; γ_R D̂]`` (``2R × O``) and, for any
function ``f``, ``A f(AᵀA) = f(AAᵀ) A`` (push-through), so when ``2R < O``,
``T̂ H_R^{-1/4}`` is the top block of ``f(AAᵀ) A``, iterated on the ``2R × 2R``
Gram instead of the ``O × O`` one (symmetrically on the left when ``2O < R``).
The result is the same matrix function, not an approximation of it.
"""

from __future__ import annotations

import jax.numpy as jnp

import rollfast

INV_ROOT4_COEFFS = ((3.85003, -10.8539, 8.61893), (1.80992, -0.587778, 0.0647852),
                    (1.50394, -0.594516, 0.121161), (45 / 32, -9 / 16, 5 / 32))


@rollfast.hookimpl
def precondition(register):
    register.mode("prism", "bidirectional", shape=shape,
                  summary="H_L^{-1/4} T H_R^{-1/4} by a coupled iteration, each side on its cheaper Gram",
                  references=("F. L. Cesista, Bidirectional-PRISM (Shampoo-style two-sided PRISM)",))


def shape(t, d, *, gamma=1.0, gamma_l=None, gamma_r=None, eps_gram=1e-6, inv_steps=6,
          inv_eps=1e-5, inv_scale=1.001, precision="highest"):
    """``H_L^{-1/4} T̂ H_R^{-1/4}`` for one ``R × O`` target ``t`` and innovation ``d``.

    Args:
      t: the target momentum, an ``R × O`` float32 matrix.
      d: the innovation ``G − M``, same shape.
      gamma: innovation weight on both sides (unless overridden).
      gamma_l: innovation weight of the left Gram ``H_L`` (default ``gamma``).
      gamma_r: innovation weight of the right Gram ``H_R`` (default ``gamma``).
      eps_gram: ridge added to both Grams.
      inv_steps: iterations of the inverse-fourth-root iteration (0 or None: 4).
      inv_eps: ridge added to the normalised Grams.
      inv_scale: safety factor κ dividing the iteration's coefficients.
      precision: matmul precision (``"highest"``, ``"default"``, …).

    >>> import jax.numpy as jnp
    >>> shape(2 * jnp.eye(3), jnp.zeros((3, 3)), gamma=0.0).round(2)
    Array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 1.]], dtype=float32)
    """
    gl = gamma if gamma_l is None else gamma_l
    gr = gamma if gamma_r is None else gamma_r
    gmax = max(gl, gr)
    mm = lambda a, b: jnp.matmul(a, b, precision=precision)
    scale = jnp.maximum(jnp.maximum(jnp.max(jnp.abs(t)), gmax * jnp.max(jnp.abs(d))), 1e-30)
    norm = scale * jnp.sqrt(jnp.sum(jnp.square(t / scale)) + gmax**2 * jnp.sum(jnp.square(d / scale)))
    sigma = jnp.maximum(norm, 1e-30)
    t, d = t / sigma, d / sigma
    rows, cols = t.shape
    steps = coefficients(inv_steps, inv_scale)
    root = lambda gram, n, x, side: _apply_inv_root4(gram, n, x, side, steps, eps_gram, inv_eps, mm)

    if 2 * rows < cols:
        a = jnp.concatenate([t, gr * d], axis=0)
        x = root(mm(a, a.T), cols, a, "left")[:rows]
        return root(mm(t, t.T) + gl**2 * mm(d, d.T), rows, x, "left")
    if 2 * cols < rows:
        a = jnp.concatenate([t, gl * d], axis=1)
        x = root(mm(a.T, a), rows, a, "right")[:, :cols]
        return root(mm(t.T, t) + gr**2 * mm(d.T, d), cols, x, "right")
    x = root(mm(t, t.T) + gl**2 * mm(d, d.T), rows, t, "left")
    return root(mm(t.T, t) + gr**2 * mm(d.T, d), cols, x, "right")


def coefficients(inv_steps=6, inv_scale=1.001):
    """The ``(a, b, c)`` rows of the ``r = 4`` iteration, one per step.

    The first ``min(inv_steps, 4)`` rows of the table, the last one repeated up
    to ``inv_steps`` rows (``0``/``None`` → 4), each divided by ``(κ, κ⁵, κ⁹)``.

    Args:
      inv_steps: number of steps.
      inv_scale: safety factor κ.

    >>> [round(a, 4) for a, _, _ in coefficients(6, 1.0)]
    [3.85, 1.8099, 1.5039, 1.4062, 1.4062, 1.4062]
    """
    n = inv_steps or 4
    if n < 0:
        raise ValueError(f"inv_steps must be >= 0, got {inv_steps}")
    table = INV_ROOT4_COEFFS[:min(n, 4)]
    table = table + (table[-1],) * (n - len(table))
    k = inv_scale
    return tuple((a / k, b / k**5, c / k**9) for a, b, c in table)


def _apply_inv_root4(gram, n, x, side, steps, eps_gram, inv_eps, mm):
    """``H^{-1/4}`` applied to ``x`` from ``side``, by the coupled iteration, for
    ``H = G + ε_g I_n``, where ``G`` is ``gram`` or, when ``gram`` is the smaller
    push-through twin ``A Aᵀ`` of an ``n × n`` Gram ``Aᵀ A``, ``x = A`` (then the
    result is ``A (AᵀA + ε_g I)^{-1/4}``; ``x`` lies in the range of ``gram``, so
    no component is amplified and then cancelled).

    ``τ = 1.05 ‖H‖_F`` with ``‖H‖_F² = ‖G‖_F² + 2 ε_g tr G + n ε_g²`` (the same
    on either side); ``L = H/τ + ε_i I`` is driven to ``I`` by
    ``W = a I + b L + c L²``, ``L ← L W⁴``, while ``x ← W x``."""
    gram = _sym(gram)
    frob = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(gram)) + 2 * eps_gram * jnp.trace(gram)
                                + n * eps_gram**2, 0.0))
    tau = 1.05 * jnp.maximum(frob, 1e-30)
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    lm = gram / tau + (eps_gram / tau + inv_eps) * eye
    for i, (a, b, c) in enumerate(steps):
        w = _sym(a * eye + b * lm + c * _sym(mm(lm, lm)))
        x = mm(w, x) if side == "left" else mm(x, w)
        if i + 1 < len(steps):
            w2 = _sym(mm(w, w))
            lm = _sym(mm(lm, _sym(mm(w2, w2))))
    return x * tau**-0.25


def _sym(x):
    return (x + x.T) / 2
