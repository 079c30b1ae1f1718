"""``scale_by_prism``: momentum, innovation and spectral shaping of matrix leaves.

Per matrix leaf, with gradient ``g`` (float32) and stored momentum ``M_prev``:

.. math::
    M = b_1 M_{prev} + (1-b_1) G,\\qquad
    \\tilde M = b_1 M + (1-b_1) G \\ (\\text{Nesterov}),\\qquad
    D = G - M,\\qquad
    O = \\operatorname{Shape}(T, D),\\ T = \\tilde M \\text{ (shape\\_nesterov) or } M,

followed by a per-matrix RMS clip and an element-wise clip. ``Shape`` is the
chosen mode's; it sees each leaf through its :class:`~rollfast_partition.MatrixSpec`
as a stack of ``R × O`` matrices (rows = reduction axes), mapped over the stack
(``lax.map``: one matrix at a time, so a stacked leaf equals its separate layers).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rollfast.registry import registry
from rollfast.toolbox import as_key, resolve


class ScaleByPrismState(NamedTuple):
    """Step count, the momentum of matrix leaves (``None`` elsewhere) and the PRNG key."""

    count: Any
    mu: Any
    key: Any


def scale_by_prism(b1=0.95, gamma=1.0, ns_iters=5, mode="original", inv_steps=6, inv_eps=1e-5,
                   inv_scale=1.001, eps_gram=1e-6, gamma_l=None, gamma_r=None, precision="highest",
                   nesterov=True, shape_nesterov=True, bias_correction=False, mu_dtype=None,
                   raw_global_grad_clip=None, permissive_spike_protection=True,
                   grad_clip_max_amps=(2.0, 10.0), weight_dimension_numbers=None, weight_decay=0.0,
                   weight_decay_mask=None, axis_name=None, key=42, round=None):
    r"""PRISM's update direction for the leaves that a partitioner views as matrices.

    Per step (``t`` = step count after increment):

    * spike guard: with ``raw_global_grad_clip = c`` and ``N`` the global L2
      norm of the matrix leaves' gradients, ``g ← g·c/N`` when ``N > c``; a
      spike is skipped when ``permissive_spike_protection`` is off, and so is
      every step with a non-finite gradient: output 0, momentum unchanged;
    * :math:`M = b_1 M_{prev} + (1-b_1) g`; the target is
      :math:`T = b_1 M + (1-b_1) g` (``nesterov`` and ``shape_nesterov``;
      with ``bias_correction`` each term is divided by its
      :math:`1-b_1^{t+1}`, :math:`1-b_1^t`) or :math:`M` (``nesterov=False``);
    * :math:`O = \mathrm{Shape}(T, D)` with :math:`D = g - M`, per matrix of
      the leaf's view; with ``nesterov`` but not ``shape_nesterov``,
      :math:`O ← b_1 O + (1-b_1) g`;
    * per matrix: :math:`O ← O\min(1, a_{rms}/(\mathrm{rms}(O)+10^{-9}))`, then
      clip to :math:`[-a_{elem}, a_{elem}]`;
    * :math:`O ← O + λ θ` (``weight_decay``, masked) on steps that are not skipped.

    Leaves without a matrix spec pass through unchanged (``prism`` sends them
    to its fallback). Updates are float32.

    Args:
      b1: momentum decay.
      gamma: weight of the innovation ``D`` in the shaping.
      ns_iters: Newton–Schulz iterations (mode ``original``).
      mode: the shaping rule: a mode name of the ``prism`` family, its registry
        record, or a function ``shape(T, D, **options)``.
      inv_steps: inverse-fourth-root iterations (mode ``bidirectional``).
      inv_eps: ridge of the normalised Grams (mode ``bidirectional``).
      inv_scale: safety factor of the iteration's coefficients (``bidirectional``).
      eps_gram: ridge added to the Grams (mode ``bidirectional``).
      gamma_l: innovation weight of the left Gram (default ``gamma``).
      gamma_r: innovation weight of the right Gram (default ``gamma``).
      precision: matmul precision of the ``bidirectional`` iteration.
      nesterov: shape (or blend in) the Nesterov look-ahead momentum.
      shape_nesterov: shape the Nesterov target rather than the plain momentum.
      bias_correction: divide the momentum terms by ``1 - b1^t``.
      mu_dtype: storage dtype of the momentum (``None``: float32).
      raw_global_grad_clip: clip the matrix gradients' global L2 norm to this.
      permissive_spike_protection: on a clipped spike, still take the step.
      grad_clip_max_amps: ``(rms, elementwise)`` bounds of the shaped update, a
        single number (rms bound, element bound 10) or ``None``.
      weight_dimension_numbers: which leaves are matrices and how: ``None``
        (by shape), a pytree of ``MatrixSpec | None``, a callable
        ``params -> pytree`` or ``(path, leaf) -> spec``, or a partitioner.
      weight_decay: decoupled weight decay λ (float or schedule of the count).
      weight_decay_mask: pytree or callable ``params -> bool pytree``.
      axis_name: data-parallel axis over which the spike norm is summed.
      key: seed or PRNG key for stochastic momentum writes.
      round: rounding object or name for writing the momentum in ``mu_dtype``.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_prism(gamma=0.0)
    >>> g = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]]), "b": jnp.ones(2)}
    >>> u, state = tx.update(g, tx.init(g))
    >>> u["w"].round(2), u["b"]
    (Array([[0.75, 0.  ],
           [0.  , 1.13]], dtype=float32), Array([1., 1.], dtype=float32))
    """
    from rollfast_partition import MatrixSpec, as_partitioner, leaf_specs

    _check(b1=b1, gamma=gamma, ns_iters=ns_iters)
    rms_amp, elem_amp = _amps(grad_clip_max_amps)
    shape_fn = _shape_fn(mode, dict(
        gamma=gamma, ns_iters=ns_iters, inv_steps=inv_steps, inv_eps=inv_eps, inv_scale=inv_scale,
        eps_gram=eps_gram, gamma_l=gamma_l, gamma_r=gamma_r, precision=precision))
    partitioner = as_partitioner(weight_dimension_numbers)
    rounder = resolve("round", round, option="round")
    store = jnp.float32 if mu_dtype is None else jnp.dtype(mu_dtype)
    is_node = lambda x: x is None or isinstance(x, (optax.MaskedNode, MatrixSpec))

    def init(params):
        specs = leaf_specs(partitioner, params)
        mu = jax.tree.map(lambda s, p: jnp.zeros_like(p, dtype=store) if isinstance(s, MatrixSpec) else s,
                          specs, params, is_leaf=is_node)
        return ScaleByPrismState(jnp.zeros([], jnp.int32), mu, as_key(key))

    def direction(t, d, g):
        out = shape_fn(t, d)
        if nesterov and not shape_nesterov:
            out = b1 * out + (1 - b1) * g
        if rms_amp is not None:
            rms = jnp.sqrt(jnp.mean(jnp.square(out)))
            out = out * jnp.minimum(1.0, rms_amp / (rms + 1e-9))
        return out if elem_amp is None else jnp.clip(out, -elem_amp, elem_amp)

    def update(updates, state, params=None):
        specs = leaf_specs(partitioner, updates)
        flat_specs, treedef = jax.tree.flatten(specs, is_leaf=is_node)
        flat_g = treedef.flatten_up_to(updates)
        flat_mu = treedef.flatten_up_to(state.mu)
        mat = [i for i, s in enumerate(flat_specs) if isinstance(s, MatrixSpec)]
        key_next, key_sr = jax.random.split(state.key)
        count = optax.safe_increment(state.count)

        g32 = {i: flat_g[i].astype(jnp.float32) for i in mat}
        sq = sum((jnp.sum(jnp.square(g)) for g in g32.values()), jnp.float32(0.0))
        if axis_name is not None:
            sq = jax.lax.psum(sq, axis_name)
        skip = ~jnp.isfinite(sq)
        if raw_global_grad_clip is not None:
            norm = jnp.sqrt(sq)
            spike = norm > raw_global_grad_clip
            factor = jnp.where(spike, raw_global_grad_clip / (norm + jnp.finfo(jnp.float32).tiny), 1.0)
            g32 = {i: g * factor for i, g in g32.items()}
            if not permissive_spike_protection:
                skip = skip | spike

        t = count.astype(jnp.float32)
        out, new_mu = list(flat_g), list(flat_mu)
        for i in mat:
            view = flat_specs[i].view(flat_g[i].shape)
            m_prev = flat_mu[i].astype(jnp.float32)
            g = jnp.where(skip, 0.0, g32[i])
            m = jnp.where(skip, m_prev, b1 * m_prev + (1 - b1) * g)
            if nesterov and bias_correction:
                target = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
            elif nesterov:
                target = b1 * m + (1 - b1) * g
            else:
                target = m / (1 - b1**t) if bias_correction else m
            target = target if shape_nesterov else m
            out[i] = _map_matrices(direction, view, target, g - m, g)
            new_mu[i] = m
        if callable(weight_decay) or weight_decay != 0:
            out = _decay(out, mat, treedef, params, state.count)
        for i in mat:
            out[i] = jnp.where(skip, 0.0, out[i])
        sr_keys = jax.random.split(key_sr, max(len(flat_mu), 1))
        for i in mat:
            new_mu[i] = _write(new_mu[i], store, rounder, sr_keys[i])
        return (treedef.unflatten(out),
                ScaleByPrismState(count, treedef.unflatten(new_mu), key_next))

    def _decay(out, mat, treedef, params, count):
        if params is None:
            raise ValueError("scale_by_prism with weight_decay needs params in update()")
        lam = weight_decay(count) if callable(weight_decay) else weight_decay
        mask = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
        flat_mask = [True] * len(out) if mask is None else treedef.flatten_up_to(mask)
        flat_params = treedef.flatten_up_to(params)
        return [o + lam * flat_params[i].astype(jnp.float32) if i in mat and flat_mask[i] else o
                for i, o in enumerate(out)]

    return optax.GradientTransformation(init, update)


def _map_matrices(fn, view, *tensors):
    """Apply ``fn`` to every matrix of the tensors' views and return a tensor."""
    mats = [view.to_matrices(x) for x in tensors]
    if view.matrix_shape[0] == 1:
        res = fn(*(m[0] for m in mats))[None]
    else:
        res = jax.lax.map(lambda ms: fn(*ms), mats)
    return view.from_matrices(res)


