"""Schedule-Free averaging and the WSD schedule (docs/schedule_free.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rollfast
import rollfast.testing as rt
from rollfast_schedule_free import ScheduleFreeState, schedule_free, wsd_schedule

def quadratic_grads(params):
    """Gradient of ½‖p‖² on float leaves; zeros on integer leaves (None stays None)."""
    return jax.tree.map(lambda p: p if jnp.issubdtype(p.dtype, jnp.floating) else jnp.zeros_like(p), params)


CURVATURE = np.linspace(0.5, 2.0, 6)
TARGET = np.linspace(-1.0, 1.0, 6)


def numpy_schedule_free_sgd(lrs, weighting, beta, steps):
    """Float64 reference: the paper's three sequences, SGD on ½Σa(y−b)², gradients at y."""
    z = np.zeros(6)
    x = z.copy()
    w_sum = 0.0
    ys, xs = [], []
    for t in range(steps):
        y = (1 - beta) * z + beta * x
        lr = lrs[t]
        w = {"theoretical": 1.0, "schedulet": lr, "practical": lr * lr}[weighting]
        w_sum += w
        c = w / w_sum
        z = z - lr * CURVATURE * (y - TARGET)
        x = (1 - c) * x + c * z
        ys.append((1 - beta) * z + beta * x)
        xs.append(x.copy())
    return np.array(ys), np.array(xs)


@pytest.mark.parametrize("weighting", ["theoretical", "schedulet", "PRACTICAL"])
def test_matches_closed_form_recurrence_over_sgd(weighting):
    steps, beta = 20, 0.9
    lrs = [0.3 * (n + 1) / 5 if n <= 4 else 0.3 * (19 - n + 1) / 4 if n > 16 else 0.3 for n in range(steps)]
    ref_y, ref_x = numpy_schedule_free_sgd(lrs, weighting.lower(), beta, steps)
    with jax.enable_x64(True):
        schedule = lambda n: jnp.asarray(lrs, jnp.float64)[n]
        opt = schedule_free(optax.sgd(schedule), learning_rate=schedule, weighting_mode=weighting,
                            sf_b1=beta)
        a, b = jnp.asarray(CURVATURE), jnp.asarray(TARGET)
        grad = jax.grad(lambda y: 0.5 * jnp.sum(a * (y - b) ** 2))
        y = jnp.zeros(6, jnp.float64)
        state = opt.init(y)
        step = jax.jit(lambda y, s: opt.update(grad(y), s, y))
        for t in range(steps):
            u, state = step(y, state)
            y = y + u
            np.testing.assert_allclose(y, ref_y[t], atol=1e-6, rtol=0)
            np.testing.assert_allclose(rollfast.schedule_free_eval_params(state, y), ref_x[t],
                                       atol=1e-6, rtol=0)


