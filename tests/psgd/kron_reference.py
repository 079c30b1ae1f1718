"""A float64 NumPy reference of one whole ``kron`` step, written from the documentation
(docs/kron.md, the ``scale_by_kron`` docstring) and independent of the library: no
library helper is imported, every flag and constant is written out here.

The only JAX call is ``jax.random.bits`` (threefry), which the step uses once to draw
its words; everything derived from them is re-implemented: the counter hash, the
uniform and normal maps, the pool of small arrays, the units (leaves alone, then the
packed vectors and scalars) and the order of the probes.

Randomness of one step (the documented layout):

* ``jax.random.bits(key, (2 + 2·pairs,))``: the first two words are the next key, then
  ``pairs`` word pairs: [rounding of mu, rounding of the factors, (u_update, u_balance),
  one seed per noise array, the seed of the pool];
* noise arrays: the probe noise ``v`` of each unit, then a ``(2, 32, d)`` pair of
  norm-bound probes per dense factor in unit order; arrays below 2¹⁶ elements are
  consecutive slices of one pooled draw;
* bits: ``h(h(φ·i + s₀) ⊕ s₁)``, ``h`` the lowbias32 hash, ``φ = 0x9E3779B9``;
  uniform ``u = (bits >> 9)·2⁻²³``; normal ``√2·erfinv(max(2u − 1, −1 + 2⁻²⁴))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg as sla
from scipy import special

TINY = float(np.finfo(np.float32).tiny)
EPS32 = float(np.finfo(np.float32).eps)
PROBE_ROWS = 32
POOL_LIMIT = 1 << 16
BALANCE_PROBABILITY = 0.01
PROCRUSTES_MAX_STEP = 0.125
# mode → (statistic, inverse probe): hard-coded from docs/kron.md's table
MODES = {"Q0.5EQ1.5": ("Ph", False), "EQ": ("Qh", True), "EXP": ("Ph", False),
         "QUAD": ("Ph", False), "NS": ("Ph", False), "TAYLOR2": ("Ph", False), "HYPER": ("Ph", False)}
CAPS = {"TAYLOR2": 0.5, "HYPER": 0.9}  # step caps c/(ℓ − T2) of the truncated exponentials


@dataclass
class Options:
    """The options of ``rollfast.get("kron", ...)`` the reference follows."""

    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    b1: float = 0.9
    preconditioner_update_probability: object = 1.0  # float, or "schedule" for the default
    max_size_triangular: int = 8192
    max_skew_triangular: float = 1.0
    min_ndim_triangular: int = 2
    memory_save_mode: object = None
    whiten_grad: bool = True
    update_preconditioner_first: bool = True
    preconditioner_lr: float = 0.1
    preconditioner_init_scale: object = None
    mode: str = "Q0.5EQ1.5"
    beta_lipschitz: float = 0.9
    track_lipschitz: bool = True
    damping: float = 1e-9
    grad_clip_max_amps: object = (2.0, 10.0)
    grad_clip_mode: str = "per_tensor_rms"
    raw_global_grad_clip: object = None
    permissive_spike_protection: bool = True
    key: int = 42

    def library_kwargs(self) -> dict:
        kw = dict(self.__dict__)
        if kw["preconditioner_update_probability"] == "schedule":
            del kw["preconditioner_update_probability"]
        return kw


@dataclass
class State:
    count: int
    mu: list | None
    qs: list  # per leaf, list of factors (2-D dense, 1-D diagonal)
    ls: list | None  # per leaf, list of floats
    needs_init: bool
    key: np.ndarray
    trace: dict = field(default_factory=dict)  # what the last step decided (for tests)


# ---------------------------------------------------------------- randomness


def lowbias32(v):
    v = (v ^ (v >> np.uint32(16))) * np.uint32(0x7FEB352D)
    v = (v ^ (v >> np.uint32(15))) * np.uint32(0x846CA68B)
    return v ^ (v >> np.uint32(16))


def hashed(seed_pair, n):
    i = np.arange(n, dtype=np.uint32)
    with np.errstate(over="ignore"):
        return lowbias32(lowbias32(i * np.uint32(0x9E3779B9) + np.uint32(seed_pair[0])) ^ np.uint32(seed_pair[1]))


def uniform(bits):
    return (np.asarray(bits, np.uint32) >> np.uint32(9)).astype(np.float64) * 2.0**-23


def normal(bits):
    return math.sqrt(2.0) * special.erfinv(np.maximum(2 * uniform(bits) - 1, -1 + 2.0**-24))


def draw_words(key, pairs):
    """``(next_key, words)`` with ``words`` of shape ``(pairs, 2)``."""
    flat = np.asarray(jax.random.bits(jnp.asarray(key, jnp.uint32), (2 + 2 * pairs,), jnp.uint32))
    return flat[:2], flat[2:].reshape(pairs, 2)


def noise_arrays(seeds, shapes):
    sizes = [math.prod(s) for s in shapes]
    pooled = sum(n for n in sizes if n < POOL_LIMIT)
    pool, start, out = normal(hashed(seeds[len(shapes)], pooled)), 0, []
    for i, (n, shape) in enumerate(zip(sizes, shapes)):
        if n < POOL_LIMIT:
            out.append(pool[start:start + n].reshape(shape))
            start += n
        else:
            out.append(normal(hashed(seeds[i], n)).reshape(shape))
    return out


# ---------------------------------------------------------------- layout


def layout(shape, o: Options):
    shape = tuple(shape) or (1,)
    n = math.prod(shape)
    forced = set()
    if o.memory_save_mode == "one_diag":
        forced = {max(range(len(shape)), key=lambda i: (shape[i], i))}
    elif o.memory_save_mode == "all_diag":
        forced = set(range(len(shape)))
    return [not (d <= 1 or d > o.max_size_triangular or d * d > o.max_skew_triangular * n
                 or len(shape) < o.min_ndim_triangular or i in forced) for i, d in enumerate(shape)]


def units(shapes, o: Options):
    """``(alone, groups, packed)``: leaf indices updated alone (in order); groups of
    leaves of equal shape and layout, stacked (in order of first appearance); and the
    vectors and scalars packed into one diagonal unit (if there are at least two)."""
    small = [i for i, s in enumerate(shapes) if len(s) <= 1]
    small = small if len(small) >= 2 else []
    alike = {}
    for i, s in enumerate(shapes):
        if i not in small:
            alike.setdefault((tuple(s), tuple(layout(s, o))), []).append(i)
    groups = [g for g in alike.values() if len(g) > 1]
    grouped = {i for g in groups for i in g}
    return [i for i in range(len(shapes)) if i not in small and i not in grouped], groups, small


# ---------------------------------------------------------------- linear algebra


def along(m, x, axis):
    if m.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        return x * m.reshape(shape)
    return np.moveaxis(np.tensordot(m, x, axes=([1], [axis])), 0, axis)


def apply_all(mats, x):
    for axis, m in enumerate(mats):
        x = along(m, x, axis)
    return x


def gram(z, axis, dense):
    others = tuple(i for i in range(z.ndim) if i != axis)
    zz = np.tensordot(z, z, axes=(others, others)) if dense else np.sum(z * z, axis=others)
    return zz


def precond(qs):
    return [q.T @ q if q.ndim == 2 else q * q for q in qs]


def power_bound(a, scale, probe):
    """Lower bound of ‖A‖₂: probes seeded by the heaviest row of A/scale, each signed to
    agree with it, two rounds of (×A, normalise, ×A)."""
    a = a / scale
    row = a[np.argmax(np.sum(a * a, axis=1))]
    v = row + np.sign(probe @ row)[:, None] * probe
    for _ in range(2):
        v = v @ a
        v = v / (np.linalg.norm(v, axis=1, keepdims=True) + TINY)
        v = v @ a
    return scale * np.max(np.linalg.norm(v, axis=1))


def bound_psd(a, probe):
    return power_bound(a, np.max(np.diag(a)) + TINY, probe)


def bound_skew(a, probe):
    return power_bound(a, np.max(np.abs(a)) + TINY, probe)


def sym(a):
    return (a + a.T) / 2


def move_dense(mode, q, t1, t2, eta, bound, probe):
    """The documented dense geometries (docs/kron.md, table of modes)."""
    eye = np.eye(q.shape[0])
    if mode == "EQ":
        return q - eta * np.triu(t1 - t2) @ q
    e_hat = sym(t1) - t2 * eye
    if mode == "EXP":
        return sym(q @ sla.expm(-eta * e_hat))
    if mode in CAPS:
        h = min(eta, CAPS[mode] / (bound - t2 + TINY)) * e_hat
        return sym(q @ (eye - h @ (eye - 0.5 * h))) if mode == "TAYLOR2" else sym(q @ (eye - h))
    if mode == "NS":
        moved = q - eta * (t1 - t2 * eye) @ q
        w, v = np.linalg.eigh(moved.T @ moved)
        return (v * np.sqrt(np.maximum(w, 0))) @ v.T
    if mode == "QUAD":
        half = eye - 0.5 * eta * (t1 - t2 * eye)
        return sym(half @ q @ half.T)
    assert mode == "Q0.5EQ1.5", mode
    q = q - eta * (t1 - t2 * eye) @ q
    r = q.T - q
    r = r / (bound_skew(r, probe) + TINY)
    rq, rrq = r @ q, r @ r @ q
    c1, c2 = np.trace(rq), np.trace(rrq)
    a = min(-c1 / c2, PROCRUSTES_MAX_STEP) if c2 < 0 else PROCRUSTES_MAX_STEP
    return q + a * (rq + a / 2 * rrq)


# ---------------------------------------------------------------- one leaf's factor update


def factor_update(qs, ls, h, v, probes, balance, o: Options):
    """Update one leaf's factors from the old ones: returns ``(qs, ls, unbalanced qs)``."""
    statistic, inverse = MODES[o.mode]
    x = apply_all(qs, h) if statistic == "Qh" else apply_all(precond(qs), h)
    b = apply_all([np.linalg.inv(q).T if q.ndim == 2 else 1 / q for q in qs], v) if inverse else None
    new_qs, new_ls = [], []
    for i, (q, probe) in enumerate(zip(qs, probes)):
        dense = q.ndim == 2
        t1 = gram(x, i, dense)
        if inverse:
            t2 = gram(b, i, dense)
        else:
            t1, t2 = t1 + o.damping, h.size / q.shape[0]
        if not dense:
            bound = np.max(t1 + t2)
        elif inverse:
            bound = bound_psd(t1 + t2, probe[0])
        else:
            bound = bound_psd(t1, probe[0]) + t2
        if o.track_lipschitz:
            lip = max(o.beta_lipschitz * ls[i] + (1 - o.beta_lipschitz) * bound, bound)
            eta = o.preconditioner_lr / max(lip, TINY)
            new_ls.append(lip)
        else:
            eta = o.preconditioner_lr / (bound + TINY)
        if dense:
            new_qs.append(move_dense(o.mode, q, t1, t2, eta, bound, probe[1]))
        else:
            new_qs.append(np.abs(q * (1 - eta * (t1 - t2))))
    unbalanced = list(new_qs)
    if len(new_qs) > 1 and balance:
        nus = np.array([np.max(np.abs(q)) for q in new_qs])
        if np.all(nus > 0):
            mean = np.exp(np.mean(np.log(nus)))
            new_qs = [q * (mean / nu) for q, nu in zip(new_qs, nus)]
    return new_qs, (new_ls if o.track_lipschitz else ls), unbalanced


