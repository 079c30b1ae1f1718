r"""``scale_by_prism``: momentum, innovation and spectral shaping of matrix leaves, as stages.

Per matrix leaf with gradient :math:`g` (float32; float64 for float64 params), stored momentum :math:`M_{prev}` and
step count :math:`t` (after increment), one step runs these stages in order:

.. math::
    \begin{aligned}
    &\text{spike guard:} & g &\leftarrow g\,\min(1, c/N),\quad N = \lVert g\rVert_2
        \ \text{over the matrix leaves}\\
    &\text{momentum:} & M &= b_1 M_{prev} + (1-b_1)\,g\\
    &\text{target:} & T &= b_1 M + (1-b_1)\,g \ \ (\text{Nesterov}),\ \text{else } M\\
    &\text{innovation:} & D &= g - M\\
    &\text{shaping:} & O &= \operatorname{Shape}(T, D)
        \ \text{per matrix of the leaf's view}\\
    &\text{clipping:} & O &\leftarrow \operatorname{clip}\big(O\min(1, a/\operatorname{rms}(O)),
        -e, e\big)\ \text{per matrix}\\
    &\text{decay:} & O &\leftarrow O + \lambda\,\theta
    \end{aligned}

``Shape`` is the chosen mode's; it sees each leaf through its
:class:`~rollfast_partition.MatrixSpec` as a stack of ``R × O`` matrices (rows =
reduction axes), mapped over the stack (``lax.map``: one matrix at a time, so a stacked
leaf equals its separate layers). Each stage is a module-level function below; the
options they read are resolved once into a frozen :class:`PrismOptions`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import jax
import jax.numpy as jnp
import optax

from rollfast.toolbox import as_key, leaf_keys, resolve, run_unless_skipped, spike_guard, update_clipper
from rollfast_partition import MatrixSpec, as_partitioner, leaf_specs

SHAPE_OPTIONS = ("gamma", "ns_iters", "inv_steps", "inv_eps", "inv_scale", "eps_gram", "gamma_l",
                 "gamma_r", "precision")


class ScaleByPrismState(NamedTuple):
    """Step count, the momentum of matrix leaves (``None`` elsewhere) and the PRNG key."""

    count: Any
    mu: Any
    key: Any


@attrs.frozen(kw_only=True)
class PrismOptions:
    """What the stages of :func:`scale_by_prism` read, checked and resolved once.

    ``shape`` is the mode's ``(T, D) -> O`` for one matrix with its options bound;
    ``clip`` is ``rollfast.toolbox.update_clipper("per_tensor_rms", grad_clip_max_amps)``;
    ``rounder`` writes the momentum in ``mu_dtype`` (``None``: a plain cast).
    """

    b1: float = 0.95
    nesterov: bool = True
    shape_nesterov: bool = True
    bias_correction: bool = False
    shape: Callable = attrs.field(default=None, repr=False)
    clip: Callable = attrs.field(default=None, repr=False)
    raw_global_grad_clip: float | None = None
    permissive_spike_protection: bool = True
    weight_decay: Any = 0.0
    weight_decay_mask: Any = None
    mu_dtype: Any = jnp.float32
    rounder: Any = None
    axis_name: Any = None


def scale_by_prism(b1=0.95, gamma=1.0, ns_iters=5, mode="original", inv_steps=6, inv_eps=1e-5, inv_scale=1.001,
                   eps_gram=1e-6, gamma_l=None, gamma_r=None, precision="highest", nesterov=True, shape_nesterov=True,
                   bias_correction=False, mu_dtype=None, raw_global_grad_clip=None, permissive_spike_protection=True,
                   grad_clip_max_amps=(2.0, 10.0), weight_dimension_numbers=None, weight_decay=0.0,
                   weight_decay_mask=None, axis_name=None, key=42, round=None) -> optax.GradientTransformation:
    r"""PRISM's update direction for the leaves that a partitioner views as matrices.

    .. math::
        g \leftarrow g\min(1, c/\lVert g\rVert_2),\quad M_t = b_1 M_{t-1} + (1-b_1) g,\quad
        T = b_1 M_t + (1-b_1) g,\quad D = g - M_t,\\
        O = \operatorname{clip}_{a,e}\bigl(\operatorname{Shape}(T, D)\bigr) + \lambda\theta
        \ \text{per matrix},\quad \operatorname{clip}_{a,e}(X) = \operatorname{clip}\bigl(X\min(1, a/\operatorname{rms}(X)), -e, e\bigr)

    (the stages :func:`momentum`, :func:`target`, :func:`shape_matrix`, :func:`decay_terms`;
    ``bias_correction`` and ``nesterov`` variants in ``docs/prism.md``). A skipped step (a spike
    without ``permissive_spike_protection``, or a non-finite norm) outputs 0 on the matrix leaves
    and keeps the state. Leaves without a matrix spec pass through unchanged.

    Args:
      b1: momentum decay, in ``[0, 1)``.
      gamma: weight γ of the innovation ``D`` in the shaping, ``>= 0``.
      ns_iters: Newton–Schulz iterations (mode ``original``).
      mode: a mode name of the ``prism`` family, its registry record, or ``shape(T, D, **options)``.
      inv_steps: inverse-fourth-root iterations (mode ``bidirectional``).
      inv_eps: ridge of the normalised Grams (mode ``bidirectional``).
      inv_scale: safety factor κ of the iteration's coefficients (mode ``bidirectional``).
      eps_gram: ridge added to the Grams (mode ``bidirectional``).
      gamma_l: innovation weight of the left Gram (default ``gamma``).
      gamma_r: innovation weight of the right Gram (default ``gamma``).
      precision: matmul precision of the ``bidirectional`` iteration.
      nesterov: shape (or blend in) the Nesterov look-ahead momentum.
      shape_nesterov: shape the Nesterov target rather than the plain momentum.
      bias_correction: divide the momentum terms by ``1 - b1^t``.
      mu_dtype: storage dtype of the momentum (``None``: float32).
      raw_global_grad_clip: spike threshold ``c`` on the matrix gradients' global L2 norm.
      permissive_spike_protection: a spike is rescaled to norm ``c`` (True) or skipped (False).
      grad_clip_max_amps: ``(a, e)`` caps of each shaped matrix; a number ``a`` is ``(a, 10.0)``; ``None``: none.
      weight_dimension_numbers: ``None`` (by shape), a pytree of ``MatrixSpec | None``, a callable, or a partitioner.
      weight_decay: decoupled weight decay λ (float or schedule of the count).
      weight_decay_mask: pytree or callable ``params -> bool pytree``.
      axis_name: data-parallel axis over which the spike norm is summed.
      key: int seed or PRNG key for stochastic momentum writes.
      round: rounding object or name for writing the momentum in ``mu_dtype``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByPrismState` (no learning rate).

    References:
      Yang, `PRISM: Structured Optimization via Anisotropic Spectral Shaping <https://arxiv.org/abs/2602.03096>`_.

    >>> import rollfast.testing
    >>> tx = optax.chain(scale_by_prism(), optax.scale_by_learning_rate(optax.cosine_decay_schedule(0.05, 60)))
    >>> loss = lambda p: jnp.sum((p["w"] - jnp.eye(8, 4)) ** 2)   # minimum 0
    >>> _, _, losses = rollfast.testing.run(tx, {"w": jnp.zeros((8, 4))}, loss, steps=60)
    >>> [round(x, 3) for x in losses[::15]]   # the loss every 15 steps
    [4.0, 2.137, 0.465, 0.114, 0.079]
    """
    _check(b1=b1, gamma=gamma, ns_iters=ns_iters)
    shape_options = dict(gamma=gamma, ns_iters=ns_iters, inv_steps=inv_steps, inv_eps=inv_eps,
                         inv_scale=inv_scale, eps_gram=eps_gram, gamma_l=gamma_l, gamma_r=gamma_r,
                         precision=precision)
    opts = PrismOptions(
        b1=b1, nesterov=nesterov, shape_nesterov=shape_nesterov, bias_correction=bias_correction,
        shape=shape_fn(mode, shape_options), clip=update_clipper("per_tensor_rms", grad_clip_max_amps),
        raw_global_grad_clip=raw_global_grad_clip, permissive_spike_protection=permissive_spike_protection,
        weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        mu_dtype=jnp.float32 if mu_dtype is None else jnp.dtype(mu_dtype),
        rounder=resolve("round", round, option="round"), axis_name=axis_name)
    partitioner = as_partitioner(weight_dimension_numbers)

    def init(params):
        return init_state(params, leaf_specs(partitioner, params), opts.mu_dtype, key)

    def update(updates, state, params=None):
        return update_matrices(updates, state, params, leaf_specs(partitioner, updates), opts)

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------------ stages
def init_state(params, specs, mu_dtype, key) -> ScaleByPrismState:
    """:math:`t = 0`, :math:`M = 0` (in ``mu_dtype``) on matrix leaves, the spec (``None``
    or a masked node) elsewhere, and the PRNG key."""
    mu = jax.tree.map(lambda s, p: jnp.zeros_like(p, dtype=mu_dtype) if isinstance(s, MatrixSpec) else s,
                      specs, params, is_leaf=_is_spec_node)
    return ScaleByPrismState(jnp.zeros([], jnp.int32), mu, as_key(key))


def update_matrices(updates, state, params, specs, opts: PrismOptions):
    """One step: the spike guard decides and rescales, :func:`prism_step` runs unless the
    step is skipped (then the matrix outputs are 0 and ``state`` is unchanged); leaves
    without a matrix spec pass through."""
    flat_specs, treedef = jax.tree.flatten(specs, is_leaf=_is_spec_node)
    flat_g = treedef.flatten_up_to(updates)
    mat = [i for i, s in enumerate(flat_specs) if isinstance(s, MatrixSpec)]
    ok, factor = spike_guard([flat_g[i] for i in mat], opts.raw_global_grad_clip,
                             opts.permissive_spike_protection, opts.axis_name)
    decay = decay_terms(params, mat, treedef, state.count, opts)

    def step(grads, state):  # the spike's rescaling fuses into the momentum's pass
        grads = [g.astype(jnp.promote_types(g.dtype, jnp.float32)) for g in grads]  # float64 stays
        if factor is not None:
            grads = [g * factor for g in grads]
        return prism_step(grads, state, mat=mat, specs=flat_specs, treedef=treedef, decay=decay, opts=opts)

    out, new_state = run_unless_skipped(ok, step, [flat_g[i] for i in mat], state)
    flat_out = list(flat_g)
    for i, o in zip(mat, out):
        flat_out[i] = o
    return treedef.unflatten(flat_out), new_state


def prism_step(grads, state, *, mat, specs, treedef, decay, opts: PrismOptions):
    """The matrix leaves' directions and the next state on a step that is taken:
    :func:`momentum`, :func:`target`, :func:`shape_leaf`, plus the decay term
    :math:`\\lambda\\theta` where there is one, and the momentum written by
    :func:`write_momentum`."""
    flat_mu = treedef.flatten_up_to(state.mu)
    key_next, key_write = jax.random.split(state.key)
    write_keys = leaf_keys(key_write, len(flat_mu))
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    out, new_mu = [], list(flat_mu)
    for i, g in zip(mat, grads):
        m = momentum(flat_mu[i].astype(g.dtype), g, opts.b1)
        o = shape_leaf(specs[i], target(m, g, t, opts), g - m, g, opts)
        out.append(o if decay[i] is None else o + decay[i])
        new_mu[i] = write_momentum(m, opts.mu_dtype, opts.rounder, write_keys[i])
    return out, ScaleByPrismState(count, treedef.unflatten(new_mu), key_next)


def momentum(m_prev, g, b1):
    """Momentum: :math:`M = b_1 M_{prev} + (1-b_1)\\,g`.

    >>> momentum(jnp.float32(1.0), jnp.float32(3.0), 0.5)
    Array(2., dtype=float32)
    """
    return b1 * m_prev + (1 - b1) * g


def target(m, g, t, opts: PrismOptions):
    r"""The matrix that is shaped, at step :math:`t`:

    .. math::
        T = \begin{cases}
            M & \text{not shape\_nesterov}\\
            b_1 M/(1-b_1^{t+1}) + (1-b_1)\,g/(1-b_1^{t}) & \text{nesterov, bias\_correction}\\
            b_1 M + (1-b_1)\,g & \text{nesterov}\\
            M/(1-b_1^{t}) & \text{bias\_correction}\\
            M & \text{otherwise}
        \end{cases}

    >>> target(jnp.float32(2.0), jnp.float32(4.0), 1.0, PrismOptions(b1=0.5))
    Array(3., dtype=float32)
    """
    b1 = opts.b1
    if not opts.shape_nesterov:
        return m
    if opts.nesterov and opts.bias_correction:
        return b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
    if opts.nesterov:
        return b1 * m + (1 - b1) * g
    return m / (1 - b1**t) if opts.bias_correction else m


def shape_leaf(spec: MatrixSpec, t, d, g, opts: PrismOptions):
    """:func:`shape_matrix` on every matrix of the leaf's view (``lax.map`` over the
    batch axes), returned in the leaf's layout."""
    view = spec.view(g.shape)
    mats = [view.to_matrices(x) for x in (t, d, g)]
    fn = lambda ms: shape_matrix(*ms, opts)
    if view.matrix_shape[0] == 1:
        res = fn([m[0] for m in mats])[None]
    else:
        res = jax.lax.map(fn, mats)
    return view.from_matrices(res)