def test_first_step_is_the_base_step_and_init_evaluates_to_params():
    params = rt.mixed_tree()
    base = rollfast.get("adamw", learning_rate=0.1)
    opt = rollfast.get("adamw", learning_rate=0.1, average="schedule_free")
    state = opt.init(params)
    for a, b in zip(jax.tree.leaves(rollfast.schedule_free_eval_params(state, params)),
                    jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    grads = quadratic_grads(params)
    expected, _ = jax.jit(base.update)(grads, base.init(params), params)
    got, _ = jax.jit(opt.update)(grads, state, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert got["nothing"] is None


@pytest.mark.parametrize("weighting", ["theoretical", "schedulet", "practical"])
def test_eval_params_is_the_weighted_average_of_z(weighting):
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    params = {"w": jax.random.normal(k[0], (4, 3)), "b": jax.random.normal(k[1], (3,))}
    lr = wsd_schedule(0.05, 30)
    opt = rollfast.get("adamw", learning_rate=lr, average="schedule_free", weighting_mode=weighting,
                       sf_b1=0.8)

    @jax.jit
    def step(p, s):
        u, s = opt.update(quadratic_grads(p), s, p)
        p = optax.apply_updates(p, u)
        return p, s, rollfast.schedule_free_eval_params(s, p)

    state = opt.init(params)
    num, den = jax.tree.map(jnp.zeros_like, params), 0.0
    for t in range(12):
        params, state, x = step(params, state)
        w = {"theoretical": 1.0, "schedulet": float(lr(t)), "practical": float(lr(t)) ** 2}[weighting]
        num, den = jax.tree.map(lambda n, z: n + w * z, num, state.z), den + w
        for xs, ns, zs, ys in zip(*(jax.tree.leaves(t) for t in (x, num, state.z, params))):
            np.testing.assert_allclose(xs, ns / den, atol=2e-5)
            np.testing.assert_allclose(ys, 0.2 * zs + 0.8 * xs, atol=2e-5)  # y = (1-β) z + β x


def test_wsd_values():
    lr = wsd_schedule(2.0, 100)
    expected = {0: 2 / 11, 5: 12 / 11, 10: 2.0, 50: 2.0, 90: 2.0, 91: 1.8, 99: 0.2, 100: 0.0, 150: 0.0}
    for n, value in expected.items():
        assert float(lr(n)) == pytest.approx(value, rel=1e-6), n
    flat = wsd_schedule(1.0, 10, warmup_fraction=0.0, decay_fraction=0.0)
    assert [float(flat(n)) for n in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert float(jax.jit(lr)(jnp.int32(95))) == pytest.approx(1.0)


def test_beats_plain_sgd_at_constant_lr_on_a_noisy_quadratic():
    dim, steps, lr, noise = 512, 400, 0.1, 1.0
    target = jax.random.normal(jax.random.PRNGKey(0), (dim,))
    loss = lambda p: 0.5 * jnp.sum((p - target) ** 2)

    def final_loss(opt, evaluate):
        def step(carry, key):
            p, s = carry
            g = p - target + noise * jax.random.normal(key, (dim,))
            u, s = opt.update(g, s, p)
            return (p + u, s), None

        p0 = jnp.zeros(dim)
        (p, s), _ = jax.lax.scan(step, (p0, opt.init(p0)), jax.random.split(jax.random.PRNGKey(1), steps))
        return float(loss(evaluate(s, p)))

    sgd = final_loss(optax.sgd(lr), lambda s, p: p)
    sf = final_loss(rollfast.get("sgd", learning_rate=lr, average="schedule_free"),
                    rollfast.schedule_free_eval_params)
    print(f"noisy quadratic, constant lr {lr}: sgd {sgd:.3f}, schedule-free {sf:.3f}")
    assert sf < 0.5 * sgd


def test_stable_five_times_beyond_the_sgd_step_limit():
    """Gradients at y = (1−β)z + βx: the z step contracts by 1 − ηa(1−β), so with β = 0.9
    Schedule-Free converges at η = 5/a_max, 2.5× beyond plain SGD's limit 2/a_max, where
    SGD, its Polyak average and its linearly weighted average all diverge (checked)."""
    dim, steps, lr = 64, 300, 5.0
    a = jnp.asarray(np.logspace(-1, 0, dim), jnp.float32)
    target = jnp.asarray(np.linspace(-1, 1, dim), jnp.float32)
    loss = lambda p: float(0.5 * jnp.sum(a * (p - target) ** 2))
    p0 = jnp.zeros(dim)

    def sgd_averages(carry, _):
        p, polyak, linear, t = carry
        p, t = p - lr * a * (p - target), t + 1
        return (p, polyak + (p - polyak) / t, linear + (p - linear) * 2 / (t + 1), t), None

    (p, polyak, linear, _), _ = jax.lax.scan(sgd_averages, (p0, p0, p0, 0.0), None, length=steps)
    assert not any(np.isfinite(loss(x)) and loss(x) < loss(p0) for x in (p, polyak, linear))

    opt = rollfast.get("sgd", learning_rate=lr, average="schedule_free", sf_b1=0.9)

    def step(carry, _):
        p, s = carry
        u, s = opt.update(a * (p - target), s, p)
        return (p + u, s), None

    (p, s), _ = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
    assert loss(rollfast.schedule_free_eval_params(s, p)) < 1e-8 * loss(p0)


def test_zero_learning_rate_does_not_move():
    lr = lambda t: jnp.where(t == 1, 0.0, 0.1)
    opt = schedule_free(optax.sgd(lr), learning_rate=lr)
    p = {"w": jnp.array([1.0, -1.0])}
    state = opt.init(p)
    u, state = opt.update({"w": jnp.ones(2)}, state, p)
    p = optax.apply_updates(p, u)
    u, _ = opt.update({"w": jnp.ones(2)}, state, p)
    np.testing.assert_array_equal(u["w"], jnp.zeros(2))


def test_bf16_params_store_z_in_bf16_with_stochastic_rounding():
    params = rt.mixed_tree(dtype=jnp.bfloat16)
    opt = rollfast.get("adamw", learning_rate=1e-3, average="schedule_free")
    state = opt.init(params)
    assert state.z["matrix"].dtype == jnp.bfloat16 and state.z["nothing"] is None and state.z["count"] is None
    grads = quadratic_grads(params)
    u, new = jax.jit(opt.update)(grads, state, params)
    assert u["matrix"].dtype == jnp.bfloat16 and new.z["matrix"].dtype == jnp.bfloat16
    wide = rollfast.get("adamw", learning_rate=1e-3, average="schedule_free", state_dtype=jnp.float32)
    assert wide.init(params).z["matrix"].dtype == jnp.float32


def test_stochastic_z_is_unbiased():
    """A step of 1/8 bf16 ulp is kept in z in expectation."""
    p = {"w": jnp.ones((4096,), jnp.bfloat16)}
    opt = schedule_free(optax.sgd(2**-10), learning_rate=2**-10, key=3)
    _, state = opt.update({"w": -jnp.ones((4096,), jnp.bfloat16)}, opt.init(p), p)
    z = np.asarray(state.z["w"].astype(jnp.float32), np.float64)
    assert set(np.unique(z)) <= {1.0, 1.0078125}
    assert abs(z.mean() - (1 + 2**-10)) < 4 * z.std() / np.sqrt(z.size)


def test_none_int_leaves_and_jit():
    params = rt.mixed_tree()
    opt = rollfast.get("adamw", learning_rate=1e-2, average="schedule_free")
    loss = rt.quadratic_loss(jax.tree.map(jnp.zeros_like, params))
    step = jax.jit(lambda p, s: opt.update(quadratic_grads(p), s, p))
    new, state = params, opt.init(params)
    for _ in range(20):
        u, state = step(new, state)
        new = optax.apply_updates(new, u)
    assert loss(new) < 0.9 * loss(params)
    assert new["nothing"] is None
    np.testing.assert_array_equal(new["count"], params["count"])
    assert isinstance(state, ScheduleFreeState) and int(state.step_count) == 20


def test_non_finite_entries_are_dropped_and_clip_protects_the_family():
    p = {"w": jnp.ones(3)}
    g = {"w": jnp.ones(3)}
    bad = {"w": jnp.array([1.0, jnp.nan, 1.0])}
    opt = rollfast.get("adamw", learning_rate=0.1, average="schedule_free", nonfinite="propagate")
    _, state = opt.update(g, opt.init(p), p)
    p1 = {"w": p["w"] - 0.1}
    u, new = jax.jit(opt.update)(bad, state, p1)
    assert bool(jnp.all(jnp.isfinite(u["w"]))) and bool(jnp.all(jnp.isfinite(new.z["w"])))
    assert float(new.z["w"][1]) == float(state.z["w"][1])  # the NaN entry of z does not move
    assert float(new.z["w"][0]) != float(state.z["w"][0])
    guarded = rollfast.get("adamw", learning_rate=0.1, average="schedule_free", raw_global_grad_clip=10.0,
                           nonfinite="propagate")
    _, state = guarded.update(g, guarded.init(p), p)
    _, new = jax.jit(guarded.update)(bad, state, p1)
    for a, b in zip(jax.tree.leaves(new.inner_state), jax.tree.leaves(state.inner_state)):
        np.testing.assert_array_equal(a, b)  # the clip wrapper skipped the family's step
    np.testing.assert_array_equal(new.z["w"], state.z["w"])


def test_errors():
    with pytest.raises(ValueError, match="weighting_mode='linear' is not allowed by average 'schedule_free'.*one of .*'practical'"):
        rollfast.get("adamw", learning_rate=0.1, average="schedule_free", weighting_mode="linear")
    opt = rollfast.get("adamw", learning_rate=0.1, average="schedule_free")
    p = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs params"):
        opt.update(p, opt.init(p))
    plain = rollfast.get("adamw", learning_rate=0.1)
    with pytest.raises(ValueError, match="outermost state"):
        rollfast.schedule_free_eval_params(plain.init(p), p)
