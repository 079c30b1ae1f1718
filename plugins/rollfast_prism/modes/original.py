"""PRISM mode ``original``: Newton–Schulz on the innovation-augmented momentum (Yang).

The shaped update of a momentum matrix ``T`` (``R × O``) with innovation ``D`` is
the top block of the (approximate) polar factor of ``A = [T; γ D]``:

.. math::
    \\operatorname{polar}(A)_{1:R} = T\\,(T^\\top T + \\gamma^2 D^\\top D)^{-1/2},

so directions in which the gradient disagrees with the momentum are shrunk;
with ``γ = 0`` it is Muon's ``orth(T)``.
"""

from __future__ import annotations

import jax.numpy as jnp

import rollfast

NS_COEFFS = (3.4445, -4.7750, 2.0315)


@rollfast.hookimpl
def precondition(register):
    register.mode("prism", "original", shape=shape,
                  summary="Newton–Schulz polar factor of [T; γD], top block",
                  references=("Y. Yang, PRISM: Structured Optimization via Anisotropic Spectral Shaping, "
                              "arXiv:2602.03096",))


def shape(t, d, *, gamma=1.0, ns_iters=5):
    """The top ``R`` rows of ``newton_schulz([T; γD], ns_iters)``.

    Args:
      t: the target momentum, an ``R × O`` float32 matrix.
      d: the innovation ``G − M``, same shape.
      gamma: weight of the innovation block.
      ns_iters: Newton–Schulz iterations.

    >>> import jax.numpy as jnp
    >>> shape(jnp.eye(3), jnp.zeros((3, 3))).round(2)
    Array([[0.69, 0.  , 0.  ],
           [0.  , 0.69, 0.  ],
           [0.  , 0.  , 0.69]], dtype=float32)
    """
    static_zero = isinstance(gamma, (int, float)) and gamma == 0
    a = t if static_zero else jnp.concatenate([t, gamma * d], axis=0)
    return newton_schulz(a, ns_iters, rows=t.shape[0])


def newton_schulz(a, iters=5, rows=None):
    """Muon's quintic Newton–Schulz iteration towards the polar factor ``U Vᵀ`` of ``a``.

    In the wide orientation (``a`` transposed if it has more rows than columns)

    .. math::
        X_0 = A / (\\|A\\|_F + 10^{-8}),\\qquad
        S = X X^\\top,\\quad X \\leftarrow a X + (b S + c S^2) X,

    with ``(a, b, c) = (3.4445, −4.7750, 2.0315)``: every singular value is
    mapped into roughly ``[0.7, 1.2]``, the singular vectors are kept. Only the
    first ``rows`` rows of the result are computed in the last iteration.

    Args:
      a: a float32 matrix.
      iters: number of iterations.
      rows: how many leading rows of the result to return (default all).

    >>> import jax, jax.numpy as jnp
    >>> x = newton_schulz(jax.random.normal(jax.random.PRNGKey(0), (8, 16)), 10)
    >>> s = jnp.linalg.svd(x, compute_uv=False)
    >>> bool((s > 0.6).all() and (s < 1.25).all())
    True
    """
    ca, cb, cc = NS_COEFFS
    rows = a.shape[0] if rows is None else rows
    tall = a.shape[0] > a.shape[1]
    x = a.T if tall else a
    x = x / (jnp.linalg.norm(x) + 1e-8)
    if iters == 0:
        return (x.T if tall else x)[:rows]
    for _ in range(iters - 1):
        s = x @ x.T
        x = ca * x + (cb * s + cc * (s @ s)) @ x
    s = x @ x.T
    if tall:
        return (ca * x[:, :rows] + (cb * s + cc * (s @ s)) @ x[:, :rows]).T
    top = s[:rows]
    return ca * x[:rows] + (cb * top + cc * (top @ s)) @ x
