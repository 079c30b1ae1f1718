"""Each stage of the kron pipeline (rollfast_psgd.transform, rollfast_psgd.factors) against
its equation in docs/kron.md, with float64 NumPy references on small problems."""

import attrs
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rollfast_psgd import scale_by_kron
from rollfast_psgd.factors import (FactorTerms, UpdateConfig, balanced, curvature_bound, gram_terms,
                                   lipschitz_step, mode_spec, statistic)
from rollfast_psgd.transform import (KronOptions, apply_preconditioner, clip_updates, guard_spike, kron_init,
                                     initial_scale, lazy_scale, leaf_plans, momentum, next_state, StepDraws)

RNG = np.random.default_rng(0)
SPEC = mode_spec({"update_dense": lambda q, t: q})


def f32(x):
    return jnp.asarray(x, jnp.float32)


def spd(d, cond=10.0):
    basis, _ = np.linalg.qr(RNG.standard_normal((d, d)))
    return basis @ np.diag(np.geomspace(1.0, cond, d)) @ basis.T


# --- spike guard --------------------------------------------------------------------------

@pytest.mark.parametrize("permissive", [True, False])
def test_guard_spike_rescales_or_skips(permissive):
    g = [f32([3.0, 0.0]), f32([[0.0, 4.0]])]                       # N = 5
    ok, out = guard_spike(g, KronOptions(raw_global_grad_clip=2.0, permissive_spike_protection=permissive))
    assert bool(ok) is permissive
    np.testing.assert_allclose(np.sqrt(sum(float(jnp.sum(x**2)) for x in out)), 2.0, rtol=1e-6)
    ok, out = guard_spike(g, KronOptions(raw_global_grad_clip=10.0, permissive_spike_protection=permissive))
    assert bool(ok) and all(np.array_equal(a, b) for a, b in zip(out, g))   # below c: untouched


def test_guard_spike_never_passes_a_non_finite_gradient():
    g = [f32([1.0, jnp.nan])]
    for threshold in (None, 1.0):
        assert not bool(guard_spike(g, KronOptions(raw_global_grad_clip=threshold))[0])


def test_permissive_spike_is_rescaled_even_when_the_update_probability_is_below_one():
    """The meaning of permissive_spike_protection is the toolbox's: True rescales, whatever p."""
    params, g = {"w": jnp.ones((3, 3))}, {"w": jnp.full((3, 3), 10.0)}
    tx = scale_by_kron(b1=0.0, raw_global_grad_clip=1.0, preconditioner_update_probability=0.5,
                       preconditioner_init_scale=1.0, update_preconditioner_first=False,
                       grad_clip_max_amps=(1e9, 1e9))
    u, after = tx.update(g, tx.init(params))
    np.testing.assert_allclose(u["w"], np.full((3, 3), 1 / 3), rtol=1e-5)   # P = I, g scaled to norm 1
    assert int(after.count) == 1


# --- momentum and lazy scale --------------------------------------------------------------

def test_momentum_matches_its_recursion_and_keeps_the_old_value_on_skip():
    gs = [RNG.standard_normal(4) for _ in range(4)]
    m, ref = [jnp.zeros(4)], np.zeros(4)
    for count, g in enumerate(gs):
        beta = min(count / (count + 1), 0.9)                       # β_t = min((t-1)/t, b1), t = count + 1
        ref = (1 - beta) * g + beta * ref
        m = momentum([f32(g)], m, jnp.int32(count), False, 0.9)
        np.testing.assert_allclose(m[0], ref, rtol=1e-6, atol=1e-7)
    kept = momentum([f32(gs[0])], m, jnp.int32(9), True, 0.9)
    assert np.array_equal(kept[0], m[0])


def test_lazy_scale_makes_p_equal_s_squared_identity():
    g_w, g_b = RNG.standard_normal((3, 2)), RNG.standard_normal(5) * 3
    damping = 0.1
    s = (max(np.mean(g_w**4), np.mean(g_b**4)) + damping**4) ** (-1 / 8)
    qs = [[jnp.eye(3), jnp.eye(2)], [jnp.ones(5)]]
    scale = initial_scale([f32(g_w), f32(g_b)], [(False, (True, True)), (False, (False,))], [None, None],
                          damping=damping)
    out = lazy_scale(qs, scale, True)
    np.testing.assert_allclose(np.kron(out[0][0], out[0][1]), s * np.eye(6), rtol=1e-5)   # Q = s^{1/2}⊗s^{1/2}
    np.testing.assert_allclose(out[1][0], np.full(5, s), rtol=1e-5)
    untouched = lazy_scale(qs, scale, False)
    assert all(np.array_equal(a, b) for fa, fb in zip(untouched, qs) for a, b in zip(fa, fb))


