"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024,
arXiv:2409.11321)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rollfast.toolbox import skip_nonfinite
from rollfast_contrib._tools import field, init_leaves, map_leaves

REFERENCES = ("Vyas et al., SOAP: Improving and Stabilizing Shampoo using Adam, arXiv:2409.11321",)


class SoapLeaf(NamedTuple):
    """One leaf's moments and preconditioner.

    ``mu`` is the momentum in eigenbasis coordinates (stored in the leaf's shape),
    ``nu`` the second moment in eigenbasis coordinates (merged shape). ``factors`` and
    ``bases`` hold, for each axis of the merged shape, its Shampoo factor and
    orthogonal eigenbasis, or ``None`` for an axis kept in the identity basis.
    """

    mu: object
    nu: object
    factors: tuple
    bases: tuple


class ScaleBySoapState(NamedTuple):
    """Calls so far (the first only builds the bases) and the per-leaf :class:`SoapLeaf`."""

    count: object
    leaves: object


class DecayAfterStepState(NamedTuple):
    """Calls so far (the learning-rate and weight-decay schedules' step)."""

    count: object


def _rotate(x, bases, back):
    r"""``x ×_i Q_iᵀ`` over every axis with a basis (into the eigenbasis), or
    ``x ×_i Q_i`` (``back``: out of it)."""
    for axis, q in enumerate(bases):
        if q is not None:
            x = jnp.moveaxis(jnp.tensordot(x, q, axes=([axis], [1 if back else 0])), -1, axis)
    return x


def first_moment(state):
    """The momentum of a ``soap`` state, rotated back to the parameters' basis."""
    def back(leaf):
        return _rotate(leaf.mu.reshape(leaf.nu.shape), leaf.bases, back=True).reshape(leaf.mu.shape)
    leaves = state[0].leaves
    return jax.tree.map(back, leaves, is_leaf=lambda x: isinstance(x, SoapLeaf))


def merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """The shape SOAP works on with ``merge_dims``: consecutive axes, the last one
    included, are merged while their product stays ≤ ``max_precond_dim``; an axis
    longer than that stays alone. Vectors and scalars are not merged.

    Args:
      shape: the parameter's shape.
      max_precond_dim: the largest merged axis.

    Returns:
      The merged shape (same number of elements).

    >>> merged_shape((3, 3, 64, 128), 10000), merged_shape((4, 8), 10000)
    ((576, 128), (32,))
    >>> merged_shape((200, 300, 7), 1000), merged_shape((20000, 2, 3), 100)
    ((200, 300, 7), (20000, 6))
    """
    if len(shape) < 2:
        return tuple(shape)
    merged, run = [], 1
    for d in shape:
        if run * d <= max_precond_dim:
            run *= d
        elif run > 1:
            merged.append(run)
            run = d
        else:
            merged.append(d)
    if run > 1 or not merged:
        merged.append(run)
    return tuple(merged)


def _plan(shape, max_precond_dim, merge_dims, precondition_1d):
    """The merged shape and, per merged axis, whether it has a factor and a basis:
    every axis ≤ ``max_precond_dim`` of a tensor of rank ≥ 2 (even if merging made it a
    vector); a vector's only axis when ``precondition_1d``; never a scalar's."""
    work = merged_shape(shape, max_precond_dim) if merge_dims else tuple(shape)
    rotated = len(shape) >= 2 or (len(shape) == 1 and precondition_1d)
    return work, tuple(rotated and d <= max_precond_dim for d in work)


def _init_leaf(p, max_precond_dim, merge_dims, precondition_1d):
    """Zero moments (float32, float64 for float64 leaves), zero factors, identity bases."""
    work, has = _plan(jnp.shape(p), max_precond_dim, merge_dims, precondition_1d)
    dtype = jnp.promote_types(jnp.result_type(p), jnp.float32)
    eye = tuple(jnp.eye(d, dtype=dtype) if h else None for d, h in zip(work, has))
    return SoapLeaf(jnp.zeros(jnp.shape(p), dtype), jnp.zeros(work, dtype),
                    tuple(None if e is None else jnp.zeros_like(e) for e in eye), eye)


