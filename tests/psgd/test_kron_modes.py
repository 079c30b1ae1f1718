"""Every registered kron mode against an independent float64 NumPy reference, and the
mode invariants (docs/kron.md, "Modes"): triangular / symmetric factors, whitening."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rollfast
from rollfast_psgd.factors import UpdateConfig, mode_spec, update_factors

MODES = [r.name for r in rollfast.available("mode", family="kron")]
SYMMETRIC = {"NS", "QUAD", "EXP", "TAYLOR2", "HYPER", "CAYLEY"}
TINY = float(np.finfo(np.float32).tiny)
DAMPING = 1e-9


def record(name):
    return rollfast.registry().lookup("mode", name, "kron")


def config(name, lr=0.1, track=True):
    return UpdateConfig(mode_spec(record(name).impl), lr, 0.9, track, DAMPING, 5)


# ---------------------------------------------------------------- float64 reference
# Each mode's statistic and whether it uses the inverse probe B = Q^{-T}v (docs/kron.md,
# "Modes"), written here rather than read from the registration under test.
STATISTIC = {"EQ": ("Qh", True), "Q0.5EQ1.5": ("Ph", False), "NS": ("Ph", False), "QUAD": ("Ph", False),
             "EXP": ("Ph", False), "TAYLOR2": ("Ph", False), "HYPER": ("Ph", False), "CAYLEY": ("Ph", False)}


def power_bound(a, scale, probe):
    """The randomised lower bound of ‖A‖₂ (docs/kron.md): with Â = A/scale and start rows
    r + sign(⟨p_k, r⟩)·p_k (r the heaviest row of Â, p_k the probe rows), two rounds of
    "multiply by Â, normalise each row, multiply by Â" leave rows V; the bound is
    scale·max_k ‖V_k‖. Unrolled: V = unit(unit(start·Â)·Â²)·Â."""
    a_hat = a / scale
    heaviest = a_hat[np.argmax(np.linalg.norm(a_hat, axis=1))]
    start = heaviest + np.sign(probe @ heaviest)[:, None] * probe
    unit = lambda rows: rows / np.linalg.norm(rows, axis=1, keepdims=True)
    rows = unit(unit(start @ a_hat) @ (a_hat @ a_hat)) @ a_hat
    return scale * np.max(np.linalg.norm(rows, axis=1))


def nlb_spd(a, probe):
    return power_bound(a, np.max(np.diag(a)), probe)


def sym(a):
    return (a + a.T) / 2


def e_hat(t):
    return sym(t.t1) - t.t2 * np.eye(len(t.t1))


def ref_procrustes(q, probe):
    r = q.T - q
    r = r / power_bound(r, np.max(np.abs(r)), probe)
    rq = r @ q
    rrq = r @ rq
    t1, t2 = np.trace(rq), np.trace(rrq)
    a = min(-t1 / t2, 0.125) if t2 < 0 else 0.125
    return q + a * (rq + a / 2 * rrq)


def ref_ns(q, probe, iters):
    """Newton–Schulz to convergence (max|XᵀX − I| ≤ 1e-12, at most iters + 40 steps): the polar factor."""
    x = q / (np.sqrt(nlb_spd(q.T @ q, probe)) + np.finfo(np.float32).eps)
    i = 0
    while i < iters + 40 and np.max(np.abs(x.T @ x - np.eye(len(q)))) > 1e-12:
        x = 0.5 * x @ (3 * np.eye(len(q)) - x.T @ x)
        i += 1
    return sym(x.T @ q)


def ref_expm(a):
    w, u = np.linalg.eigh(sym(a))
    return (u * np.exp(w)) @ u.T


REFERENCES = {
    "EQ": lambda q, t: q - t.eta * np.triu(t.t1 - t.t2) @ q,
    "Q0.5EQ1.5": lambda q, t: ref_procrustes(q - t.eta * (t.t1 @ q - t.t2 * q), t.probe),
    "NS": lambda q, t: ref_ns(q - t.eta * (t.t1 @ q - t.t2 * q), t.probe, 5),
    "QUAD": lambda q, t: sym((np.eye(len(q)) - t.eta / 2 * (t.t1 - t.t2 * np.eye(len(q)))) @ q
                             @ (np.eye(len(q)) - t.eta / 2 * (t.t1 - t.t2 * np.eye(len(q))))),
    "EXP": lambda q, t: sym(q @ ref_expm(-t.eta * e_hat(t))),
    "TAYLOR2": lambda q, t: sym(q @ taylor2_multiplier(t)),
    "HYPER": lambda q, t: sym(q @ (np.eye(len(q)) - min(t.eta, 0.9 / (t.bound - t.t2 + TINY)) * e_hat(t))),
}


def taylor2_multiplier(t):
    h = min(t.eta, 0.5 / (t.bound - t.t2 + TINY)) * e_hat(t)
    return np.eye(len(h)) - h @ (np.eye(len(h)) - h / 2)


def geometry(name):
    rec = record(name)
    if name in REFERENCES:
        return REFERENCES[name]
    ref = rec.metadata.get("reference_dense")
    if ref is None:
        pytest.fail(f"kron mode {name!r} has no float64 reference (metadata['reference_dense'])")
    return ref


def along(m, x, axis):
    if m.ndim == 1:
        return x * m.reshape((-1,) + (1,) * (x.ndim - axis - 1))
    return np.moveaxis(np.tensordot(m, x, axes=([1], [axis])), 0, axis)


def gram(z, axis, dense):
    others = tuple(i for i in range(z.ndim) if i != axis)
    return np.tensordot(z, z, axes=(others, others)) if dense else np.sum(z * z, axis=others)


def reference_update(name, qs, ls, h, v, probes, lr=0.1):
    """Float64 re-implementation of one preconditioner update (docs/kron.md, "One preconditioner update")."""
    if name not in STATISTIC:
        pytest.fail(f"kron mode {name!r} has no statistic in the reference table STATISTIC")
    stat, inverse = STATISTIC[name]
    x = h
    for i, q in enumerate(qs):
        m = q if stat == "Qh" else (q.T @ q if q.ndim == 2 else q * q)
        x = along(m, x, i)
    b = None
    if inverse:
        b = v
        for i, q in enumerate(qs):
            b = along(np.linalg.inv(q).T if q.ndim == 2 else 1 / q, b, i)
    out_q, out_l = [], []
    for i, (q, probe) in enumerate(zip(qs, probes)):
        p_bound, p_geom = probe if q.ndim == 2 else (None, None)
        dense = q.ndim == 2
        t1 = gram(x, i, dense)
        if b is None:
            t1, t2 = t1 + DAMPING, h.size / len(q)
            bound = nlb_spd(t1, p_bound) + t2 if dense else np.max(t1 + t2)
        else:
            t2 = gram(b, i, dense)
            bound = nlb_spd(t1 + t2, p_bound) if dense else np.max(t1 + t2)
        l_new = max(0.9 * ls[i] + 0.1 * bound, bound)
        terms = types.SimpleNamespace(t1=t1, t2=t2, eta=lr / l_new, bound=bound, probe=p_geom,
                                      newton_schulz_iters=5)
        out_q.append(geometry(name)(q, terms) if dense else np.abs(q * (1 - terms.eta * (t1 - t2))))
        out_l.append(l_new)
    return out_q, out_l


def initial(shape, rng):
    """Non-trivial starting factors: upper-triangular dense (valid for every mode), positive diagonal."""
    qs = []
    for d, dense in zip(shape, (True, False)):
        if dense:
            qs.append(np.triu(0.1 * rng.standard_normal((d, d))) + 0.8 * np.eye(d))
        else:
            qs.append(0.5 + rng.random(d))
    return qs


@pytest.mark.parametrize("shape", [(6, 20), (7,)], ids=["dense+diagonal", "diagonal"])
@pytest.mark.parametrize("name", MODES)
def test_factor_update_matches_float64_reference(name, shape):
    rng = np.random.default_rng(3)
    qs = initial(shape, rng)
    if name in SYMMETRIC | {"Q0.5EQ1.5"} and len(shape) == 2:
        qs[0] = sym(qs[0]) + 0.5 * np.eye(shape[0])
    ls = [0.0] * len(qs)
    h = rng.standard_normal(shape) * np.linspace(0.2, 3.0, shape[-1])
    v = rng.standard_normal(shape)
    probes = [rng.standard_normal((2, 32, len(q))).astype(np.float32) if q.ndim == 2 else None
              for q in qs]
    cfg = config(name)
    with jax.default_matmul_precision("highest"):
        step = jax.jit(lambda q, l: update_factors(q, l, jnp.asarray(h, jnp.float32),
                                                   jnp.asarray(v, jnp.float32), probes, False, cfg))
        jq = [jnp.asarray(q, jnp.float32) for q in qs]
        jl = [jnp.zeros([], jnp.float32) for _ in qs]
        for _ in range(10):
            jq, jl, jp = step(jq, jl)
            qs, ls = reference_update(name, qs, ls, h, v, [None if p is None else p.astype(np.float64)
                                                            for p in probes])
    for got, want in zip(jq, qs):
        err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
        assert err < 1e-5, f"{name}: relative error {err:.2e} after 10 updates"
    np.testing.assert_allclose(np.asarray(jl), ls, rtol=1e-5)
    for got, q in zip(jp, qs):  # the P applied is QᵀQ of the factor stored (if the mode returned it too)
        want = q.T @ q if q.ndim == 2 else q * q
        assert np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)) < 1e-5


@pytest.mark.parametrize("name", MODES)
def test_factor_shape_invariants(name):
    rng = np.random.default_rng(0)
    qs = [jnp.eye(5), jnp.ones(9)]
    ls = [jnp.zeros([]), jnp.zeros([])]
    cfg = config(name)
    probes = [jax.random.normal(jax.random.PRNGKey(1), (2, 32, 5)), None]
    step = jax.jit(lambda q, l, h, v: update_factors(q, l, h, v, probes, False, cfg))
    for _ in range(5):
        h = jnp.asarray(rng.standard_normal((5, 9)) * 3, jnp.float32)
        qs, ls, _ = step(qs, ls, h, jnp.asarray(rng.standard_normal((5, 9)), jnp.float32))
    dense, diag = np.asarray(qs[0]), np.asarray(qs[1])
    assert np.all(np.isfinite(dense)) and np.all(diag > 0)
    if name == "EQ":
        assert np.all(np.tril(dense, -1) == 0)
    if name in SYMMETRIC:
        assert np.array_equal(dense, dense.T)


@pytest.mark.parametrize("name", [m for m in MODES if m != "NS"])
def test_zero_preconditioner_lr_keeps_factors(name):
    q = np.triu(np.ones((4, 4))) + 2 * np.eye(4)
    if name != "EQ":
        q = q @ q.T
    qs = [jnp.asarray(q, jnp.float32), jnp.full(3, 0.7)]
    h = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    probes = [jax.random.normal(jax.random.PRNGKey(1), (2, 32, 4)), None]
    new, _, _ = update_factors(qs, [jnp.zeros([])] * 2, h, h, probes, False, config(name, lr=0.0))
    for a, b in zip(new, qs):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODES)
def test_whitening_fixed_point(name):
    """With h ~ N(0, C), cond(C) = 100, on a (d, 1) leaf (one dense factor), P C P → I
    (Q C Qᵀ → I for a Q·h statistic without the inverse probe, e.g. TAYLOR2), up to the
    O(η₀) bias of a constant step."""
    d = 4
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    cov = (basis * np.logspace(-1, 1, d)) @ basis.T
    root = jnp.asarray(np.linalg.cholesky(cov), jnp.float32)
    cfg = config(name, lr=0.01)

    def body(carry, k):
        qs, ls = carry
        kh, kv, kp = jax.random.split(k, 3)
        h = root @ jax.random.normal(kh, (d, 1))
        probes = [jax.random.normal(kp, (2, 32, d)), None]
        return update_factors(qs, ls, h, jax.random.normal(kv, (d, 1)), probes, False, cfg)[:2], None

    start = ([jnp.eye(d), jnp.ones(1)], [jnp.zeros([]), jnp.zeros([])])
    (qs, _), _ = jax.lax.scan(body, start, jax.random.split(jax.random.PRNGKey(0), 4000))
    q = np.asarray(qs[0], np.float64) * float(qs[1][0])
    stat, inverse = STATISTIC[name]
    if stat == "Qh" and not inverse:
        white = q @ cov @ q.T
    else:
        p = q.T @ q
        white = p @ cov @ p
    eig = np.linalg.eigvalsh(sym(white))
    assert np.all((eig > 0.6) & (eig < 1.4)), eig


def test_unknown_mode_suggests_the_closest():
    with pytest.raises(rollfast.UnknownNameError, match="did you mean 'EXP'"):
        rollfast.get("kron", mode="EXPO")


def test_mode_aliases_and_case():
    assert record("q0p5eq1p5").name == "Q0.5EQ1.5"
    assert record("exp").name == "EXP"


def test_bad_mode_registration_is_rejected():
    with pytest.raises(TypeError, match="update_dense"):
        mode_spec({"update": abs})
    with pytest.raises(ValueError, match="statistic"):
        mode_spec({"update_dense": abs, "statistic": "Vh"})


def test_contrib_mode_is_a_third_party_plugin():
    rec = record("CAYLEY")
    assert not rec.provider.first_party and rec.provider.distribution == "rollfast-kron-cayley"
    import doctest

    import rollfast_kron_cayley

    assert doctest.testmod(rollfast_kron_cayley).failed == 0


@pytest.mark.parametrize("norm", [1e-3, 0.1, 0.125, 0.5, 3.0])
def test_expm_taylor_matches_the_exponential(norm):
    from rollfast_psgd.linalg import expm_taylor

    a = np.random.default_rng(0).standard_normal((24, 24))
    a = norm * sym(a) / np.linalg.norm(sym(a), 2)
    squarings = max(0, int(np.ceil(np.log2(norm / 0.125))))
    got = np.asarray(expm_taylor(jnp.asarray(a, jnp.float32), jnp.float32(norm)), np.float64)
    want = ref_expm(a)
    assert np.linalg.norm(got - want, 2) / np.linalg.norm(want, 2) < 1e-6 * 2**squarings
