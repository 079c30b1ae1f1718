"""kron with ``cache_preconditioner=True``: ``P_i = Q_iᵀQ_i`` kept in the state instead of
formed every step. The run equals forming ``P`` every step, the cache is always ``P`` of
the factors it sits beside, and a skipped step keeps it. (Each case compiles kron twice:
the default tier runs the default mode unblocked and blocked; the rest is slow.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rollfast
from rollfast_psgd import KronState, scale_by_kron
from rollfast_psgd.linalg import preconditioner

PARAMS = {"w": jax.random.normal(jax.random.PRNGKey(0), (100, 40)) * 0.1, "b": jnp.ones(7),
          "s": jnp.asarray(0.5), "c": jax.random.normal(jax.random.PRNGKey(1), (3, 8, 6))}


def loss(p):
    return sum(jnp.mean((x - 1) ** 2) + 0.1 * jnp.mean(x ** 4) for x in jax.tree.leaves(p))


def train(steps=8, **options):
    opt = rollfast.get("kron", learning_rate=1e-2, **options)
    step = jax.jit(lambda p, s: rollfast.apply_step(opt, jax.grad(loss)(p), s, p))
    params, state = PARAMS, opt.init(PARAMS)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def kron_state(state) -> KronState:
    return next(x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, KronState))
                if isinstance(x, KronState))


@pytest.mark.parametrize("options", [
    {"preconditioner_update_probability": 0.3}, {"block_size": 64, "preconditioner_update_probability": 0.3},
    pytest.param({"mode": "EQ", "block_size": 64, "preconditioner_update_probability": 0.3}, marks=pytest.mark.slow),
    pytest.param({"scanned_layers": {"w": False, "b": False, "s": False, "c": True},
                  "preconditioner_update_probability": 0.3}, marks=pytest.mark.slow),
], ids=str)
def test_cached_run_equals_forming_p_every_step(options):
    """In float32 the cached ``P`` is the very matrix the uncached step forms (lazy scale
    included: the cache is scaled by ``s^{2/k}`` with its factors), and it is ``P`` of the
    factors it is stored with."""
    (a, _), (b, state) = train(**options), train(cache_preconditioner=True, **options)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert_cache_is_p_of_the_factors(kron_state(state), scanned="scanned_layers" in options)


def assert_cache_is_p_of_the_factors(ks: KronState, scanned: bool):
    qs, ps = jax.tree.leaves(ks.qs), jax.tree.leaves(ks.ps)
    assert len(qs) == len(ps)
    for q, p in zip(qs, ps):  # (d,) diagonal, (d, d) dense, (N, bs, bs) a tile stack or scanned layers
        layered = q.ndim == 3 or (scanned and q.ndim == 2 and q.shape[0] == 3)
        want = jax.vmap(lambda x: preconditioner([x])[0])(q) if layered else preconditioner([q])[0]
        np.testing.assert_allclose(p, want, rtol=2e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"update_preconditioner_first": False}, {"mode": "NS"}], ids=str)
def test_cached_run_equals_forming_p_every_step_to_rounding(options):
    """With the old factors first the cached ``P`` is formed in another branch; NS hands the
    family its own ``QᵀQ`` (to float32 accuracy) and the cache keeps that one."""
    (a, _), (b, _) = [train(preconditioner_update_probability=0.3, cache_preconditioner=c, **options)
                      for c in (False, True)]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=2e-6), a, b)


def test_a_skipped_step_keeps_the_cache():
    tx = scale_by_kron(preconditioner_update_probability=1.0, cache_preconditioner=True, block_size=64)
    state = tx.init(PARAMS)
    g = jax.grad(loss)(PARAMS)
    _, state = jax.jit(tx.update)(g, state)
    bad = {**g, "w": g["w"].at[3, 4].set(jnp.nan)}
    u, new = jax.jit(tx.update)(bad, state)
    assert all(bool((x == 0).all()) for x in jax.tree.leaves(u))
    jax.tree.map(np.testing.assert_array_equal, new, state)


@pytest.mark.slow
def test_bfloat16_factors_cache_p_in_bfloat16():
    (a, _), (b, state) = [train(precond_dtype=jnp.bfloat16, block_size=64, preconditioner_update_probability=0.3,
                                cache_preconditioner=c) for c in (False, True)]
    assert {x.dtype for x in jax.tree.leaves(kron_state(state).ps)} == {jnp.dtype(jnp.bfloat16)}
    # P of the float32 factors rounded once, against P of the rounded factors: close, not equal.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-2), a, b)
    assert abs(float(loss(a)) - float(loss(b))) < 1e-3 * float(loss(a)) and float(loss(b)) < float(loss(PARAMS))
