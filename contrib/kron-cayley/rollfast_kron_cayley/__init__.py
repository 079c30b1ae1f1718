r"""CAYLEY: the Cayley retraction for rollfast's PSGD Kron family (a third-party mode).

.. math::
    C = (I + \tfrac{\eta}{2}\hat E)^{-1}(I - \tfrac{\eta}{2}\hat E),\quad
    Q \leftarrow \operatorname{sym}(Q\,C),\quad \hat E = \operatorname{sym}(T_1) - T_2 I

:math:`C` is the Padé [1/1] approximant of EXP's :math:`\exp(-\eta\hat E)`. Because
:math:`\hat E` is symmetric, :math:`C` is symmetric with eigenvalues
:math:`(1-\eta\lambda/2)/(1+\eta\lambda/2)`, all positive whenever
:math:`\eta\|\hat E\| < 2` — which the family's normalisation
:math:`\eta \le \eta_0/\ell` guarantees for :math:`\eta_0 < 2`. So the multiplier stays
in the SPD cone for every step size the family produces (unlike a truncated Taylor
series), it is never singular (:math:`\lambda \ge -T_2` and :math:`\eta T_2 \le \eta_0`),
and it costs one Cholesky solve instead of a matrix exponential. (With a skew-symmetric
generator the Cayley map would be orthogonal and could only rotate ``Q``, never whiten.)

Installed, it is ``rollfast.get("kron", mode="CAYLEY")``.
"""

from __future__ import annotations

import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

import rollfast
from rollfast_psgd.linalg import sym, whitening_error


@rollfast.hookimpl
def precondition(register):
    register.mode("kron", "CAYLEY", summary=__doc__.splitlines()[0], update_dense=cayley_dense,
                  metadata={"reference_dense": cayley_reference},
                  references=("Xi-Lin Li, Stochastic Hessian Fittings with Lie Groups, arXiv:2402.11858",))


def cayley_dense(q, terms):
    r"""Move a dense factor by the Cayley transform of the whitening error.

    .. math::
        Q \leftarrow \operatorname{sym}\bigl(Q\,(I + \tfrac{\eta}{2}\hat E)^{-1}(I - \tfrac{\eta}{2}\hat E)\bigr)

    Args:
      q: the ``(d, d)`` factor.
      terms: its ``rollfast_psgd.factors.FactorTerms``.

    >>> import jax.numpy as jnp
    >>> from rollfast_psgd.factors import FactorTerms
    >>> cayley_dense(jnp.eye(2), FactorTerms(jnp.eye(2) * 2, 1.0, 1.0, 3.0, None, 5)).round(6)
    Array([[0.333333, 0.      ],
           [0.      , 0.333333]], dtype=float32)
    """
    half = 0.5 * terms.eta * whitening_error(terms)
    shifted = jnp.eye(q.shape[0], dtype=q.dtype) + half
    # (I + H)⁻¹(I − H) = 2(I + H)⁻¹ − I and (I + H) is SPD (module docstring), so
    # sym(Q·C) = sym(2·Q(I + H)⁻¹) − sym(Q) = sym(2·(I + H)⁻¹Qᵀ) − sym(Q):
    # one Cholesky solve and no product.
    return sym(2 * jsl.cho_solve(jsl.cho_factor(shifted), q.T)) - sym(q)


def cayley_reference(q, terms):
    """Float64 NumPy reference of :func:`cayley_dense` (for the family's mode tests).

    Args:
      q: the ``(d, d)`` factor as a float64 array.
      terms: an object with float64 ``t1``, ``t2``, ``eta``.

    >>> import numpy as np, types
    >>> cayley_reference(np.eye(1), types.SimpleNamespace(t1=np.eye(1) * 2, t2=1.0, eta=1.0))
    array([[0.33333333]])
    """
    eye = np.eye(q.shape[0])
    half = 0.5 * terms.eta * ((terms.t1 + terms.t1.T) / 2 - terms.t2 * eye)
    c = np.linalg.solve(eye + half, eye - half)
    return (q @ c + (q @ c).T) / 2
