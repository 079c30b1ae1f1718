"""The core's non-finite policy: a step with a NaN/±inf gradient (or update argument)
changes nothing but the skip counter, for every family and wrapper combination;
finite steps are untouched (bit for bit); ``nonfinite="propagate"`` gives the raw
arithmetic back."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rollfast
from rollfast.policy import CoreState

PARAMS = {"m": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "v": jnp.linspace(0.5, 1.5, 5),
          "s": jnp.asarray(0.3), "i": jnp.arange(2), "n": None}
# The arguments that families declaring ``update_args`` need.
EXTRA = {"value": jnp.float32(1.0), "grad": None, "value_fn": None,
         "obj_fn": lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))}


def grads(seed, bad=None):
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(seed), jnp.shape(p)) * 0.1
                     if jnp.issubdtype(p.dtype, jnp.floating) else jnp.zeros_like(p), PARAMS)
    if bad is not None:
        g["m"] = g["m"].at[1, 2].set(bad)
    return g


def floats(tree):
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]


def extra_for(name):
    needs = rollfast.registry().lookup("family", name).metadata.get("update_args", ())
    out = {k: EXTRA[k] for k in needs}
    if "value_fn" in out:
        loss = lambda p: sum(jnp.sum(x ** 2) for x in floats(p))
        out.update(value_fn=loss, value=loss(PARAMS), grad=None)
    return out


def plain(x):
    """A typed PRNG key as its raw data (NumPy cannot compare typed keys)."""
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(plain(x), plain(y)), a, b)


def without_counter(state):
    """The state with the skip counter zeroed (to compare the rest bit for bit)."""
    if isinstance(state, CoreState):
        return state._replace(skipped=jnp.zeros_like(state.skipped))
    return state._replace(inner_state=without_counter(state.inner_state))


def all_families():
    return sorted(r.qualified_name for r in rollfast.available("family"))


@pytest.mark.parametrize("name", all_families())
def test_every_family_skips_a_nan_step_and_recovers(name):
    """One NaN step changes nothing but the counter; the next finite step moves every float leaf
    by a finite amount (no family is poisoned)."""
    lr = {} if name in ("optax:lbfgs",) else {"learning_rate": 1e-2}
    try:
        opt = rollfast.get(name, **lr)
    except TypeError as e:  # a family that needs more than a learning rate
        pytest.skip(f"{name} needs options: {e}")
    try:
        state = opt.init(PARAMS)
    except ValueError as e:  # this tree hits one of rollfast.optax_catalogue_limitations
        if "known Optax limitations" not in str(e):
            raise
        pytest.skip(f"known Optax limitation: {e}")
    extra = extra_for(name.split(":")[1])
    if "grad" in extra:
        extra["grad"] = grads(1)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p, **extra)) if "value_fn" not in extra else \
        (lambda g, s, p: opt.update(g, s, p, **extra))
    _, state = update(grads(1), state, PARAMS)
    for k, bad in enumerate((jnp.nan, jnp.inf, -jnp.inf)):
        updates, new = update(grads(2, bad), state, PARAMS)
        assert all(bool((u == 0).all()) for u in floats(updates)), name
        assert_same(without_counter(new), without_counter(state))
        assert int(rollfast.skipped_steps(new)) == int(rollfast.skipped_steps(state)) + 1
        state = new
    updates, state = update(grads(3), state, PARAMS)
    assert all(bool(jnp.isfinite(x).all()) for x in floats((updates, state))), name
    assert int(rollfast.skipped_steps(state)) == 3


@pytest.mark.parametrize("options", [
    {"average": "schedule_free"}, {"mask": "magma"}, {"mask": "magma", "average": "schedule_free"},
    {"mask": "magma", "average": "schedule_free", "raw_global_grad_clip": 1.0},
])
def test_wrappers_never_stall_or_poison_after_a_nan_step(options):
    """The issue's failures: adamw + schedule_free stopped moving after one NaN step; adamw +
    magma turned NaN on the next normal step."""
    if "mask" in options:
        options = {**options, "magma_p": 1.0}  # every leaf kept: a step that does not move is a stall
    opt = rollfast.get("adamw", learning_rate=0.05, **options)
    target = jax.tree.map(lambda p: p + 1 if jnp.issubdtype(p.dtype, jnp.floating) else p, PARAMS)
    loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(floats(p), floats(target)))
    grad = jax.grad(lambda f, rest: loss({**rest, **f}))

    @jax.jit
    def step(params, state, poison):
        f = {k: params[k] for k in ("m", "v", "s")}
        g = {**grad(f, params), "i": jnp.zeros(2, jnp.int32), "n": None}
        g = jax.tree.map(lambda x: x * poison if jnp.issubdtype(x.dtype, jnp.floating) else x, g)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    params, state = PARAMS, opt.init(PARAMS)
    for t in range(60):
        before = params
        params, state = step(params, state, jnp.float32(jnp.nan if t == 3 else 1.0))
        if t == 3:
            assert_same(params, before)
        elif t > 3:
            assert not all(bool((a == b).all()) for a, b in zip(floats(params), floats(before))), t
    assert all(bool(jnp.isfinite(x).all()) for x in floats((params, state)))
    assert int(rollfast.skipped_steps(state)) == 1
    assert float(loss(params)) < 0.5 * float(loss(PARAMS))


def test_finite_steps_equal_optax_bit_for_bit_under_jit():
    ours, theirs = rollfast.get("adamw", learning_rate=3e-3), optax.adamw(3e-3, weight_decay=1e-4)
    p = {"w": jnp.linspace(-1, 1, 300).reshape(30, 10), "b": jnp.ones(7)}
    s1, s2 = ours.init(p), theirs.init(p)
    f1, f2 = jax.jit(ours.update), jax.jit(theirs.update)
    for t in range(10):
        g = jax.tree.map(lambda x: jnp.cos(x * t), p)
        (u1, s1), (u2, s2) = f1(g, s1, p), f2(g, s2, p)
        assert_same(u1, u2)
    assert int(rollfast.skipped_steps(s1)) == 0


def test_non_finite_update_arguments_skip_the_step():
    opt = rollfast.get("optax:polyak_sgd")
    p = {"w": jnp.ones(3)}
    state = opt.init(p)
    u, new = opt.update({"w": jnp.ones(3)}, state, p, value=jnp.float32(jnp.nan))
    assert bool((u["w"] == 0).all()) and int(rollfast.skipped_steps(new)) == 1
    u, new = opt.update({"w": jnp.ones(3)}, new, p, value=jnp.float32(2.0))
    assert float(u["w"][0]) < 0 and int(rollfast.skipped_steps(new)) == 1


def test_propagate_gives_the_raw_arithmetic():
    p = {"w": jnp.ones(3)}
    bad = {"w": jnp.array([1.0, jnp.nan, 1.0])}
    raw = rollfast.get("adamw", learning_rate=0.1, nonfinite="propagate")
    u, state = raw.update(bad, raw.init(p), p)
    assert bool(jnp.isnan(u["w"][1])) and bool(jnp.isnan(state.inner_state[0].nu["w"][1]))
    assert int(rollfast.skipped_steps(state)) == 0
    u2, _ = optax.adamw(0.1, weight_decay=1e-4).update(bad, optax.adamw(0.1).init(p), p)
    np.testing.assert_array_equal(u["w"], u2["w"])


def test_huge_finite_gradients_are_not_skipped():
    """The fast finiteness test (a sum of squares) overflows for |g| ~ 1e20; the exact
    test then decides, so a finite gradient is never skipped."""
    opt = rollfast.get("optax:sgd", learning_rate=1e-20)
    p = {"w": jnp.zeros(2)}
    u, state = jax.jit(opt.update)({"w": jnp.array([1e30, -1e30])}, opt.init(p), p)
    np.testing.assert_allclose(u["w"], [-1e10, 1e10], rtol=1e-6)
    assert int(rollfast.skipped_steps(state)) == 0


def test_skipped_steps_needs_a_rollfast_state():
    with pytest.raises(TypeError, match="not a state of an optimizer built by rollfast.get"):
        rollfast.skipped_steps(optax.adam(0.1).init({"w": jnp.ones(2)}))


def fused_step(opt, **extra):
    return jax.jit(lambda g, s, p: rollfast.apply_step(opt, g, s, p, **extra))


def separate_step(opt, **extra):
    def step(g, s, p):
        u, s = opt.update(g, s, p, **extra)
        return optax.apply_updates(p, u), s
    return jax.jit(step)


@pytest.mark.parametrize("options", [{}, {"mask": "magma"}, {"average": "schedule_free"}])
def test_apply_step_equals_update_then_apply(options):
    """``rollfast.apply_step`` is ``update`` + ``apply_updates`` on finite steps (to the last
    ulp or two XLA may round differently when it fuses the two) and keeps params and state on a
    skipped one."""
    opt = rollfast.get("adamw", learning_rate=1e-2, **options)
    fused, separate = fused_step(opt), separate_step(opt)
    p1 = p2 = PARAMS
    s1 = s2 = opt.init(PARAMS)
    for t in range(6):
        g = grads(t, bad=jnp.nan if t == 3 else None)
        (q1, n1), (q2, n2) = fused(g, s1, p1), separate(g, s2, p2)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(plain(a), plain(b), rtol=1e-6, atol=1e-7),
                     (q1, n1), (q2, n2))
        if t == 3:
            assert_same(q1, p1)
            assert_same(without_counter(n1), without_counter(s1))
        p1, s1, p2, s2 = q1, n1, q2, n2
    assert int(rollfast.skipped_steps(s1)) == 1
    assert jax.tree.map(lambda x: x.dtype, p1) == jax.tree.map(lambda x: x.dtype, PARAMS)


def test_apply_step_equals_optax_adamw():
    ours, theirs = rollfast.get("adamw", learning_rate=3e-3), optax.adamw(3e-3, weight_decay=1e-4)
    p1 = p2 = {"w": jnp.linspace(-1, 1, 300).reshape(30, 10), "b": jnp.ones(7)}
    s1, s2 = ours.init(p1), theirs.init(p2)
    f1, f2 = fused_step(ours), separate_step(theirs)
    for t in range(10):
        g = jax.tree.map(lambda x: jnp.cos(x * t), p1)
        (p1, s1), (p2, s2) = f1(g, s1, p1), f2(g, s2, p2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p1, p2)


def test_apply_step_passes_update_arguments_and_skips_on_them():
    opt = rollfast.get("optax:polyak_sgd")
    p = {"w": jnp.ones(3)}
    step = fused_step(opt, value=jnp.float32(jnp.nan))
    q, state = step({"w": jnp.ones(3)}, opt.init(p), p)
    assert_same(q, p)
    assert int(rollfast.skipped_steps(state)) == 1
    q, state = jax.jit(lambda g, s, p, v: rollfast.apply_step(opt, g, s, p, value=v))({"w": jnp.ones(3)}, state, p,
                                                                                     jnp.float32(2.0))
    assert float(q["w"][0]) < 1.0 and int(rollfast.skipped_steps(state)) == 1


def test_apply_step_of_other_optimizers_and_propagate_is_update_then_apply():
    p = {"w": jnp.ones(3)}
    g = {"w": jnp.array([1.0, jnp.nan, 1.0])}
    for opt in (optax.adam(0.1), rollfast.get("adamw", learning_rate=0.1, nonfinite="propagate")):
        (q1, s1), (q2, s2) = fused_step(opt)(g, opt.init(p), p), separate_step(opt)(g, opt.init(p), p)
        np.testing.assert_array_equal(q1["w"], q2["w"])
        assert bool(jnp.isnan(q1["w"][1]))
    eager, _ = rollfast.apply_step(optax.sgd(1.0), {"w": jnp.ones(3)}, optax.sgd(1.0).init(p), p)
    np.testing.assert_array_equal(eager["w"], jnp.zeros(3))


def test_apply_step_checks_the_tree():
    opt = rollfast.get("adamw", learning_rate=0.1)
    p = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"first difference at \['w'\]: init had shape \(3,\), update has no leaf"):
        rollfast.apply_step(opt, {"x": jnp.ones(3)}, opt.init(p), {"x": jnp.ones(3)})
