"""Stochastic rounding (bf16, f16), rollfast.apply_updates / apply_updates_prefix, bf16 training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rollfast
import rollfast.testing as rt
from rollfast_rounding import Nearest, Stochastic, sr_bf16

N = 10_000


def bf16_neighbours(x: np.ndarray):
    """The two bf16 values around float32 ``x`` (toward zero, away from zero), via bit patterns."""
    bits = x.astype(np.float32).view(np.uint32)
    low = bits & np.uint32(0xFFFF0000)
    return low.view(np.float32), (low + np.uint32(0x10000)).view(np.float32)


def assert_unbiased(samples: np.ndarray, x: float):
    samples = samples.astype(np.float64)
    se = samples.std(ddof=1) / np.sqrt(samples.size)
    assert abs(samples.mean() - x) <= 4 * se + 1e-300, (samples.mean(), x, se)


@pytest.mark.parametrize("x", [1 + 2**-10, np.pi, -0.1234567, 3.0e-30, 65000.5, 7.0e-39])
def test_sr_bf16_unbiased_and_between_neighbours(x):
    x32 = np.float32(x)
    out = np.asarray(sr_bf16(jnp.full((N,), x32), jax.random.PRNGKey(1)).astype(jnp.float32))
    lo, hi = bf16_neighbours(np.array([x32]))
    assert set(np.unique(out)) <= {lo[0], hi[0]}
    assert_unbiased(out, float(x32))


def test_sr_bf16_probability_of_rounding_up():
    out = np.asarray(sr_bf16(jnp.full((N,), 1 + 2**-10, jnp.float32), jax.random.PRNGKey(2)))
    frac = np.mean(out.astype(np.float32) > 1.0)
    assert abs(frac - 1 / 8) < 4 * np.sqrt(1 / 8 * 7 / 8 / N)


@pytest.mark.parametrize("x", [1 + 2**-12, -3.14159, 3.3e-6, 1e-7])  # the last two are f16 subnormals
def test_sr_float16_unbiased_and_between_neighbours(x):
    x32 = np.float32(x)
    out = np.asarray(Stochastic().cast(jnp.full((N,), x32), jnp.float16, jax.random.PRNGKey(3)))
    lo = np.float16(x32)
    lo = lo if abs(np.float32(lo)) <= abs(x32) else np.nextafter(lo, np.float16(0))
    hi = np.nextafter(lo, np.float16(np.copysign(np.inf, x32)))
    assert set(np.unique(out)) <= {lo, hi}
    assert_unbiased(out.astype(np.float64), float(x32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_round_trip_exact_for_representable_values(dtype):
    values = jax.random.normal(jax.random.PRNGKey(0), (4096,)).astype(dtype)
    specials = jnp.array([0.0, -0.0, jnp.inf, -jnp.inf, 1.0, -2.0], dtype)
    x = jnp.concatenate([values, specials]).astype(jnp.float32)
    out = Stochastic().cast(x, dtype, jax.random.PRNGKey(5))
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out.view(jnp.uint16)),
                                  np.asarray(x.astype(dtype).view(jnp.uint16)))
    nan = Stochastic().cast(jnp.full((4,), jnp.nan), dtype, jax.random.PRNGKey(5))
    assert bool(jnp.all(jnp.isnan(nan)))


def test_stochastic_cast_needs_a_key_and_nearest_is_a_cast():
    with pytest.raises(ValueError, match="needs a PRNG key"):
        Stochastic().cast(jnp.ones(2), jnp.bfloat16)
    x = jnp.array([1 + 2**-9, 1 + 3 * 2**-9])
    np.testing.assert_array_equal(Nearest().cast(x, jnp.bfloat16), x.astype(jnp.bfloat16))
    np.testing.assert_array_equal(Stochastic().cast(x, jnp.float32, None), x)


def test_apply_updates_equals_optax_for_float32():
    params = rt.mixed_tree()
    updates = jax.tree.map(lambda p: p * 0.37 - 0.1 if p.dtype == jnp.float32 else jnp.zeros_like(p),
                           params)
    expected = optax.apply_updates(params, updates)
    for key in (None, jax.random.PRNGKey(0)):
        out = rollfast.apply_updates(params, updates, key)
        assert jax.tree.structure(out) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_apply_updates_bf16_nearest_and_stochastic():
    p = {"w": jnp.ones((N,), jnp.bfloat16), "none": None}
    u = {"w": jnp.full((N,), 2**-10, jnp.float32), "none": None}
    nearest = (p["w"].astype(jnp.float32) + u["w"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(rollfast.apply_updates(p, u)["w"], nearest)
    np.testing.assert_array_equal(rollfast.apply_updates(p, u, jax.random.PRNGKey(0), stochastic=False)["w"],
                                  nearest)
    out = rollfast.apply_updates(p, u, jax.random.PRNGKey(0))
    assert out["none"] is None and out["w"].dtype == jnp.bfloat16
    assert_unbiased(np.asarray(out["w"].astype(jnp.float32)), 1 + 2**-10)
    jitted = jax.jit(rollfast.apply_updates)(p, u, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(jitted["w"], out["w"])


def test_apply_updates_one_key_per_leaf_position():
    """Two identical leaves get different random bits; a None leaf still consumes a key."""
    x = jnp.ones((1000,), jnp.bfloat16)
    u = jnp.full((1000,), 2**-9)
    out = rollfast.apply_updates([x, None, x], [u, None, u], jax.random.PRNGKey(0))
    assert not np.array_equal(out[0], out[2])
    k = jax.random.split(jax.random.PRNGKey(0), 3)[2]
    np.testing.assert_array_equal(out[2], sr_bf16(x.astype(jnp.float32) + u, k))


def test_apply_updates_prefix_keeps_non_array_subtrees():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.PRNGKey(0), activation=jax.nn.relu)
    grads = eqx.filter_grad(lambda m: jnp.sum(m(jnp.ones(3)) ** 2))(model)
    updates = jax.tree.map(lambda g: -0.1 * g, grads)
    new = rollfast.apply_updates_prefix(model, updates)
    assert new.activation is jax.nn.relu
    np.testing.assert_allclose(new.layers[0].weight, model.layers[0].weight + updates.layers[0].weight)
    frozen = {"train": jnp.ones(2), "frozen": {"w": jnp.ones(3), "fn": print}}
    out = rollfast.apply_updates_prefix(frozen, {"train": jnp.ones(2), "frozen": None},
                                        jax.random.PRNGKey(0))
    assert out["frozen"] is frozen["frozen"]
    np.testing.assert_array_equal(out["train"], 2 * jnp.ones(2))


def _train(dtype, key):
    """SGD (lr 1e-3, 500 steps) on ½‖p‖², p₀ = 0.9: every step is below half a bf16 ulp."""
    p0 = jnp.full((1000,), 0.9, dtype)
    loss = lambda p: 0.5 * jnp.sum(jnp.square(p.astype(jnp.float32)))
    opt = optax.sgd(1e-3)

    def step(carry, k):
        p, s = carry
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return (rollfast.apply_updates(p, u, k), s), None

    keys = jax.random.split(jax.random.PRNGKey(7), 500) if key else None
    if key:
        (p, _), _ = jax.lax.scan(step, (p0, opt.init(p0)), keys)
    else:
        (p, _), _ = jax.lax.scan(lambda c, _: step(c, None), (p0, opt.init(p0)), None, length=500)
    return float(loss(p)), float(loss(p0))


def test_bf16_training_stochastic_matches_f32_while_nearest_stalls():
    f32, start = _train(jnp.float32, key=False)
    sr, _ = _train(jnp.bfloat16, key=True)
    nearest, bf16_start = _train(jnp.bfloat16, key=False)
    print(f"final loss: f32 {f32:.5f}  bf16+stochastic {sr:.5f}  bf16+nearest {nearest:.5f}  "
          f"(start {start:.5f})")
    assert abs(sr - f32) / f32 < 0.02
    assert nearest == bf16_start  # every update is lost to round-to-nearest


def test_bf16_moments_use_the_chosen_rounding():
    params = {"w": jnp.zeros((4096,))}
    g = {"w": jax.random.normal(jax.random.PRNGKey(0), (4096,))}
    stored = {}
    for rule in ("nearest", "stochastic"):
        opt = rollfast.get("adamw", learning_rate=1e-3, mu_dtype=jnp.bfloat16, round=rule)
        _, state = opt.update(g, opt.init(params), params)
        stored[rule] = np.asarray(jax.tree.leaves(state)[1].astype(jnp.float32))  # mu
    exact = np.asarray(0.1 * g["w"], np.float32)
    np.testing.assert_array_equal(stored["nearest"], exact.astype(jnp.bfloat16).astype(np.float32))
    lo, hi = bf16_neighbours(exact)
    assert np.all((stored["stochastic"] == lo) | (stored["stochastic"] == hi))
    assert not np.array_equal(stored["stochastic"], stored["nearest"])


def test_prism_momentum_is_stored_with_stochastic_rounding():
    """PRISM with ``mu_dtype=bfloat16, round="stochastic"``: a momentum of 10⁴ equal
    entries a third of the way between two bfloat16 neighbours is stored as those two
    with mean the value; with ``round="nearest"`` every entry is the lower one."""
    x = 1 + 2**-7 / 3
    b1 = 0.5
    params = {"w": jnp.zeros((100, 100))}
    grads = {"w": jnp.full((100, 100), x / (1 - b1), jnp.float32)}  # m = (1 - b1) g from zero

    def stored(rule):
        opt = rollfast.get("prism", learning_rate=0.1, b1=b1, mu_dtype=jnp.bfloat16, round=rule)
        _, state = jax.jit(opt.update)(grads, opt.init(params), params)
        mus = [m for m in jax.tree.leaves(state) if getattr(m, "shape", None) == (100, 100)]
        assert len(mus) == 1 and mus[0].dtype == jnp.bfloat16
        return np.asarray(mus[0].astype(jnp.float32), np.float64)

    sr, nearest = stored("stochastic"), stored("nearest")
    assert set(np.unique(sr)) == {1.0, 1 + 2**-7}
    assert abs(sr.mean() - x) < 4 * 2**-7 * np.sqrt(2 / 9 / sr.size)
    assert set(np.unique(nearest)) == {1.0}