def _gram(x, axis):
    r"""``G_(i) G_(i)ᵀ``: the gradient unfolded along ``axis`` times its transpose."""
    others = [a for a in range(x.ndim) if a != axis]
    return jnp.tensordot(x, x, axes=(others, others))


def _accumulate(factors, x, beta_s):
    r"""``L_i ← β_s L_i + (1−β_s) G_(i) G_(i)ᵀ`` for every axis with a factor."""
    return tuple(None if f is None else beta_s * f + (1 - beta_s) * _gram(x, axis)
                 for axis, f in enumerate(factors))


def _descending_eigenbasis(factor):
    r"""``Q`` with ``L = Q diag(λ) Qᵀ``, ``λ`` descending."""
    return jnp.linalg.eigh(factor)[1][:, ::-1]


def _build(leaf, x, beta_s):
    r"""First call: ``L_i = (1−β_s) G_(i) G_(i)ᵀ``, ``Q_i = eigh(L_i)``; no update."""
    factors = _accumulate(leaf.factors, x, beta_s)
    bases = tuple(None if f is None else _descending_eigenbasis(f) for f in factors)
    return jnp.zeros_like(x), SoapLeaf(leaf.mu, leaf.nu, factors, bases)


def _adam_in_eigenbasis(leaf, x, n, b1, b2, eps):
    r"""Adam on ``Ḡ = G ×_i Q_iᵀ``: ``m̄ ← β1 m̄ + (1−β1) Ḡ``, ``v ← β2 v + (1−β2) Ḡ²``,
    ``u = √(1−β2ⁿ)/(1−β1ⁿ) · (m̄/(√v+ε)) ×_i Q_i``."""
    g_bar = _rotate(x, leaf.bases, back=False)
    mu = b1 * leaf.mu.reshape(x.shape) + (1 - b1) * g_bar
    nu = b2 * leaf.nu + (1 - b2) * jnp.square(g_bar)
    scale = (jnp.sqrt(1 - b2**n) / (1 - b1**n)).astype(x.dtype)
    return scale * _rotate(mu / (jnp.sqrt(nu) + eps), leaf.bases, back=True), mu, nu


def _refresh(factors, bases, mu, nu):
    r"""One power iteration per basis: order ``Q_i``'s columns by ``diag(Q_iᵀ L_i Q_i)``
    (descending; ``v`` permuted alike), ``Q_i' = qr(L_i Q_i)``; the momentum moves to the
    new basis, ``m̄ ← m̄ ×_i (Q_i'ᵀ Q_i)``."""
    new_bases = []
    for axis, (f, q) in enumerate(zip(factors, bases)):
        if q is None:
            new_bases.append(None)
            continue
        order = jnp.argsort(-jnp.einsum("ij,ik,kj->j", q, f, q))
        nu = jnp.take(nu, order, axis=axis)
        new_q = jnp.linalg.qr(f @ q[:, order])[0]
        mu = jnp.moveaxis(jnp.tensordot(mu, new_q.T @ q, axes=([axis], [1])), -1, axis)
        new_bases.append(new_q)
    return tuple(new_bases), mu, nu


