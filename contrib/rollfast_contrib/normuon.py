"""NorMuon: Muon's orthogonalised momentum followed by per-neuron second-moment
normalisation and an RMS-matching scale (arXiv:2510.05491), with AdamW for
leaves that are not matrices."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import optax

from rollfast.constraints import Beta, LearningRate, NonNegative, Positive, PositiveInt, WeightDecay
from rollfast_contrib._tools import adam_direction, adam_moments, decoupled, field, init_leaves, map_leaves

REFERENCES = ("Li et al., NorMuon: Making Muon more efficient and scalable, arXiv:2510.05491",
              "Jordan et al., Muon: An optimizer for hidden layers in neural networks (2024), "
              "https://kellerjordan.github.io/posts/muon/")
NS_COEFFS = (3.4445, -4.7750, 2.0315)


class NorMuonLeaf(NamedTuple):
    """One leaf's momentum (its shape) and second moment: per neuron for a matrix
    leaf, element-wise for a fallback leaf."""

    mu: object
    nu: object


class ScaleByNorMuonState(NamedTuple):
    """Step count and the per-leaf :class:`NorMuonLeaf` in the parameters' structure."""

    count: object
    leaves: object


def first_moment(state):
    """The momentum of a ``normuon`` state."""
    return field(state[0].leaves, "mu", NorMuonLeaf)


