"""Built-in task ``lstsq``: ill-conditioned least squares with a known optimum."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from rollfast.compare.protocol import Task


def lstsq_task(dim: int = 32, outputs: int = 16, rows: int = 512, condition: float = 1e2,
               steps: int = 300, seed: int = 0) -> Task:
    r"""An ill-conditioned least-squares problem with a known optimum.

    The data :math:`X = U\operatorname{diag}(s)V^\top\in\mathbb{R}^{n\times d}` has
    orthonormal random :math:`U, V` and singular values :math:`s` log-spaced from 1 to
    ``1/condition``; the targets are :math:`Y = XW^\star` for a fixed random
    :math:`W^\star\in\mathbb{R}^{d\times k}` with :math:`\lVert W^\star\rVert_F = 1`.
    The full-batch loss

    .. math:: L(W) = \tfrac12\lVert XW - Y\rVert_F^2

    is minimised exactly at :math:`W^\star` (:math:`L = 0`); its Hessian
    :math:`X^\top X\otimes I` has eigenvalues in :math:`[\text{condition}^{-2}, 1]`.
    Parameters start at :math:`W = 0`; the metric is the distance to the optimum
    :math:`\lVert W - W^\star\rVert_F` (1 at the start).

    >>> t = lstsq_task(dim=4, outputs=2, rows=8)
    >>> round(float(t.evaluate(t.init(None))), 4)
    1.0
    """
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((rows, dim)))[0]
    v = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    x = (u * np.logspace(0, -np.log10(condition), dim)) @ v.T
    w_star = rng.standard_normal((dim, outputs))
    w_star /= np.linalg.norm(w_star)
    x, w_star = jnp.asarray(x, jnp.float32), jnp.asarray(w_star, jnp.float32)
    y = x @ w_star
    initial = 0.5 * float(jnp.sum(y**2))

    def loss(params, batch):
        return 0.5 * jnp.sum(jnp.square(x @ params["w"] - y))

    def evaluate(params):
        return jnp.linalg.norm(params["w"] - w_star)

    return Task(
        name="lstsq", init=lambda key: {"w": jnp.zeros((dim, outputs), jnp.float32)}, loss=loss,
        batch=lambda key, step: None, evaluate=evaluate, metric="distance to optimum",
        steps=steps, learning_rate=1e-2, target=initial * 1e-3,
        description=(f"least squares 0.5||XW - Y||^2 with X {rows}x{dim} of condition number "
                     f"{condition:g} (Hessian {condition**2:g}), W {dim}x{outputs}, Y = XW*, "
                     f"full batch; metric ||W - W*||_F (1 at the start); target 1e-3 x initial loss"))


__all__ = ["lstsq_task"]