# ---------------------------------------------------------------- the whole step


def init(shapes, o: Options, key=None) -> State:
    scale = 1.0 if o.preconditioner_init_scale is None else o.preconditioner_init_scale
    qs = []
    for s in shapes:
        dims = tuple(s) or (1,)
        root = scale ** (1 / len(dims))
        qs.append([root * (np.eye(d) if dense else np.ones(d)) for d, dense in zip(dims, layout(s, o))])
    mu = [np.zeros(s) for s in shapes] if o.b1 > 0 else None
    ls = [[0.0] * len(f) for f in qs] if o.track_lipschitz else None
    key = np.array([0, o.key], np.uint32) if key is None else key
    return State(0, mu, qs, ls, o.preconditioner_init_scale is None, key)


def probability(o: Options, t):
    p = o.preconditioner_update_probability
    if p != "schedule":
        return p
    # precond_update_prob_schedule(): 1 for 500 steps, then exp(-0.001 (t - 500)), floor 0.03
    return float(np.float32(min(max(math.exp(-0.001 * (t - 500)), 0.03), 1.0)))


def guard(grads, prob, o: Options):
    """``(grads, skip)``: the spike clip and the skip decision."""
    skip = not all(np.all(np.isfinite(g)) for g in grads)
    if o.raw_global_grad_clip is not None and not skip:
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
        if norm > o.raw_global_grad_clip:
            grads = [g * (o.raw_global_grad_clip / (norm + TINY)) for g in grads]
            skip = not o.permissive_spike_protection  # True: rescaled, False: skipped
    return grads, skip


