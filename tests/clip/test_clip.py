"""Generic spike protection and update clipping (the ``clip`` mask, docs/magma.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rollfast
from rollfast_clip import ClipState, clip

TINY = np.finfo(np.float32).tiny


def numpy_per_tensor(d, a_rms, a_elem):
    d = np.asarray(d, np.float64)
    rms = np.sqrt(np.mean(d**2))
    return np.clip(d * min(1.0, a_rms / (rms + TINY)), -a_elem, a_elem)


def numpy_global(ds, a):
    ds = [np.asarray(d, np.float64) for d in ds]
    rms = np.sqrt(sum((d**2).sum() for d in ds) / sum(d.size for d in ds))
    return [d * min(1.0, a / max(rms, TINY)) for d in ds]


GRADS = {"big": jnp.array([3.0, -40.0, 0.5, 1.0]), "small": jnp.array([[0.1, -0.2], [0.05, 0.0]]),
         "s": jnp.asarray(30.0), "none": None}


def sgd(lr):
    return optax.chain(optax.identity(), optax.scale_by_learning_rate(lr))


@pytest.mark.parametrize("lr", [0.5, 1e-3])
def test_per_tensor_rms_clips_the_direction_not_the_step(lr):
    opt = clip(sgd(lr), learning_rate=lr, grad_clip_max_amps=(2.0, 3.0))
    u, _ = opt.update(GRADS, opt.init(GRADS))
    for n in ("big", "small", "s"):
        np.testing.assert_allclose(u[n], -lr * numpy_per_tensor(GRADS[n], 2.0, 3.0), rtol=1e-6)
    assert u["none"] is None


def test_global_rms_and_schedule_at_own_count():
    schedule = lambda t: 0.1 * (t + 1)
    opt = clip(sgd(schedule), learning_rate=schedule, grad_clip_mode="GLOBAL_RMS", grad_clip_max_amps=1.5)
    state = opt.init(GRADS)
    names = ("big", "small", "s")
    for t in range(3):
        u, state = opt.update(GRADS, state)
        expected = numpy_global([GRADS[n] for n in names], 1.5)
        for n, e in zip(names, expected):
            np.testing.assert_allclose(u[n], -schedule(t) * e, rtol=1e-6)
    assert int(state.count) == 3


def test_raw_global_norm_spike_is_rescaled():
    opt = clip(sgd(1.0), learning_rate=1.0, raw_global_grad_clip=5.0, grad_clip_max_amps=None)
    norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(GRADS)))
    u, _ = opt.update(GRADS, opt.init(GRADS))
    for n in ("big", "small", "s"):
        np.testing.assert_allclose(u[n], -np.asarray(GRADS[n]) * 5.0 / norm, rtol=1e-6)
    quiet = jax.tree.map(lambda g: g / 100, GRADS)
    u, _ = opt.update(quiet, opt.init(GRADS))
    np.testing.assert_allclose(u["big"], -quiet["big"], rtol=1e-6)


def test_strict_spike_protection_skips_the_step():
    params = {"w": jnp.ones(3)}
    opt = rollfast.get("adamw", learning_rate=0.1, raw_global_grad_clip=1.0, permissive_spike_protection=False)
    state = opt.init(params)
    assert isinstance(state, ClipState)
    _, state = opt.update({"w": jnp.full(3, 0.1)}, state, params)
    u, new = jax.jit(opt.update)({"w": jnp.full(3, 10.0)}, state, params)
    np.testing.assert_array_equal(u["w"], jnp.zeros(3))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    u, after = opt.update({"w": jnp.full(3, 0.1)}, new, params)
    assert int(after.count) == 2 and bool(jnp.all(u["w"] != 0))


def test_nan_gradient_skips_the_step():
    opt = rollfast.get("adamw", learning_rate=0.1, raw_global_grad_clip=1.0)
    params = {"w": jnp.ones(2), "i": jnp.arange(2)}
    state = opt.init(params)
    u, new = opt.update({"w": jnp.array([jnp.inf, 1.0]), "i": jnp.zeros(2, jnp.int32)}, state, params)
    np.testing.assert_array_equal(u["w"], jnp.zeros(2))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new) if x.dtype == jnp.float32)


def test_auto_added_only_when_asked_and_not_for_families_that_clip_themselves():
    p = {"w": jnp.ones(2)}
    assert not isinstance(rollfast.get("adamw", learning_rate=0.1).init(p), ClipState)
    assert isinstance(rollfast.get("lion", learning_rate=0.1, grad_clip_max_amps=(1.0, 1.0)).init(p), ClipState)
    names = {r.name for r in rollfast.available("family")}
    for family in ("kron", "prism"):
        if family in names:
            opt = rollfast.get(family, learning_rate=0.1, raw_global_grad_clip=1.0)
            assert not isinstance(opt.init({"w": jnp.ones((3, 2))}), ClipState)


def test_clip_bounds_a_real_family_update():
    """AdamW with a huge weight decay: the clipped direction has RMS ≤ 2 and |·| ≤ 10."""
    params = {"w": jnp.linspace(-100.0, 100.0, 64)}
    lr = 1e-2
    opt = rollfast.get("adamw", learning_rate=lr, weight_decay=1.0, grad_clip_max_amps=(2.0, 10.0))
    u, _ = jax.jit(opt.update)({"w": jnp.ones(64)}, opt.init(params), params)
    d = np.asarray(u["w"]) / lr
    assert np.sqrt(np.mean(d**2)) <= 2.0 * (1 + 1e-6) and np.abs(d).max() <= 10.0 * (1 + 1e-6)


def test_zero_learning_rate_gives_zero_not_nan():
    opt = clip(sgd(0.0), learning_rate=0.0)
    u, _ = opt.update(GRADS, opt.init(GRADS))
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))


def test_bf16_updates_keep_their_dtype():
    g = {"w": jnp.array([4.0, -30.0, 1.0], jnp.bfloat16)}
    opt = clip(sgd(1.0), learning_rate=1.0, grad_clip_max_amps=(1.0, 1.0))
    u, _ = jax.jit(opt.update)(g, opt.init(g))
    assert u["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(u["w"], np.float32),
                               -numpy_per_tensor(np.asarray(g["w"], np.float32), 1.0, 1.0), rtol=1e-2)


def test_bad_mode():
    with pytest.raises(ValueError, match="grad_clip_mode must be one of 'per_tensor_rms', 'global_rms'"):
        rollfast.get("adamw", learning_rate=0.1, grad_clip_mode="elementwise")
