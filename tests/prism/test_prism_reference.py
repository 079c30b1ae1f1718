"""PRISM against a float64 NumPy reference written here from the equations of docs/prism.md.

The reference follows the equations literally (direct ``R×R`` and ``O×O`` Grams, the
coupled two-sided iteration); the plugin may compute the same functions another
way (one side at a time, on the cheaper Gram), so agreement checks both.
"""

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
import rollfast
from rollfast_partition import MatrixSpec

NS = (3.4445, -4.7750, 2.0315)
TINY = np.finfo(np.float32).tiny
ROOT4 = [(3.85003, -10.8539, 8.61893), (1.80992, -0.587778, 0.0647852),
         (1.50394, -0.594516, 0.121161), (45 / 32, -9 / 16, 5 / 32)]


def quintic_ns(a, iters):
    tall = a.shape[0] > a.shape[1]
    x = a.T if tall else a
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(iters):
        s = x @ x.T
        x = NS[0] * x + (NS[1] * s + NS[2] * s @ s) @ x
    return x.T if tall else x


def shape_original(t, d, gamma=1.0, ns_iters=5):
    return quintic_ns(np.vstack([t, gamma * d]), ns_iters)[: t.shape[0]]


def sym(x):
    return (x + x.T) / 2


def frob(x):
    m = max(np.max(np.abs(x)), 1e-30)
    return m * np.sqrt(np.sum((x / m) ** 2))


def inv_root4(lm, gm, rm, steps=6, eps=1e-5, kappa=1.001):
    tl, tr = 1.05 * max(frob(lm), 1e-30), 1.05 * max(frob(rm), 1e-30)
    lm = lm / tl + eps * np.eye(len(lm))
    rm = rm / tr + eps * np.eye(len(rm))
    n = steps or 4
    rows = ROOT4[: min(n, 4)]
    rows = rows + [rows[-1]] * (n - len(rows))
    for a, b, c in rows:
        a, b, c = a / kappa, b / kappa**5, c / kappa**9
        wl = sym(a * np.eye(len(lm)) + b * lm + c * sym(lm @ lm))
        wr = sym(a * np.eye(len(rm)) + b * rm + c * sym(rm @ rm))
        wl4 = sym(sym(wl @ wl) @ sym(wl @ wl))
        wr4 = sym(sym(wr @ wr) @ sym(wr @ wr))
        lm, rm = sym(lm @ wl4), sym(rm @ wr4)
        gm = wl @ gm @ wr
    return gm * tl**-0.25 * tr**-0.25


def shape_bidirectional(t, d, gamma=1.0, gamma_l=None, gamma_r=None, eps_gram=1e-6, **kw):
    gl = gamma if gamma_l is None else gamma_l
    gr = gamma if gamma_r is None else gamma_r
    gmax = max(gl, gr)
    mu = max(np.max(np.abs(t)), gmax * np.max(np.abs(d)), 1e-30)
    sigma = max(mu * np.sqrt(np.sum((t / mu) ** 2) + gmax**2 * np.sum((d / mu) ** 2)), 1e-30)
    t, d = t / sigma, d / sigma
    hl = sym(t @ t.T + gl**2 * d @ d.T) + eps_gram * np.eye(t.shape[0])
    hr = sym(t.T @ t + gr**2 * d.T @ d) + eps_gram * np.eye(t.shape[1])
    return inv_root4(hl, t, hr, **kw)


def to_matrix(x, red, out):
    batch = [a for a in range(x.ndim) if a not in red and a not in out]
    perm = batch + list(red) + list(out)
    y = np.transpose(x, perm)
    size = lambda axes: int(np.prod([x.shape[a] for a in axes]))
    return y.reshape(size(batch), size(red), size(out)), perm, y.shape


def from_matrix(y, perm, permuted_shape):
    return np.transpose(y.reshape(permuted_shape), np.argsort(perm))


def prism_steps(grads, shape_fn, *, b1=0.95, lr=1.0, red=(0,), out=(1,), nesterov=True,
                shape_nesterov=True, bias_correction=False, amps=(2.0, 10.0)):
    """Updates of PRISM on one leaf for a sequence of gradients (float64)."""
    m = np.zeros_like(grads[0], dtype=np.float64)
    updates = []
    for step, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        if nesterov and bias_correction:
            target = b1 * m / (1 - b1 ** (step + 1)) + (1 - b1) * g / (1 - b1**step)
        elif nesterov:
            target = b1 * m + (1 - b1) * g
        else:
            target = m / (1 - b1**step) if bias_correction else m
        target = target if shape_nesterov else m
        tm, perm, pshape = to_matrix(target, red, out)
        dm, _, _ = to_matrix(g - m, red, out)
        gm, _, _ = to_matrix(g, red, out)
        res = []
        for tb, db, gb in zip(tm, dm, gm):
            o = shape_fn(tb, db)
            if nesterov and not shape_nesterov:
                o = b1 * o + (1 - b1) * gb
            rms = np.sqrt(np.mean(o**2))
            o = o * min(1.0, amps[0] / (rms + TINY))  # rollfast.toolbox.update_clipper's guard
            res.append(np.clip(o, -amps[1], amps[1]))
        updates.append(-lr * from_matrix(np.stack(res), perm, pshape))
    return updates


