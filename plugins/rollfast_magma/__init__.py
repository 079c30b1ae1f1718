r"""Magma: momentum-aligned random block masking of a whole optimizer's update.

Joo, Xia, Kim, Zhang, Ie, "On Surprising Effectiveness of Masking Updates in
Adaptive Optimizers" (arXiv:2602.15322).

Every leaf is one block. Each step, per leaf, the raw gradient :math:`g` is scored
against a first moment :math:`m`, the score is smoothed, and the block survives
with probability :math:`p`:

.. math::
    \cos = \operatorname{clip}\Big(\frac{\langle g, m\rangle}
           {\max(\lVert g\rVert\lVert m\rVert, 10^{-12})}, -1, 1\Big),\quad
    s_t = 0.9\,s_{t-1} + 0.1\,\sigma(\cos/\tau),\quad
    b \sim \mathrm{Bernoulli}(p),\quad \Delta' = b\,s_t\,\Delta

with :math:`s_0 = 0.5`, so the expected update is scaled by about :math:`p/2`
(0.25 with the defaults; multiply the learning rate by ≈4 to compensate).

Which first moment: a family that registers ``first_moment`` (``adam``,
``adamw``, ``kron`` with momentum, ``prism``, the contrib families, and Optax
catalogue optimizers whose state starts with a ``mu``) hands its momentum of this
step to the mask through ``rollfast.get``; for a family that keeps none visible
(e.g. ``optax:sgd``, or ``kron`` with ``b1=0``), Magma keeps its own EMA :math:`m_t = 0.9\,m_{t-1} + 0.1\,g_t`
(float32, one copy of the parameters; no bias correction, which the cosine does
not see). The family's update already contains its weight decay and the factor
:math:`-\eta`; as the mask is one scalar per leaf, masking after the learning
rate equals masking before it, and the decay is masked too (as rollfast 0.2.1 does
when Magma is on).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import rollfast
from rollfast.constraints import Positive, Probability, Seed
from rollfast.toolbox import absent, as_key, is_float, keep_if, sum_of_squares

EMA_DECAY = 0.9
SCORE_DECAY = 0.9
KEY_TAG = 0x4D61  # folded into the user's key, so Magma's stream differs from the family's


@rollfast.hookimpl
def mask(register):
    register("magma", magma,
             references=("Joo et al., On Surprising Effectiveness of Masking Updates in "
                         "Adaptive Optimizers, arXiv:2602.15322",))


class MagmaState(NamedTuple):
    """Wrapped state, per-leaf scores ``s``, own gradient EMA (``()`` if the family's
    first moment is used) and the mask's PRNG key."""

    inner_state: object
    score: object
    ema: object
    key: object


def magma(inner, *, first_moment=None, magma_p: Probability = 0.5, magma_tau: Positive = 2.0,
          key: Seed = 42, axis_name=None):
    r"""Drop each leaf's update with probability 1 − p and damp the survivors by their score.

    Per leaf, with :math:`g` the raw gradient, :math:`m` the family's first moment
    of this step (or Magma's own EMA of :math:`g` when the family keeps none) and
    :math:`\Delta` the wrapped optimizer's update:

    .. math::
        \cos_t = \operatorname{clip}\Big(\frac{\langle g_t, m_t\rangle}
                 {\max(\lVert g_t\rVert\lVert m_t\rVert, 10^{-12})}, -1, 1\Big),\qquad
        s_t = 0.9\,s_{t-1} + 0.1\,\sigma(\cos_t/\tau),\quad s_0 = 0.5,\\
        b_t \sim \mathrm{Bernoulli}(p),\qquad \Delta'_t = b_t\,s_t\,\Delta_t

    one :math:`b_t` and one :math:`s_t` per leaf. The expected update is scaled by
    about :math:`p/2` (0.25 with the defaults: multiply the learning rate by about
    4). A step with a non-finite gradient never reaches this mask (the core's policy
    skips it, see ``rollfast.get``); with ``nonfinite="propagate"`` it gives a zero
    update and leaves Magma's own state (scores, EMA) unchanged.

    Args:
      inner: the optimizer to wrap (given by ``rollfast.get``).
      first_moment: ``state -> first moment`` of the wrapped family, or ``None``
        (given by ``rollfast.get`` from the family's registration).
      magma_p: probability that a leaf's update is kept.
      magma_tau: temperature of the sigmoid score (> 0).
      key: int seed or PRNG key of the masks (same key, same masks).
      axis_name: pmap/shard_map axis: sums are reduced over it and every device
        draws the same masks.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`MagmaState` holding the wrapped state in ``inner_state``.

    Raises:
      ValueError: ``magma_p`` outside [0, 1] or ``magma_tau`` not positive.

    References:
      Joo, Xia, Kim, Zhang & Ie, *On Surprising Effectiveness of Masking Updates in
      Adaptive Optimizers*, 2026, https://arxiv.org/abs/2602.15322

    >>> import jax.numpy as jnp, rollfast, rollfast.testing
    >>> target = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -1.0])}
    >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)   # min 0
    >>> opt = rollfast.get("adamw", learning_rate=0.4, mask="magma", key=0)
    >>> _, _, losses = rollfast.testing.run(opt, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, loss, steps=41)
    >>> [round(x, 4) for x in losses[::10]]   # the loss every 10 steps
    [15.5, 9.5542, 2.5167, 0.3409, 0.2807]

    With ``magma_p=1`` nothing is dropped and the first step shows the damping
    alone: :math:`\cos = 1`, so :math:`s_1 = 0.9\cdot 0.5 + 0.1\,\sigma(1/2)`.

    >>> opt = rollfast.get("adamw", learning_rate=1.0, weight_decay=0.0, mask="magma", magma_p=1.0)
    >>> p = {"w": jnp.ones(2)}
    >>> u = opt.update({"w": jnp.array([1.0, -1.0])}, opt.init(p), p)[0]["w"]
    >>> [round(float(x), 4) for x in u]
    [-0.5122, 0.5122]
    """

    return _masked(inner, first_moment=first_moment, magma_p=magma_p, magma_tau=magma_tau, key=key,
                   axis_name=axis_name)