# --- the factor fit -----------------------------------------------------------------------

def test_statistic_is_p_times_h_or_q_times_h():
    q1, q2 = np.triu(RNG.standard_normal((3, 3))) + 3 * np.eye(3), RNG.standard_normal(2) + 2
    h = RNG.standard_normal((3, 2))
    qs = [f32(q1), f32(q2)]
    full_q = np.kron(q1, np.diag(q2))
    x, b = statistic(qs, f32(h), None, SPEC)
    np.testing.assert_allclose(x, (full_q.T @ full_q @ h.ravel()).reshape(3, 2), rtol=1e-5)
    assert b is None
    v = RNG.standard_normal((3, 2))
    x, b = statistic(qs, f32(h), f32(v), mode_spec({"update_dense": abs, "statistic": "Qh", "inverse_probe": True}))
    np.testing.assert_allclose(x, (full_q @ h.ravel()).reshape(3, 2), rtol=1e-5)
    np.testing.assert_allclose(b, np.linalg.solve(full_q.T, v.ravel()).reshape(3, 2), rtol=1e-4)


def test_gram_terms_are_the_unfolding_grams():
    x, b = RNG.standard_normal((3, 4, 2)), RNG.standard_normal((3, 4, 2))
    cfg = UpdateConfig(SPEC, 0.1, 0.9, True, 0.25, 5)
    unfold = np.moveaxis(x, 1, 0).reshape(4, -1)
    t1, t2 = gram_terms(f32(x), None, axis=1, q=jnp.eye(4), n=x.size, cfg=cfg)
    np.testing.assert_allclose(t1, unfold @ unfold.T + 0.25, rtol=1e-5)        # G_i(X) + δ
    assert float(t2) == pytest.approx(x.size / 4)                               # n / d_i
    t1, t2 = gram_terms(f32(x), None, axis=0, q=jnp.ones(3), n=x.size, cfg=cfg)
    np.testing.assert_allclose(t1, np.sum(x**2, axis=(1, 2)) + 0.25, rtol=1e-5)  # squared row norms
    t1, t2 = gram_terms(f32(x), f32(b), axis=2, q=jnp.eye(2), n=x.size, cfg=cfg)
    ub = np.moveaxis(b, 2, 0).reshape(2, -1)
    ux = np.moveaxis(x, 2, 0).reshape(2, -1)
    np.testing.assert_allclose(t1, ux @ ux.T, rtol=1e-5)                       # no δ with the inverse probe
    np.testing.assert_allclose(t2, ub @ ub.T, rtol=1e-5)


def test_curvature_bound_is_a_tight_lower_bound_of_the_spectral_norm():
    a = spd(6, cond=100.0)
    probe = jax.random.normal(jax.random.PRNGKey(0), (32, 6))
    exact = np.linalg.norm(a, 2)
    bound = float(curvature_bound(f32(a), jnp.float32(2.0), probe, dense=True))
    assert exact + 2.0 >= bound - 1e-4 and bound >= 0.99 * (exact + 2.0)        # nlb(T1) + T2
    bound = float(curvature_bound(f32(a), f32(a), probe, dense=True))
    assert 2 * exact >= bound - 1e-4 and bound >= 0.99 * 2 * exact               # nlb(T1 + T2)
    assert float(curvature_bound(f32([1.0, 5.0]), jnp.float32(0.5), None, dense=False)) == 5.5


@pytest.mark.parametrize("track", [True, False])
def test_lipschitz_step(track):
    cfg = UpdateConfig(SPEC, 0.2, 0.75, track, 1e-9, 5)
    eta, l_new = lipschitz_step(jnp.float32(2.0), jnp.float32(8.0), cfg)
    if track:
        assert float(l_new) == pytest.approx(max(0.75 * 8 + 0.25 * 2, 2.0))   # L' = max(βL + (1-β)ℓ, ℓ)
        assert float(eta) == pytest.approx(0.2 / 6.5)
        eta, l_new = lipschitz_step(jnp.float32(9.0), jnp.float32(1.0), cfg)
        assert float(l_new) == 9.0                                            # never below this ℓ
    else:
        assert l_new is None and float(eta) == pytest.approx(0.1)             # η₀ / ℓ


