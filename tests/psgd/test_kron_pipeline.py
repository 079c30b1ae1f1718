"""kron's whole step against an independent float64 reference (tests/psgd/kron_reference.py)
while the preconditioner updates, under non-default values of every option that
changes numbers; balancing, the realised update rate, skipped steps, and stochastic
rounding of the stored momentum and factors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kron_reference as ref
import rollfast

SHAPES = {"a": (3, 4), "b": (5,), "c": (), "d": (2, 3, 4)}
NAMES = sorted(SHAPES)
TOL = 2e-5  # float32 library against float64 reference, relative to the largest entry

# Each configuration sets the options to values where they change the numbers (a
# decreasing gradient scale keeps L above ℓ, so beta_lipschitz matters; damping 1e-2
# makes the probe noise visible). Key 260 makes configuration A balance on its third step.
CONFIGS = {
    "A": ref.Options(mode="Q0.5EQ1.5", learning_rate=0.1, weight_decay=0.05, b1=0.8, beta_lipschitz=0.5,
                     preconditioner_lr=0.3, damping=1e-2, preconditioner_update_probability=0.5,
                     max_skew_triangular=2.0, grad_clip_max_amps=(1.5, 3.0), key=260),
    "B": ref.Options(mode="EQ", learning_rate=0.2, b1=0.6, beta_lipschitz=0.3, preconditioner_lr=0.2,
                     damping=1e-2, whiten_grad=False, track_lipschitz=False, update_preconditioner_first=False,
                     preconditioner_init_scale=0.7, memory_save_mode="one_diag", grad_clip_mode="global_rms",
                     grad_clip_max_amps=0.8, raw_global_grad_clip=40.0, key=3),
    "C": ref.Options(mode="EXP", learning_rate=0.05, b1=0.0, damping=1e-3, max_size_triangular=3,
                     min_ndim_triangular=3, preconditioner_update_probability="schedule",
                     raw_global_grad_clip=40.0, permissive_spike_protection=False, key=11),
    # the other geometries, each with a few more non-default options
    "NS": ref.Options(mode="NS", learning_rate=0.1, damping=1e-3, preconditioner_lr=0.4, b1=0.7,
                      max_size_triangular=3, key=1),
    "TAYLOR2": ref.Options(mode="TAYLOR2", learning_rate=0.1, damping=1e-3, preconditioner_lr=0.9,
                           beta_lipschitz=0.2, max_skew_triangular=2.0, key=2),
    "HYPER": ref.Options(mode="HYPER", learning_rate=0.1, damping=1e-3, preconditioner_lr=0.9,
                         track_lipschitz=False, grad_clip_mode="global_rms", key=4),
}


def kron_state(state):
    """The ``scale_by_kron`` state inside whatever ``rollfast.get`` wrapped it in."""
    found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "qs")) if hasattr(x, "qs")]
    assert len(found) == 1
    return found[0]


def gradient(rng, t, name, shapes=SHAPES):
    g = rng.standard_normal(shapes[name]) * 4 / (1 + t)
    if (t, name) == (4, "d"):
        g = g * 30  # a spike: clipped (B), skipped (C: not permissive)
    if (t, name) == (6, "a"):
        g = g.copy().reshape(-1)
        g[1] = np.nan  # skipped by everyone
    return np.asarray(g, np.float32).reshape(shapes[name])


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def run_both(o: ref.Options, steps=8, shapes=SHAPES, scales=None):
    """Yield per step ``(library updates, library KronState, reference updates, reference state)``."""
    names, scales = sorted(shapes), scales or {}
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.standard_normal(shapes[k]), jnp.float32) for k in names}
    opt = rollfast.get("kron", **o.library_kwargs())
    state, update = opt.init(params), jax.jit(opt.update)
    rs = ref.init([shapes[k] for k in names], o)
    for t in range(steps):
        g = {k: gradient(rng, t, k, shapes) * np.float32(scales.get(k, 1.0)) for k in names}
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        ru, rs = ref.step([g[k] for k in names], [np.asarray(params[k]) for k in names], rs, o)
        yield u, kron_state(state), ru, rs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_whole_step_matches_float64_reference(name):
    """Updates, factors, Lipschitz estimates, momentum, count and key after each of 8
    steps equal the reference's; the steps that updated, balanced and were skipped are
    the ones the documented draws say; a balancing step keeps the Kronecker product."""
    o = CONFIGS[name]
    events = {"updated": 0, "kept": 0, "skipped": 0, "balanced": 0}
    for u, ks, ru, rs in run_both(o):
        for k, want in zip(NAMES, ru):
            assert relative_error(u[k], want) < TOL, (name, k)
        for k, fs in zip(NAMES, rs.qs):
            for got, want in zip(ks.qs[k], fs):
                assert relative_error(got, want) < TOL, (name, k)
        if o.track_lipschitz:
            got = np.array([float(x) for k in NAMES for x in ks.ls[k]])
            assert relative_error(got, [x for ls in rs.ls for x in ls]) < TOL
        else:
            assert ks.ls is None
        if o.b1 > 0:
            for k, want in zip(NAMES, rs.mu):
                assert relative_error(ks.mu[k], want) < TOL
        assert int(ks.count) == rs.count and np.array_equal(np.asarray(ks.key), rs.key)
        skipped, updated = rs.trace["skipped"], rs.trace["updated"]
        events["skipped" if skipped else "updated" if updated else "kept"] += 1
        if rs.trace["balanced"]:
            check_balanced(ks, rs)
            events["balanced"] += 1
    # each configuration exercises the branches it is meant to
    assert events["updated"] >= 4
    assert events["skipped"] == {"A": 1, "B": 1, "C": 2}.get(name, 1)
    assert events["kept"] == {"A": 3}.get(name, 0)
    assert events["balanced"] == {"A": 1}.get(name, 0)


def test_stacked_leaves_match_the_reference_with_the_same_probes():
    """Three leaves of one shape run as one stacked unit sharing a probe pair; with the
    probes of the reference (the same draws) each leaf's update and factors agree with
    the float64 reference at 2e-5, gradients 1×, 10× and 100× with the clip active."""
    shapes = {"a": (4, 3), "b": (4, 3), "c": (4, 3), "w": (3, 4), "e": (5,), "f": (2,)}
    o = ref.Options(learning_rate=0.1, damping=1e-3, b1=0.5, grad_clip_max_amps=(0.5, 1.0), key=9)
    for u, ks, ru, rs in run_both(o, steps=5, shapes=shapes, scales={"b": 10.0, "c": 100.0}):
        assert rs.trace["updated"]
        for k, want, fs in zip(sorted(shapes), ru, rs.qs):
            assert relative_error(u[k], want) < TOL, k
            for got, want_q in zip(ks.qs[k], fs):
                assert relative_error(got, want_q) < TOL, k


def check_balanced(ks, rs):
    """On a balancing step the factors of each leaf end with a common max-abs entry
    while their Kronecker product is that of the unbalanced factors (reference)."""
    for k, before in zip(NAMES, rs.trace["unbalanced"]):
        after = [np.asarray(q, np.float64) for q in ks.qs[k]]
        if len(after) < 2:
            continue
        nus = [np.max(np.abs(q)) for q in after]
        assert max(nus) / min(nus) - 1 < 1e-6
        spread = [np.max(np.abs(q)) for q in before]
        assert max(spread) / min(spread) > 1.02  # so balancing had something to do
        full = [q if q.ndim == 2 else np.diag(q) for q in after]
        full_before = [q if q.ndim == 2 else np.diag(q) for q in before]
        product = lambda fs: fs[0] if len(fs) == 1 else np.kron(fs[0], product(fs[1:]))
        assert relative_error(product(full), product(full_before)) < TOL


def test_realised_update_rate_at_probability_0_3():
    """With p = 0.3 the factors move on exactly the steps whose uniform word is below
    0.3 (1500 steps, predicted by the reference's draws), at a rate within 4 standard
    errors of 0.3."""
    steps, p = 1500, 0.3
    o = ref.Options(preconditioner_update_probability=p, preconditioner_init_scale=1.0, key=5)
    opt = rollfast.get("kron", **o.library_kwargs())
    params = {"w": jnp.zeros((2, 2))}
    grads = jax.random.normal(jax.random.PRNGKey(0), (steps, 2, 2))

    def one(state, g):
        qs = kron_state(state).qs
        _, state = opt.update({"w": g}, state, params)
        moved = jnp.any(jnp.stack([jnp.any(a != b) for a, b in zip(jax.tree.leaves(qs),
                                                                   jax.tree.leaves(kron_state(state).qs))]))
        return state, moved

    _, moved = jax.jit(lambda s: jax.lax.scan(one, s, grads))(opt.init(params))
    moved = np.asarray(moved)
    rate = moved.mean()
    assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / steps)
    rs, predicted = ref.init([(2, 2)], o), []
    for _ in range(200):
        next_key, u_update, *_ = ref.randomness(rs, [(2, 2)], o)
        predicted.append(u_update < p)
        rs = dataclasses.replace(rs, key=next_key)
    assert np.array_equal(moved[:200], predicted)


def _between(mean, dtype=jnp.bfloat16):
    """Distance of ``mean`` from the nearest value of ``dtype``, in units of its spacing."""
    nearest = float(jnp.asarray(mean, jnp.float32).astype(dtype).astype(jnp.float32))
    spacing = float(jnp.finfo(dtype).eps) * 2.0 ** np.floor(np.log2(abs(mean)))
    return abs(mean - nearest) / spacing


def test_stochastic_rounding_of_the_stored_momentum():
    """``mu_dtype=bfloat16, round="stochastic"``: 10⁴ copies of a value a third of the way
    between two bfloat16 neighbours are stored as those two neighbours with mean the
    value (rounding to nearest would store all of them as the lower one)."""
    x = 1 + 2**-7 / 3
    opt = rollfast.get("kron", learning_rate=1.0, b1=0.9, mu_dtype=jnp.bfloat16, round="stochastic",
                       preconditioner_update_probability=0.0, preconditioner_init_scale=1.0)
    params = {"v": jnp.zeros(10_000)}
    _, state = jax.jit(opt.update)({"v": jnp.full(10_000, x, jnp.float32)}, opt.init(params), params)
    mu = np.asarray(kron_state(state).mu["v"].astype(jnp.float32), np.float64)
    assert kron_state(state).mu["v"].dtype == jnp.bfloat16
    assert set(np.unique(mu)) == {1.0, 1 + 2**-7}
    assert abs(mu.mean() - x) < 4 * 2**-7 * np.sqrt(2 / 9 / mu.size)


def test_stochastic_rounding_of_the_stored_factors():
    """``precond_dtype=bfloat16, round="stochastic"``: after one update of a diagonal factor
    (every entry the same value up to 1e-6, between two bfloat16 neighbours) the stored
    entries average to the float32 factor of the same step."""
    def factor(precond_dtype):
        opt = rollfast.get("kron", learning_rate=1.0, precond_dtype=precond_dtype, round="stochastic",
                           preconditioner_update_probability=1.0, preconditioner_init_scale=1.0)
        params = {"v": jnp.zeros(10_000)}
        _, state = jax.jit(opt.update)({"v": jnp.full(10_000, 0.7, jnp.float32)}, opt.init(params), params)
        return np.asarray(kron_state(state).qs["v"][0].astype(jnp.float32), np.float64)

    exact, stored = factor(None), factor(jnp.bfloat16)
    value = exact.mean()
    assert np.ptp(exact) < 1e-6 * value
    spacing = float(jnp.finfo(jnp.bfloat16).eps) * 2.0 ** np.floor(np.log2(value))
    assert 0.2 < _between(value) < 0.8  # nearest would be off by ≥ 0.2 spacing ≫ the tolerance
    assert len(np.unique(stored)) == 2
    assert abs(stored.mean() - value) < 4 * spacing / 2 / np.sqrt(stored.size)


def test_default_clip_gives_exact_rms_and_element_caps():
    """With P = s²I fixed, the default clip (2.0, 10.0) maps the update s²g to exactly
    RMS 2 when larger, then caps entries at exactly ±10; a small update is untouched."""
    s = 2.0
    opt = rollfast.get("kron", learning_rate=1.0, b1=0.0, preconditioner_update_probability=0.0,
                       preconditioner_init_scale=s)
    params = {"w": jnp.zeros((8, 8)), "small": jnp.zeros((4, 4))}
    w = np.full((8, 8), 1.0, np.float32)
    w[0, 0] = 100.0  # one outlier: after the RMS cap it exceeds 10 and is capped
    small = np.linspace(-0.1, 0.1, 16, dtype=np.float32).reshape(4, 4)
    u, _ = jax.jit(opt.update)({"w": jnp.asarray(w), "small": jnp.asarray(small)}, opt.init(params), params)
    want = s**2 * w.astype(np.float64)
    want = want * 2.0 / np.sqrt(np.mean(want**2))
    assert want[0, 0] > 10 and np.all(np.abs(want.ravel()[1:]) < 10)
    want = np.clip(want, -10.0, 10.0)
    np.testing.assert_allclose(-np.asarray(u["w"]), want, rtol=1e-6)
    np.testing.assert_allclose(-np.asarray(u["small"]), s**2 * small, rtol=1e-6)
