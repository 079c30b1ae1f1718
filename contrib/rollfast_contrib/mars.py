"""MARS: variance-reduced gradient correction (Yuan et al., 2024, arXiv:2411.10438),
in its AdamW and Lion instances, with the approximate correction that reuses the
previous step's gradient."""

from __future__ import annotations

from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rollfast.constraints import POSITIVE, Beta, Choice, LearningRate, NonNegative, Nullable, WeightDecay
from rollfast_contrib._tools import adam_direction, adam_moments, decoupled

REFERENCES = ("Yuan et al., MARS: Unleashing the Power of Variance Reduction for Training "
              "Large Models, arXiv:2411.10438",)
VARIANTS = ("adamw", "lion")


class ScaleByMarsState(NamedTuple):
    """Step count, momentum, second moment (``()`` for Lion) and the previous gradient."""

    count: object
    mu: object
    nu: object
    prev_grad: object


def first_moment(state):
    """The momentum of a ``mars`` state."""
    return state[0].mu


def scale_by_mars(b1=0.95, b2=0.99, eps=1e-8, gamma=0.025, max_grad_norm=1.0, variant="adamw"):
    r"""MARS's direction: a variance-reduced gradient fed to AdamW or Lion.

    .. math::
        c_t = g_t + \gamma\,\frac{\beta_1}{1-\beta_1}\,(g_t - g_{t-1}),\qquad
        \tilde c_t = c_t \cdot \min\!\big(1, \tfrac{\kappa}{\lVert c_t\rVert_2}\big),\\
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde c_t,\\
        \text{adamw: } v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde c_t^2,\;
        u_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon};\qquad
        \text{lion: } u_t = \operatorname{sign}(m_t)

    with κ = ``max_grad_norm`` and the norm taken per leaf. At ``t = 1`` there is no
    previous gradient: ``g_0 = g_1`` (the paper's ``x_0 = x_1``), so ``c_1 = g_1``.
    ``γ = 0`` without clipping is AdamW (Lion with one β, ``β1 = β2``).

    Args:
      b1: decay β1 of the momentum (also sets the correction's weight β1/(1−β1)).
      b2: decay β2 of the second moment (AdamW variant).
      eps: added to the denominator (AdamW variant).
      gamma: strength γ of the gradient correction.
      max_grad_norm: per-leaf L2 norm κ above which the corrected gradient is
        rescaled to norm κ (``None``: no clipping).
      variant: ``"adamw"`` or ``"lion"``.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByMarsState`.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_mars()
    >>> u, _ = tx.update(jnp.array([0.3, -0.4]), tx.init(jnp.zeros(2)))
    >>> u.round(4)
    Array([ 1., -1.], dtype=float32)
    """
    if variant not in VARIANTS:
        raise ValueError(f"MARS variant must be one of {VARIANTS}, got {variant!r}")
    lion = variant == "lion"
    weight = gamma * b1 / (1 - b1)

    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
        return ScaleByMarsState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                                () if lion else jax.tree.map(zeros, params),
                                jax.tree.map(zeros, params))

    def corrected(g, prev, first):
        g = g.astype(jnp.float32)
        c = g + weight * (g - jnp.where(first, g, prev))
        if max_grad_norm is None:
            return c
        norm = jnp.linalg.norm(c.ravel())
        return jnp.where(norm > max_grad_norm, c * (max_grad_norm / jnp.where(norm > 0, norm, 1)), c)

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        c = jax.tree.map(lambda g, p: corrected(g, p, state.count == 0), updates, state.prev_grad)
        prev = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        if lion:
            mu = jax.tree.map(lambda c, m: (1 - b1) * c + b1 * m, c, state.mu)
            out = jax.tree.map(lambda m, g: jnp.sign(m).astype(g.dtype), mu, updates)
            return out, ScaleByMarsState(count, mu, (), prev)
        mu, nu = adam_moments(c, state.mu, state.nu, b1, b2)
        out = jax.tree.map(lambda m, v, g: adam_direction(m, v, count, b1, b2, eps).astype(g.dtype),
                           mu, nu, updates)
        return out, ScaleByMarsState(count, mu, nu, prev)

    return optax.GradientTransformation(init, update)


def mars(learning_rate: LearningRate, b1: Beta = 0.95, b2: Beta = 0.99, eps: NonNegative = 1e-8,
         gamma: NonNegative = 0.025, max_grad_norm: Annotated[float, Nullable(POSITIVE)] = 1.0,
         variant: Annotated[str, Choice(*VARIANTS)] = "adamw", weight_decay: WeightDecay = 0.0,
         weight_decay_mask=None):
    r"""MARS: ``-lr·(AdamW or Lion direction of the corrected gradient + λ·θ)``.

    The gradient is corrected by a scaled difference of consecutive gradients (the
    approximate variance reduction that reuses the previous step's gradient instead
    of a second gradient evaluation), clipped per leaf, and fed to AdamW or Lion:

    .. math::
        c_t = g_t + \gamma\,\frac{\beta_1}{1-\beta_1}\,(g_t - g_{t-1}),\qquad
        \tilde c_t = c_t\,\min\!\Big(1, \frac{\kappa}{\lVert c_t\rVert_2}\Big),\qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\tilde c_t,\\
        \text{adamw: } v_t = \beta_2 v_{t-1} + (1-\beta_2)\,\tilde c_t^2,\quad
        u_t = -\eta_t\Big(\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}
              + \lambda\theta_{t-1}\Big),\\
        \text{lion: } u_t = -\eta_t\big(\operatorname{sign}(m_t) + \lambda\theta_{t-1}\big)

    with κ = ``max_grad_norm``, :math:`g_0 = g_1` (so :math:`c_1 = g_1`) and
    :math:`m_0 = v_0 = 0`. With γ = 0 and gradients under the clipping norm this is
    AdamW. Defaults are the paper's (β = (0.95, 0.99), γ = 0.025, κ = 1). Steps with
    non-finite gradients are skipped.

    Args:
      learning_rate: step size, a float or an Optax schedule.
      b1: decay β1 of the momentum (also sets the correction's weight β1/(1−β1)).
      b2: decay β2 of the second moment (AdamW variant).
      eps: added to the denominator (AdamW variant).
      gamma: strength γ of the gradient correction.
      max_grad_norm: per-leaf L2 norm above which the corrected gradient is
        rescaled to that norm (``None``: no clipping).
      variant: ``"adamw"`` or ``"lion"``.
      weight_decay: decoupled weight decay λ (float or schedule).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.

    Returns:
      An ``optax.GradientTransformation`` (:func:`scale_by_mars`, decoupled weight
      decay and the learning rate) that returns zero updates and keeps its state on
      a step whose gradients are not all finite. ``update`` needs ``params``.

    References:
      Yuan et al., *MARS: Unleashing the Power of Variance Reduction for Training
      Large Models*, 2024, https://arxiv.org/abs/2411.10438

    >>> import jax.numpy as jnp, rollfast, rollfast.testing
    >>> target = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -1.0])}
    >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)   # min 0
    >>> opt = rollfast.get("mars", learning_rate=0.05)
    >>> _, _, losses = rollfast.testing.run(opt, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, loss, steps=41)
    >>> [round(x, 4) for x in losses[::10]]   # the loss every 10 steps
    [15.5, 9.0029, 5.0447, 2.6025, 1.0512]
    """
    return decoupled(scale_by_mars(b1, b2, eps, gamma, max_grad_norm, variant), learning_rate,
                     weight_decay, weight_decay_mask)