def shape_matrix(t, d, g, opts: PrismOptions):
    r"""One matrix's shaped and clipped direction:

    .. math::
        O = \operatorname{Shape}(T, D)\ \big(\leftarrow b_1 O + (1-b_1)\,g
            \text{ when nesterov but not shape\_nesterov}\big),\qquad
        O \leftarrow \operatorname{clip}\big(O\min(1, a/\operatorname{rms}(O)), -e, e\big).

    >>> opts = PrismOptions(shape=lambda t, d: t, clip=update_clipper("per_tensor_rms", (1.0, 0.5)))
    >>> shape_matrix(jnp.array([[3.0, 4.0]]), None, None, opts).tolist()
    [[0.5, 0.5]]
    """
    out = opts.shape(t, d)
    if opts.nesterov and not opts.shape_nesterov:
        out = opts.b1 * out + (1 - opts.b1) * g
    return opts.clip(out, 1.0)


def decay_terms(params, mat, treedef, count, opts: PrismOptions) -> list:
    r"""Per flattened leaf, the decoupled decay term :math:`\lambda_t\,\theta` (float32,
    float64 for float64 params) on masked-in matrix leaves, ``None`` elsewhere (everywhere when :math:`\lambda = 0`).

    :math:`\lambda_t` is ``weight_decay``, or ``weight_decay(count)`` with the count
    before this step when it is a schedule."""
    wd, mask, n = opts.weight_decay, opts.weight_decay_mask, treedef.num_leaves
    if not callable(wd) and wd == 0:
        return [None] * n
    if params is None:
        raise ValueError("scale_by_prism with weight_decay needs params in update()")
    lam = wd(count) if callable(wd) else wd
    mask = mask(params) if callable(mask) else mask
    flat_mask = [True] * n if mask is None else treedef.flatten_up_to(mask)
    flat_params = treedef.flatten_up_to(params)
    return [lam * flat_params[i].astype(jnp.promote_types(flat_params[i].dtype, jnp.float32))
            if i in mat and flat_mask[i] else None
            for i in range(n)]


