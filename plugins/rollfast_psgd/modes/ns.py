"""NS: a Euclidean step ``(I − ηE)Q`` projected onto ``(QᵀQ)^{1/2}`` by Newton–Schulz."""

from __future__ import annotations

import rollfast
from rollfast_psgd import reference
from rollfast_psgd.linalg import left_step, ns_spd


@rollfast.hookimpl
def precondition(register):
    register.mode("kron", "NS", summary=__doc__.splitlines()[0], update_dense=ns_dense,
                  references=("Xi-Lin Li, Stochastic Hessian Fittings with Lie Groups, arXiv:2402.11858",),
                  metadata={"reference_dense": reference.ns_reference, "invariants": ("symmetric", "spd")})


def ns_dense(q, terms):
    r"""Step, then polar projection onto the SPD cone.

    .. math::
        Q' = Q - \eta (T_1 - T_2 I) Q,\qquad Q \leftarrow (Q'^T Q')^{1/2}
        \ \text{(Newton–Schulz, to convergence)}

    The result is exactly symmetric, and its square is :math:`Q'^TQ'`, which the
    projection forms anyway: it is returned as the new factor's ``P``.

    Args:
      q: the ``(d, d)`` factor.
      terms: its :class:`~rollfast_psgd.factors.FactorTerms`.

    >>> import jax.numpy as jnp
    >>> from rollfast_psgd.factors import FactorTerms
    >>> t = FactorTerms(jnp.eye(2) * 3, 1.0, 0.25, 4.0, jnp.ones((32, 2)), 5)
    >>> ns_dense(jnp.eye(2), t)
    (Array([[0.5, 0. ],
           [0. , 0.5]], dtype=float32), Array([[0.25, 0.  ],
           [0.  , 0.25]], dtype=float32))
    """
    return ns_spd(left_step(q, terms), terms.probe, terms.newton_schulz_iters)
