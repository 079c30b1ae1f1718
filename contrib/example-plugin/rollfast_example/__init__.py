"""An example third-party rollfast plugin, published as its own distribution.

It contributes a family, ``signum`` (Bernstein et al., signSGD with momentum),
and a mask, ``trust_ratio`` (LARS/LAMB-style layer-wise scaling of any
optimizer's update). After ``pip install rollfast-example-plugin``,
``rollfast list`` shows both with this plugin as their provider.
"""

from __future__ import annotations

from typing import NamedTuple

import rollfast


@rollfast.hookimpl
def precondition(register):
    # optax.trace keeps Σ b1^k g, proportional to the EMA (the sign is the same).
    register.family("signum", signum, first_moment=lambda state: state[0].trace,
                    references=("Bernstein et al., signSGD: Compressed Optimisation for "
                                "Non-Convex Problems, arXiv:1802.04434",))


@rollfast.hookimpl
def mask(register):
    register("trust_ratio", trust_ratio,
             references=("You et al., Large Batch Training of Convolutional Networks, arXiv:1708.03888",))


def signum(learning_rate, b1=0.9, weight_decay=0.0):
    r"""Signum: step along the sign of the momentum, ``-lr · (sign(m_t) + λ θ)``.

    .. math:: m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t

    Args:
      learning_rate: step size, a float or an Optax schedule.
      b1: momentum decay.
      weight_decay: decoupled weight decay λ.

    >>> import jax.numpy as jnp
    >>> opt = signum(0.1)
    >>> opt.update({"w": jnp.array([2.0, -3.0])}, opt.init({"w": jnp.zeros(2)}))[0]["w"]
    Array([-0.1,  0.1], dtype=float32)
    """
    import optax

    return optax.chain(optax.trace(decay=b1),
                       optax.scale_by_sign(),
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
    import jax
    import jax.numpy as jnp
    import optax

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
