"""QUAD: the symmetric two-sided step ``(I − ½ηE) Q (I − ½ηE)``."""

from __future__ import annotations

import rollfast
from rollfast_psgd import reference
from rollfast_psgd.linalg import left_step, sym


@rollfast.hookimpl
def precondition(register):
    register.mode("kron", "QUAD", summary=__doc__.splitlines()[0], update_dense=quad_dense,
                  references=("Xi-Lin Li, Stochastic Hessian Fittings with Lie Groups, arXiv:2402.11858",),
                  metadata={"reference_dense": reference.quad_reference, "invariants": ("symmetric",)})


def quad_dense(q, terms):
    r"""Quadratic-form update, symmetric and (for small :math:`\eta E`) positive definite.

    .. math::
        Q \leftarrow \operatorname{sym}\bigl((I - \tfrac12\eta E)\,Q\,(I - \tfrac12\eta E)\bigr),
        \quad E = T_1 - T_2 I

    Args:
      q: the ``(d, d)`` factor.
      terms: its :class:`~rollfast_psgd.factors.FactorTerms`.

    >>> import jax.numpy as jnp
    >>> from rollfast_psgd.factors import FactorTerms
    >>> quad_dense(jnp.eye(2), FactorTerms(jnp.eye(2) * 3, 1.0, 0.5, 4.0, None, 5))
    Array([[0.25, 0.  ],
           [0.  , 0.25]], dtype=float32)
    """
    return sym(left_step(left_step(q, terms, 0.5).T, terms, 0.5).T)
