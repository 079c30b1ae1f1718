"""Each contrib optimizer against a NumPy float64 transcription of its paper's
equations, written here independently of the implementation: two or three steps
(the first step is special for MARS, SOAP and the APOLLO limiter) to 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rollfast

LR, WD = 0.05, 0.1
RTOL = ATOL = 1e-5


def grads_sequence(shapes, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            for _ in range(steps)]


def run_updates(opt, params, grads):
    """The optimizer's updates for a fixed ``params`` and a sequence of gradients."""
    update = jax.jit(opt.update)
    state = opt.init(params)
    out = []
    for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        out.append(jax.tree.map(np.asarray, u))
    return out


def runs(opt, reference, shapes, steps, seed):
    """Per leaf ``(name, θ, the library's updates, the reference's directions)``, on the
    same float32 gradients and starting parameters."""
    grads = grads_sequence(shapes, steps, seed)
    params = {k: v.astype(np.float32) for k, v in grads_sequence(shapes, 1, seed + 1)[0].items()}
    got = run_updates(opt, jax.tree.map(jnp.asarray, params), grads)
    for name in shapes:
        want = reference([g[name].astype(np.float64) for g in grads])
        yield name, params[name].astype(np.float64), [s[name] for s in got], want


def check(opt, reference, shapes, steps, seed=0):
    for name, theta, got, want in runs(opt, reference, shapes, steps, seed):
        for t, (u, d) in enumerate(zip(got, want)):
            np.testing.assert_allclose(u, -LR * (d + WD * theta), rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name}, step {t + 1}")


def adam_ref(grads, b1, b2, eps):
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(m / (1 - b1**t) / (np.sqrt(v / (1 - b2**t)) + eps))
    return out


# --- QHAdamW -----------------------------------------------------------------------

def qhadam_ref(grads, b1=0.995, b2=0.999, nu1=0.7, nu2=1.0, eps=1e-8):
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        num = (1 - nu1) * g + nu1 * m / (1 - b1**t)
        out.append(num / (np.sqrt((1 - nu2) * g * g + nu2 * v / (1 - b2**t)) + eps))
    return out


@pytest.mark.parametrize("nu1, nu2", [(0.7, 1.0), (0.5, 0.8)])
def test_qhadamw_matches_numpy(nu1, nu2):
    opt = rollfast.get("qhadamw", learning_rate=LR, weight_decay=WD, nu1=nu1, nu2=nu2, b1=0.9)
    check(opt, lambda gs: qhadam_ref(gs, b1=0.9, nu1=nu1, nu2=nu2), {"v": (5,), "m": (3, 4)}, 3)


# --- MARS --------------------------------------------------------------------------

def mars_ref(grads, variant, b1=0.95, b2=0.99, eps=1e-8, gamma=0.025, clip=1.0):
    m = v = 0.0
    prev = grads[0]
    out = []
    for t, g in enumerate(grads, 1):
        c = g + gamma * b1 / (1 - b1) * (g - prev)
        norm = np.sqrt(np.sum(c * c))
        if clip is not None and norm > clip:
            c = c * clip / norm
        prev = g
        m = b1 * m + (1 - b1) * c
        if variant == "lion":
            out.append(np.sign(m))
            continue
        v = b2 * v + (1 - b2) * c * c
        out.append(m / (1 - b1**t) / (np.sqrt(v / (1 - b2**t)) + eps))
    return out


@pytest.mark.parametrize("variant", ["adamw", "lion"])
@pytest.mark.parametrize("clip", [1.0, None])
def test_mars_matches_numpy(variant, clip):
    opt = rollfast.get("mars", learning_rate=LR, weight_decay=WD, variant=variant, gamma=0.5,
                       max_grad_norm=clip)
    # small gradients: the norm-1 clipping acts on the matrix leaf but not on the vector
    scaled = lambda gs: mars_ref(gs, variant, gamma=0.5, clip=clip)
    grads = grads_sequence({"v": (3,), "m": (4, 5)}, 3)
    for g in grads:
        g["v"] *= 0.1
    params = {k: jnp.asarray(v) for k, v in grads_sequence({"v": (3,), "m": (4, 5)}, 1, 1)[0].items()}
    got = run_updates(opt, params, grads)
    for name in ("v", "m"):
        want = scaled([g[name].astype(np.float64) for g in grads])
        for u, d in zip((s[name] for s in got), want):
            np.testing.assert_allclose(u, -LR * (d + WD * np.asarray(params[name], np.float64)),
                                       rtol=RTOL, atol=ATOL)


