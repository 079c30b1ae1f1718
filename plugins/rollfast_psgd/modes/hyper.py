"""HYPER: the first-order multiplicative step ``Q(I − η'Ê)`` with a trust-region cap."""

from __future__ import annotations

import jax.numpy as jnp

import rollfast
from rollfast_psgd import reference
from rollfast_psgd.linalg import sym, whitening_error


@rollfast.hookimpl
def precondition(register):
    register.mode("kron", "HYPER", summary=__doc__.splitlines()[0], update_dense=hyper_dense,
                  references=("Xi-Lin Li, Stochastic Hessian Fittings with Lie Groups, arXiv:2402.11858",),
                  metadata={"reference_dense": reference.hyper_reference, "invariants": ("symmetric",)})


def hyper_dense(q, terms):
    r"""First-order truncation of EXP, step capped by the bound.

    .. math::
        \eta' = \min\bigl(\eta, \tfrac{0.9}{\ell - T_2}\bigr),\quad
        Q \leftarrow \operatorname{sym}\bigl(Q (I - \eta' \hat E)\bigr),\quad
        \hat E = \operatorname{sym}(T_1) - T_2 I

    Args:
      q: the ``(d, d)`` factor.
      terms: its :class:`~rollfast_psgd.factors.FactorTerms`.

    >>> import jax.numpy as jnp
    >>> from rollfast_psgd.factors import FactorTerms
    >>> out = hyper_dense(jnp.eye(2), FactorTerms(jnp.eye(2) * 2, 1.0, 0.5, 3.0, None, 5))
    >>> [round(float(v), 5) for v in out.ravel()]   # η' = 0.9/(ℓ − T₂) = 0.45 caps η = 0.5
    [0.55, 0.0, 0.0, 0.55]
    """
    cap = 0.9 / (terms.bound - terms.t2 + jnp.finfo(jnp.float32).tiny)
    eye = jnp.eye(q.shape[0], dtype=q.dtype)
    return sym(q @ (eye - jnp.minimum(terms.eta, cap) * whitening_error(terms)))
