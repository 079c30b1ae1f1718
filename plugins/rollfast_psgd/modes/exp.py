"""EXP: the exponential-map (geodesic) step ``Q·exp(−ηÊ)``."""

from __future__ import annotations

import rollfast
from rollfast_psgd import reference
from rollfast_psgd.linalg import expm_taylor, sym, whitening_error


@rollfast.hookimpl
def precondition(register):
    register.mode("kron", "EXP", summary=__doc__.splitlines()[0], update_dense=exp_dense,
                  references=("Xi-Lin Li, Stochastic Hessian Fittings with Lie Groups, arXiv:2402.11858",),
                  metadata={"reference_dense": reference.exp_reference, "invariants": ("symmetric",)})


def exp_dense(q, terms):
    r"""Right multiplication by the matrix exponential of the whitening error.

    .. math::
        Q \leftarrow \operatorname{sym}\bigl(Q\,\exp(-\eta \hat E)\bigr),\quad
        \hat E = \operatorname{sym}(T_1) - T_2 I

    The exponential is :func:`~rollfast_psgd.linalg.expm_taylor` with the norm estimate
    :math:`\eta\ell \ge \lVert\eta\hat E\rVert_2`: float32-accurate in two matrix
    products at the default step size.

    Args:
      q: the ``(d, d)`` factor.
      terms: its :class:`~rollfast_psgd.factors.FactorTerms`.

    >>> import jax.numpy as jnp
    >>> from rollfast_psgd.factors import FactorTerms
    >>> exp_dense(jnp.eye(2), FactorTerms(jnp.eye(2) * 2, 1.0, jnp.log(2.0), 3.0, None, 5)).round(5).tolist()
    [[0.5, 0.0], [0.0, 0.5]]
    """
    return sym(q @ expm_taylor(-terms.eta * whitening_error(terms), terms.eta * terms.bound))
