"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024,
arXiv:2409.11321)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rollfast_contrib._tools import decoupled, field, init_leaves, map_leaves

REFERENCES = ("Vyas et al., SOAP: Improving and Stabilizing Shampoo using Adam, arXiv:2409.11321",)


class SoapLeaf(NamedTuple):
    """One leaf's momentum (its shape), second moment (in the eigenbasis, merged
    shape), and for each preconditioned axis its Shampoo factor and eigenbasis."""

    mu: object
    nu: object
    factors: tuple
    bases: tuple


class ScaleBySoapState(NamedTuple):
    """Step count (the first step only builds the bases) and the per-leaf :class:`SoapLeaf`."""

    count: object
    leaves: object


def first_moment(state):
    """The momentum of a ``soap`` state."""
    return field(state[0].leaves, "mu", SoapLeaf)


def merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """The shape SOAP works on: consecutive axes before the last are merged while their
    product stays ≤ ``max_precond_dim``; the last axis stays on its own.

    Args:
      shape: the parameter's shape.
      max_precond_dim: the largest merged axis.

    >>> merged_shape((3, 3, 64, 128), 10000), merged_shape((200, 300, 7), 1000)
    ((576, 128), (200, 300, 7))
    """
    if len(shape) <= 2:
        return tuple(shape)
    merged = [shape[0]]
    for d in shape[1:-1]:
        if merged[-1] * d <= max_precond_dim:
            merged[-1] *= d
        else:
            merged.append(d)
    return (*merged, shape[-1])


def _mode_product(x, q, axis, transpose):
    """``x ×_axis qᵀ`` (into the basis) or ``x ×_axis q`` (back)."""
    return jnp.moveaxis(jnp.tensordot(x, q, axes=([axis], [0 if transpose else 1])), -1, axis)


def _gram(x, axis):
    others = [a for a in range(x.ndim) if a != axis]
    return jnp.tensordot(x, x, axes=(others, others))


def _descending_eigenbasis(factor):
    _, vectors = jnp.linalg.eigh(factor)
    return vectors[:, ::-1]