def test_balancing_keeps_the_kronecker_product():
    q1, q2 = f32(RNG.standard_normal((3, 3)) * 50), f32(RNG.standard_normal((2, 2)) * 0.01)
    (b1, b2), (p1, p2) = balanced([q1, q2], [q1.T @ q1, None], True)
    np.testing.assert_allclose(np.kron(b1, b2), np.kron(q1, q2), rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(b1))) == pytest.approx(float(jnp.max(jnp.abs(b2))), rel=1e-5)
    np.testing.assert_allclose(p1, b1.T @ b1, rtol=1e-4)                      # P_i follows s_i²
    assert p2 is None
    same, _ = balanced([q1, q2], [None, None], False)
    assert np.array_equal(same[0], q1) and np.array_equal(same[1], q2)


# --- apply P, clip, state -----------------------------------------------------------------

def test_apply_preconditioner_is_the_kronecker_product():
    p1, p2, m = spd(3), np.diag(RNG.random(4) + 0.5), RNG.standard_normal((3, 4))
    (u,) = apply_preconditioner([[f32(p1), f32(np.diag(p2))]], [f32(m)], [(False, (True, False))],
                                KronOptions(precond_grads_precision="highest"))
    np.testing.assert_allclose(u.ravel(), np.kron(p1, p2) @ m.ravel(), rtol=1e-5)


def test_clip_updates_per_tensor_and_global():
    u = [f32(RNG.standard_normal(100) * 5), f32(RNG.standard_normal(10) * 0.1)]
    a, b = clip_updates(u, KronOptions(grad_clip_max_amps=(1.0, 1.5)))
    big = np.asarray(u[0], np.float64)
    assert np.sqrt(np.mean(big**2)) > 1.0 and np.max(np.abs(big)) / np.sqrt(np.mean(big**2)) > 1.5
    np.testing.assert_allclose(a, np.clip(big / np.sqrt(np.mean(big**2)), -1.5, 1.5), rtol=1e-6)
    np.testing.assert_allclose(b, u[1], rtol=1e-6)                            # already below the caps
    a, b = clip_updates(u, KronOptions(grad_clip_mode="global_rms", grad_clip_max_amps=0.5))
    total = np.sqrt((np.sum(np.square(a)) + np.sum(np.square(b))) / 110)
    np.testing.assert_allclose(total, 0.5, rtol=1e-5)
    np.testing.assert_allclose(a / u[0], b[0] / u[1][0], rtol=1e-5)            # one common factor


def test_next_state_keeps_count_key_and_flag_when_skipped():
    options = KronOptions(preconditioner_init_scale=None)
    params = {"w": jnp.ones((2, 2))}
    state = kron_init(params, options)
    treedef = jax.tree.structure(params)
    draws = StepDraws(jnp.array([7, 7], jnp.uint32), None, None, False, False, None)
    qs, ls = [list(state.qs["w"])], [list(state.ls["w"])]
    for skip, count in ((True, 0), (False, 1)):
        new = next_state(state, treedef, moms=[jnp.ones((2, 2))], qs=qs, ls=ls, skip=jnp.asarray(skip),
                         draws=draws, options=options)
        assert int(new.count) == count and bool(new.needs_scale_init) is skip
        assert np.array_equal(new.key, state.key if skip else draws.next_key)


def test_leaf_plans_follow_scanned_layers_and_the_layout():
    params = {"stack": jnp.ones((4, 3, 3)), "v": jnp.ones(5), "wide": jnp.ones((2, 64))}
    plans = leaf_plans(params, KronOptions(scanned_layers={"stack": True, "v": False, "wide": False}))
    assert plans == [(True, (True, True)), (False, (False,)), (False, (True, False))]


@pytest.mark.parametrize("bad, error, message", [
    (dict(mode="NOPE"), Exception, "NOPE"),
    (dict(memory_save_mode="some_diag"), ValueError, "memory_save_mode must be one of"),
    (dict(grad_clip_mode="rms"), ValueError, "grad_clip_mode must be one of"),
    (dict(grad_clip_max_amps="big"), ValueError, "grad_clip_max_amps must be"),
    (dict(whiten_grad=False, b1=0.0), ValueError, "needs b1 > 0"),
])
def test_options_are_validated_once(bad, error, message):
    with pytest.raises(error, match=message):
        KronOptions(**bad)


def test_options_record_is_frozen():
    options = KronOptions()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.b1 = 0.5
    assert FactorTerms._fields[:4] == ("t1", "t2", "eta", "bound")
