"""8-bit AdamW: Adam's moments stored block-wise quantised to 8 bits with the
dynamic (tree) quantisation map (Dettmers et al., 2021, arXiv:2110.02861)."""

from __future__ import annotations

from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rollfast.constraints import Beta, Interval, LearningRate, NonNegative, PositiveInt, WeightDecay
from rollfast_contrib._tools import adam_direction, adam_moments, decoupled, field, init_leaves, map_leaves

REFERENCES = ("Dettmers et al., 8-bit Optimizers via Block-wise Quantization, arXiv:2110.02861",)


class Quantized(NamedTuple):
    """A tensor as uint8 codes (in its own shape) and the absmax of each block of its
    flattened elements."""

    codes: object
    absmax: object


class MomentsLeaf(NamedTuple):
    """One leaf's two moments: :class:`Quantized`, or float32 arrays for small leaves."""

    mu: object
    nu: object


class ScaleByAdam8bitState(NamedTuple):
    """Step count and the per-leaf :class:`MomentsLeaf` in the parameters' structure."""

    count: object
    moments: object


def dynamic_map(signed: bool):
    r"""The 256 (signed: 255) values of the dynamic tree quantisation map, ascending.

    After the sign bit (signed maps only) the code's ``E`` leading zero bits give the
    exponent, the next 1 bit is the indicator, and the remaining ``F`` bits a linear
    fraction of ``[0.1, 1]``:

    .. math::
        q = \pm 10^{-E}\Big(0.1 + 0.9\,\frac{k+1}{2^F}\Big),\quad k = 0,\dots,2^F-1

    with ``E + 1 + F`` equal to the 7 (signed) or 8 (unsigned) bits, plus the code 0.
    The fraction grid takes the upper end of each of its ``2^F`` cells, so ``±1``
    (a block's absmax) is exact.

    Args:
      signed: the map for signed values (first moment) or non-negative ones (second moment).

    >>> m = dynamic_map(signed=False)
    >>> len(m), float(m[0]), round(float(m[1]), 12), float(m[-1])
    (256, 0.0, 1e-07, 1.0)
    >>> len(dynamic_map(signed=True))
    255
    """
    bits = 7 if signed else 8
    values = [np.zeros(1)]
    for exponent in range(bits):
        cells = 2 ** (bits - 1 - exponent)
        magnitudes = 10.0**-exponent * (0.1 + 0.9 * np.arange(1, cells + 1) / cells)
        values += [magnitudes, -magnitudes] if signed else [magnitudes]
    return np.sort(np.concatenate(values)).astype(np.float32)


