"""APOLLO: SGD-like memory, AdamW-like steps — channel-wise gradient scaling
estimated from AdamW moments kept in a random low-rank projection (Zhu et al.,
2024, arXiv:2412.05270), with AdamW for leaves that are not matrices."""

from __future__ import annotations

import math
from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rollfast.constraints import (POSITIVE, POSITIVE_INT, Beta, Choice, LearningRate, NonNegative,
                                  Nullable, PositiveInt, Seed, WeightDecay)
from rollfast.toolbox import as_key
from rollfast_contrib._tools import (
    adam_direction,
    adam_moments,
    decoupled,
    init_leaves,
    map_leaves,
    matrix_shape,
)

REFERENCES = ("Zhu et al., APOLLO: SGD-like Memory, AdamW-level Performance, arXiv:2412.05270",)
VARIANTS = ("apollo", "mini")


class ApolloLeaf(NamedTuple):
    """One leaf's Adam moments (of the projected gradient for a matrix leaf) and the
    norm of its previous scaled gradient (for the norm-growth limiter)."""

    mu: object
    nu: object
    prev_norm: object


class ScaleByApolloState(NamedTuple):
    """Step count, the per-leaf :class:`ApolloLeaf` and the projections' PRNG key."""

    count: object
    leaves: object
    key: object


def projection(key, leaf: int, period: int, rank: int, dim: int):
    r"""The random projection ``P ∈ R^{rank×dim}``, entries ``N(0, 1/rank)``, of leaf
    number ``leaf`` during refresh period ``period`` (steps ``period·T … period·T+T−1``).

    It is regenerated from ``fold_in(fold_in(key, leaf), period)`` whenever needed, so
    the state holds only the seed. ``E[PᵀP] = I``.

    Args:
      key: the optimizer's PRNG key.
      leaf: the leaf's index in the flattened parameter tree.
      period: ``step // update_proj_gap`` (0-based step).
      rank: rows of ``P``.
      dim: columns of ``P`` (the projected side of the leaf's matrix).

    >>> import jax
    >>> p = projection(jax.random.PRNGKey(0), 0, 0, 2, 5)
    >>> p.shape, p.dtype.name
    ((2, 5), 'float32')
    """
    k = jax.random.fold_in(jax.random.fold_in(key, leaf), period)
    return jax.random.normal(k, (rank, dim), jnp.float32) / math.sqrt(rank)