def _write(x, dtype, rounder, key):
    return x.astype(dtype) if rounder is None else rounder.cast(x, dtype, key)



def _amps(amps):
    if amps is None:
        return None, None
    if isinstance(amps, (int, float)):
        return float(amps), 10.0
    try:
        rms, elem = amps
    except (TypeError, ValueError):
        raise ValueError(f"grad_clip_max_amps must be None, a number or a pair "
                         f"(rms, elementwise), got {amps!r}") from None
    return rms, elem


def _check(*, b1, gamma, ns_iters):
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"b1 must be in [0, 1), got {b1}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if int(ns_iters) != ns_iters or ns_iters < 0:
        raise ValueError(f"ns_iters must be a non-negative integer, got {ns_iters}")


def _shape_fn(mode, options):
    """``(T, D) -> O`` from a mode name, record or function, with the options it declares."""
    if isinstance(mode, str):
        mode = registry().lookup("mode", mode, "prism")
    fn = mode.impl["shape"] if hasattr(mode, "impl") else mode
    if not callable(fn):
        raise TypeError(f"a prism mode must provide shape(T, D, **options), got {fn!r}")
    declared = inspect.signature(fn).parameters
    chosen = {k: v for k, v in options.items() if k in declared}
    return lambda t, d: fn(t, d, **chosen)
