"""Fuzz over the registry: families × modes × wrappers × trees (None, int, empty,
0-d … 4-D leaves) × float32/bfloat16/float16 × NaN/±inf steps × stepping through
``update`` + ``apply_updates`` or ``rollfast.apply_step``.

Derandomized with a fixed example budget, so CI sees the same cases every run and the
test stays within seconds per example. Every example must either build and run, or
raise one of the documented clear errors (:data:`DOCUMENTED`); a run must keep the
parameters' dtypes and the state's structure and dtypes, leave integer / ``None`` /
empty leaves untouched, keep every float finite, and skip the non-finite step (zero
updates, state unchanged but for the skip counter).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rollfast
from rollfast.policy import CoreState

EXAMPLES = 24


def _targets():
    """``(family, options)`` for every family and every mode of a family with modes."""
    out = []
    for record in rollfast.available("family"):
        required = [p.name for p in record.parameters if p.required and p.name != "learning_rate"]
        if required:  # e.g. a family that needs a model-specific option: not fuzzable blind
            continue
        takes_lr = "learning_rate" in record.parameter_names
        base = {"learning_rate": 1e-2} if takes_lr and record.name != "lbfgs" else {}
        modes = rollfast.available("mode", record.name) if record.provider.plugin != "optax" else []
        out += [(record.qualified_name, {**base, "mode": m.name}) for m in modes] or \
               [(record.qualified_name, base)]
    return sorted(out, key=lambda t: (t[0], str(t[1])))


TARGETS = _targets()
WRAPPERS = [{}, {"mask": "magma"}, {"average": "schedule_free"}, {"raw_global_grad_clip": 1.0},
            {"mask": "magma", "average": "schedule_free"}]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SHAPES = [(), (3,), (2, 3), (2, 1, 3), (2, 2, 1, 3)]
STEPPING = ["update", "apply_step"]
# Clear errors that a combination may raise instead of running, with the reason.
DOCUMENTED = {
    r"known Optax limitations": "rollfast.optax_catalogue_limitations (sm3 on 0-d leaves, ...)",
}


def combination_count() -> int:
    """Families×modes × wrappers × dtypes × leaf kinds (None, int, empty, five ranks) × bad values
    × the two ways to step."""
    return len(TARGETS) * len(WRAPPERS) * len(DTYPES) * (3 + len(SHAPES)) * 3 * len(STEPPING)


leaf_kinds = st.sampled_from(["none", "int", "empty"] + [f"float{len(s)}" for s in SHAPES])


@st.composite
def trees(draw):
    kinds = draw(st.lists(leaf_kinds, min_size=1, max_size=5))
    return [(f"l{i}", kind) for i, kind in enumerate(kinds)]


def build_tree(spec, dtype):
    tree = {}
    for i, (name, kind) in enumerate(spec):
        if kind == "none":
            tree[name] = None
        elif kind == "int":
            tree[name] = jnp.arange(3, dtype=jnp.int32) + i
        elif kind == "empty":
            tree[name] = jnp.zeros((0, 2), dtype)
        else:
            shape = SHAPES[int(kind[-1])]
            tree[name] = (jnp.linspace(-1, 1, int(np.prod(shape))).reshape(shape) * 0.5 + 0.1 * i).astype(dtype)
    return tree


def grads_of(params, t, bad=None):
    def g(path, p):
        if p is None or not jnp.issubdtype(p.dtype, jnp.floating) or p.size == 0:
            return p if p is None else jnp.zeros_like(p)
        out = jnp.cos(p.astype(jnp.float32) * (t + 2)).astype(p.dtype)
        return out.reshape(-1).at[0].set(bad).reshape(p.shape) if bad is not None else out
    return jax.tree_util.tree_map_with_path(g, params)


def is_live(p):
    return p is not None and jnp.issubdtype(p.dtype, jnp.floating) and p.size > 0


def extra_args(name, params):
    record = rollfast.registry().lookup("family", name)
    needs = record.metadata.get("update_args", ())
    loss = lambda p: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(p)
                         if jnp.issubdtype(x.dtype, jnp.floating))
    table = {"value": jnp.float32(1.0), "grad": None, "value_fn": loss, "obj_fn": loss}
    return {k: table[k] for k in needs}


def without_counter(state):
    if isinstance(state, CoreState):
        return state._replace(skipped=jnp.zeros_like(state.skipped))
    return state._replace(inner_state=without_counter(state.inner_state))


def plain(x):
    """A typed PRNG key as its raw data (NumPy cannot compare typed keys)."""
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def signature(state):
    return jax.tree.structure(state), [(x.shape, x.dtype) for x in jax.tree.leaves(state)]


def stepper(opt, stepping: str, jit: bool):
    """``(grads, state, params, extra) -> (params, state, updates or None)``."""
    if stepping == "apply_step":
        def step(g, s, p, extra):
            return (*rollfast.apply_step(opt, g, s, p, **extra), None)
    else:
        def step(g, s, p, extra):
            u, s = opt.update(g, s, p, **extra)
            return optax.apply_updates(p, u), s, u
    return jax.jit(step) if jit else step


def run_case(target, wrapper, dtype, spec, bad, bad_step, stepping="update"):
    name, options = target
    params = build_tree(spec, dtype)
    try:
        opt = rollfast.get(name, **options, **wrapper)
        state = opt.init(params)
    except ValueError as e:
        if any(re.search(p, str(e)) for p in DOCUMENTED):
            return "documented error"
        raise
    extra = extra_args(name.split(":")[-1], params)
    needs_grad = "grad" in extra
    step = stepper(opt, stepping, jit="value_fn" not in extra)
    has_live = any(is_live(p) for p in jax.tree.leaves(params, is_leaf=lambda x: x is None) if p is not None)
    first = signature(state)
    for t in range(3):
        poisoned = bad if t == bad_step and has_live else None
        grads = grads_of(params, t, poisoned)
        if needs_grad:
            extra["grad"] = grads
        new_params, new, updates = step(grads, state, params, extra)
        assert signature(new) == first, "the state changed structure or dtype"
        if poisoned is not None:
            assert all(not bool(jnp.any(u)) for u in jax.tree.leaves(updates)), "a non-finite step moved"
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(plain(a), plain(b)),
                         without_counter(new), without_counter(state))
            jax.tree.map(np.testing.assert_array_equal, new_params, params)
            assert int(rollfast.skipped_steps(new)) == int(rollfast.skipped_steps(state)) + 1
        for p, q in zip(jax.tree.leaves(params, is_leaf=lambda x: x is None),
                        jax.tree.leaves(new_params, is_leaf=lambda x: x is None)):
            if p is None:
                assert q is None
                continue
            assert q.dtype == p.dtype and q.shape == p.shape
            if not is_live(p):
                np.testing.assert_array_equal(q, p)
            else:
                assert bool(jnp.all(jnp.isfinite(q.astype(jnp.float32)))), "a parameter went non-finite"
        params, state = new_params, new
    return "ran"


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(target=st.sampled_from(TARGETS), wrapper=st.sampled_from(WRAPPERS), dtype=st.sampled_from(DTYPES),
       spec=trees(), bad=st.sampled_from([jnp.nan, jnp.inf, -jnp.inf]), bad_step=st.integers(0, 2),
       stepping=st.sampled_from(STEPPING))
def test_registry_fuzz(target, wrapper, dtype, spec, bad, bad_step, stepping):
    run_case(target, wrapper, dtype, spec, bad, bad_step, stepping)


def test_fuzz_space_is_counted():
    """The space the fuzz samples from (reported in the closing note of issue 14)."""
    assert len(TARGETS) > 50
    assert combination_count() == len(TARGETS) * 5 * 3 * 8 * 3 * 2


@pytest.mark.parametrize("name, spec", [
    ("optax:sm3", [("s", "float0")]), ("optax:lbfgs", [("i", "int"), ("n", "none")]),
    ("optax:galore", [("e", "empty")]), ("optax:sophia", [("n", "none")]),
    ("optax:dadapt_adamw", [("s", "float0")]), ("optax:prodigy", [("v", "float1")]),
    ("optax:galore", [("m", "float2")]),
])
def test_known_optax_limitations_are_clear_errors(name, spec):
    options = {} if name == "optax:lbfgs" else {"learning_rate": 1e-2}
    dtype = jnp.float16 if name in ("optax:dadapt_adamw", "optax:prodigy") or spec[0][1] == "float2" else jnp.float32
    with pytest.raises(ValueError, match="known Optax limitations"):
        rollfast.get(name, **options).init(build_tree(spec, dtype))
    assert name.split(":")[1] in rollfast.optax_catalogue_limitations