def scale_by_apollo(rank=None, variant="apollo", scale=None, update_proj_gap=200, b1=0.9,
                    b2=0.999, eps=1e-8, norm_growth_limit=1.01, key=0):
    r"""APOLLO's direction: the raw gradient scaled channel-wise by the ratio that
    AdamW's moments produce in a random low-rank space.

    A leaf of rank ≥ 2 is viewed as ``G ∈ R^{m×n}`` (leading axes merged). The smaller
    side is projected with :func:`projection` ``P`` (``r = min(rank, m, n)``), fresh
    every ``T = update_proj_gap`` steps; channels are the other side's rows/columns:

    .. math::
        R_t = PG_t\ (m\le n)\ \text{or}\ G_tP^\top,\quad
        M_t, V_t = \text{Adam moments of } R_t,\quad
        \tilde R_t = \frac{M_t/(1-\beta_1^t)}{\sqrt{V_t/(1-\beta_2^t)}+\epsilon},\\
        s_j = \frac{\lVert \tilde R_{t,:j}\rVert}{\lVert R_{t,:j}\rVert + 10^{-8}}\ \text{(per channel)},\quad
        \tilde G_t = G_t\,\mathrm{diag}(s),\\
        \tilde G_t \leftarrow \tilde G_t\cdot\min\!\Big(1, \frac{\gamma\,\lVert\tilde G_{t-1}\rVert}{\lVert\tilde G_t\rVert}\Big)\ (\tilde G_{t-1}\ne0),\qquad
        u_t = \alpha\,\tilde G_t

    with the norm-growth limit γ (not applied after a zero step, which would pin every
    later step to zero), and α = ``scale``. ``variant="mini"`` (APOLLO-Mini):
    rank 1, one tensor-wise factor ``s = ‖R̃‖/‖R‖``, α = √128. Moments are kept across
    projection refreshes. Leaves of rank < 2 take Adam's direction (no limiter).

    Args:
      rank: projection rank (``None``: 256 for APOLLO, 1 for APOLLO-Mini; capped by the
        matrix's smaller side).
      variant: ``"apollo"`` (channel-wise scaling) or ``"mini"`` (tensor-wise, rank 1).
      scale: the factor α (``None``: 1 for APOLLO, √128 for APOLLO-Mini).
      update_proj_gap: steps T between projection refreshes.
      b1: decay β1 of the projected first moment.
      b2: decay β2 of the projected second moment.
      eps: added to the denominator of the projected Adam direction.
      norm_growth_limit: γ, the largest allowed growth of the scaled gradient's norm
        from one step to the next (``None``: no limiter).
      key: seed or PRNG key of the random projections.

    >>> import jax, jax.numpy as jnp
    >>> tx = scale_by_apollo(rank=2)
    >>> g = {"w": jax.random.normal(jax.random.PRNGKey(0), (4, 6))}
    >>> u, s = tx.update(g, tx.init(g))
    >>> s.leaves["w"].mu.shape, u["w"].shape
    ((2, 6), (4, 6))
    """
    if variant not in VARIANTS:
        raise ValueError(f"APOLLO variant must be one of {VARIANTS}, got {variant!r}")
    mini = variant == "mini"
    rank = (1 if mini else 256) if rank is None else rank
    alpha = (math.sqrt(128) if mini else 1.0) if scale is None else scale
    if rank < 1 or update_proj_gap < 1:
        raise ValueError(f"APOLLO needs rank >= 1 and update_proj_gap >= 1, got {rank}, {update_proj_gap}")

    def init(params):
        leaves = init_leaves(lambda _, p: _zero_leaf(jnp.shape(p), rank), params)
        return ScaleByApolloState(jnp.zeros([], jnp.int32), leaves, as_key(key))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        period = state.count // update_proj_gap

        def leaf(i, g, s):
            if g.ndim < 2:
                mu, nu = adam_moments(g, s.mu, s.nu, b1, b2)
                u = adam_direction(mu, nu, count, b1, b2, eps)
                return u.astype(g.dtype), ApolloLeaf(mu, nu, s.prev_norm)
            (m, n), r, _ = _layout(g.shape, rank)
            p = projection(state.key, i, period, r, m if m <= n else n)
            return _matrix_step(g, s, p, shape=(m, n), count=count, mini=mini, alpha=alpha, b1=b1, b2=b2,
                                eps=eps, norm_growth_limit=norm_growth_limit)

        out, leaves = map_leaves(leaf, updates, state.leaves)
        return out, ScaleByApolloState(count, leaves, state.key)

    return optax.GradientTransformation(init, update)


def _layout(shape, rank):
    """``((m, n), r, moment shape)`` of a matrix leaf: its matrix view, the projection
    rank ``r = min(rank, m, n)`` and the shape of the projected moments."""
    m, n = matrix_shape(shape)
    r = min(rank, m, n)
    return (m, n), r, ((r, n) if m <= n else (m, r))


def _zero_leaf(shape, rank) -> ApolloLeaf:
    """Zero moments (projected for a matrix leaf, full for a vector or scalar) and norm."""
    moments = _layout(shape, rank)[2] if len(shape) >= 2 else shape
    return ApolloLeaf(jnp.zeros(moments, jnp.float32), jnp.zeros(moments, jnp.float32), jnp.zeros([], jnp.float32))


def _matrix_step(g, s, p, *, shape, count, mini, alpha, b1, b2, eps, norm_growth_limit):
    r"""One matrix leaf: :math:`R_t = PG_t` (or :math:`G_tP^\top`), Adam's direction
    :math:`\tilde R_t` of its moments, the scaled gradient :math:`\tilde G_t = G_t\,\mathrm{diag}(s)`
    under the norm-growth limit, and :math:`u_t = \alpha\tilde G_t`."""
    m, n = shape
    mat = g.astype(jnp.float32).reshape(m, n)
    wide = m <= n
    low = p @ mat if wide else mat @ p.T
    mu, nu = adam_moments(low, s.mu, s.nu, b1, b2)
    low_adam = adam_direction(mu, nu, count, b1, b2, eps)
    if mini:
        factor = jnp.linalg.norm(low_adam) / (jnp.linalg.norm(low) + 1e-8)
    else:
        axis = 0 if wide else 1
        factor = (jnp.linalg.norm(low_adam, axis=axis, keepdims=True)
                  / (jnp.linalg.norm(low, axis=axis, keepdims=True) + 1e-8))
    scaled = mat * factor
    norm = jnp.linalg.norm(scaled)
    if norm_growth_limit is not None:
        cap = norm_growth_limit * s.prev_norm
        shrink = jnp.where((s.prev_norm > 0) & (norm > cap), cap / jnp.maximum(norm, 1e-30), 1.0)
        scaled, norm = scaled * shrink, norm * shrink
    return (alpha * scaled).reshape(g.shape).astype(g.dtype), ApolloLeaf(mu, nu, norm)


