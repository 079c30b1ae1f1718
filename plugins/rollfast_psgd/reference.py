r"""Float64 NumPy references of the kron family's factor update and of its
first-party modes: what the conformance contract (:mod:`rollfast_psgd.conformance`)
compares a mode against.

A mode's reference is ``reference_dense(q, terms) -> q``: ``q`` a float64 ``(d, d)``
array, ``terms`` an object with float64 ``t1``, ``t2`` (scalar or matrix), ``eta``,
``bound``, ``probe`` (the ``(32, d)`` probe of the geometry, float64) and
``newton_schulz_iters``; it returns the moved factor as a float64 array. The family's
common part (statistic, Gram terms, bound, Lipschitz step, diagonal rule) is
:func:`reference_update`, written here once from the equations of ``docs/kron.md``.
"""

from __future__ import annotations

import types

import numpy as np

TINY = float(np.finfo(np.float32).tiny)
EPS32 = float(np.finfo(np.float32).eps)


def sym(a):
    """:math:`(A + A^T)/2`."""
    return (a + a.T) / 2


def power_bound(a, scale, probe):
    r"""The randomised lower bound of :math:`\lVert A\rVert_2` the family uses: start from the
    largest row plus the probe, two rounds of :math:`v \leftarrow vA/\lVert vA\rVert,\ v A`."""
    a = a / scale
    row = a[np.argmax(np.sum(a * a, axis=1))]
    v = row + np.sign(probe @ row)[:, None] * probe
    for _ in range(2):
        v = v @ a
        v = v / (np.linalg.norm(v, axis=1, keepdims=True) + TINY)
        v = v @ a
    return scale * np.max(np.linalg.norm(v, axis=1))


def nlb_spd(a, probe):
    """:func:`power_bound` of a symmetric positive semi-definite matrix, scaled by its largest diagonal entry."""
    return power_bound(a, np.max(np.diag(a)) + TINY, probe)


def whitening_error(t):
    r""":math:`\hat E = \operatorname{sym}(T_1) - T_2 I`."""
    return sym(t.t1) - t.t2 * np.eye(len(t.t1))


def expm(a):
    """The matrix exponential of a symmetric matrix, by eigendecomposition."""
    w, u = np.linalg.eigh(sym(a))
    return (u * np.exp(w)) @ u.T


def procrustes(q, probe):
    r"""One step of the orthogonal Procrustes rotation of ``q`` toward symmetry
    (:math:`Q + a(RQ + \tfrac a2 R^2Q)`, :math:`R` the normalised :math:`Q^T - Q`)."""
    r = q.T - q
    r = r / (power_bound(r, np.max(np.abs(r)) + TINY, probe) + TINY)
    rq = r @ q
    rrq = r @ rq
    t1, t2 = np.trace(rq), np.trace(rrq)
    a = min(-t1 / t2, 0.125) if t2 < 0 else 0.125
    return q + a * (rq + a / 2 * rrq)


def polar_spd(q, probe, iters):
    """The SPD polar factor ``sym(XᵀQ)``, ``X`` the orthogonal polar factor of ``Q`` by
    Newton–Schulz run to convergence (max|XᵀX − I| ≤ 1e-12, at most ``iters + 40`` steps)."""
    x = q / (np.sqrt(nlb_spd(q.T @ q, probe)) + EPS32)
    i = 0
    while i < iters + 40 and np.max(np.abs(x.T @ x - np.eye(len(q)))) > 1e-12:
        x = 0.5 * x @ (3 * np.eye(len(q)) - x.T @ x)
        i += 1
    return sym(x.T @ q)


def eq_reference(q, t):
    r"""EQ: :math:`Q - \eta\,\operatorname{triu}(T_1 - T_2)\,Q`."""
    return q - t.eta * np.triu(t.t1 - t.t2) @ q


def q0p5eq1p5_reference(q, t):
    r"""Q0.5EQ1.5: :math:`Q - \eta(T_1Q - T_2Q)`, then one Procrustes rotation toward symmetry."""
    return procrustes(q - t.eta * (t.t1 @ q - t.t2 * q), t.probe)


def ns_reference(q, t):
    r"""NS: :math:`Q - \eta(T_1Q - T_2Q)`, then its SPD polar factor."""
    return polar_spd(q - t.eta * (t.t1 @ q - t.t2 * q), t.probe, t.newton_schulz_iters)


def quad_reference(q, t):
    r"""QUAD: :math:`\operatorname{sym}\bigl((I - \tfrac12\eta E)Q(I - \tfrac12\eta E)\bigr)`, :math:`E = T_1 - T_2I`."""
    half = np.eye(len(q)) - t.eta / 2 * (t.t1 - t.t2 * np.eye(len(q)))
    return sym(half @ q @ half)


def exp_reference(q, t):
    r"""EXP: :math:`\operatorname{sym}\bigl(Q\exp(-\eta\hat E)\bigr)`."""
    return sym(q @ expm(-t.eta * whitening_error(t)))