def quantize(x, signed: bool, block_size: int) -> Quantized:
    r"""Block-wise quantisation: the flattened tensor is cut into
    ``ceil(n/block_size)`` blocks of equal length (the last zero-padded); each block is
    divided by its absmax and rounded to the nearest value of :func:`dynamic_map`.

    The code is computed, not searched: ``|x|`` in band ``E`` (``10^{-E-1} < |x| ≤ 10^{-E}``)
    lies on the uniform grid ``10^{-E}(0.1 + 0.9 j/2^F)``, ``j = 0…2^F`` (``j = 0`` is
    the next band's top; in the last band the grid starts at 0), whose ``j``-th point
    has index ``2^F − 1 + j`` among the non-negative codes. Unsigned: a positive
    value never rounds to 0 (it takes the smallest positive code), so a quantised
    second moment never vanishes under a non-zero first moment.

    Args:
      x: the float tensor.
      signed: use the signed map (else ``x`` must be non-negative).
      block_size: elements per block.

    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.array([0.5, -2.0, 1e-3]), signed=True, block_size=4)
    >>> [round(float(v), 4) for v in dequantize(q, signed=True)]
    [0.5094, -2.0, 0.0011]
    """
    bits = 7 if signed else 8
    flat = x.astype(jnp.float32).ravel()
    length = _block_length(flat.size, -(-flat.size // block_size))
    blocks = jnp.pad(flat, (0, -flat.size % length)).reshape(-1, length)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normed = jnp.abs(blocks) / jnp.where(absmax > 0, absmax, 1)[:, None]
    band = sum((normed <= 10.0**-e).astype(jnp.int32) for e in range(1, bits))
    cells = jnp.asarray([2.0 ** (bits - 1 - e) for e in range(bits)])[band]
    unit = jnp.asarray([10.0**e for e in range(bits)])[band]
    low = jnp.where(band == bits - 1, 0.0, 0.1)
    j = jnp.clip(jnp.round((normed * unit - low) / (1 - low) * cells), 0, cells)
    index = cells - 1 + j
    if signed:
        index = 2**bits - 1 + jnp.sign(blocks) * index
    else:
        index = jnp.where((normed > 0) & (index == 0), 1, index)
    codes = index.astype(jnp.uint8).ravel()[:flat.size].reshape(x.shape)
    return Quantized(codes, absmax)


def dequantize(q: Quantized, signed: bool):
    """The float32 tensor that the codes of ``q`` stand for.

    Args:
      q: the quantised tensor.
      signed: which map ``q`` was written with.

    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.array([4.0, 0.4, 0.0]), signed=False, block_size=2)
    >>> q.codes, dequantize(q, signed=False)
    (Array([255, 127,   0], dtype=uint8), Array([4. , 0.4, 0. ], dtype=float32))
    """
    scale = jnp.repeat(q.absmax, _block_length(q.codes.size, q.absmax.size))
    values = jnp.asarray(dynamic_map(signed))[q.codes.astype(jnp.int32)]
    return values * scale[:q.codes.size].reshape(q.codes.shape)


def _block_length(size: int, blocks: int) -> int:
    return -(-size // blocks)


def first_moment(state):
    """The dequantised momentum of an ``adamw8bit`` state."""
    return jax.tree.map(lambda m: dequantize(m, True) if isinstance(m, Quantized) else m,
                        field(state[0].moments, "mu", MomentsLeaf),
                        is_leaf=lambda x: isinstance(x, Quantized))


def scale_by_adam_8bit(b1=0.9, b2=0.999, eps=1e-8, block_size=2048, min_8bit_size=4096):
    r"""Adam's direction with both moments stored in 8 bits.

    Per step and leaf: dequantise ``m, v`` → update in float32 → requantise:

    .. math::
        m_t = \beta_1 \mathrm{D}(m_{t-1}) + (1-\beta_1) g_t,\quad
        v_t = \beta_2 \mathrm{D}(v_{t-1}) + (1-\beta_2) g_t^2,\quad
        u_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}

    and ``Q(m_t)`` (signed map), ``Q(v_t)`` (unsigned map) are stored. The update uses
    the float32 moments of this step. A leaf with fewer than ``min_8bit_size``
    elements keeps float32 moments. State: 2 bytes per element plus 8 per block,
    about a quarter of float32 Adam's 8.

    Args:
      b1: decay β1 of the first moment.
      b2: decay β2 of the second moment.
      eps: added to the denominator.
      block_size: elements per quantisation block (the paper: 2048; 256 is finer).
      min_8bit_size: leaves with fewer elements keep float32 moments.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByAdam8bitState`.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_adam_8bit(min_8bit_size=0)
    >>> u, s = tx.update(jnp.array([2.0, -3.0]), tx.init(jnp.zeros(2)))
    >>> [round(float(x), 4) for x in u], s.moments.mu.codes.dtype
    ([1.0, -1.0], dtype('uint8'))
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")

    def small(p):
        return jnp.size(p) < max(min_8bit_size, 1)

    def init(params):
        def leaf(_, p):
            shape = jnp.shape(p)
            if small(p):
                return MomentsLeaf(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))

            def zero(signed):
                absmax = jnp.zeros(-(-p.size // block_size), jnp.float32)
                return Quantized(jnp.full(shape, 127 if signed else 0, jnp.uint8), absmax)

            return MomentsLeaf(zero(True), zero(False))
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), init_leaves(leaf, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)

        def leaf(_, g, s):
            if small(g):
                m, v = s
            else:
                m, v = dequantize(s.mu, True), dequantize(s.nu, False)
            m, v = adam_moments(g, m, v, b1, b2)
            u = adam_direction(m, v, count, b1, b2, eps).astype(g.dtype)
            if small(g):
                return u, MomentsLeaf(m, v)
            return u, MomentsLeaf(quantize(m, True, block_size), quantize(v, False, block_size))

        out, moments = map_leaves(leaf, updates, state.moments)
        return out, ScaleByAdam8bitState(count, moments)

    return optax.GradientTransformation(init, update)


def adamw8bit(learning_rate: LearningRate, b1: Beta = 0.9, b2: Beta = 0.999, eps: NonNegative = 1e-8,
              weight_decay: WeightDecay = 1e-2, weight_decay_mask=None, block_size: PositiveInt = 2048,
              min_8bit_size: Annotated[int, Interval(0, None, integer=True)] = 4096):
    r"""8-bit AdamW: ``-lr·(m̂/(sqrt(v̂)+eps) + λθ)`` with block-wise 8-bit moments.

    AdamW whose two moments are stored as 8-bit codes of the dynamic tree map
    (:func:`dynamic_map`), one float32 absmax per block of ``block_size``
    elements. Per step, with :math:`\mathrm D` dequantisation and :math:`\mathrm Q`
    quantisation (:func:`quantize`, :func:`dequantize`):

    .. math::
        m_t = \beta_1\,\mathrm D(\bar m_{t-1}) + (1-\beta_1)\,g_t,\qquad
        v_t = \beta_2\,\mathrm D(\bar v_{t-1}) + (1-\beta_2)\,g_t^2,\\
        u_t = -\eta_t\Big(\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}
              + \lambda\theta_{t-1}\Big),\qquad
        \bar m_t = \mathrm Q_{\pm}(m_t),\quad \bar v_t = \mathrm Q_{+}(v_t)

    (signed map for :math:`m`, unsigned for :math:`v`). The step uses this step's
    float32 moments; only the stored ones are rounded. Leaves with fewer than
    ``min_8bit_size`` elements keep float32 moments. State: about 2 bytes per
    element, a quarter of float32 AdamW's 8. Defaults are the paper's (block size
    2048, leaves under 4096 elements in float32, weight decay 1e-2 as
    bitsandbytes' AdamW8bit). Steps with non-finite gradients are skipped.

    Args:
      learning_rate: step size, a float or an Optax schedule.
      b1: decay β1 of the first moment.
      b2: decay β2 of the second moment.
      eps: added to the denominator.
      weight_decay: decoupled weight decay λ (float or schedule).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.
      block_size: elements per quantisation block (the paper: 2048; 256 is finer).
      min_8bit_size: leaves with fewer elements keep float32 moments.

    Returns:
      An ``optax.GradientTransformation`` (:func:`scale_by_adam_8bit`, decoupled
      weight decay and the learning rate) that returns zero updates and keeps its
      state on a step whose gradients are not all finite. ``update`` needs ``params``.

    References:
      Dettmers et al., *8-bit Optimizers via Block-wise Quantization*, ICLR 2022,
      https://arxiv.org/abs/2110.02861

    >>> import jax.numpy as jnp, rollfast, rollfast.testing
    >>> target = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -1.0])}
    >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)   # min 0
    >>> opt = rollfast.get("adamw8bit", learning_rate=0.1, min_8bit_size=0)
    >>> _, _, losses = rollfast.testing.run(opt, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, loss, steps=41)
    >>> [round(x, 4) for x in losses[::10]]   # the loss every 10 steps
    [15.5, 5.2498, 1.5147, 0.2303, 0.0612]
    """
    return decoupled(scale_by_adam_8bit(b1, b2, eps, block_size, min_8bit_size), learning_rate,
                     weight_decay, weight_decay_mask)
