"""Magma + Schedule-Free + stochastic rounding (+ clipping) together, under jit and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import rollfast
from rollfast_clip import ClipState
from rollfast_magma import MagmaState
from rollfast_schedule_free import ScheduleFreeState


def catalogue_family() -> str:
    """One Optax catalogue optimizer (registered by the optax plugin), else rollfast's adam."""
    names = {r.qualified_name for r in rollfast.available("family")}
    return "optax:lion" if "optax:lion" in names else "adam"


FAMILIES = {"adamw": dict(learning_rate=0.3, mu_dtype=jnp.bfloat16),
            "catalogue": dict(learning_rate=0.1)}


def build(which, **extra):
    family = "adamw" if which == "adamw" else catalogue_family()
    return rollfast.get(family, mask="magma", average="schedule_free", round="stochastic",
                        magma_p=0.8, raw_global_grad_clip=50.0, **FAMILIES[which], **extra)


def params(dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"w": jax.random.normal(k[0], (16, 8), dtype), "b": jax.random.normal(k[1], (8,), dtype),
            "s": jnp.asarray(1.0, dtype), "none": None, "i": jnp.arange(3)}


def loss(p):
    return sum(0.5 * jnp.sum((p[n].astype(jnp.float32) - 0.25) ** 2) for n in ("w", "b", "s"))


def grads_of(p):
    g = jax.grad(lambda q: loss({**p, **q}))({n: p[n] for n in ("w", "b", "s")})
    return {**g, "none": None, "i": jnp.zeros(3, jnp.int32)}


def make_step(opt):
    @jax.jit
    def step(p, state, key, scale):
        g = jax.tree.map(lambda x: x * scale.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         grads_of(p))
        u, state = opt.update(g, state, p)
        return rollfast.apply_updates(p, u, key), state

    return step


def train(opt, p, steps, nan_at=None):
    step = make_step(opt)
    state = opt.init(p)
    for t in range(steps):
        scale = jnp.float32(jnp.nan if t == nan_at else 1.0)
        before = (p, state)
        p, state = step(p, state, jax.random.PRNGKey(t), scale)
        if t == nan_at:  # the core's policy skips the whole step: only the skip counter moves
            for a, b in zip(jax.tree.leaves((p, state.z, state.inner_state.inner_state.inner_state.inner_state)),
                            jax.tree.leaves((before[0], before[1].z,
                                             before[1].inner_state.inner_state.inner_state.inner_state))):
                np.testing.assert_array_equal(a, b)
            assert int(rollfast.skipped_steps(state)) == 1
    return p, state


@pytest.mark.parametrize("which, dtype", [("adamw", jnp.bfloat16), ("catalogue", jnp.float32)])
def test_all_wrappers_together_train_and_survive_nan(which, dtype):
    opt = build(which)
    p0 = params(dtype)
    p, state = train(opt, p0, 40, nan_at=5)
    assert isinstance(state, ScheduleFreeState)
    assert isinstance(state.inner_state, MagmaState)
    assert isinstance(state.inner_state.inner_state, ClipState)
    assert p["none"] is None and p["w"].dtype == dtype
    np.testing.assert_array_equal(p["i"], p0["i"])
    floats = [x for x in jax.tree.leaves((p, state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in floats)
    x = rollfast.schedule_free_eval_params(state, p)
    print(f"{which} {jnp.dtype(dtype).name}: loss {float(loss(p0)):.3f} -> y {float(loss(p)):.3f}, "
          f"x {float(loss(x)):.3f}")
    assert float(loss(x)) < 0.5 * float(loss(p0))


@pytest.mark.parametrize("which", list(FAMILIES))
def test_sharded_equals_unsharded(which):
    mesh = Mesh(np.array(jax.devices()), ("d",))
    opt = build(which, key=7)
    p0 = params()
    sharded = {**p0, "w": jax.device_put(p0["w"], NamedSharding(mesh, P("d", None)))}
    a, state_a = train(opt, p0, 4)
    b, state_b = train(opt, sharded, 4)
    assert b["w"].sharding.spec[0] == "d" or len(b["w"].sharding.device_set) == 8
    for x, y in zip(jax.tree.leaves((a, state_a)), jax.tree.leaves((b, state_b))):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-5, atol=1e-7)


def test_wrappers_get_the_family_default_learning_rate():
    """Without ``learning_rate=``, a wrapper's learning-rate-relative caps use the family's
    own default (schedule_free_adamw: 0.0025): the same updates as passing it explicitly,
    with the caps active (entries exactly ±cap·lr)."""
    params = {"w": jnp.zeros(4)}
    g = {"w": jnp.array([1.0, -2.0, 3.0, -4.0])}
    amps = (1e-3, 1e-3)

    def first_update(**lr):
        opt = rollfast.get("optax:schedule_free_adamw", grad_clip_max_amps=amps, **lr)
        return np.asarray(opt.update(g, opt.init(params), params)[0]["w"])

    default, explicit = first_update(), first_update(learning_rate=0.0025)
    np.testing.assert_array_equal(default, explicit)
    np.testing.assert_allclose(np.abs(default), 1e-3 * 0.0025, rtol=1e-5)
