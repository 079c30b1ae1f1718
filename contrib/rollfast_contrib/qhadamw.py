"""QHAdamW: quasi-hyperbolic Adam (Ma & Yarats, 2019, arXiv:1810.06801) with
decoupled weight decay (Loshchilov & Hutter, arXiv:1711.05101)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rollfast.constraints import Beta, LearningRate, NonNegative, Probability, WeightDecay
from rollfast_contrib._tools import adam_moments, decoupled

REFERENCES = ("Ma & Yarats, Quasi-hyperbolic momentum and Adam for deep learning, arXiv:1810.06801",
              "Loshchilov & Hutter, Decoupled Weight Decay Regularization, arXiv:1711.05101")


class ScaleByQHAdamState(NamedTuple):
    """Step count and Adam's two moments (float32, parameters' structure)."""

    count: object
    mu: object
    nu: object


def first_moment(state):
    """The momentum of a ``qhadamw`` state."""
    return state[0].mu


def scale_by_qhadam(b1=0.995, b2=0.999, nu1=0.7, nu2=1.0, eps=1e-8):
    r"""Quasi-hyperbolic Adam's direction: each moment is mixed with the raw gradient.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
        u_t = \frac{(1-\nu_1)\, g_t + \nu_1\, m_t/(1-\beta_1^t)}
                   {\sqrt{(1-\nu_2)\, g_t^2 + \nu_2\, v_t/(1-\beta_2^t)} + \epsilon}

    ``ν1 = ν2 = 1`` is Adam; ``ν1 = 0`` drops momentum from the numerator.

    Args:
      b1: decay β1 of the first moment.
      b2: decay β2 of the second moment.
      nu1: weight ν1 of the momentum against the raw gradient in the numerator.
      nu2: weight ν2 of the second moment against the squared gradient.
      eps: added to the denominator.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByQHAdamState`.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_qhadam()
    >>> u, _ = tx.update(jnp.array([2.0, -3.0]), tx.init(jnp.zeros(2)))
    >>> [round(float(x), 4) for x in u]
    [1.0, -1.0]
    """
    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
        return ScaleByQHAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                                  jax.tree.map(zeros, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu, nu = adam_moments(updates, state.mu, state.nu, b1, b2)

        def direction(g, m, v):
            g32 = g.astype(jnp.float32)
            num = (1 - nu1) * g32 + nu1 * (m / (1 - b1**count).astype(jnp.float32))
            den = jnp.sqrt((1 - nu2) * (g32 * g32) + nu2 * (v / (1 - b2**count).astype(jnp.float32)))
            return (num / (den + eps)).astype(g.dtype)

        return jax.tree.map(direction, updates, mu, nu), ScaleByQHAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def qhadamw(learning_rate: LearningRate, b1: Beta = 0.995, b2: Beta = 0.999, nu1: Probability = 0.7,
            nu2: Probability = 1.0, eps: NonNegative = 1e-8, weight_decay: WeightDecay = 0.0,
            weight_decay_mask=None):
    r"""QHAdamW: ``-lr·(quasi-hyperbolic Adam direction + λ·θ)``.

    Quasi-hyperbolic Adam mixes each of Adam's bias-corrected moments with the raw
    gradient it averages, and decays the weights as AdamW does:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\,g_t,\qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2,\qquad m_0 = v_0 = 0,\\
        u_t = -\eta_t\Big(\frac{(1-\nu_1)\,g_t + \nu_1\,m_t/(1-\beta_1^t)}
              {\sqrt{(1-\nu_2)\,g_t^2 + \nu_2\,v_t/(1-\beta_2^t)} + \epsilon}
              + \lambda\theta_{t-1}\Big)

    ν1 = ν2 = 1 is AdamW; ν1 = 0 drops momentum from the numerator. Defaults are
    the paper's recommendation (β1 = 0.995, ν1 = 0.7, β2 = 0.999, ν2 = 1). Steps
    with non-finite gradients are skipped.

    Args:
      learning_rate: step size, a float or an Optax schedule.
      b1: decay β1 of the first moment.
      b2: decay β2 of the second moment.
      nu1: weight ν1 of the momentum against the raw gradient in the numerator.
      nu2: weight ν2 of the second moment against the squared gradient.
      eps: added to the denominator.
      weight_decay: decoupled weight decay λ (float or schedule).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.

    Returns:
      An ``optax.GradientTransformation`` (:func:`scale_by_qhadam`, decoupled weight
      decay and the learning rate) that returns zero updates and keeps its state on
      a step whose gradients are not all finite. ``update`` needs ``params``.

    References:
      Ma & Yarats, *Quasi-hyperbolic momentum and Adam for deep learning*, ICLR 2019,
      https://arxiv.org/abs/1810.06801

      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019,
      https://arxiv.org/abs/1711.05101

    >>> import jax.numpy as jnp, rollfast, rollfast.testing
    >>> target = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -1.0])}
    >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)   # min 0
    >>> opt = rollfast.get("qhadamw", learning_rate=0.05)
    >>> _, _, losses = rollfast.testing.run(opt, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, loss, steps=41)
    >>> [round(x, 4) for x in losses[::10]]   # the loss every 10 steps
    [15.5, 9.112, 5.2823, 2.936, 1.5223]
    """
    return decoupled(scale_by_qhadam(b1, b2, nu1, nu2, eps), learning_rate, weight_decay,
                     weight_decay_mask)