def randomness(state: State, shapes, o: Options):
    """The step's words: ``(next_key, u_update, u_balance, noise per leaf, probes per leaf)``.

    A stacked group draws one noise array for all its leaves and one probe pair per
    dense factor, shared by its leaves."""
    alone, groups, packed = units(shapes, o)
    dims = lambda i: tuple(shapes[i]) or (1,)
    unit_shapes = [dims(i) for i in alone] + [(len(g),) + dims(g[0]) for g in groups]
    if packed:
        unit_shapes.append((sum(math.prod(dims(i)) for i in packed),))
    heads = alone + [g[0] for g in groups]
    probe_shapes = [(2, PROBE_ROWS, d) for i in heads for d, dense in zip(dims(i), layout(shapes[i], o)) if dense]
    next_key, words = draw_words(state.key, 3 + len(unit_shapes) + len(probe_shapes) + 1)
    u_update, u_balance = uniform(words[2])
    arrays = iter(noise_arrays(words[3:], unit_shapes + probe_shapes))
    noise = [None] * len(shapes)
    for i in alone:
        noise[i] = next(arrays)
    for g in groups:
        stacked = next(arrays)
        for j, i in enumerate(g):
            noise[i] = stacked[j]
    if packed:
        flat, start = next(arrays), 0
        for i in packed:
            n = math.prod(dims(i))
            noise[i] = flat[start:start + n].reshape(dims(i))
            start += n
    probes = [[None] * len(dims(i)) for i in range(len(shapes))]
    members = {i: [i] for i in alone} | {g[0]: g for g in groups}
    for i in heads:
        for k, dense in enumerate(layout(shapes[i], o)):
            if dense:
                pair = next(arrays)
                for member in members[i]:
                    probes[member][k] = pair
    return next_key, u_update, u_balance, noise, probes


