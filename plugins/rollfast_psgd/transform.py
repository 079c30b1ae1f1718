"""``scale_by_kron``: the PSGD Kron pipeline as one Optax transformation, built from stages.

Per step (:func:`kron_update`): :func:`guard_spike` → :func:`momentum` → :func:`lazy_scale`
→ (with probability ``p``) :func:`fit_factors` → :func:`apply_preconditioner` →
:func:`clip_updates`; where the factors live is :func:`leaf_plans` (the layout stage) and,
with ``block_size``, :func:`work_layout` (tiles and strips, ``rollfast_psgd.blocking``);
the state is written by :func:`next_state`. A step whose gradient is not finite, or a
spike with ``permissive_spike_protection=False``, returns zero updates and leaves the
state exactly as it was. The equations are in ``docs/kron.md``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import attrs
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rollfast.toolbox import hashed_bits, resolve, spike_guard, update_clipper
from rollfast_psgd.blocking import BlockedFactors, Tiling, TileStack, Untiled, unit_mask
from rollfast_psgd.factors import (MEMORY_SAVE_MODES, ModeSpec, Packing, UpdateConfig, init_factors, layout,
                                   mode_spec, update_factors)
from rollfast_psgd.linalg import PROBES, apply_all, preconditioner
from rollfast_psgd.schedule import precond_update_prob_schedule

BALANCE_PROBABILITY = 0.01
POOL_LIMIT = 1 << 16  # arrays below this many elements share one normal draw
F32 = jnp.float32


class KronState(NamedTuple):
    """State of :func:`scale_by_kron` (arrays only).

    ``mu``: momentum like params in ``mu_dtype`` (``None`` when ``b1 <= 0``); ``qs``: per
    leaf a tuple of factors (``(d, d)`` dense, ``(d,)`` diagonal; scalar leaves ``(1,)``;
    scanned leaves with a leading layer axis) in ``precond_dtype``; ``ls``: per factor
    Lipschitz estimates (``None`` without ``track_lipschitz``); ``ps``: with
    ``cache_preconditioner``, :math:`P_i = Q_i^TQ_i` of each factor in the form of ``qs``
    (else ``None``).
    """

    count: object
    mu: object
    qs: object
    ls: object
    needs_scale_init: object
    key: object
    ps: object = None


def _check_memory_save_mode(instance, attribute, value):
    if value not in MEMORY_SAVE_MODES:
        raise ValueError(f"memory_save_mode must be one of {MEMORY_SAVE_MODES}, got {value!r}")


LR_STYLES = (None, "adam")


def _check_lr_style(instance, attribute, value):
    if value not in LR_STYLES:
        raise ValueError(f"lr_style must be one of {LR_STYLES}, got {value!r}")


def _check_size(instance, attribute, value):
    if value is None and attribute.name == "block_size":
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        allowed = "None or an int >= 1" if attribute.name == "block_size" else "an int >= 1"
        raise ValueError(f"{attribute.name} must be {allowed}, got {value!r}")


@attrs.frozen(kw_only=True)
class KronOptions:
    """The options of :func:`scale_by_kron`, validated once (see its Args), and what
    follows from them: the mode's :class:`~rollfast_psgd.factors.ModeSpec`, the rounding
    rule, the update clipper, storage dtypes and the factor update's
    :class:`~rollfast_psgd.factors.UpdateConfig`.

    >>> KronOptions(mode="EXP").spec.statistic
    'Ph'
    >>> KronOptions(memory_save_mode="some_diag")
    Traceback (most recent call last):
    ValueError: memory_save_mode must be one of (None, 'one_diag', 'all_diag'), got 'some_diag'
    """

    b1: float = 0.9
    preconditioner_update_probability: float | Callable = precond_update_prob_schedule()
    max_size_triangular: int = 8192
    max_skew_triangular: float = 1.0
    min_ndim_triangular: int = 2
    memory_save_mode: str | None = attrs.field(default=None, validator=_check_memory_save_mode)
    whiten_grad: bool = True
    update_preconditioner_first: bool = True
    preconditioner_lr: float = 0.1
    preconditioner_init_scale: float | None = None
    mu_dtype: object = None
    precond_dtype: object = None
    precond_update_precision: object = "tensorfloat32"
    precond_grads_precision: object = None
    scanned_layers: object = None
    lax_map_scanned_layers: bool = False
    lax_map_batch_size: int = 8
    mode: object = "Q0.5EQ1.5"
    beta_lipschitz: float = 0.9
    track_lipschitz: bool = True
    damping: float = 1e-9
    grad_clip_max_amps: object = (2.0, 10.0)
    grad_clip_mode: str = "per_tensor_rms"
    raw_global_grad_clip: float | None = None
    permissive_spike_protection: bool = True
    newton_schulz_iters: int = 5
    axis_name: object = None
    round: object = "nearest"
    key: object = 42
    block_size: int | None = attrs.field(default=None, validator=_check_size)
    max_size_dense: int = attrs.field(default=16384, validator=_check_size)
    tile_stack_multiple: int = attrs.field(default=1, validator=_check_size)
    normalize_grads: bool = False
    lr_style: str | None = attrs.field(default=None, validator=_check_lr_style)
    cache_preconditioner: bool = False
    spec: ModeSpec = attrs.field(init=False)
    rounding: object = attrs.field(init=False)
    clip: Callable = attrs.field(init=False)
    update_config: UpdateConfig = attrs.field(init=False)

    @spec.default
    def _spec(self):
        return mode_spec(resolve("mode", self.mode, "kron", option="mode").impl)

    @rounding.default
    def _rounding(self):
        return resolve("round", self.round, default="nearest", option="round")

    @clip.default
    def _clip(self):
        return update_clipper(self.grad_clip_mode, self.grad_clip_max_amps, self.axis_name)

    @update_config.default
    def _update_config(self):
        return UpdateConfig(self.spec, self.preconditioner_lr, self.beta_lipschitz, self.track_lipschitz,
                            self.damping, self.newton_schulz_iters, self.axis_name)

    def __attrs_post_init__(self):
        if not self.whiten_grad and self.b1 <= 0:
            raise ValueError("whiten_grad=False whitens the momentum and needs b1 > 0")

    @property
    def mu_store(self):
        return jnp.dtype(self.mu_dtype or F32)

    @property
    def q_store(self):
        return jnp.dtype(self.precond_dtype or F32)

    @property
    def never_updates(self) -> bool:
        """A constant update probability of 0: no update branch is compiled."""
        p = self.preconditioner_update_probability
        return not callable(p) and p <= 0


def scale_by_kron(b1=0.9, preconditioner_update_probability=precond_update_prob_schedule(), max_size_triangular=8192,
                  max_skew_triangular=1.0, min_ndim_triangular=2, memory_save_mode=None, whiten_grad=True,
                  update_preconditioner_first=True, preconditioner_lr=0.1, preconditioner_init_scale=None,
                  mu_dtype=None, precond_dtype=None, precond_update_precision="tensorfloat32",
                  precond_grads_precision=None, scanned_layers=None, lax_map_scanned_layers=False,
                  lax_map_batch_size=8, mode="Q0.5EQ1.5", beta_lipschitz=0.9, track_lipschitz=True, damping=1e-9,
                  grad_clip_max_amps=(2.0, 10.0), grad_clip_mode="per_tensor_rms", raw_global_grad_clip=None,
                  permissive_spike_protection=True, newton_schulz_iters=5, axis_name=None, round="nearest",
                  key=42, block_size=None, max_size_dense=16384,
                  tile_stack_multiple=1, normalize_grads=False, lr_style=None,
                  cache_preconditioner=False) -> optax.GradientTransformation:
    r"""Precondition the momentum with a Kronecker-factored PSGD preconditioner.

    .. math::
        m_t = (1-\beta_t) g_t + \beta_t m_{t-1},\ \beta_t = \min(\tfrac{t-1}{t}, b_1),\qquad
        u_t = \operatorname{clip}(P m_t),\ P = Q^TQ,\ Q = Q_1\otimes\dots\otimes Q_k

    and, with probability :math:`p(t)`, each factor first takes a step of the mode's geometry
    towards whitening :math:`h = g + (\delta + \epsilon|g|) v` (equations: ``docs/kron.md``).

    Args:
      b1, preconditioner_update_probability, ..., cache_preconditioner: the options of
        :func:`rollfast_psgd.kron` (documented there, one by one), held in a validated
        :class:`KronOptions` record.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`KronState`.

    References:
      Li, `Preconditioned stochastic gradient descent <https://arxiv.org/abs/1512.04202>`_, 2015;
      Li, `Preconditioner on matrix Lie group for SGD <https://arxiv.org/abs/1809.10232>`_, 2018.

    >>> import jax, jax.numpy as jnp, optax
    >>> loss = lambda w: 0.5 * jnp.sum((jnp.diag(jnp.array([10.0, 1.0, 0.1])) @ w - 1.0) ** 2)  # min 0
    >>> tx = optax.chain(scale_by_kron(preconditioner_update_probability=1.0), optax.scale(-0.1))
    >>> step = jax.jit(lambda w, state: tx.update(jax.grad(loss)(w), state))
    >>> w, losses = jnp.zeros((3, 2)), []; state = tx.init(w)
    >>> for _ in range(100):
    ...     u, state = step(w, state); w = w + u; losses.append(round(float(loss(w)), 4))
    >>> losses[24::25]   # the loss every 25 steps
    [1.0443, 0.8135, 0.5535, 0.3112]
    """
    options = KronOptions(b1=b1, preconditioner_update_probability=preconditioner_update_probability,
        max_size_triangular=max_size_triangular, max_skew_triangular=max_skew_triangular,
        min_ndim_triangular=min_ndim_triangular, memory_save_mode=memory_save_mode, whiten_grad=whiten_grad,
        update_preconditioner_first=update_preconditioner_first, preconditioner_lr=preconditioner_lr,
        preconditioner_init_scale=preconditioner_init_scale, mu_dtype=mu_dtype, precond_dtype=precond_dtype,
        precond_update_precision=precond_update_precision, precond_grads_precision=precond_grads_precision,
        scanned_layers=scanned_layers, lax_map_scanned_layers=lax_map_scanned_layers,
        lax_map_batch_size=lax_map_batch_size, mode=mode, beta_lipschitz=beta_lipschitz,
        track_lipschitz=track_lipschitz, damping=damping, grad_clip_max_amps=grad_clip_max_amps,
        grad_clip_mode=grad_clip_mode, raw_global_grad_clip=raw_global_grad_clip,
        permissive_spike_protection=permissive_spike_protection, newton_schulz_iters=newton_schulz_iters,
        axis_name=axis_name, round=round, key=key, block_size=block_size, max_size_dense=max_size_dense,
        tile_stack_multiple=tile_stack_multiple, normalize_grads=normalize_grads, lr_style=lr_style,
        cache_preconditioner=cache_preconditioner)
    return kron_transform(options)


def kron_transform(options: KronOptions) -> optax.GradientTransformation:
    """The ``GradientTransformation`` of validated :class:`KronOptions`."""
    return optax.GradientTransformation(partial(kron_init, options=options),
                                        partial(kron_update, options=options))


# --- layout: where the factors live ---------------------------------------------------

def leaf_plans(tree, options: KronOptions) -> list:
    """Per leaf ``(scanned, dense)``: whether it is stacked on axis 0 (``scanned_layers``)
    and its factor :func:`~rollfast_psgd.factors.layout` (of the un-stacked shape).

    >>> leaf_plans({"w": jnp.ones((3, 3)), "b": jnp.ones(3)}, KronOptions())
    [(False, (False,)), (False, (True, True))]
    """
    leaves = jax.tree.leaves(tree)
    flags = _scanned_flags(tree, options.scanned_layers, len(leaves))
    return [(s, layout(p.shape[1:] if s else p.shape, options.max_size_triangular, options.max_skew_triangular,
                       options.min_ndim_triangular, options.memory_save_mode)) for p, s in zip(leaves, flags)]


def view(x, scanned):
    """``x`` as its factors see it: a scalar as ``(1,)`` (per layer when ``scanned``)."""
    shape = x.shape[1:] if scanned else x.shape
    return x.reshape(x.shape[:1] * scanned + (shape or (1,)))


def per_layer(fn, scanned, options: KronOptions):
    """``fn`` mapped over the leading layer axis of a scanned unit (``vmap`` or ``lax.map``)."""
    if not scanned:
        return fn
    if options.lax_map_scanned_layers:
        batch = options.lax_map_batch_size if options.lax_map_batch_size > 1 else None
        return lambda *args: jax.lax.map(lambda a: fn(*a), args, batch_size=batch)
    return jax.vmap(fn)


def work_layout(tree, plans, options: KronOptions):
    """Where the factors live: :class:`~rollfast_psgd.blocking.Untiled` (every leaf its own
    unit) or, with ``block_size``, the :class:`~rollfast_psgd.blocking.Tiling` of the tree."""
    if options.block_size is None:
        return Untiled(plans)
    return Tiling([p.shape for p in jax.tree.leaves(tree)], plans, block_size=options.block_size,
                  max_size_dense=options.max_size_dense, stack_multiple=options.tile_stack_multiple)


def kron_init(params, options: KronOptions) -> KronState:
    r"""Initial state: zero momentum, factors at :math:`P = s^2 I` (``s = 1`` until the lazy
    scale when ``preconditioner_init_scale`` is ``None``; with ``block_size``, on the valid
    block of each piece and 0 on its padding), Lipschitz estimates 0, count 0.

    >>> kron_init({"w": jnp.ones((2, 2))}, KronOptions(preconditioner_init_scale=4.0)).qs["w"][0]
    Array([[2., 0.],
           [0., 2.]], dtype=float32)
    """
    leaves, treedef = jax.tree.flatten(params)
    scale = 1.0 if options.preconditioner_init_scale is None else options.preconditioner_init_scale
    plans = leaf_plans(params, options)
    tiling = work_layout(params, plans, options)
    shapes = [s.shape for s in jax.eval_shape(tiling.split, leaves)]
    qs = tiling.init_factors(scale) if options.block_size else [None] * len(shapes)
    for u, (shape, (scanned, dense)) in enumerate(zip(shapes, tiling.plans)):
        if qs[u] is None:
            lead = shape[:1] * scanned
            qs[u] = init_factors(shape[1:] if scanned else shape, dense, scale)
            qs[u] = tuple(jnp.broadcast_to(q, lead + q.shape) for q in qs[u])
    qs = [tuple(q.astype(options.q_store) for q in fs) for fs in qs]
    ls = [tuple(jnp.zeros(shape[:1] * scanned, F32) for _ in fs)
          for fs, shape, (scanned, _) in zip(qs, shapes, tiling.plans)]
    mu = jax.tree.map(lambda p: jnp.zeros_like(p, options.mu_store), params) if options.b1 > 0 else None
    key = jax.random.PRNGKey(options.key) if isinstance(options.key, int) else options.key
    ps = None
    if options.cache_preconditioner:
        ps = [[p.astype(options.q_store) for p in fs]
              for fs in preconditioners([[q.astype(F32) for q in fs] for fs in qs], tiling.plans, options)]
    return KronState(jnp.zeros([], jnp.int32), mu, factor_state(qs, treedef, tiling),
                     factor_state(ls, treedef, tiling) if options.track_lipschitz else None,
                     jnp.asarray(options.preconditioner_init_scale is None), key,
                     None if ps is None else factor_state(ps, treedef, tiling))


def factor_state(per_unit: list, treedef, tiling):
    """Per-unit factor tuples → the state's form: the params tree of per-leaf tuples, or
    (blocked) :class:`~rollfast_psgd.blocking.BlockedFactors` with the stack first."""
    if tiling is None or isinstance(tiling, Untiled):
        return treedef.unflatten([tuple(fs) for fs in per_unit])
    stack = TileStack(*per_unit[0]) if tiling.stacked else None
    return BlockedFactors(stack, tuple(tuple(fs) for fs in per_unit[bool(tiling.stacked):]))


def factor_units(stored, treedef, tiling) -> list:
    """Inverse of :func:`factor_state`: per work unit the list of its factors."""
    if isinstance(tiling, Untiled):
        return [list(fs) for fs in treedef.flatten_up_to(stored)]
    return ([list(stored.stack)] if tiling.stacked else []) + [list(fs) for fs in stored.units]


# --- the stages of one step -----------------------------------------------------------

def guard_spike(grads: list, options: KronOptions):
    r"""``(ok, grads)``: :func:`rollfast.toolbox.spike_guard` with ``raw_global_grad_clip``
    :math:`c`: :math:`g \leftarrow g \cdot \min(1, c/\lVert g\rVert_2)`; ``ok`` is false for
    a non-finite gradient, and for a spike when ``permissive_spike_protection`` is False.

    >>> ok, g = guard_spike([jnp.array([3.0, 4.0])], KronOptions(raw_global_grad_clip=1.0))
    >>> bool(ok), g
    (True, [Array([0.6, 0.8], dtype=float32)])
    """
    ok, factor = spike_guard(grads, options.raw_global_grad_clip, options.permissive_spike_protection,
                             options.axis_name)
    return ok, (grads if factor is None else [g * factor for g in grads])


def update_probability(count, options: KronOptions):
    """:math:`p(t)` of this step, ``t = count + 1`` (a constant or the schedule's value)."""
    p = options.preconditioner_update_probability
    return p(optax.safe_increment(count)) if callable(p) else p


def momentum(grads: list, mus: list, count, skip, b1: float) -> list:
    r"""Float32 momentum :math:`m_t = (1-\beta_t)g_t + \beta_t m_{t-1}`,
    :math:`\beta_t = \min(\tfrac{t-1}{t}, b_1)` with ``t = count + 1``; the old
    :math:`m_{t-1}` where ``skip``.

    >>> momentum([jnp.ones(2)], [jnp.zeros(2)], jnp.int32(1), False, 0.9)
    [Array([0.5, 0.5], dtype=float32)]
    """
    count = count.astype(F32)
    beta = jnp.minimum(count / (1 + count), b1)
    # A skipped step keeps the old momentum; selecting before anything reads the new one
    # lets XLA write it in place in one pass (no copy of the old state).
    return [jnp.where(skip, m, (1 - beta) * g + beta * m) for g, m in zip(grads, (m.astype(F32) for m in mus))]


def initial_scale(units, unit_plans, segments, *, damping, axis_name=None):
    r"""The lazy initial scale, estimated from the gradient ``units`` (see
    :class:`~rollfast_psgd.factors.Packing`):

    .. math::
        s = \bigl(\max_{\text{leaf}} \operatorname{mean}(g^4) + \delta^4\bigr)^{-1/8}

    (for a scanned leaf the max over its layers; averaged over ``axis_name``).

    >>> round(float(initial_scale([jnp.full(2, 2.0)], [(False, (False,))], [None], damping=0.0)), 4)  # 16^(-1/8)
    0.7071
    """
    mean4 = lambda g, seg: jnp.mean(g**4) if seg is None else jnp.max(seg.mean(g**4))
    mu4 = [jnp.max(jnp.mean(g.reshape(g.shape[0], -1) ** 4, axis=1)) if scanned else mean4(g, seg)
           for g, (scanned, _), seg in zip(units, unit_plans, segments) if g.size]
    s = (jnp.max(jnp.stack(mu4 or [jnp.float32(0)])) + damping**4) ** (-1 / 8)
    return jax.lax.pmean(s, axis_name) if axis_name else s


def lazy_scale(qs, s, flag, power=1):
    r"""Every leaf's ``k`` factors times :math:`s^{1/k}` where ``flag`` (:func:`initial_scale`);
    with ``power=2`` the same for cached :math:`P_i = Q_i^TQ_i`: times :math:`s^{2/k}`.

    >>> lazy_scale([[jnp.ones(2)]], jnp.float32(0.5), True)
    [[Array([0.5, 0.5], dtype=float32)]]
    """
    return [[q * jnp.where(flag, s ** (power / len(fs)), 1.0) for q in fs] for fs in qs]


def noise_shapes(signal, unit_plans) -> list:
    """Shapes of an update's probe noise: per unit its own, then a ``(2, 32, d)`` probe
    pair per dense factor.

    >>> noise_shapes([jnp.ones((3, 2))], [(False, (True, False))])
    [(3, 2), (2, 32, 3)]
    """
    dims = [d for x, (scanned, dense) in zip(signal, unit_plans)
            for d, is_dense in zip(x.shape[scanned:], dense) if is_dense]
    return [x.shape for x in signal] + [(2, PROBES, d) for d in dims]


def preconditioners(qs, plans, options: KronOptions) -> list:
    """Per unit, :math:`P_i = Q_i^TQ_i` of each factor (:func:`~rollfast_psgd.linalg.preconditioner`)."""
    upper = options.spec.inverse_probe
    return [per_layer(lambda fs: preconditioner(fs, upper), scanned, options)(fs)
            for fs, (scanned, _) in zip(qs, plans)]


def fit_units(qs, ls, signal, plans, segments, normals, balance, options: KronOptions, valid=None):
    r"""One preconditioner update of every unit (:func:`~rollfast_psgd.factors.update_factors`)
    on the probe :math:`h = x + (\delta + \epsilon|x|)\,v`; an empty unit keeps its factors.
    A unit of zero-padded pieces (``valid[i]`` not ``None``) draws ``v`` on the valid block only.

    Returns:
      ``(qs, ls, ps)`` per unit: new factors, Lipschitz estimates (``None`` without
      ``track_lipschitz``) and :math:`P` of the new factors.
    """
    noise, probes = iter(normals[:len(signal)]), iter(normals[len(signal):])
    valid = valid or [None] * len(signal)
    new_qs, new_ls, new_ps = [], [], []
    for i, (x, (scanned, dense), seg) in enumerate(zip(signal, plans, segments)):
        v = next(noise) if valid[i] is None else next(noise) * unit_mask(valid[i], x.shape)
        leaf_probes = [next(probes) if is_dense else None for is_dense in dense]
        l_i = None if ls is None else ls[i]
        if x.size == 0:  # an empty leaf has nothing to fit
            new_qs.append(qs[i])
            new_ls.append(l_i)
            new_ps += preconditioners([qs[i]], [(scanned, dense)], options)
            continue
        h = x + (options.damping + jnp.finfo(x.dtype).eps * jnp.abs(x)) * v
        step = partial(_update_one, probes=leaf_probes, balance=balance, cfg=options.update_config, segments=seg)
        q, l, p = per_layer(step, scanned, options)(qs[i], l_i, view(h.astype(F32), scanned), view(v, scanned),
                                                    valid[i])
        new_qs.append(q)
        new_ls.append(l)
        new_ps.append(p)
    return new_qs, (None if ls is None else new_ls), new_ps


def _update_one(qs, ls, h, v, valid, *, probes, balance, cfg, segments):
    return update_factors(qs, ls, h, v, probes, balance, cfg, segments, valid)


def fit_factors(qs, ls, signal, plans, draws, options: KronOptions, valid=None, cached=None):
    """The factor stage: per leaf ``(qs, ls, ps, next_ps)`` after an update with probability
    ``p`` (``lax.cond`` on ``draws.do_update``; with a constant ``p = 0`` no update branch is
    compiled). ``ps`` is ``P`` of the factors that precondition this step: the new ones with
    ``update_preconditioner_first``, else the old ones. ``next_ps`` (only with ``cached``,
    the ``P`` of the incoming factors) is ``P`` of the returned factors, to cache for the next
    step: a step that keeps its factors forms no ``P`` at all. Leaves are fitted as the units
    of ``Packing.of(..., stack=True)``: small leaves packed, leaves of equal shape stacked.
    ``valid``: per leaf (unit of blocked pieces) ``None`` or its valid lengths.
    """
    fit = Packing.of(plans, [x.shape for x in signal], enabled=options.spec.update_diag is None)
    first = options.update_preconditioner_first
    new_p = first or cached is not None
    valid = valid or [None] * len(signal)
    fit_valid = [valid[i] for i in fit.others] + [None] * (len(fit.plans(plans)) - len(fit.others))

    def update_branch(qs, ls):
        new_qs, new_ls, new_ps = fit_units(
            fit.pack(qs), None if ls is None else fit.pack(ls), fit.pack(signal), fit.plans(plans),
            fit.segments, draws.normals(), draws.balance, options, fit_valid)
        out = (fit.unpack(new_qs, qs), None if ls is None else fit.unpack(new_ls, ls), fit.unpack(new_ps, qs))
        return out if new_p else out[:2]

    def keep_branch(qs, ls):
        if not new_p:
            return qs, ls
        return qs, ls, preconditioners(qs, plans, options) if cached is None else cached

    with jax.default_matmul_precision(options.precond_update_precision):
        out = (keep_branch(qs, ls) if options.never_updates
               else jax.lax.cond(draws.do_update, update_branch, keep_branch, qs, ls))
        if first:
            ps = out[2]
        else:
            ps = preconditioners(qs, plans, options) if cached is None else cached
        return (*out[:2], ps, None if cached is None else out[2])


def apply_preconditioner(ps, moms, plans, options: KronOptions) -> list:
    r"""Per unit :math:`u = P m`, :math:`P m = (P_1 \otimes\dots\otimes P_k)\,m` axis by axis."""
    with jax.default_matmul_precision(options.precond_grads_precision):
        return [per_layer(apply_all, scanned, options)(fs, view(m, scanned)).reshape(m.shape)
                for fs, m, (scanned, _) in zip(ps, moms, plans)]


def clip_updates(us: list, options: KronOptions) -> list:
    r""":func:`rollfast.toolbox.update_clipper` of ``grad_clip_mode`` with caps
    ``grad_clip_max_amps`` :math:`(a, e)`: per tensor
    :math:`u \leftarrow \operatorname{clip}(u \min(1, a/\operatorname{rms}(u)), -e, e)`, or
    :math:`u \leftarrow u \min(1, a/\operatorname{rms}_{\text{all}})`.

    >>> clip_updates([jnp.array([3.0, 4.0])], KronOptions(grad_clip_max_amps=(1.0, 1.5)))
    [Array([0.84852815, 1.1313709 ], dtype=float32)]
    """
    return options.clip(us, 1.0)


def normalized(grads: list) -> list:
    r"""``normalize_grads``: each leaf :math:`g \leftarrow g / (\lVert g\rVert_F + 10^{-6})`.

    >>> [round(float(x), 4) for x in normalized([jnp.array([3.0, 4.0])])[0]]
    [0.6, 0.8]
    """
    return [g / (jnp.linalg.norm(g.reshape(-1)) + 1e-6) for g in grads]


def adam_matched(us: list) -> list:
    r"""``lr_style="adam"``: per leaf
    :math:`u \leftarrow u \cdot \min(1, 1.1/\operatorname{rms}(u)) / 5`, so a whitened
    update (RMS ≈ 1) has RMS ≈ 0.2 — about Adam's — and Adam learning rates transfer.

    >>> [round(float(x), 4) for x in adam_matched([jnp.full(4, 2.0)])[0]]
    [0.22, 0.22, 0.22, 0.22]
    """
    rms = lambda u: jnp.sqrt(jnp.mean(jnp.square(u))) if u.size else jnp.float32(0)
    return [u * jnp.minimum(1.0, 1.1 / jnp.maximum(rms(u), 1e-30)) / 5 for u in us]


def store(arrays: list, dtype, key, rounding) -> list:
    """Arrays written in their storage ``dtype`` with the ``round`` rule (float32: as they are)."""
    if dtype == F32:
        return arrays
    return [rounding.cast(a, dtype, k) for a, k in zip(arrays, jax.random.split(key, len(arrays)))]


class StepDraws(NamedTuple):
    """All of a step's randomness, from one ``jax.random.bits`` call (:func:`draw_step`)."""

    next_key: object
    mu_key: object
    q_key: object
    do_update: object
    balance: object
    normals: Callable


def draw_step(key, shapes, prob, skip) -> StepDraws:
    """The step's draws: the next key, keys of the stochastic rounding of ``mu`` and ``qs``,
    the update coin ``u < p`` (false when ``skip``), the balancing coin ``u < 0.01``, and
    the deferred probe normals of ``shapes`` (:func:`_normals`)."""
    next_key, words = _draw_words(key, 3 + len(shapes) + 1)
    u_update, u_balance = _unit(words[2])
    return StepDraws(next_key, words[0], words[1], (u_update < prob) & ~skip,
                     u_balance < BALANCE_PROBABILITY, _normals(words[3:], shapes))


def kron_update(updates, state: KronState, params=None, *, options: KronOptions):
    """One step: the stages in order (module docstring); ``params`` is unused. With
    ``block_size`` the factor stages run on the blocked units of :func:`work_layout`."""
    del params
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves:
        return updates, state
    plans = leaf_plans(updates, options)
    tiling = work_layout(updates, plans, options)
    ok, grads = guard_spike([g.astype(F32) for g in leaves], options)
    skip = ~ok
    if options.normalize_grads:
        grads = normalized(grads)
    moms = grads
    if options.b1 > 0:
        moms = momentum(grads, treedef.flatten_up_to(state.mu), state.count, skip, options.b1)
    qs = [[q.astype(F32) for q in fs] for fs in factor_units(state.qs, treedef, tiling)]
    ls = factor_units(state.ls, treedef, tiling) if options.track_lipschitz else None
    pk = Packing.of(plans, [g.shape for g in grads], enabled=options.spec.update_diag is None, stack=False)
    cached = None if state.ps is None else [[p.astype(F32) for p in fs]
                                            for fs in factor_units(state.ps, treedef, tiling)]
    if options.preconditioner_init_scale is None:
        scale = initial_scale(pk.pack(grads), pk.plans(plans), pk.segments, damping=options.damping,
                              axis_name=options.axis_name)
        flag = state.needs_scale_init & ~skip
        qs = lazy_scale(qs, scale, flag)
        cached = None if cached is None else lazy_scale(cached, scale, flag, power=2)
    signal = tiling.split(grads if options.whiten_grad else moms)
    draws = draw_step(state.key, _fit_noise_shapes(signal, tiling.plans, options),
                      update_probability(state.count, options), skip)
    new_qs, new_ls, ps, next_ps = fit_factors(qs, ls, signal, tiling.plans, draws, options, tiling.valid, cached)
    work = tiling.split(moms)
    pw = pk if isinstance(tiling, Untiled) else Packing.of(
        tiling.plans, [m.shape for m in work], enabled=options.spec.update_diag is None, stack=False)
    us = tiling.join(pw.unpack(apply_preconditioner(pw.pack(ps), pw.pack(work), pw.plans(tiling.plans), options),
                               work), leaves)
    us = clip_updates(us, options)
    if options.lr_style == "adam":
        us = adam_matched(us)
    us = [jnp.where(skip, 0.0, u).astype(g.dtype) for u, g in zip(us, leaves)]
    return treedef.unflatten(us), next_state(state, treedef, tiling=tiling, moms=moms, qs=new_qs, ls=new_ls,
                                             ps=next_ps, skip=skip, draws=draws, options=options)


def _fit_noise_shapes(signal, plans, options):
    fit = Packing.of(plans, [x.shape for x in signal], enabled=options.spec.update_diag is None)
    return noise_shapes(jax.eval_shape(fit.pack, signal), fit.plans(plans))


def next_state(state: KronState, treedef, *, moms, qs, ls, skip, draws: StepDraws,
               options: KronOptions, tiling=None, ps=None) -> KronState:
    """The new state in its storage dtypes; count, key and the lazy-scale flag stay where
    ``skip`` (momentum, factors, estimates and cached ``ps`` kept themselves in their
    stages); factors in the form of :func:`factor_state` for ``tiling`` (``None``: per leaf).
    Cached ``ps`` are stored in the factors' dtype, rounded to nearest."""
    mu = treedef.unflatten(store(moms, options.mu_store, draws.mu_key, options.rounding)) if options.b1 > 0 \
        else state.mu
    stored = iter(store([q for fs in qs for q in fs], options.q_store, draws.q_key, options.rounding))
    keep = lambda old, new: jnp.where(skip, old, new)
    return KronState(
        keep(state.count, optax.safe_increment(state.count)), mu,
        factor_state([tuple(next(stored) for _ in fs) for fs in qs], treedef, tiling),
        factor_state(ls, treedef, tiling) if options.track_lipschitz else None,
        keep(state.needs_scale_init, False), keep(state.key, draws.next_key),
        None if ps is None else factor_state([tuple(p.astype(options.q_store) for p in fs) for fs in ps], treedef,
                                             tiling))


# --- random numbers -------------------------------------------------------------------

def _normals(seeds, shapes):
    """Standard normal arrays of the given shapes from ``len(shapes) + 1`` pairs of uint32
    ``seeds``, deferred.

    The bits are :func:`rollfast.toolbox.hashed_bits`, a counter hash: threefry itself
    takes ~45 ms for the 4.9 M elements of the benchmark tree, the hash 0.4 ms. Arrays
    of fewer than ``POOL_LIMIT`` elements (small leaves, probes) are slices of one pooled
    draw (the last seed), computed now; the larger ones use their own seed and are
    computed when the returned ``draw()`` is called. Called inside the ``lax.cond``
    branch that uses them, each large array fuses into its consumer, while the pool is
    one operand of the branch, computed once: fused into each of its ~50 consumers, XLA
    compiled ~50 copies of the hash.

    Returns:
      ``draw``, a function of no arguments returning the list of arrays.
    """

    sizes = [int(np.prod(s)) for s in shapes]
    pooled = [i for i, size in enumerate(sizes) if size < POOL_LIMIT]
    pool = _normal(hashed_bits(seeds[len(shapes)], (sum(sizes[i] for i in pooled),))) if pooled else None

    def draw():
        out, start = [], 0
        for i, (size, shape) in enumerate(zip(sizes, shapes)):
            if size < POOL_LIMIT:
                out.append(pool[start:start + size].reshape(shape))
                start += size
            else:
                out.append(_normal(hashed_bits(seeds[i], shape)))
        return out

    return draw


def _draw_words(key, pairs):
    """``(next_key, words)``: ``pairs`` pairs of uint32 words, shape ``(pairs, 2)``, and a
    key to use next time, from one ``jax.random.bits`` call on ``key`` (raw or typed)."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    flat = jax.random.bits(key, (data.size + 2 * pairs,), jnp.uint32)
    nxt = flat[:data.size].reshape(data.shape)
    if typed:
        nxt = jax.random.wrap_key_data(nxt, impl=jax.random.key_impl(key))
    return nxt, flat[data.size:].reshape(pairs, 2)


def _unit(bits):
    """Uniform floats in ``[0, 1)`` from the 23 high bits of uint32 words."""
    return jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1


def _normal(bits):
    """``√2·erfinv(2u − 1)`` with ``u ∈ [0, 1)`` from the 23 high bits: N(0, 1)."""
    return jnp.sqrt(2.0) * jax.lax.erf_inv(jnp.maximum(2 * _unit(bits) - 1, jnp.nextafter(-1.0, 0.0)))


def _scanned_flags(tree, scanned_layers, n) -> list[bool]:
    if scanned_layers is None:
        return [False] * n
    marks = scanned_layers(tree) if callable(scanned_layers) else scanned_layers
    hole = lambda x: x is None or isinstance(x, optax.MaskedNode)
    flags = jax.tree.map(lambda p, s: None if hole(p) else bool(s), tree, marks, is_leaf=hole)
    return jax.tree.leaves(flags)