def _masked(inner, *, first_moment, magma_p, magma_tau, key, axis_name):
    """The transformation that :func:`magma` documents, its options checked."""

    def family_moment(inner_state):
        return first_moment(inner_state) if first_moment is not None else None

    def init(params):
        per_leaf = lambda fill: jax.tree.map(lambda p: fill(p) if is_float(p) else None, params,
                                             is_leaf=absent)
        inner_state = inner.init(params)
        score = per_leaf(lambda p: jnp.asarray(0.5, jnp.float32))
        ema = (() if family_moment(inner_state) is not None
               else per_leaf(lambda p: jnp.zeros(jnp.shape(p), jnp.float32)))
        return MagmaState(inner_state, score, ema, jax.random.fold_in(as_key(key), KEY_TAG))

    def update(grads, state, params=None, **extra):
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra)
        flat_u, treedef = jax.tree.flatten(updates, is_leaf=absent)
        flat_g = treedef.flatten_up_to(grads)
        moment = family_moment(inner_state)
        if moment is not None:
            ema = ()
            flat_m = treedef.flatten_up_to(moment)
        else:
            flat_m = [m if m is None else EMA_DECAY * m + (1 - EMA_DECAY) * g.astype(jnp.float32)
                      for m, g in zip(treedef.flatten_up_to(state.ema), flat_g)]
            ema = treedef.unflatten(flat_m)
        key_next, k_mask = jax.random.split(state.key)
        if axis_name is not None:
            k_mask = jax.lax.pmin(k_mask, axis_name)
        keeps = jax.random.uniform(k_mask, (len(flat_u),)) < magma_p  # b, one per leaf position
        sums = [_sums(g, m, axis_name) if is_float(u) and not absent(m) else None
                for u, g, m in zip(flat_u, flat_g, flat_m)]
        ok = jnp.all(jnp.asarray([jnp.isfinite(t[1]) for t in sums if t is not None]))
        out, scores = [], []
        for u, s, keep, leaf_sums in zip(flat_u, treedef.flatten_up_to(state.score), keeps, sums):
            if leaf_sums is None:
                out.append(u)
                scores.append(s)
                continue
            dot, g2, m2 = leaf_sums
            cos = dot / jnp.maximum(jnp.sqrt(g2) * jnp.sqrt(m2), 1e-12)
            cos = jnp.clip(jnp.nan_to_num(cos, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)
            new_s = SCORE_DECAY * s + (1 - SCORE_DECAY) * jax.nn.sigmoid(cos / magma_tau)
            keep = keep & ok
            out.append(jnp.where(keep, u * new_s.astype(u.dtype), jnp.zeros_like(u)))
            scores.append(jnp.where(ok, new_s, s))
        ema = keep_if(ok, ema, state.ema)
        return treedef.unflatten(out), MagmaState(inner_state, treedef.unflatten(scores), ema, key_next)

    return optax.GradientTransformationExtraArgs(init, update)


def _sums(g, m, axis_name=None):
    """``[Σ g·m, Σ g², Σ m²]`` in float32 (summed over ``axis_name``)."""

    g, m = g.astype(jnp.float32), m.astype(jnp.float32)
    sums = jnp.stack([jnp.vdot(g, m), sum_of_squares(g), sum_of_squares(m)])
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)
