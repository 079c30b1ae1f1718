"""EQ: Li's ``dQ = E·Q`` step on the group of upper-triangular matrices."""

from __future__ import annotations

import jax.numpy as jnp

import rollfast
from rollfast_psgd import reference
from rollfast_psgd.linalg import along_upper


@rollfast.hookimpl
def precondition(register):
    register.mode("kron", "EQ", summary=__doc__.splitlines()[0],
                  update_dense=eq_dense, statistic="Qh", inverse_probe=True,
                  references=("Xi-Lin Li, Preconditioner on Matrix Lie Group for SGD, arXiv:1809.10232",),
                  metadata={"reference_dense": reference.eq_reference, "invariants": ("upper_triangular",)})


def eq_dense(q, terms):
    r"""Move an upper-triangular factor along :math:`-\operatorname{triu}(T_1 - T_2)\,Q`.

    .. math::
        Q \leftarrow Q - \eta\,\operatorname{triu}\bigl(G_i(Qh) - G_i(Q^{-T}v)\bigr)\,Q

    the triangular-group gradient step of the criterion
    :math:`E[h^TPh + v^TP^{-1}v]`; its fixed point is :math:`P E[hh^T] P = I`.
    ``Q`` stays upper triangular.

    Args:
      q: the ``(d, d)`` upper-triangular factor.
      terms: its :class:`~rollfast_psgd.factors.FactorTerms` (``t2`` a matrix).

    >>> import jax.numpy as jnp
    >>> from rollfast_psgd.factors import FactorTerms
    >>> t = FactorTerms(jnp.array([[2.0, 1.0], [1.0, 2.0]]), jnp.eye(2), 0.5, 3.0, None, 5)
    >>> eq_dense(jnp.eye(2), t)
    Array([[ 0.5, -0.5],
           [ 0. ,  0.5]], dtype=float32)
    """
    return q - terms.eta * along_upper(jnp.triu(terms.t1 - terms.t2), q, 0)