# --- 8-bit AdamW -------------------------------------------------------------------

def dynamic_map_ref(signed):
    """Sign bit (signed only), E zero bits, an indicator bit, F = bits-1-E fraction bits;
    value 10^-E times the upper end of fraction cell k of [0.1, 1]."""
    bits = 7 if signed else 8
    vals = {0.0}
    for e in range(bits):
        f = bits - 1 - e
        for k in range(2**f):
            x = 10.0**-e * (0.1 + 0.9 * (k + 1) / 2**f)
            vals |= {x, -x} if signed else {x}
    return np.array(sorted(vals))


def quantize_ref(x, signed, block):
    table = dynamic_map_ref(signed)
    flat = x.ravel()
    nblocks = -(-flat.size // block)
    length = -(-flat.size // nblocks)
    out = np.empty_like(flat)
    for b in range(nblocks):
        chunk = flat[b * length:(b + 1) * length]
        absmax = np.abs(chunk).max()
        normed = chunk / absmax if absmax > 0 else chunk
        idx = np.abs(normed[:, None] - table[None, :]).argmin(axis=1)
        if not signed:
            idx = np.where((normed > 0) & (idx == 0), 1, idx)
        out[b * length:(b + 1) * length] = table[idx] * absmax
    return out.reshape(x.shape)


def adam8bit_ref(grads, block, b1=0.9, b2=0.999, eps=1e-8):
    m = v = np.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(m / (1 - b1**t) / (np.sqrt(v / (1 - b2**t)) + eps))
        m, v = quantize_ref(m, True, block), quantize_ref(v, False, block)
    return out


def test_dynamic_map_matches_the_bit_layout():
    from rollfast_contrib.adamw8bit import dynamic_map

    for signed in (True, False):
        np.testing.assert_allclose(dynamic_map(signed), dynamic_map_ref(signed), rtol=1e-6)


def test_adamw8bit_matches_numpy():
    opt = rollfast.get("adamw8bit", learning_rate=LR, weight_decay=WD, block_size=16,
                       min_8bit_size=0)
    check(opt, lambda gs: adam8bit_ref(gs, 16), {"v": (7,), "m": (6, 9)}, 3)


def test_adamw8bit_keeps_small_leaves_in_float32():
    opt = rollfast.get("adamw8bit", learning_rate=LR, weight_decay=WD)
    check(opt, lambda gs: adam_ref(gs, 0.9, 0.999, 1e-8), {"m": (6, 9)}, 3)


# --- NorMuon -----------------------------------------------------------------------

def newton_schulz_ref(x, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def normuon_ref(grads, rows_are_neurons, b1=0.95, b2=0.95, eps=1e-8):
    m, v = 0.0, 0.0
    out = []
    for g in grads:
        mat = g if rows_are_neurons else g.T
        m = b1 * m + (1 - b1) * mat
        o = newton_schulz_ref(m)
        v = b2 * v + (1 - b2) * (o * o).mean(axis=1)
        o = o / (np.sqrt(v) + eps)[:, None]
        o = 0.2 * np.sqrt(o.size) * o / np.linalg.norm(o)
        out.append(o if rows_are_neurons else o.T)
    return out


@pytest.mark.parametrize("neuron_axis", [0, -1])
def test_normuon_matches_numpy(neuron_axis):
    opt = rollfast.get("normuon", learning_rate=LR, weight_decay=WD, neuron_axis=neuron_axis)
    check(opt, lambda gs: normuon_ref(gs, neuron_axis == 0), {"m": (5, 8)}, 3)
    check(opt, lambda gs: normuon_ref(gs, neuron_axis == 0), {"t": (9, 4)}, 2)


def test_normuon_falls_back_to_adamw_on_vectors():
    opt = rollfast.get("normuon", learning_rate=LR, weight_decay=WD)
    check(opt, lambda gs: adam_ref(gs, 0.9, 0.999, 1e-8), {"v": (6,), "s": ()}, 3)


# --- APOLLO ------------------------------------------------------------------------

def apollo_ref(grads, projections, mini, b1=0.9, b2=0.999, eps=1e-8, limit=1.01):
    """``projections[t]``: P of step t (float64); channels along the longer side."""
    m = v = 0.0
    prev = None
    alpha = np.sqrt(128) if mini else 1.0
    out = []
    for t, (g, p) in enumerate(zip(grads, projections), 1):
        wide = g.shape[0] <= g.shape[1]
        r = p @ g if wide else g @ p.T
        m = b1 * m + (1 - b1) * r
        v = b2 * v + (1 - b2) * r * r
        ra = m / (1 - b1**t) / (np.sqrt(v / (1 - b2**t)) + eps)
        if mini:
            s = np.linalg.norm(ra) / (np.linalg.norm(r) + 1e-8)
        else:
            axis = 0 if wide else 1
            s = np.linalg.norm(ra, axis=axis, keepdims=True) / (np.linalg.norm(r, axis=axis, keepdims=True) + 1e-8)
        gs = g * s
        norm = np.linalg.norm(gs)
        if prev and norm > limit * prev:
            gs = gs * limit * prev / norm
            norm = limit * prev
        prev = norm
        out.append(alpha * gs)
    return out


@pytest.mark.parametrize("variant, shape", [("apollo", (4, 7)), ("apollo", (7, 4)), ("mini", (5, 6))])
def test_apollo_matches_numpy(variant, shape):
    from rollfast_contrib.apollo import projection

    gap, rank, steps = 2, 3, 3
    opt = rollfast.get("apollo", learning_rate=LR, weight_decay=WD, variant=variant,
                       rank=None if variant == "mini" else rank, update_proj_gap=gap, key=7)
    r = 1 if variant == "mini" else rank
    side = min(shape)
    projections = [np.asarray(projection(jax.random.PRNGKey(7), 0, t // gap, r, side), np.float64)
                   for t in range(steps)]
    check(opt, lambda gs: apollo_ref(gs, projections, variant == "mini"), {"w": shape}, steps)


def test_apollo_limiter_caps_norm_growth():
    opt = rollfast.get("apollo", learning_rate=1.0, weight_decay=0.0, rank=2)
    params = {"w": jnp.zeros((4, 6))}
    g = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
    state = opt.init(params)
    u1, state = opt.update({"w": g}, state, params)
    u2, _ = opt.update({"w": 100 * g}, state, params)
    assert float(jnp.linalg.norm(u2["w"])) <= 1.01 * float(jnp.linalg.norm(u1["w"])) * (1 + 1e-5)


def test_apollo_limiter_does_not_stick_after_a_zero_gradient():
    opt = rollfast.get("apollo", learning_rate=1.0, weight_decay=0.0, rank=2)
    params = {"w": jnp.zeros((4, 6))}
    state = opt.init(params)
    _, state = opt.update({"w": jnp.zeros((4, 6))}, state, params)
    u, _ = opt.update({"w": jnp.ones((4, 6))}, state, params)
    assert float(jnp.abs(u["w"]).min()) > 0.1


def test_apollo_projection_is_unbiased():
    from rollfast_contrib.apollo import projection

    p = np.stack([np.asarray(projection(jax.random.PRNGKey(1), 0, k, 4, 3)) for k in range(400)])
    np.testing.assert_allclose(np.einsum("kri,krj->ij", p, p) / len(p), np.eye(3), atol=0.1)


# --- SOAP --------------------------------------------------------------------------
# The first call only builds the bases (no step, no decay) for every leaf, and the
# decay acts on the stepped parameters: u = -LR·d - LR·WD·(θ - LR·d).

def descending_eigh(a):
    return np.linalg.eigh(a)[1][:, ::-1]


def check_soap(opt, reference, shapes, steps, seed=0):
    for name, theta, got, want in runs(opt, reference, shapes, steps, seed):
        np.testing.assert_array_equal(got[0], 0.0)
        for t, (u, d) in enumerate(zip(got[1:], want), 2):
            np.testing.assert_allclose(u, -LR * d - LR * WD * (theta - LR * d), rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name}, step {t}")


def soap_ref(grads, freq, b1=0.95, b2=0.95, eps=1e-8):
    """Two-sided SOAP on a matrix: call 0 builds the bases; the momentum is kept in the
    parameters' basis (the same in exact arithmetic); refresh after step n, n % freq == 0."""
    g0 = grads[0]
    lf, rf = (1 - b2) * g0 @ g0.T, (1 - b2) * g0.T @ g0
    ql, qr = descending_eigh(lf), descending_eigh(rf)
    m, v = np.zeros_like(g0), np.zeros_like(g0)
    out = []
    for n, g in enumerate(grads[1:], 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * (ql.T @ g @ qr) ** 2
        d = (ql.T @ m @ qr) / (np.sqrt(v) + eps)
        out.append(np.sqrt(1 - b2**n) / (1 - b1**n) * ql @ d @ qr.T)
        lf, rf = b2 * lf + (1 - b2) * g @ g.T, b2 * rf + (1 - b2) * g.T @ g
        if n % freq == 0:
            ol = np.argsort(-np.diag(ql.T @ lf @ ql))
            orr = np.argsort(-np.diag(qr.T @ rf @ qr))
            v = v[ol][:, orr]
            ql = np.linalg.qr(lf @ ql[:, ol])[0]
            qr = np.linalg.qr(rf @ qr[:, orr])[0]
    return out


def test_soap_matches_numpy():
    opt = rollfast.get("soap", learning_rate=LR, weight_decay=WD, precondition_frequency=2)
    # 4x3: the left factor's null space after one gradient is one-dimensional, so the
    # eigenbasis is unique up to signs, to which the update is invariant.
    check_soap(opt, lambda gs: soap_ref(gs, 2), {"m": (4, 3)}, 6)


def test_soap_one_sided_for_long_axes_and_adam_for_vectors():
    opt = rollfast.get("soap", learning_rate=LR, weight_decay=WD, max_precond_dim=4)

    def left_only(grads, b1=0.95, b2=0.95, eps=1e-8):
        g0 = grads[0]
        q = descending_eigh((1 - b2) * g0 @ g0.T)
        m = v = 0.0
        out = []
        for n, g in enumerate(grads[1:], 1):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * (q.T @ g) ** 2
            out.append(np.sqrt(1 - b2**n) / (1 - b1**n) * q @ ((q.T @ m) / (np.sqrt(v) + eps)))
        return out

    check_soap(opt, left_only, {"m": (3, 6)}, 4)

    def adam_soap_eps(grads, b1=0.95, b2=0.95, eps=1e-8):
        m = v = 0.0
        out = []
        for n, g in enumerate(grads[1:], 1):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            out.append(np.sqrt(1 - b2**n) / (1 - b1**n) * m / (np.sqrt(v) + eps))
        return out

    check_soap(opt, adam_soap_eps, {"v": (5,), "s": ()}, 4)


@pytest.mark.parametrize("max_dim, flat, one_d", [(10000, (48,), True), (12, (12, 4), False)])
def test_soap_merge_dims(max_dim, flat, one_d):
    """merge_dims: (3, 2, 2, 4) is a 48-vector with a full factor when 48 <= max_precond_dim,
    a 12x4 matrix when max_precond_dim = 12."""
    common = {"learning_rate": LR, "weight_decay": WD, "precondition_frequency": 2, "max_precond_dim": max_dim}
    merged = rollfast.get("soap", merge_dims=True, **common)
    plain = rollfast.get("soap", precondition_1d=one_d, **common)
    grads = grads_sequence({"k": (3, 2, 2, 4)}, 4)
    a = run_updates(merged, {"k": jnp.ones((3, 2, 2, 4))}, grads)
    b = run_updates(plain, {"k": jnp.ones(flat)}, [{"k": g["k"].reshape(flat)} for g in grads])
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["k"].reshape(flat), y["k"], rtol=1e-5, atol=1e-6)