def newton_schulz(x, steps=5, coeffs=NS_COEFFS, eps=1e-7):
    r"""Approximate the orthogonal polar factor ``U Vᵀ`` of ``x = U Σ Vᵀ`` by the quintic
    Newton–Schulz iteration of Muon, in float32:

    .. math::
        X_0 = x/(\lVert x\rVert_F+\epsilon),\quad
        X_{k+1} = aX_k + (bA_k + cA_k^2)X_k,\ A_k = X_kX_k^\top

    (on the wide orientation, so ``A`` is the smaller Gram matrix). The coefficients
    drive the singular values into roughly [0.7, 1.2] rather than exactly to 1.

    Args:
      x: a matrix.
      steps: number of iterations.
      coeffs: the quintic's ``(a, b, c)``.
      eps: guards the normalisation of a zero matrix.

    >>> import jax.numpy as jnp
    >>> s = jnp.linalg.svd(newton_schulz(jnp.diag(jnp.array([3.0, 1.0, 0.2]))), compute_uv=False)
    >>> bool(((s > 0.6) & (s < 1.3)).all())
    True
    """
    a, b, c = coeffs
    tall = x.shape[0] > x.shape[1]
    x = x.astype(jnp.float32)
    x = (x.T if tall else x) / (jnp.linalg.norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def scale_by_normuon(b1=0.95, b2=0.95, eps=1e-8, ns_steps=5, neuron_axis=-1, rms_scale=0.2,
                     adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8):
    r"""NorMuon's direction for leaves of rank ≥ 2; Adam's for the others.

    A leaf is viewed as a matrix ``(neurons, fan_in)`` with ``neuron_axis`` first and
    the other axes merged. With ``O = NS(M)`` (:func:`newton_schulz`):

    .. math::
        M_t = \beta_1 M_{t-1} + (1-\beta_1) G_t,\quad O_t = \mathrm{NS}(M_t),\\
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\,\mathrm{mean}_{j}(O_t\odot O_t)_{:,j}\in\mathbb R^{\text{neurons}},\\
        \hat O_t = O_t / (\sqrt{v_t}+\epsilon)\ \text{(row-wise)},\quad
        u_t = \rho\,\sqrt{mn}\,\hat O_t/\lVert\hat O_t\rVert_F

    so ``RMS(u) = ρ`` (ρ = ``rms_scale`` = 0.2 matches AdamW's typical update RMS and
    lets one learning rate serve both paths). Leaves of rank < 2 take Adam's
    bias-corrected direction with ``adam_b1, adam_b2, adam_eps``.

    Args:
      b1: decay β1 of the momentum.
      b2: decay β2 of the per-neuron second moment.
      eps: added to the per-neuron root second moment.
      ns_steps: Newton–Schulz iterations.
      neuron_axis: the axis indexing output neurons: ``-1`` in JAX's ``(…, in, out)``
        layout, ``0`` in PyTorch's ``(out, in)`` layout (the paper's rows).
      rms_scale: target RMS ρ of a matrix leaf's direction.
      adam_b1: Adam's β1 for leaves of rank < 2.
      adam_b2: Adam's β2 for leaves of rank < 2.
      adam_eps: Adam's ε for leaves of rank < 2.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByNorMuonState`.

    >>> import jax, jax.numpy as jnp
    >>> tx = scale_by_normuon()
    >>> g = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 4)), "b": jnp.array([2.0, -3.0])}
    >>> u, _ = tx.update(g, tx.init(g))
    >>> round(float(jnp.sqrt(jnp.mean(u["w"] ** 2))), 4), [round(float(x), 4) for x in u["b"]]
    (0.2, [1.0, -1.0])
    """
    def as_matrix(x):
        moved = jnp.moveaxis(x, neuron_axis, 0)
        return moved.reshape(moved.shape[0], -1)

    def from_matrix(m, shape):
        axis = neuron_axis % len(shape)
        moved = (shape[axis], *shape[:axis], *shape[axis + 1:])
        return jnp.moveaxis(m.reshape(moved), 0, axis)

    def init(params):
        def leaf(_, p):
            mu = jnp.zeros(jnp.shape(p), jnp.float32)
            nu = jnp.zeros(jnp.shape(p)[neuron_axis] if jnp.ndim(p) >= 2 else jnp.shape(p), jnp.float32)
            return NorMuonLeaf(mu, nu)
        return ScaleByNorMuonState(jnp.zeros([], jnp.int32), init_leaves(leaf, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)

        def leaf(_, g, s):
            if g.ndim < 2:
                mu, nu = adam_moments(g, s.mu, s.nu, adam_b1, adam_b2)
                u = adam_direction(mu, nu, count, adam_b1, adam_b2, adam_eps)
                return u.astype(g.dtype), NorMuonLeaf(mu, nu)
            mu = (1 - b1) * g.astype(jnp.float32) + b1 * s.mu
            o = newton_schulz(as_matrix(mu), ns_steps)
            nu = (1 - b2) * jnp.mean(o * o, axis=1) + b2 * s.nu
            o = o / (jnp.sqrt(nu) + eps)[:, None]
            o = o * (rms_scale * jnp.sqrt(o.size) / jnp.maximum(jnp.linalg.norm(o), 1e-30))
            return from_matrix(o, g.shape).astype(g.dtype), NorMuonLeaf(mu, nu)

        out, leaves = map_leaves(leaf, updates, state.leaves)
        return out, ScaleByNorMuonState(count, leaves)

    return optax.GradientTransformation(init, update)


def normuon(learning_rate: LearningRate, b1: Beta = 0.95, b2: Beta = 0.95, eps: NonNegative = 1e-8,
            ns_steps: PositiveInt = 5, neuron_axis: int = -1, rms_scale: Positive = 0.2,
            adam_b1: Beta = 0.9, adam_b2: Beta = 0.999, adam_eps: NonNegative = 1e-8,
            weight_decay: WeightDecay = 0.0, weight_decay_mask=None):
    r"""NorMuon: ``-lr·(NorMuon direction + λθ)``; AdamW on leaves of rank < 2.

    A leaf of rank ≥ 2 is viewed as a matrix with one row per output neuron
    (``neuron_axis`` first, the other axes merged). Its momentum is orthogonalised
    by Newton–Schulz (:func:`newton_schulz`), normalised row by row by a second
    moment of the orthogonalised rows, and rescaled to a fixed RMS:

    .. math::
        M_t = \beta_1 M_{t-1} + (1-\beta_1)\,G_t,\qquad O_t = \mathrm{NS}(M_t),\\
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\,\operatorname{mean}_j (O_t\odot O_t)_{:,j},\qquad
        \hat O_t = \operatorname{diag}(\sqrt{v_t}+\epsilon)^{-1}\,O_t,\\
        u_t = -\eta_t\Big(\rho\,\sqrt{mn}\,\frac{\hat O_t}{\lVert\hat O_t\rVert_F}
              + \lambda\theta_{t-1}\Big)

    for an :math:`m\times n` view, so the direction's RMS is ρ = ``rms_scale``
    (0.2, about AdamW's, which lets one learning rate serve both paths). Leaves of
    rank < 2 take AdamW's step with ``adam_b1, adam_b2, adam_eps``. Steps with
    non-finite gradients are skipped.

    Args:
      learning_rate: step size, a float or an Optax schedule (one for both paths).
      b1: decay β1 of the momentum.
      b2: decay β2 of the per-neuron second moment.
      eps: added to the per-neuron root second moment.
      ns_steps: Newton–Schulz iterations.
      neuron_axis: the axis indexing output neurons: ``-1`` in JAX's ``(…, in, out)``
        layout, ``0`` in PyTorch's ``(out, in)`` layout (the paper's rows).
      rms_scale: target RMS ρ of a matrix leaf's direction.
      adam_b1: Adam's β1 for leaves of rank < 2.
      adam_b2: Adam's β2 for leaves of rank < 2.
      adam_eps: Adam's ε for leaves of rank < 2.
      weight_decay: decoupled weight decay λ (float or schedule).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.

    Returns:
      An ``optax.GradientTransformation`` (:func:`scale_by_normuon`, decoupled
      weight decay and the learning rate) that returns zero updates and keeps its
      state on a step whose gradients are not all finite. ``update`` needs ``params``.

    References:
      Li et al., *NorMuon: Making Muon more efficient and scalable*, 2025,
      https://arxiv.org/abs/2510.05491

      Jordan et al., *Muon: An optimizer for hidden layers in neural networks*,
      2024, https://kellerjordan.github.io/posts/muon/

    >>> import jax.numpy as jnp, rollfast, rollfast.testing
    >>> target = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -1.0])}
    >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)   # min 0
    >>> opt = rollfast.get("normuon", learning_rate=0.3)
    >>> _, _, losses = rollfast.testing.run(opt, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, loss, steps=41)
    >>> [round(x, 4) for x in losses[::10]]   # the loss every 10 steps
    [15.5, 7.6584, 4.0204, 1.2346, 0.3689]
    """
    return decoupled(scale_by_normuon(b1, b2, eps, ns_steps, neuron_axis, rms_scale, adam_b1,
                                      adam_b2, adam_eps),
                     learning_rate, weight_decay, weight_decay_mask)