def scale_by_soap(b1=0.95, b2=0.95, eps=1e-8, shampoo_beta=None, precondition_frequency=10,
                  max_precond_dim=10000, merge_dims=True, precondition_1d=False):
    r"""SOAP's direction: Adam run in the rotating eigenbasis of Shampoo's factors.

    A leaf is viewed in its :func:`merged_shape` (``merge_dims``); each axis of
    length ≤ ``max_precond_dim`` (of a leaf of rank ≥ 2, or of a vector when
    ``precondition_1d``) has a factor ``L_i`` and an orthogonal basis ``Q_i``; other
    axes keep the identity basis (one-sided SOAP). Writing ``X̄ = X ×_i Q_iᵀ`` for the
    rotation into the basis and ``X = X̄ ×_i Q_i`` back:

    .. math::
        \text{step }0:\ L_i = (1-\beta_s)\,G_{(i)}G_{(i)}^\top,\ Q_i = \mathrm{eigh}(L_i)
            \text{ (descending)},\ u = 0;\\
        \text{step }t\ge1:\ m_t = \beta_1 m_{t-1} + (1-\beta_1)G,\quad
            v_t = \beta_2 v_{t-1} + (1-\beta_2)\bar G^2,\\
        u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\Big(\frac{\bar m_t}{\sqrt{v_t}+\epsilon}\Big)
            \times_i Q_i,\qquad L_i \leftarrow \beta_s L_i + (1-\beta_s)G_{(i)}G_{(i)}^\top,

    and every ``precondition_frequency`` steps, one power iteration with QR:
    ``Q_i`` is reordered by the estimated eigenvalues ``diag(Q_iᵀL_iQ_i)`` (descending,
    ``v`` permuted alike) and replaced by ``qr(L_i Q_i)``. ``G_{(i)}`` is the
    gradient unfolded along axis ``i``; ``β_s = shampoo_beta`` (``None``: β2). The
    momentum lives in the parameters' basis, the second moment in the eigenbasis.

    Args:
      b1: decay β1 of the momentum.
      b2: decay β2 of the second moment in the eigenbasis.
      eps: added to the root second moment.
      shampoo_beta: decay of the Shampoo factors (``None``: ``b2``).
      precondition_frequency: steps between eigenbasis refreshes.
      max_precond_dim: axes longer than this keep the identity basis.
      merge_dims: merge leading axes of tensors of rank > 2 (see :func:`merged_shape`).
      precondition_1d: rotate vectors too (else they take plain Adam).

    >>> import jax, jax.numpy as jnp
    >>> tx = scale_by_soap()
    >>> g = {"w": jax.random.normal(jax.random.PRNGKey(0), (4, 3)), "b": jnp.ones(2)}
    >>> s = tx.init(g)
    >>> u, s = tx.update(g, s)
    >>> float(jnp.abs(u["w"]).max()), [q.shape for q in s.leaves["w"].bases]
    (0.0, [(4, 4), (3, 3)])
    """
    beta_s = b2 if shampoo_beta is None else shampoo_beta
    if precondition_frequency < 1:
        raise ValueError(f"precondition_frequency must be >= 1, got {precondition_frequency}")

    def plan(shape):
        work = merged_shape(shape, max_precond_dim) if merge_dims else tuple(shape)
        rotated = len(work) >= 2 or (len(work) == 1 and precondition_1d)
        axes = tuple(i for i, d in enumerate(work) if rotated and d <= max_precond_dim)
        return work, axes

    def init(params):
        def leaf(_, p):
            work, axes = plan(jnp.shape(p))
            eye = tuple(jnp.eye(work[i], dtype=jnp.float32) for i in axes)
            return SoapLeaf(jnp.zeros(jnp.shape(p), jnp.float32), jnp.zeros(work, jnp.float32),
                            tuple(jnp.zeros_like(e) for e in eye), eye)
        return ScaleBySoapState(jnp.zeros([], jnp.int32), init_leaves(leaf, params))

    def rotate(x, bases, axes, back):
        for q, axis in zip(bases, axes):
            x = _mode_product(x, q, axis, transpose=not back)
        return x

    def refresh(factors, bases, nu, axes):
        new_bases = []
        for f, q, axis in zip(factors, bases, axes):
            order = jnp.argsort(-jnp.diag(q.T @ f @ q))
            nu = jnp.take(nu, order, axis=axis)
            new_bases.append(jnp.linalg.qr(f @ q[:, order])[0])
        return tuple(new_bases), nu

    def update(updates, state, params=None):
        del params
        t = state.count

        def leaf(_, g, s):
            work, axes = plan(g.shape)
            x = g.astype(jnp.float32).reshape(work)

            def accumulate(factors):
                return tuple(beta_s * f + (1 - beta_s) * _gram(x, axis) for f, axis in zip(factors, axes))

            def first(s):
                factors = accumulate(s.factors)
                bases = tuple(_descending_eigenbasis(f) for f in factors)
                return jnp.zeros_like(x), SoapLeaf(s.mu, s.nu, factors, bases)

            def step(s, n):
                mu = (1 - b1) * g.astype(jnp.float32) + b1 * s.mu
                nu = (1 - b2) * jnp.square(rotate(x, s.bases, axes, back=False)) + b2 * s.nu
                inner = rotate(mu.reshape(work), s.bases, axes, back=False) / (jnp.sqrt(nu) + eps)
                u = rotate(inner, s.bases, axes, back=True) * (jnp.sqrt(1 - b2**n) / (1 - b1**n))
                factors = accumulate(s.factors)
                bases, nu = jax.lax.cond(t % precondition_frequency == 0,
                                         lambda: refresh(factors, s.bases, nu, axes),
                                         lambda: (s.bases, nu))
                return u, SoapLeaf(mu, nu, factors, bases)

            if axes:
                u, new = jax.lax.cond(t == 0, first, lambda s: step(s, t), s)
            else:
                u, new = step(s, optax.safe_increment(t))
            return u.reshape(g.shape).astype(g.dtype), new

        out, leaves = map_leaves(leaf, updates, state.leaves)
        return out, ScaleBySoapState(optax.safe_increment(t), leaves)

    return optax.GradientTransformation(init, update)


def soap(learning_rate, b1=0.95, b2=0.95, eps=1e-8, weight_decay=0.01, weight_decay_mask=None,
         shampoo_beta=None, precondition_frequency=10, max_precond_dim=10000, merge_dims=True,
         precondition_1d=False):
    r"""SOAP: ``-lr·(SOAP direction + λθ)``.

    Defaults are the paper's (β = (0.95, 0.95), refresh every 10 steps, axes up to
    10000, weight decay 0.01). The first step of a rotated leaf only builds its bases
    (zero update). Steps with non-finite gradients are skipped.

    Args:
      learning_rate: step size, a float or an Optax schedule.
      b1: decay β1 of the momentum.
      b2: decay β2 of the second moment in the eigenbasis.
      eps: added to the root second moment.
      weight_decay: decoupled weight decay λ (float or schedule).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.
      shampoo_beta: decay of the Shampoo factors (``None``: ``b2``).
      precondition_frequency: steps between eigenbasis refreshes.
      max_precond_dim: axes longer than this keep the identity basis.
      merge_dims: merge leading axes of tensors of rank > 2.
      precondition_1d: rotate vectors too (else they take plain Adam).

    >>> import jax.numpy as jnp, rollfast
    >>> opt = rollfast.get("soap", learning_rate=0.1, weight_decay=0.0)
    >>> p = {"b": jnp.array([1.0, -1.0])}
    >>> opt.update({"b": jnp.array([3.0, -0.5])}, opt.init(p), p)[0]["b"]
    Array([-0.1,  0.1], dtype=float32)
    """
    return decoupled(scale_by_soap(b1, b2, eps, shampoo_beta, precondition_frequency,
                                   max_precond_dim, merge_dims, precondition_1d),
                     learning_rate, weight_decay, weight_decay_mask)
