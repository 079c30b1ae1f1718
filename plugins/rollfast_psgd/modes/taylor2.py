"""TAYLOR2: the second-order Taylor truncation of the exponential map."""

from __future__ import annotations

import jax.numpy as jnp

import rollfast
from rollfast_psgd import reference
from rollfast_psgd.linalg import sym, whitening_error


@rollfast.hookimpl
def precondition(register):
    register.mode("kron", "TAYLOR2", summary=__doc__.splitlines()[0], update_dense=taylor2_dense,
                  references=("Xi-Lin Li, Stochastic Hessian Fittings with Lie Groups, arXiv:2402.11858",),
                  metadata={"reference_dense": reference.taylor2_reference, "invariants": ("symmetric",)})


def taylor2_dense(q, terms):
    r"""Capped second-order step :math:`Q(I - H + H^2/2)`.

    .. math::
        \hat E = \operatorname{sym}(T_1) - T_2 I,\quad
        H = \min\bigl(\eta, \tfrac{0.5}{\ell - T_2}\bigr)\hat E,\quad
        Q \leftarrow \operatorname{sym}\bigl(Q (I - H (I - \tfrac12 H))\bigr)

    The statistic is :math:`X = Ph` as for EXP (of which this is the truncation), so the
    fixed point is Li's :math:`P E[hh^T] P = I`. (rollfast 0.2 fitted :math:`X = Qh`, whose
    fixed point :math:`P \approx E[hh^T]^{-1}` amplifies low-variance noise; see docs/kron.md.)

    Args:
      q: the ``(d, d)`` factor.
      terms: its :class:`~rollfast_psgd.factors.FactorTerms`.

    >>> import jax.numpy as jnp
    >>> from rollfast_psgd.factors import FactorTerms
    >>> taylor2_dense(jnp.eye(2), FactorTerms(jnp.eye(2) * 2, 1.0, 0.5, 3.0, None, 5))
    Array([[0.78125, 0.     ],
           [0.     , 0.78125]], dtype=float32)
    """
    eye = jnp.eye(q.shape[0], dtype=q.dtype)
    cap = 0.5 / (terms.bound - terms.t2 + jnp.finfo(jnp.float32).tiny)
    h = jnp.minimum(terms.eta, cap) * whitening_error(terms)
    return sym(q @ (eye - h @ (eye - 0.5 * h)))