# ------------------------------------------------------------------------ tests
SHAPES = {"tall": (64, 32), "wide": (32, 64), "conv": (3, 3, 4, 8), "flat": (8, 40)}
SPECS = {"tall": MatrixSpec(0, 1), "wide": MatrixSpec(0, 1), "conv": MatrixSpec((0, 1, 2), 3),
         "flat": MatrixSpec(0, 1), "bias": None}
REFERENCE_SHAPE = {"original": shape_original, "bidirectional": shape_bidirectional}


def _grads(steps=10, seed=0):
    rng = np.random.default_rng(seed)
    shapes = dict(SHAPES, bias=(8,))
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            for _ in range(steps)]


def _run(opt, grads):
    params = jax.tree.map(lambda g: jnp.zeros(g.shape), grads[0])
    state, out = opt.init(params), []
    update = jax.jit(opt.update)
    for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        out.append(jax.tree.map(np.asarray, u))
    return out


def _atol(mode, step):
    """1e-5, except on the first step of ``bidirectional``: there ``D ∝ T``, so
    the Grams are rank-deficient and the float32 iteration amplifies rounding
    in their null spaces by up to ``(ridge)^{-1/4} ≈ 17``."""
    return 5e-5 if mode == "bidirectional" and step == 0 else 1e-5


def _axes(a):
    return a if isinstance(a, tuple) else (a,)


@pytest.mark.parametrize("mode, variant", [
    ("original", {}), ("bidirectional", {}),
    ("original", {"nesterov": False, "bias_correction": True}),
    ("original", {"shape_nesterov": False, "b1": 0.9}),
    ("bidirectional", {"bias_correction": True})])
def test_ten_steps_match_float64_reference(mode, variant):
    """64×32, 32×64, a 4-D conv kernel through dimension numbers and an 8×40
    matrix (both cheaper-side Gram paths) agree with the float64 reference to
    1e-5 over 10 steps (see ``_atol``); the vector leaf gets optax.adamw's update."""
    grads = _grads()
    opt = rollfast.get("prism", learning_rate=1.0, mode=mode, partition="dimension_numbers",
                       dimension_numbers=SPECS, adam_learning_rate=0.01, **variant)
    got = _run(opt, grads)
    for name, spec in SPECS.items():
        if spec is None:
            continue
        ref = prism_steps([g[name] for g in grads], REFERENCE_SHAPE[mode], b1=variant.get("b1", 0.95),
                          red=_axes(spec.reduction_axis), out=_axes(spec.output_axis),
                          **{k: v for k, v in variant.items() if k != "b1"})
        for step, (u, r) in enumerate(zip(got, ref)):
            np.testing.assert_allclose(u[name], r, atol=_atol(mode, step), rtol=0,
                                       err_msg=f"{name} step {step}")
    adam = _run(optax.adamw(0.01, weight_decay=0.0), [{"bias": g["bias"]} for g in grads])
    for u, a in zip(got, adam):
        np.testing.assert_allclose(u["bias"], a["bias"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", ["original", "bidirectional"])
def test_gamma_and_clip_options_match_reference(mode):
    """Non-default γ (and γ_L ≠ γ_R) and a tight RMS clip, still to 1e-5."""
    grads = _grads(steps=4, seed=1)
    opts = ({"gamma": 0.5} if mode == "original" else {"gamma_l": 0.3, "gamma_r": 2.0})
    opt = rollfast.get("prism", learning_rate=1.0, mode=mode, partition="dimension_numbers",
                       dimension_numbers=SPECS, grad_clip_max_amps=(0.05, 0.1), **opts)
    got = _run(opt, grads)
    shape_fn = lambda t, d: REFERENCE_SHAPE[mode](t, d, **opts)
    for name in ("tall", "flat"):
        ref = prism_steps([g[name] for g in grads], shape_fn, amps=(0.05, 0.1))
        for step, (u, r) in enumerate(zip(got, ref)):
            np.testing.assert_allclose(u[name], r, atol=_atol(mode, step), rtol=0,
                                       err_msg=f"{name} step {step}")
