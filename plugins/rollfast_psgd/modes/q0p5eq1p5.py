"""Q0.5EQ1.5 (default): the step ``(I − ηE)Q`` re-symmetrised by a Procrustes rotation."""

from __future__ import annotations

import rollfast
from rollfast_psgd import reference
from rollfast_psgd.linalg import left_step, procrustes


@rollfast.hookimpl
def precondition(register):
    register.mode("kron", "Q0.5EQ1.5", summary=__doc__.splitlines()[0],
                  update_dense=q0p5eq1p5_dense, aliases=("Q0p5EQ1p5",),
                  references=("Xi-Lin Li, Stochastic Hessian Fittings with Lie Groups, arXiv:2402.11858",),
                  metadata={"reference_dense": reference.q0p5eq1p5_reference, "invariants": ()})


def q0p5eq1p5_dense(q, terms):
    r"""Li's :math:`dQ = Q^{0.5} E Q^{1.5}` form via a step and a rotation.

    .. math::
        Q \leftarrow \operatorname{procrustes}\bigl(Q - \eta (T_1 - T_2 I) Q\bigr)

    With :math:`Q` symmetric, the rotation restores symmetry, keeping :math:`Q \approx P^{1/2}`
    without triangular solves; fixed point :math:`G_i(Ph) + \delta = (n/d) I`.

    Args:
      q: the ``(d, d)`` factor.
      terms: its :class:`~rollfast_psgd.factors.FactorTerms`.

    >>> import jax.numpy as jnp
    >>> from rollfast_psgd.factors import FactorTerms
    >>> t = FactorTerms(jnp.eye(2) * 3, 1.0, 0.25, 4.0, jnp.ones((32, 2)), 5)
    >>> q0p5eq1p5_dense(jnp.eye(2), t)
    Array([[0.5, 0. ],
           [0. , 0.5]], dtype=float32)
    """
    return procrustes(left_step(q, terms), terms.probe)