def clip(us, o: Options):
    amps = o.grad_clip_max_amps
    rms_cap, elem_cap = (float(amps), 10.0) if isinstance(amps, (int, float)) else amps
    if o.grad_clip_mode == "global_rms":
        rms = math.sqrt(sum(float(np.sum(u * u)) for u in us) / sum(u.size for u in us))
        return [u * min(1.0, rms_cap / max(rms, TINY)) for u in us]
    return [np.clip(u * min(1.0, rms_cap / (math.sqrt(float(np.mean(u * u))) + TINY)), -elem_cap, elem_cap)
            for u in us]


def step(grads, params, state: State, o: Options):
    """One ``rollfast.get("kron", **o.library_kwargs())`` step in float64: ``(updates, state)``."""
    shapes = [g.shape for g in grads]
    grads = [np.asarray(g, np.float64) for g in grads]
    prob = probability(o, state.count + 1)
    grads, skip = guard(grads, prob, o)
    next_key, u_update, u_balance, noise, probes = randomness(state, shapes, o)
    moms, mu = grads, state.mu
    if o.b1 > 0 and not skip:
        beta = min(state.count / (1 + state.count), o.b1)
        moms = mu = [(1 - beta) * g + beta * m for g, m in zip(grads, state.mu)]
    elif o.b1 > 0:
        moms = state.mu
    qs = [list(f) for f in state.qs]
    if o.preconditioner_init_scale is None and state.needs_init and not skip:
        s = (max(float(np.mean(g**4)) for g in grads) + o.damping**4) ** (-1 / 8)
        qs = [[q * s ** (1 / len(f)) for q in f] for f in qs]
    do_update = bool(u_update < prob) and not skip
    balance = bool(u_balance < BALANCE_PROBABILITY)
    new_qs, new_ls, unbalanced = qs, state.ls, None
    if do_update:
        signal = [x.reshape(v.shape) for x, v in zip(grads if o.whiten_grad else moms, noise)]
        out = [factor_update(f, None if state.ls is None else state.ls[i],
                             x + (o.damping + EPS32 * np.abs(x)) * noise[i], noise[i], probes[i], balance, o)
               for i, (f, x) in enumerate(zip(qs, signal))]
        new_qs = [a for a, _, _ in out]
        new_ls = [b for _, b, _ in out] if o.track_lipschitz else None
        unbalanced = [c for _, _, c in out]
    applied = new_qs if o.update_preconditioner_first else qs
    us = [apply_all(precond(f), m.reshape(tuple(m.shape) or (1,))).reshape(m.shape) for f, m in zip(applied, moms)]
    us = [np.zeros(s) for s in shapes] if skip else clip(us, o)
    updates = [-o.learning_rate * (u + o.weight_decay * np.asarray(p, np.float64)) for u, p in zip(us, params)]
    if not all(np.all(np.isfinite(g)) for g in grads):  # the core's policy: the whole step skipped
        updates = [np.zeros(s) for s in shapes]
    trace = dict(updated=do_update, balanced=do_update and balance, skipped=skip, unbalanced=unbalanced)
    if skip:
        return updates, State(state.count, state.mu, state.qs, state.ls, state.needs_init, state.key, trace)
    return updates, State(state.count + 1, mu, new_qs, new_ls, False, next_key, trace)