def write_momentum(m, dtype, rounder, key):
    """``M`` stored in ``dtype``: a cast, or ``rounder.cast`` (e.g. stochastic rounding)."""
    return m.astype(dtype) if rounder is None else rounder.cast(m, dtype, key)


# ------------------------------------------------------------------------ options
def shape_fn(mode, options: dict) -> Callable:
    """``(T, D) -> O`` from a mode name, record or function, bound to the ``options``
    its signature declares.

    >>> f = shape_fn(lambda t, d, *, gamma: t + gamma * d, {"gamma": 2.0, "ns_iters": 5})
    >>> float(f(jnp.float32(1.0), jnp.float32(1.0)))
    3.0
    """
    mode = resolve("mode", mode, "prism")
    fn = mode.impl["shape"] if hasattr(mode, "impl") else mode
    if not callable(fn):
        raise TypeError(f"a prism mode must provide shape(T, D, **options), got {fn!r}")
    declared = inspect.signature(fn).parameters
    chosen = {k: v for k, v in options.items() if k in declared}
    return lambda t, d: fn(t, d, **chosen)


def _check(*, b1, gamma, ns_iters):
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"b1 must be in [0, 1), got {b1}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if int(ns_iters) != ns_iters or ns_iters < 0:
        raise ValueError(f"ns_iters must be a non-negative integer, got {ns_iters}")


def _is_spec_node(x) -> bool:
    return x is None or isinstance(x, (optax.MaskedNode, MatrixSpec))