def apollo(learning_rate: LearningRate, rank: Annotated[int, Nullable(POSITIVE_INT)] = None,
           variant: Annotated[str, Choice(*VARIANTS)] = "apollo",
           scale: Annotated[float, Nullable(POSITIVE)] = None, update_proj_gap: PositiveInt = 200,
           b1: Beta = 0.9, b2: Beta = 0.999, eps: NonNegative = 1e-8,
           norm_growth_limit: Annotated[float, Nullable(POSITIVE)] = 1.01,
           weight_decay: WeightDecay = 0.0, weight_decay_mask=None, key: Seed = 0):
    r"""APOLLO: ``-lr·(APOLLO direction + λθ)``; AdamW on leaves of rank < 2.

    The raw gradient of a matrix leaf :math:`G\in\mathbb R^{m\times n}` is scaled
    channel by channel by the ratio that AdamW's moments produce in a random
    rank-:math:`r` projection of it (see :func:`scale_by_apollo` for the
    orientation and :func:`projection` for :math:`P`):

    .. math::
        R_t = P_t G_t,\qquad M_t, V_t = \text{Adam moments of } R_t,\qquad
        \tilde R_t = \frac{M_t/(1-\beta_1^t)}{\sqrt{V_t/(1-\beta_2^t)}+\epsilon},\\
        s_j = \frac{\lVert \tilde R_{t,:j}\rVert}{\lVert R_{t,:j}\rVert + 10^{-8}},\qquad
        \tilde G_t = G_t\,\operatorname{diag}(s)\cdot\min\Big(1,
        \frac{\gamma\lVert\tilde G_{t-1}\rVert}{\lVert G_t\operatorname{diag}(s)\rVert}\Big),\\
        u_t = -\eta_t\big(\alpha\,\tilde G_t + \lambda\theta_{t-1}\big)

    :math:`P_t` (entries :math:`N(0, 1/r)`) is redrawn every ``update_proj_gap``
    steps from the key and never stored; the limiter γ is skipped after a zero
    step. ``variant="mini"`` (APOLLO-Mini) uses rank 1, one tensor-wise factor
    :math:`s = \lVert\tilde R_t\rVert/\lVert R_t\rVert` and α = √128. Defaults are
    the paper's (rank 256, T = 200, γ = 1.01, α = 1). State of an ``m×n`` matrix:
    ``2·r·max(m, n)`` floats. Leaves of rank < 2 take AdamW's step. Steps with
    non-finite gradients are skipped.

    Args:
      learning_rate: step size, a float or an Optax schedule.
      rank: projection rank (``None``: 256 for APOLLO, 1 for APOLLO-Mini; capped by the
        matrix's smaller side).
      variant: ``"apollo"`` (channel-wise scaling) or ``"mini"`` (tensor-wise, rank 1).
      scale: the factor α (``None``: 1 for APOLLO, √128 for APOLLO-Mini).
      update_proj_gap: steps T between projection refreshes.
      b1: decay β1 of the projected first moment.
      b2: decay β2 of the projected second moment.
      eps: added to the denominator of the projected Adam direction.
      norm_growth_limit: γ, the largest allowed growth of the scaled gradient's norm
        from one step to the next (``None``: no limiter).
      weight_decay: decoupled weight decay λ (float or schedule).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.
      key: seed or PRNG key of the random projections.

    Returns:
      An ``optax.GradientTransformation`` (:func:`scale_by_apollo`, decoupled weight
      decay and the learning rate) that returns zero updates and keeps its state on
      a step whose gradients are not all finite. ``update`` needs ``params``.

    References:
      Zhu et al., *APOLLO: SGD-like Memory, AdamW-level Performance*, MLSys 2025,
      https://arxiv.org/abs/2412.05270

    >>> import jax.numpy as jnp, rollfast, rollfast.testing
    >>> target = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -1.0])}
    >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)   # min 0
    >>> opt = rollfast.get("apollo", learning_rate=0.05)
    >>> _, _, losses = rollfast.testing.run(opt, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, loss, steps=41)
    >>> [round(x, 4) for x in losses[::10]]   # the loss every 10 steps
    [15.5, 6.2724, 1.8382, 0.264, 0.0163]
    """
    return decoupled(scale_by_apollo(rank, variant, scale, update_proj_gap, b1, b2, eps,
                                     norm_growth_limit, key),
                     learning_rate, weight_decay, weight_decay_mask)
