"""An example third-party rollfast plugin, published as its own distribution.

It contributes a family, ``adamod`` (Ding et al., 2019: Adam with a momental
bound on each element's step size), and a mask, ``trust_ratio`` (LARS/LAMB-style layer-wise scaling of any
optimizer's update). After ``pip install rollfast-example-plugin``,
``rollfast list`` shows both with this plugin as their provider.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import rollfast


@rollfast.hookimpl
def precondition(register):
    register.family("adamod", adamod, first_moment=lambda state: state[0].mu,
                    references=("Ding, Ren, Luo & Sun, An Adaptive and Momental Bound Method "
                                "for Stochastic Learning, arXiv:1910.12249",))


@rollfast.hookimpl
def mask(register):
    register("trust_ratio", trust_ratio,
             references=("You et al., Large Batch Training of Convolutional Networks, arXiv:1708.03888",))


class AdaModState(NamedTuple):
    count: object
    mu: object
    nu: object
    step_bound: object


def scale_by_adamod(b1=0.9, b2=0.999, b3=0.999, eps=1e-8):
    r"""AdaMod's direction: Adam whose per-element step size is capped by its own EMA.

    .. math::
        \eta_t = \frac{1}{\sqrt{\hat v_t} + \epsilon},\quad
        s_t = \beta_3 s_{t-1} + (1-\beta_3)\eta_t,\quad
        u_t = \min(\eta_t, s_t)\,\hat m_t

    (the learning rate multiplies afterwards, so the bound is on ``η_t/lr``).

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      b3: decay of the step-size bound (its memory is about ``1/(1-b3)`` steps).
      eps: added to the denominator.
    """
    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return AdaModState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

    def update(g, state, params=None):
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, g, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * g * g, g, state.nu)
        m_hat = optax.tree.bias_correction(mu, b1, count)
        v_hat = optax.tree.bias_correction(nu, b2, count)
        eta = jax.tree.map(lambda v: 1 / (jnp.sqrt(v) + eps), v_hat)
        bound = jax.tree.map(lambda s, e: b3 * s + (1 - b3) * e, state.step_bound, eta)
        u = jax.tree.map(lambda m, e, s: jnp.minimum(e, s) * m, m_hat, eta, bound)
        return u, AdaModState(count, mu, nu, bound)

    return optax.GradientTransformation(init, update)


def adamod(learning_rate, b1=0.9, b2=0.999, b3=0.999, eps=1e-8, weight_decay=0.0):
    r"""AdaMod: Adam with momental bounds on the per-element learning rate.

    Early steps are small (the bound starts at 0 and warms up), which removes the
    need for a warm-up schedule.

    Args:
      learning_rate: step size, a float or an Optax schedule.
      b1: decay of the first moment.
      b2: decay of the second moment.
      b3: decay of the step-size bound.
      eps: added to the denominator.
      weight_decay: decoupled weight decay λ.

    >>> import jax.numpy as jnp
    >>> opt, params = adamod(0.1), {"w": jnp.zeros(2)}
    >>> u, _ = opt.update({"w": jnp.array([2.0, -3.0])}, opt.init(params), params)
    >>> [round(float(x), 7) for x in u["w"]]  # the first bound is (1 - b3)·η: a thousandth of Adam's first step
    [-0.0001, 0.0001]
    """
    return optax.chain(scale_by_adamod(b1, b2, b3, eps),
                       optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


class TrustRatioState(NamedTuple):
    inner_state: object


def trust_ratio(inner, *, first_moment=None, trust_coefficient=1.0, trust_eps=1e-9):
    r"""Scale each leaf's update to ``η · ‖θ‖/‖u‖`` of its own size (layer-wise trust ratio).

    .. math:: u \leftarrow u \cdot \eta \frac{\lVert\theta\rVert}{\lVert u\rVert + \epsilon}
              \quad(\text{unchanged where } \lVert\theta\rVert = 0)

    Args:
      trust_coefficient: η, the ratio of update norm to parameter norm.
      trust_eps: added to the update norm.

    >>> import jax.numpy as jnp, optax
    >>> tx = trust_ratio(optax.sgd(1.0), trust_coefficient=0.1)
    >>> p = {"w": jnp.array([3.0, 4.0])}
    >>> u, _ = tx.update({"w": jnp.array([0.0, 1.0])}, tx.init(p), p)
    >>> float(jnp.linalg.norm(u["w"]))
    0.5
    """
    def init(params):
        return TrustRatioState(inner.init(params))

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("trust_ratio needs params= in update()")
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra)

        def scale(u, p):
            p_norm, u_norm = jnp.linalg.norm(p), jnp.linalg.norm(u)
            ratio = jnp.where(p_norm > 0, trust_coefficient * p_norm / (u_norm + trust_eps), 1.0)
            return (u * ratio).astype(u.dtype)

        return jax.tree.map(scale, updates, params), TrustRatioState(inner_state)

    return optax.GradientTransformationExtraArgs(init, update)