def scale_by_soap(b1: float = 0.95, b2: float = 0.95, eps: float = 1e-8,
                  shampoo_beta: float | None = None, precondition_frequency: int = 10,
                  max_precond_dim: int = 10000, merge_dims: bool = False,
                  precondition_1d: bool = False) -> optax.GradientTransformation:
    r"""SOAP's direction: Adam run in the rotating eigenbasis of Shampoo's factors.

    A leaf is viewed in its merged shape (:func:`merged_shape` when ``merge_dims``);
    each axis of length ≤ ``max_precond_dim`` of a tensor of rank ≥ 2 (and a
    vector's axis when ``precondition_1d``) has a factor ``L_i`` and an orthogonal
    basis ``Q_i``; other axes keep the identity (one-sided SOAP, or plain Adam).
    With ``X̄ = X ×_i Q_iᵀ`` (into the basis):

    .. math::
        \text{call }0:\quad L_i = (1-\beta_s)\,G_{(i)}G_{(i)}^\top,\quad
            Q_i = \mathrm{eigh}(L_i)\ \text{(descending)},\quad u = 0;\\
        \text{step }n\ge1:\quad \bar m_n = \beta_1 \bar m_{n-1} + (1-\beta_1)\bar G,\quad
            v_n = \beta_2 v_{n-1} + (1-\beta_2)\bar G^2,\\
        u_n = \frac{\sqrt{1-\beta_2^n}}{1-\beta_1^n}
            \Big(\frac{\bar m_n}{\sqrt{v_n}+\epsilon}\Big)\times_i Q_i,\qquad
            L_i \leftarrow \beta_s L_i + (1-\beta_s)G_{(i)}G_{(i)}^\top,

    and after every ``precondition_frequency``-th step one power iteration with QR:
    ``Q_i`` is reordered by ``diag(Q_iᵀL_iQ_i)`` (descending, ``v`` permuted alike),
    ``Q_i' = qr(L_iQ_i)``, and the momentum is carried over, ``m̄ ← m̄ ×_i Q_i'ᵀQ_i``.
    ``β_s`` is ``shampoo_beta`` (``None``: β2). Momentum and second moment both live
    in the eigenbasis, so ``|m̄|/√v`` keeps Adam's bound even where a factor is
    rank-deficient. Moments are float32 (float64 for float64 parameters).

    Args:
      b1: decay β1 of the momentum.
      b2: decay β2 of the second moment.
      eps: added to the root second moment.
      shampoo_beta: decay of the Shampoo factors (``None``: ``b2``).
      precondition_frequency: steps between eigenbasis refreshes.
      max_precond_dim: axes longer than this keep the identity basis.
      merge_dims: merge axes while their product is ≤ ``max_precond_dim``.
      precondition_1d: give vectors a factor and a basis too (else plain Adam).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleBySoapState`.

    >>> import jax, jax.numpy as jnp
    >>> tx = scale_by_soap()
    >>> g = {"w": jax.random.normal(jax.random.PRNGKey(0), (4, 3)), "b": jnp.ones(2)}
    >>> u, s = tx.update(g, tx.init(g))
    >>> float(jnp.abs(u["w"]).max()), [q.shape for q in s.leaves["w"].bases]
    (0.0, [(4, 4), (3, 3)])
    """
    beta_s = b2 if shampoo_beta is None else shampoo_beta
    if precondition_frequency < 1:
        raise ValueError(f"precondition_frequency must be >= 1, got {precondition_frequency}")

    def init(params):
        leaf = lambda _, p: _init_leaf(p, max_precond_dim, merge_dims, precondition_1d)
        return ScaleBySoapState(jnp.zeros([], jnp.int32), init_leaves(leaf, params))

    def update(updates, state, params=None):
        del params
        t = state.count

        def leaf(_, g, s):
            x = g.astype(s.nu.dtype).reshape(s.nu.shape)

            def step(s):
                u, mu, nu = _adam_in_eigenbasis(s, x, t, b1, b2, eps)
                factors = _accumulate(s.factors, x, beta_s)
                bases, mu, nu = jax.lax.cond(t % precondition_frequency == 0,
                                             lambda: _refresh(factors, s.bases, mu, nu),
                                             lambda: (s.bases, mu, nu))
                return u, SoapLeaf(mu.reshape(s.mu.shape), nu, factors, bases)

            u, new = jax.lax.cond(t == 0, lambda s: _build(s, x, beta_s), step, s)
            return u.reshape(g.shape).astype(g.dtype), new

        out, leaves = map_leaves(leaf, updates, state.leaves)
        return out, ScaleBySoapState(optax.safe_increment(t), leaves)

    return optax.GradientTransformation(init, update)


