"""``scale_by_kron``: the PSGD Kron pipeline as one Optax transformation.

Per step: spike clip → momentum → lazy scale init → (with probability ``p``) one
preconditioner update by the chosen mode → ``u = P·m`` → update clipping. A step whose
gradient is not finite, or a spike that is skipped, returns zero updates and leaves the
state exactly as it was.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rollfast.toolbox import all_finite, hashed_bits, resolve, sum_of_squares
from rollfast_psgd.factors import MEMORY_SAVE_MODES, Packing, UpdateConfig, mode_spec
from rollfast_psgd.linalg import PROBES
from rollfast_psgd.schedule import precond_update_prob_schedule

GRAD_CLIP_MODES = ("per_tensor_rms", "global_rms")
BALANCE_PROBABILITY = 0.01
POOL_LIMIT = 1 << 16  # arrays below this many elements share one normal draw


class KronState(NamedTuple):
    """State of :func:`scale_by_kron` (arrays only).

    ``mu``: momentum like params in ``mu_dtype`` (``None`` when ``b1 <= 0``); ``qs``: per
    leaf a tuple of factors (``(d, d)`` dense, ``(d,)`` diagonal; scalar leaves ``(1,)``;
    scanned leaves with a leading layer axis) in ``precond_dtype``; ``ls``: per factor
    Lipschitz estimates (``None`` without ``track_lipschitz``).
    """

    count: object
    mu: object
    qs: object
    ls: object
    needs_scale_init: object
    key: object


def scale_by_kron(
    b1=0.9,
    preconditioner_update_probability=precond_update_prob_schedule(),
    max_size_triangular=8192,
    max_skew_triangular=1.0,
    min_ndim_triangular=2,
    memory_save_mode=None,
    whiten_grad=True,
    update_preconditioner_first=True,
    preconditioner_lr=0.1,
    preconditioner_init_scale=None,
    mu_dtype=None,
    precond_dtype=None,
    precond_update_precision="tensorfloat32",
    precond_grads_precision=None,
    scanned_layers=None,
    lax_map_scanned_layers=False,
    lax_map_batch_size=8,
    mode="Q0.5EQ1.5",
    beta_lipschitz=0.9,
    track_lipschitz=True,
    damping=1e-9,
    grad_clip_max_amps=(2.0, 10.0),
    grad_clip_mode="per_tensor_rms",
    raw_global_grad_clip=None,
    permissive_spike_protection=True,
    newton_schulz_iters=5,
    axis_name=None,
    round="nearest",
    key=42,
):
    r"""Precondition the momentum with a Kronecker-factored PSGD preconditioner.

    .. math::
        m_t = (1-\beta_t) g_t + \beta_t m_{t-1},\ \beta_t = \min(\tfrac{t-1}{t}, b_1),\qquad
        u_t = \operatorname{clip}(P m_t),\ P = Q^TQ,\ Q = Q_1\otimes\dots\otimes Q_k

    and, with probability :math:`p(t)`, each factor first moves towards whitening the
    probe :math:`h = g + (\delta + \epsilon|g|) v`, :math:`v\sim N(0,I)`: the mode's
    geometry applied to the error :math:`G_i(Ph) + \delta - \tfrac{n}{d_i} I` (or its EQ /
    TAYLOR2 variants), with step :math:`\eta_0/L`, :math:`L` a running max of the
    curvature bound :math:`\ell`.

    Args:
      b1: momentum (``β_t = min(t/(1+t), b1)``); ``<= 0`` uses the gradient.
      preconditioner_update_probability: float or schedule ``step -> p`` (default:
        :func:`precond_update_prob_schedule`).
      max_size_triangular: axes longer than this get a diagonal factor.
      max_skew_triangular: an axis with ``d² > max_skew_triangular · n`` gets a diagonal factor.
      min_ndim_triangular: leaves with fewer axes get only diagonal factors.
      memory_save_mode: ``None``, ``"one_diag"`` (largest axis diagonal) or ``"all_diag"``.
      whiten_grad: fit P to the gradient (True) or to the momentum (False, needs ``b1 > 0``).
      update_preconditioner_first: precondition with this step's updated factors.
      preconditioner_lr: base step η₀ of the factor updates.
      preconditioner_init_scale: initial ``s`` of ``P = s²I``; ``None`` estimates
        ``s = (max_leaf mean g⁴ + damping⁴)^{-1/8}`` from the first gradient.
      mu_dtype: momentum storage dtype (``None``: float32).
      precond_dtype: factor storage dtype (``None``: float32).
      precond_update_precision: matmul precision of the factor updates.
      precond_grads_precision: matmul precision of ``P·m`` (``None``: JAX default).
      scanned_layers: bool pytree (or ``params -> pytree``) marking leaves stacked on
        their leading axis; each layer gets its own factors.
      lax_map_scanned_layers: map scanned layers with ``lax.map`` instead of ``vmap``.
      lax_map_batch_size: ``lax.map`` batch size (``<= 1``: unbatched).
      mode: the factor geometry, a registered kron mode (``rollfast list``).
      beta_lipschitz: decay of the Lipschitz estimate ``L``.
      track_lipschitz: normalise by the running ``L`` (True) or by this update's bound.
      damping: probe noise floor δ, added to ``G_i(Ph)``, and in the init-scale estimate.
      grad_clip_max_amps: ``(rms, elementwise)`` caps of the update; a number means
        ``(number, 10.0)``.
      grad_clip_mode: ``"per_tensor_rms"`` or ``"global_rms"``.
      raw_global_grad_clip: clip the raw gradient to this global L2 norm (a "spike").
      permissive_spike_protection: while ``p >= 1`` spikes are clipped, not skipped.
      newton_schulz_iters: the NS mode's reference iteration count; its polar projection
        runs to convergence, at most ``newton_schulz_iters + 40`` steps.
      axis_name: mapped axis over which statistics are averaged and bounds maxed.
      round: rounding rule for bfloat16 ``mu_dtype`` / ``precond_dtype`` storage.
      key: int seed or PRNG key; all randomness flows from it.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_kron(b1=0.0, preconditioner_update_probability=0.0,
    ...                    preconditioner_init_scale=2.0)
    >>> tx.update({"w": jnp.full((2, 2), 0.25)}, tx.init({"w": jnp.zeros((2, 2))}))[0]["w"]
    Array([[1., 1.],
           [1., 1.]], dtype=float32)
    """

    spec = mode_spec(resolve("mode", mode, "kron", option="mode").impl)
    rounding = resolve("round", round, default="nearest", option="round")
    if grad_clip_mode not in GRAD_CLIP_MODES:
        raise ValueError(f"grad_clip_mode must be one of {GRAD_CLIP_MODES}, got {grad_clip_mode!r}")
    if memory_save_mode not in MEMORY_SAVE_MODES:
        raise ValueError(f"memory_save_mode must be one of {MEMORY_SAVE_MODES}, got {memory_save_mode!r}")
    if not whiten_grad and b1 <= 0:
        raise ValueError("whiten_grad=False whitens the momentum and needs b1 > 0")
    if isinstance(grad_clip_max_amps, (int, float)):
        grad_clip_max_amps = (float(grad_clip_max_amps), 10.0)
    rms_cap, elem_cap = grad_clip_max_amps
    mu_store = jnp.dtype(mu_dtype or jnp.float32)
    q_store = jnp.dtype(precond_dtype or jnp.float32)
    f32 = jnp.float32
    tiny = jnp.finfo(f32).tiny
    cfg = UpdateConfig(spec, preconditioner_lr, beta_lipschitz, track_lipschitz, damping,
                       newton_schulz_iters, axis_name)
    reduce = lambda op, x: op(x, axis_name) if axis_name else x
    never_updates = not callable(preconditioner_update_probability) and preconditioner_update_probability <= 0

    def plans(tree):
        from rollfast_psgd.factors import layout

        leaves = jax.tree.leaves(tree)
        flags = _scanned_flags(tree, scanned_layers, len(leaves))
        return [(s, layout(p.shape[1:] if s else p.shape, max_size_triangular, max_skew_triangular,
                           min_ndim_triangular, memory_save_mode)) for p, s in zip(leaves, flags)]

    def view(x, scanned):
        shape = x.shape[1:] if scanned else x.shape
        return x.reshape(x.shape[:1] * scanned + (shape or (1,)))

    def per_layer(fn, scanned):
        if not scanned:
            return fn
        if lax_map_scanned_layers:
            batch = lax_map_batch_size if lax_map_batch_size > 1 else None
            return lambda *args: jax.lax.map(lambda a: fn(*a), args, batch_size=batch)
        return jax.vmap(fn)

    def init(params):
        from rollfast_psgd.factors import init_factors

        leaves, treedef = jax.tree.flatten(params)
        scale = 1.0 if preconditioner_init_scale is None else preconditioner_init_scale
        qs, ls = [], []
        for p, (scanned, dense) in zip(leaves, plans(params)):
            lead = p.shape[:1] * scanned
            shape = p.shape[1:] if scanned else p.shape
            qs.append(tuple(jnp.broadcast_to(q, lead + q.shape).astype(q_store)
                            for q in init_factors(shape, dense, scale)))
            ls.append(tuple(jnp.zeros(lead, f32) for _ in qs[-1]))
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, mu_store), params) if b1 > 0 else None
        k = jax.random.PRNGKey(key) if isinstance(key, int) else key
        return KronState(jnp.zeros([], jnp.int32), mu, treedef.unflatten(qs),
                         treedef.unflatten(ls) if track_lipschitz else None,
                         jnp.asarray(preconditioner_init_scale is None), k)

    def lazy_scale(qs, units, unit_plans, flag, segments):
        """Scale every leaf's factors by the estimate from the gradient ``units`` (see Packing)."""
        mean4 = lambda g, seg: jnp.mean(g**4) if seg is None else jnp.max(seg.mean(g**4))
        mu4 = [jnp.max(jnp.mean(g.reshape(g.shape[0], -1) ** 4, axis=1)) if scanned
               else mean4(g, seg) for g, (scanned, _), seg in zip(units, unit_plans, segments)
               if g.size]
        s = (jnp.max(jnp.stack(mu4 or [jnp.float32(0)])) + damping**4) ** (-1 / 8)
        s = reduce(jax.lax.pmean, s)
        return [[q * jnp.where(flag, s ** (1 / len(fs)), 1.0) for q in fs] for fs in qs]

    def noise_shapes(signal, leaf_plans):
        """Shapes of an update's probe noise: per unit its own, then a probe pair per dense factor."""
        dims = [d for x, (scanned, dense) in zip(signal, leaf_plans)
                for d, is_dense in zip(x.shape[scanned:], dense) if is_dense]
        return [x.shape for x in signal] + [(2, PROBES, d) for d in dims]

    def update_preconditioner(qs, ls, signal, leaf_plans, segments, draw, balance):
        from rollfast_psgd.factors import update_factors

        normals = draw()
        noise, probes = iter(normals[:len(signal)]), iter(normals[len(signal):])
        new_qs, new_ls, new_ps = [], [], []
        for i, (x, (scanned, dense), seg) in enumerate(zip(signal, leaf_plans, segments)):
            v = next(noise)
            leaf_probes = [next(probes) if is_dense else None for is_dense in dense]
            if x.size == 0:  # an empty leaf has nothing to fit
                new_qs.append(qs[i])
                new_ls.append(None if ls is None else ls[i])
                new_ps += preconditioners([qs[i]], [(scanned, dense)])
                continue
            h = x + (damping + jnp.finfo(x.dtype).eps * jnp.abs(x)) * v
            step = lambda q, l, h, v, p=leaf_probes, seg=seg: update_factors(q, l, h, v, p, balance, cfg, seg)
            q, l, p = per_layer(step, scanned)(qs[i], None if ls is None else ls[i],
                                               view(h.astype(f32), scanned), view(v, scanned))
            new_qs.append(q)
            new_ls.append(l)
            new_ps.append(p)
        return new_qs, (None if ls is None else new_ls), new_ps

    def preconditioners(qs, leaf_plans):
        from rollfast_psgd.factors import preconditioner

        return [per_layer(lambda fs: preconditioner(fs, spec.inverse_probe), scanned)(fs)
                for fs, (scanned, _) in zip(qs, leaf_plans)]

    def precondition(ps, moms, leaf_plans):
        from rollfast_psgd.factors import apply_all

        return [per_layer(apply_all, scanned)(fs, view(m, scanned)).reshape(m.shape)
                for fs, m, (scanned, _) in zip(ps, moms, leaf_plans)]

    def clip(us, segments):
        if grad_clip_mode == "global_rms":
            total = reduce(jax.lax.psum, sum(jnp.sum(u * u) for u in us))
            count = reduce(jax.lax.psum, jnp.float32(sum(u.size for u in us)))
            factor = jnp.minimum(1.0, rms_cap / jnp.maximum(jnp.sqrt(total / count), tiny))
            return [u * factor for u in us]
        rms = lambda u, seg: jnp.sqrt(jnp.mean(u * u)) if seg is None else seg.spread(jnp.sqrt(seg.mean(u * u)))
        return [jnp.clip(u * jnp.minimum(1.0, rms_cap / (rms(u, seg) + tiny)), -elem_cap, elem_cap)
                for u, seg in zip(us, segments)]

    def write(arrays, dtype, k):
        if dtype == f32:
            return arrays
        return [rounding.cast(a, dtype, kk) for a, kk in zip(arrays, jax.random.split(k, len(arrays)))]

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        if not leaves:
            return updates, state
        leaf_plans = plans(updates)
        grads = [g.astype(f32) for g in leaves]
        qs = [[q.astype(f32) for q in fs] for fs in treedef.flatten_up_to(state.qs)]
        ls = [list(l) for l in treedef.flatten_up_to(state.ls)] if track_lipschitz else None
        # Units (see Packing): small leaves packed; to fit, leaves of equal shape stacked.
        shapes = [g.shape for g in grads]
        pk = Packing.of(leaf_plans, shapes, enabled=spec.update_diag is None, stack=False)
        fit = Packing.of(leaf_plans, shapes, enabled=spec.update_diag is None)
        signal_shapes = noise_shapes(jax.eval_shape(fit.pack, grads), fit.plans(leaf_plans))
        # All of a step's randomness from one threefry call (each costs ~50 ms of compile).
        key_next, words = _draw_words(state.key, 3 + len(signal_shapes) + 1)
        k_sr, k_srq, (u_update, u_balance), seeds = words[0], words[1], _unit(words[2]), words[3:]
        finite = all_finite(grads, axis_name)

        skip = ~finite
        if raw_global_grad_clip is not None:
            norm = jnp.sqrt(reduce(jax.lax.psum, sum(sum_of_squares(g) for g in grads)))
            spike = norm > raw_global_grad_clip
            grads = [jnp.where(spike, g * (raw_global_grad_clip / (norm + tiny)), g) for g in grads]
        prob = (preconditioner_update_probability(optax.safe_increment(state.count))
                if callable(preconditioner_update_probability) else preconditioner_update_probability)
        if raw_global_grad_clip is not None:
            skip |= spike & ~(permissive_spike_protection & (prob >= 1.0))

        mu = state.mu
        moms = grads
        if b1 > 0:
            count = state.count.astype(f32)
            beta = jnp.minimum(count / (1 + count), b1)
            # A skipped step keeps the old momentum; selecting before anything reads the
            # new one lets XLA write it in place in one pass (no copy of the old state).
            moms = [jnp.where(skip, m, (1 - beta) * g + beta * m)
                    for g, m in zip(grads, (m.astype(f32) for m in treedef.flatten_up_to(state.mu)))]
            mu = treedef.unflatten(write(moms, mu_store, k_sr))
        if preconditioner_init_scale is None:
            qs = lazy_scale(qs, pk.pack(grads), pk.plans(leaf_plans), state.needs_scale_init & ~skip,
                            pk.segments)

        do_update = (u_update < prob) & ~skip
        signal = grads if whiten_grad else moms
        draw, balance = _normals(seeds, signal_shapes), u_balance < BALANCE_PROBABILITY

        # Each branch also returns P = QᵀQ of the factors it leaves (a mode may have formed
        # it already), unless P of the old factors is applied.
        def fit_factors(qs, ls):  # per leaf in and out; packed and stacked inside the branch
            new_qs, new_ls, new_ps = update_preconditioner(
                fit.pack(qs), None if ls is None else fit.pack(ls), fit.pack(signal),
                fit.plans(leaf_plans), fit.segments, draw, balance)
            out = (fit.unpack(new_qs, qs), None if ls is None else fit.unpack(new_ls, ls),
                   fit.unpack(new_ps, qs))
            return out if update_preconditioner_first else out[:2]

        def keep_factors(qs, ls):
            return (qs, ls, preconditioners(qs, leaf_plans)) if update_preconditioner_first else (qs, ls)

        with jax.default_matmul_precision(precond_update_precision):
            out = (keep_factors(qs, ls) if never_updates  # a constant probability 0: no branch to compile
                   else jax.lax.cond(do_update, fit_factors, keep_factors, qs, ls))
            new_qs, new_ls = out[:2]
            ps = out[2] if update_preconditioner_first else preconditioners(qs, leaf_plans)
        with jax.default_matmul_precision(precond_grads_precision):
            us = clip(precondition(pk.pack(ps), pk.pack(moms), pk.plans(leaf_plans)), pk.segments)
        us = [jnp.where(skip, 0.0, u).astype(g.dtype) for u, g in zip(pk.unpack(us, leaves), leaves)]

        flat_qs = [q for fs in new_qs for q in fs]
        stored = iter(write(flat_qs, q_store, k_srq))
        keep = lambda old, new: jnp.where(skip, old, new)  # scalars; the arrays kept themselves
        new_state = KronState(
            keep(state.count, optax.safe_increment(state.count)), mu,
            treedef.unflatten([tuple(next(stored) for _ in fs) for fs in new_qs]),
            treedef.unflatten([tuple(l) for l in new_ls]) if track_lipschitz else None,
            keep(state.needs_scale_init, False), keep(state.key, key_next))
        return treedef.unflatten(us), new_state

    return optax.GradientTransformation(init, update)




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