def taylor2_reference(q, t):
    r"""TAYLOR2: :math:`\operatorname{sym}\bigl(Q(I - H(I - H/2))\bigr)`, :math:`H = \min(\eta, \tfrac{1/2}{b - T_2})\hat E`."""
    h = min(t.eta, 0.5 / (t.bound - t.t2 + TINY)) * whitening_error(t)
    return sym(q @ (np.eye(len(h)) - h @ (np.eye(len(h)) - h / 2)))


def hyper_reference(q, t):
    r"""HYPER: :math:`\operatorname{sym}\bigl(Q(I - \min(\eta, \tfrac{0.9}{b - T_2})\hat E)\bigr)`."""
    return sym(q @ (np.eye(len(q)) - min(t.eta, 0.9 / (t.bound - t.t2 + TINY)) * whitening_error(t)))


def along(m, x, axis):
    """Apply a matrix (contraction) or a vector (elementwise) along ``axis``."""
    if m.ndim == 1:
        return x * m.reshape((-1,) + (1,) * (x.ndim - axis - 1))
    return np.moveaxis(np.tensordot(m, x, axes=([1], [axis])), 0, axis)


def gram(z, axis, dense):
    """:math:`G_i(Z)`: the Gram matrix of the axis-``i`` unfolding, or its diagonal."""
    others = tuple(i for i in range(z.ndim) if i != axis)
    return np.tensordot(z, z, axes=(others, others)) if dense else np.sum(z * z, axis=others)


def statistics(qs, h, v, statistic, inverse):
    r"""The statistic :math:`X = Ph` or :math:`Qh`, and :math:`B = Q^{-T}v` for inverse-probe modes."""
    x = h
    for i, q in enumerate(qs):
        m = q if statistic == "Qh" else (q.T @ q if q.ndim == 2 else q * q)
        x = along(m, x, i)
    b = None
    if inverse:
        b = v
        for i, q in enumerate(qs):
            b = along(np.linalg.inv(q).T if q.ndim == 2 else 1 / q, b, i)
    return x, b


def reference_update(geometry, qs, ls, h, v, probes, *, statistic="Ph", inverse=False,
                     lr=0.1, beta=0.9, damping=1e-9, newton_schulz_iters=5):
    r"""One preconditioner update of a leaf's factors in float64.

    Per factor :math:`i`: :math:`T_1 = G_i(X) + \delta`, :math:`T_2 = n/d_i` (or, with the
    inverse probe, :math:`T_1 = G_i(X)`, :math:`T_2 = G_i(B)`); the bound
    :math:`\ell = \mathrm{nlb}(T_1) + T_2` (:math:`\mathrm{nlb}(T_1+T_2)`, or
    :math:`\max(T_1+T_2)` for a diagonal factor); :math:`L \leftarrow \max(\beta L +
    (1-\beta)\ell, \ell)`, :math:`\eta = \eta_0/L`; a dense factor moves by ``geometry``, a
    diagonal one by :math:`|q\odot(1-\eta(T_1-T_2))|`.

    Args:
      geometry: the mode's ``reference_dense(q, terms)``.
      qs: the factors (float64 ``(d, d)`` or ``(d,)``).
      ls: their Lipschitz estimates.
      h: the probe gradient; v: the probe noise.
      probes: per factor ``None`` or a ``(2, 32, d)`` array (bound probe, geometry probe).
      statistic: ``"Ph"`` or ``"Qh"``; inverse: the mode uses :math:`B = Q^{-T}v`.
      lr: :math:`\eta_0`; beta: :math:`\beta`; damping: :math:`\delta`.
      newton_schulz_iters: passed to the geometry.

    Returns:
      ``(qs, ls)`` after the update (no balancing: the caller compares one leaf's factors
      of a single update chain, where the family balances only on its own schedule).
    """
    x, b = statistics(qs, h, v, statistic, inverse)
    out_q, out_l = [], []
    for i, (q, probe) in enumerate(zip(qs, probes)):
        dense = q.ndim == 2
        p_bound, p_geom = probe if dense else (None, None)
        t1 = gram(x, i, dense)
        if b is None:
            t1, t2 = t1 + damping, h.size / len(q)
            bound = nlb_spd(t1, p_bound) + t2 if dense else np.max(t1 + t2)
        else:
            t2 = gram(b, i, dense)
            bound = nlb_spd(t1 + t2, p_bound) if dense else np.max(t1 + t2)
        l_new = max(beta * ls[i] + (1 - beta) * bound, bound)
        terms = types.SimpleNamespace(t1=t1, t2=t2, eta=lr / l_new, bound=bound, probe=p_geom,
                                      newton_schulz_iters=newton_schulz_iters)
        out_q.append(geometry(q, terms) if dense else np.abs(q * (1 - terms.eta * (t1 - t2))))
        out_l.append(l_new)
    return out_q, out_l