def decay_after_step(learning_rate, weight_decay, mask=None) -> optax.GradientTransformation:
    r"""Decoupled weight decay of the parameters *after* the step, none on the first call.

    .. math::
        \theta' = (\theta + u)(1 - \eta_t\lambda_t)
        \iff u' = u - \eta_t\lambda_t(\theta + u)

    ``η`` and ``λ`` are floats or schedules of the call count; the first call (SOAP's
    basis-building call) passes ``u`` through.

    Args:
      learning_rate: η, a float or an Optax schedule.
      weight_decay: λ, a float or an Optax schedule.
      mask: pytree or callable ``params -> bool pytree``: where to decay.

    Returns:
      An ``optax.GradientTransformation`` that needs ``params``.

    >>> import jax.numpy as jnp
    >>> tx = decay_after_step(0.1, 0.5)
    >>> s = tx.init(jnp.ones(1))
    >>> u, s = tx.update(-jnp.ones(1), s, jnp.ones(1))
    >>> u, tx.update(-jnp.ones(1), s, 2 * jnp.ones(1))[0]
    (Array([-1.], dtype=float32), Array([-1.05], dtype=float32))
    """
    value = lambda v, n: v(n) if callable(v) else v

    def init(params):
        del params
        return DecayAfterStepState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("soap's weight decay needs params: call update(updates, state, params)")
        n = state.count
        rate = jnp.where(n == 0, 0.0, value(learning_rate, n) * value(weight_decay, n))
        decay = lambda u, p: None if u is None else (u - rate * (p + u)).astype(u.dtype)
        out = jax.tree.map(decay, updates, params, is_leaf=lambda x: x is None)
        return out, DecayAfterStepState(optax.safe_increment(n))

    tx = optax.GradientTransformation(init, update)
    return tx if mask is None else optax.masked(tx, mask)


def soap(learning_rate: optax.ScalarOrSchedule, b1: float = 0.95, b2: float = 0.95,
         eps: float = 1e-8, weight_decay: optax.ScalarOrSchedule = 0.01, weight_decay_mask=None,
         shampoo_beta: float | None = None, precondition_frequency: int = 10,
         max_precond_dim: int = 10000, merge_dims: bool = False,
         precondition_1d: bool = False) -> optax.GradientTransformation:
    r"""SOAP (ShampoO with Adam in the Preconditioner's eigenbasis).

    Adam run in the eigenbasis of Shampoo's Kronecker factors (see
    :func:`scale_by_soap`), refreshed by one power iteration every
    ``precondition_frequency`` steps, then decoupled weight decay of the stepped
    parameters:

    .. math::
        \theta_{n} = \big(\theta_{n-1} - \eta_n\, d_n\big)\,(1 - \eta_n \lambda),

    with ``d_n`` the direction of :func:`scale_by_soap`. As in the authors' code the
    first call only builds the bases (no step, no decay) for every leaf, the momentum
    is kept in the eigenbasis and carried over at each refresh, and ``merge_dims`` is
    off by default. Steps with non-finite gradients are skipped.

    Args:
      learning_rate: step size η, a float or an Optax schedule.
      b1: decay β1 of the momentum.
      b2: decay β2 of the second moment.
      eps: added to the root second moment.
      weight_decay: decoupled weight decay λ (float or schedule).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.
      shampoo_beta: decay of the Shampoo factors (``None``: ``b2``).
      precondition_frequency: steps between eigenbasis refreshes.
      max_precond_dim: axes longer than this keep the identity basis.
      merge_dims: merge axes while their product is ≤ ``max_precond_dim``.
      precondition_1d: give vectors a factor and a basis too (else plain Adam).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, 2024.

    >>> import jax, jax.numpy as jnp, optax, rollfast
    >>> x = jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [3.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    >>> y = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    >>> loss = lambda p: 0.5 * jnp.sum((x @ p["w"] + p["b"] - y) ** 2)
    >>> opt = rollfast.get("soap", learning_rate=0.1)
    >>> p = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> s = opt.init(p)
    >>> @jax.jit
    ... def step(p, s):
    ...     u, s = opt.update(jax.grad(loss)(p), s, p)
    ...     return optax.apply_updates(p, u), s
    >>> for i in range(61):
    ...     p, s = step(p, s)
    ...     if i % 20 == 0:
    ...         print(i, round(float(loss(p)), 4))
    0 4.0
    20 1.4046
    40 1.1059
    60 1.0439
    """
    direction = scale_by_soap(b1=b1, b2=b2, eps=eps, shampoo_beta=shampoo_beta,
                              precondition_frequency=precondition_frequency,
                              max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                              precondition_1d=precondition_1d)
    return skip_nonfinite(optax.chain(direction, optax.scale_by_learning_rate(learning_rate),
                                      decay_after_step(learning_rate, weight_decay, weight_decay_mask)))
