"""Magma update masking (docs/magma.md): float64 reference, invariants, randomness, attenuation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import rollfast
from rollfast_magma import MagmaState, magma

SHAPES = {"a": (5,), "b": (3, 4), "s": ()}


def grad_stream(steps, seed=0, drift=0.7):
    """Gradients with a persistent component (so cosines vary) plus noise."""
    keys = jax.random.split(jax.random.PRNGKey(seed), steps + 1)
    base = {n: np.asarray(jax.random.normal(jax.random.fold_in(keys[0], i), s))
            for i, (n, s) in enumerate(SHAPES.items())}
    return [{n: jnp.asarray(drift * base[n] + np.asarray(jax.random.normal(jax.random.fold_in(k, i), s)),
                            jnp.float32)
             for i, (n, s) in enumerate(SHAPES.items())} | {"n": None} for k in keys[1:]]


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference_scores(grads, moments, tau):
    """Float64 score recursion s ← 0.9 s + 0.1 σ(cos(g, m)/τ), per leaf."""
    s = {n: 0.5 for n in SHAPES}
    out = []
    for g, m in zip(grads, moments):
        for n in SHAPES:
            gn, mn = np.asarray(g[n], np.float64).ravel(), np.asarray(m[n], np.float64).ravel()
            cos = np.clip(gn @ mn / max(np.linalg.norm(gn) * np.linalg.norm(mn), 1e-12), -1, 1)
            s[n] = 0.9 * s[n] + 0.1 * sigmoid(cos / tau)
        out.append(dict(s))
    return out


def ema(grads, decay):
    m, out = {n: np.zeros(s) for n, s in SHAPES.items()}, []
    for g in grads:
        m = {n: decay * m[n] + (1 - decay) * np.asarray(g[n], np.float64) for n in SHAPES}
        out.append(m)
    return out


def run(opt, grads, params=None):
    params = params or {n: jnp.zeros(s) for n, s in SHAPES.items()} | {"n": None}
    state = opt.init(params)
    step = jax.jit(lambda g, s: opt.update(g, s, params))
    outs, states = [], []
    for g in grads:
        u, state = step(g, state)
        outs.append(u)
        states.append(state)
    return outs, states


def test_own_ema_matches_float64_reference():
    grads = grad_stream(15)
    outs, states = run(magma(optax.identity(), magma_p=0.6, magma_tau=0.7, key=3), grads)
    ref = reference_scores(grads, ema(grads, 0.9), 0.7)
    kept = []
    for g, u, st, r in zip(grads, outs, states, ref):
        assert st.ema != () and u["n"] is None
        for n in SHAPES:
            np.testing.assert_allclose(st.score[n], r[n], rtol=1e-6)
            keep = bool(jnp.any(u[n] != 0))
            kept.append(keep)
            np.testing.assert_allclose(u[n], r[n] * np.asarray(g[n]) * keep, rtol=1e-6)
    assert 0 < np.mean(kept) < 1


def test_family_first_moment_is_used():
    grads = grad_stream(8, seed=1)
    opt = rollfast.get("adamw", learning_rate=0.1, b1=0.5, weight_decay=0.0, mask="magma", magma_p=1.0)
    base = rollfast.get("adamw", learning_rate=0.1, b1=0.5, weight_decay=0.0)
    outs, states = run(opt, grads)
    plain, _ = run(base, grads)
    ref = reference_scores(grads, ema(grads, 0.5), 2.0)  # adam's m_t with b1 = 0.5, not bias-corrected
    for u, d, st, r in zip(outs, plain, states, ref):
        assert st.ema == ()
        for n in SHAPES:
            np.testing.assert_allclose(st.score[n], r[n], rtol=1e-6)
            np.testing.assert_allclose(u[n], r[n] * np.asarray(d[n]), rtol=1e-5)


def test_family_without_first_moment_keeps_an_ema():
    opt = rollfast.get("sgd", learning_rate=0.1, mask="magma")  # plain SGD keeps no momentum
    state = opt.init({"w": jnp.zeros(3)})
    assert isinstance(state, MagmaState) and state.ema["w"].shape == (3,)
    grads = grad_stream(6, seed=4)
    _, states = run(magma(optax.sgd(0.1), first_moment=lambda s: None, magma_tau=0.5), grads)
    ref = reference_scores(grads, ema(grads, 0.9), 0.5)
    np.testing.assert_allclose(states[-1].score["b"], ref[-1]["b"], rtol=1e-6)


def test_invariants():
    g = {"a": jnp.arange(1.0, 6.0), "b": jnp.ones((3, 4)), "s": jnp.asarray(2.0), "n": None}
    base = rollfast.get("adamw", learning_rate=0.1, weight_decay=0.0)
    delta, _ = run(base, [g])
    # p = 1, first adamw step: g = m, cos = 1, s = 0.9·0.5 + 0.1·σ(0.5)
    one = rollfast.get("adamw", learning_rate=0.1, weight_decay=0.0, mask="magma", magma_p=1.0)
    (u,), _ = run(one, [g])
    s1 = 0.45 + 0.1 * sigmoid(0.5)
    assert s1 == pytest.approx(0.51225, abs=1e-5)
    for n in SHAPES:
        np.testing.assert_allclose(u[n], s1 * np.asarray(delta[0][n]), rtol=1e-6)
    # p = 0: every update exactly zero, scores still move
    zero = rollfast.get("adamw", learning_rate=0.1, mask="magma", magma_p=0.0)
    outs, states = run(zero, [g, g])
    assert all(bool(jnp.all(x == 0)) for u in outs for x in jax.tree.leaves(u))
    assert float(states[-1].score["a"]) > 0.5
    # g = 0: cos = 0, the score stays 0.5
    zeros = jax.tree.map(jnp.zeros_like, g)
    _, states = run(one, [zeros, zeros])
    assert all(float(s) == 0.5 for s in jax.tree.leaves(states[-1].score))


def test_each_leaf_is_zero_or_exactly_score_times_update():
    grads = grad_stream(10, seed=2)
    outs, states = run(rollfast.get("adamw", learning_rate=0.1, mask="magma"), grads)
    plain, _ = run(rollfast.get("adamw", learning_rate=0.1), grads)
    for u, d, st in zip(outs, plain, states):
        for n in SHAPES:
            scaled = np.asarray(d[n]) * float(st.score[n])  # equal up to fused-multiply rounding
            assert bool(jnp.all(u[n] == 0)) or np.allclose(u[n], scaled, rtol=1e-6, atol=0)


def test_same_key_same_run_different_key_different_masks():
    grads = grad_stream(20, seed=3)
    masks = []
    for key in (1, jax.random.PRNGKey(1), 2):  # an int seed is PRNGKey(seed)
        outs, _ = run(rollfast.get("adamw", learning_rate=0.1, mask="magma", key=key), grads)
        masks.append([bool(jnp.any(u[n] != 0)) for u in outs for n in SHAPES])
    assert masks[0] == masks[1]
    assert masks[0] != masks[2]


def test_expected_attenuation_is_p_times_one_half():
    """Uncorrelated g and m: s ≈ 0.5, so E[b·s] ≈ 0.25 (tolerance from the sample variance)."""
    leaves, dim, steps, p = 8, 512, 500, 0.5
    fixed = {f"l{i}": jax.random.normal(jax.random.PRNGKey(100 + i), (dim,)) for i in range(leaves)}
    opt = magma(optax.identity(), first_moment=lambda _: fixed, magma_p=p, key=0)

    def step(state, key):
        g = {n: jax.random.normal(jax.random.fold_in(key, i), (dim,)) for i, n in enumerate(fixed)}
        u, state = opt.update(g, state)
        return state, jnp.stack([u[n][0] / g[n][0] for n in fixed])

    _, ratios = jax.lax.scan(step, opt.init(fixed), jax.random.split(jax.random.PRNGKey(9), steps))
    ratios = np.asarray(ratios, np.float64).ravel()
    se = ratios.std(ddof=1) / np.sqrt(ratios.size)
    print(f"mean attenuation {ratios.mean():.4f} ± {se:.4f} (expected {p * 0.5})")
    assert abs(ratios.mean() - p * 0.5) < 4 * se + 0.01  # + the bias bound |E s − 0.5| for dim 512
    kept = ratios != 0
    assert abs(kept.mean() - p) < 4 * np.sqrt(p * (1 - p) / kept.size)


def test_non_finite_gradient_zeroes_the_update_and_keeps_magma_state():
    opt = rollfast.get("sgd", learning_rate=0.1, mask="magma", magma_p=1.0)  # own EMA path
    params = {"w": jnp.ones(3), "none": None}
    state = opt.init(params)
    _, state = opt.update({"w": jnp.ones(3), "none": None}, state, params)
    u, new = jax.jit(opt.update)({"w": jnp.array([1.0, jnp.nan, 0.0]), "none": None}, state, params)
    np.testing.assert_array_equal(u["w"], jnp.zeros(3))
    np.testing.assert_array_equal(new.score["w"], state.score["w"])
    np.testing.assert_array_equal(new.ema["w"], state.ema["w"])


def test_bad_options():
    with pytest.raises(ValueError, match=r"magma_p=1.5 is not allowed by mask 'magma'.*a number in \[0, 1\]"):
        rollfast.get("adamw", learning_rate=0.1, mask="magma", magma_p=1.5)
    with pytest.raises(ValueError, match="magma_tau=0.0 is not allowed by mask 'magma'.*a number > 0"):
        rollfast.get("adamw", learning_rate=0.1, mask="magma", magma_tau=0.0)


def test_axis_name_reduces_across_devices_and_shares_masks():
    mesh = Mesh(np.array(jax.devices()), ("d",))
    params = {"w": jnp.zeros(64)}
    grads = [{"w": jax.random.normal(jax.random.PRNGKey(i), (64,)) + 0.5} for i in range(6)]
    local = magma(optax.identity(), magma_p=0.5, axis_name="d")
    whole = magma(optax.identity(), magma_p=0.5)
    specs = MagmaState(optax.EmptyState(), {"w": P()}, {"w": P("d")}, P())
    step = jax.jit(jax.shard_map(lambda g, s: local.update(g, s), mesh=mesh,
                                 in_specs=({"w": P("d")}, specs), out_specs=({"w": P("d")}, specs)))
    s_local, s_whole = local.init(params), whole.init(params)
    for g in grads:
        u_local, s_local = step(g, s_local)
        u_whole, s_whole = whole.update(g, s_whole)
        np.testing.assert_allclose(u_local["w"], u_whole["w"], rtol=1e-6)
        np.testing.assert_allclose(s_local.score["w"], s_whole.score["w"], rtol=1e-6)
