"""The contrib families on awkward inputs: mixed trees (scalar, vector, matrix,
4-D, None, int) under jit in float32 and bfloat16, non-finite gradients, sharded
parameters, the first-moment accessor, and bad options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rollfast
import rollfast.testing as rt
from jax.sharding import Mesh, NamedSharding, PartitionSpec

VARIANTS = {
    "soap": {}, "mars": {}, "mars-lion": {"variant": "lion"}, "qhadamw": {}, "normuon": {},
    "apollo": {}, "apollo-mini": {"variant": "mini"}, "adamw8bit": {"min_8bit_size": 0, "block_size": 8},
}
FAMILIES = ("soap", "mars", "qhadamw", "normuon", "apollo", "adamw8bit")


def build(variant, **options):
    return rollfast.get(variant.split("-")[0], learning_rate=1e-2, **VARIANTS[variant], **options)


def grads_like(params, seed=1):
    return jax.tree.map(lambda p: (jax.random.normal(jax.random.PRNGKey(seed), jnp.shape(p)).astype(p.dtype)
                                   if jnp.issubdtype(p.dtype, jnp.floating) else jnp.zeros_like(p)),
                        params)


@pytest.mark.parametrize("variant, dtype", [(v, "float32") for v in sorted(VARIANTS)]
                         + [(v, "bfloat16") for v in FAMILIES])
def test_mixed_tree_under_jit(variant, dtype):
    dtype = jnp.dtype(dtype)
    params = rt.mixed_tree(dtype)
    opt = build(variant)
    step = jax.jit(lambda p, s: opt.update(grads_like(p), s, p))
    state = opt.init(params)
    for _ in range(3):
        updates, state = step(params, state)
        params = jax.tree.map(lambda p, u: p if p is None else (p + u).astype(p.dtype), params, updates,
                              is_leaf=lambda x: x is None)
    assert params["nothing"] is None and updates["nothing"] is None
    np.testing.assert_array_equal(params["count"], np.arange(3))
    for name in ("scalar", "bias", "matrix", "conv"):
        assert params[name].dtype == dtype and updates[name].shape == params[name].shape
        assert bool(jnp.all(jnp.isfinite(params[name].astype(jnp.float32)))), name
    moved = [float(jnp.abs(updates[n].astype(jnp.float32)).max()) for n in ("bias", "matrix", "conv")]
    assert all(m > 0 for m in moved), moved


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_buffers_are_distinct(variant):
    """Every state array is its own buffer, so a jitted step may donate the state."""
    leaves = jax.tree.leaves(build(variant).init(rt.mixed_tree()))
    assert len({id(x) for x in leaves}) == len(leaves)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_non_finite_gradients_skip_the_step(variant):
    params = {"m": jnp.ones((4, 3)), "v": jnp.ones(5)}
    opt = build(variant)
    update = jax.jit(opt.update)
    state = opt.init(params)
    _, state = update(grads_like(params), state, params)
    for bad in (jnp.nan, jnp.inf):
        grads = grads_like(params, 2)
        grads["m"] = grads["m"].at[1, 2].set(bad)
        updates, new_state = update(grads, state, params)
        assert all(bool((u == 0).all()) for u in jax.tree.leaves(updates))
        jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
        assert int(rollfast.skipped_steps(new_state)) == int(rollfast.skipped_steps(state)) + 1
        state = new_state
    updates, _ = update(grads_like(params, 3), state, params)
    assert all(bool(jnp.isfinite(u).all()) and float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("variant", ["soap", "normuon", "apollo", "adamw8bit", "mars"])
def test_sharded_parameters_give_the_same_updates(variant):
    mesh = Mesh(np.array(jax.devices()), ("d",))
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 8)), "b": jnp.ones(8)}
    sharded = {"w": jax.device_put(params["w"], NamedSharding(mesh, PartitionSpec("d", None))),
               "b": jax.device_put(params["b"], NamedSharding(mesh, PartitionSpec()))}
    opt = build(variant)

    def two_steps(p):
        state = opt.init(p)
        u, state = opt.update(grads_like(p), state, p)
        return opt.update(grads_like(p, 5), state, p)[0]

    plain, split = jax.jit(two_steps)(params), jax.jit(two_steps)(sharded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain, split)


# What the first moment is after two steps g1, g2 from zero, per leaf ("ema": the
# exponential average with the family's b1; "last": (1-b1)·g2: SOAP's first call only
# builds its bases, for every leaf), with the tolerance (8-bit AdamW stores it in 8
# bits; SOAP's rotates it into its eigenbasis and back).
FIRST_MOMENT = {"soap": ({"m": "last", "v": "last"}, 1e-5), "qhadamw": ({"m": "ema", "v": "ema"}, 1e-6),
                "normuon": ({"m": "ema"}, 1e-6), "adamw8bit": ({"m": "ema", "v": "ema"}, 2e-2),
                "mars": ({}, 0.0)}  # mars: the average of its corrected gradient


@pytest.mark.parametrize("name", sorted(FIRST_MOMENT))
def test_first_moment_is_the_momentum_in_the_parameters_structure(name):
    record = next(r for r in rollfast.available("family") if r.name == name)
    b1 = next(p.default for p in record.parameters if p.name == "b1")
    params = {"m": jnp.ones((4, 3)), "v": jnp.ones(5), "none": None}
    opt = record.factory(learning_rate=0.1, **({"min_8bit_size": 0} if name == "adamw8bit" else {}))
    state = opt.init(params)
    grads = [grads_like({"m": params["m"], "v": params["v"]}, seed) for seed in (1, 2)]
    for g in grads:
        _, state = opt.update(g | {"none": None}, state, params)
    mu = record.metadata["first_moment"](state)
    assert jax.tree.structure(mu) == jax.tree.structure(params)
    assert mu["m"].shape == (4, 3) and float(jnp.abs(mu["m"]).max()) > 0
    kinds, tol = FIRST_MOMENT[name]
    for leaf, kind in kinds.items():
        want = (1 - b1) * grads[1][leaf] + (b1 * (1 - b1) * grads[0][leaf] if kind == "ema" else 0.0)
        np.testing.assert_allclose(mu[leaf], want, rtol=tol, atol=tol * float(jnp.abs(want).max()))


def test_soap_first_moment_is_the_gradients_average_across_refreshes():
    r"""SOAP keeps ``m̄`` in the eigenbasis; seen through ``first_moment`` (``m̄`` rotated
    back, ``M = m̄ ×_i Q_i``) it is the parameters'-basis average of the gradients from
    the second call on, ``M_n = Σ_{k≥2} (1-b1) b1^{n-k} g_k``: a step adds
    ``(1-b1) Ḡ`` in the current basis, and a refresh carries ``m̄`` over by
    ``Q_i'ᵀQ_i``, which leaves ``M`` unchanged. Checked over 4 refreshes on a matrix, a
    4-D kernel (one-sided past ``max_precond_dim``) and a vector (no basis). Tolerance:
    float32 rounding of the rotations, accumulated over the run."""
    b1, steps = 0.9, 13
    params = {"m": jnp.ones((6, 4)), "k": jnp.ones((3, 2, 2, 7)), "v": jnp.ones(5)}
    record = next(r for r in rollfast.available("family") if r.name == "soap")
    opt = record.factory(learning_rate=0.1, b1=b1, precondition_frequency=3, max_precond_dim=6)
    state, update = opt.init(params), jax.jit(opt.update)
    want = jax.tree.map(jnp.zeros_like, params)
    for seed in range(steps):
        grads = grads_like(params, seed)
        _, state = update(grads, state, params)
        if seed > 0:
            want = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, want, grads)
    bases = state[0].leaves
    assert [q is None for q in bases["k"].bases] == [False, False, False, True]
    assert not np.allclose(bases["m"].bases[0], np.eye(6), atol=0.1)  # the basis has turned
    mu = record.metadata["first_moment"](state)
    for name in params:
        scale = float(jnp.abs(want[name]).max())
        np.testing.assert_allclose(mu[name], want[name], rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def test_apollo_has_no_visible_first_moment():
    record = next(r for r in rollfast.available("family") if r.name == "apollo")
    assert record.metadata.get("first_moment") is None


@pytest.mark.parametrize("name, options, message", [
    ("mars", {"variant": "adam"}, "variant='adam' is not allowed by family 'mars'.*one of 'adamw', 'lion'"),
    ("apollo", {"variant": "maxi"}, "variant='maxi' is not allowed by family 'apollo'"),
    ("apollo", {"rank": 0}, "rank=0 is not allowed by family 'apollo'.*an integer ≥ 1"),
    ("soap", {"precondition_frequency": 0}, "precondition_frequency=0 is not allowed by family 'soap'"),
    ("adamw8bit", {"block_size": 0}, "block_size=0 is not allowed by family 'adamw8bit'"),
])
def test_bad_options_are_reported(name, options, message):
    with pytest.raises(ValueError, match=message):
        rollfast.get(name, learning_rate=0.1, **options)


def test_families_are_listed_with_their_references():
    records = {r.name: r for r in rollfast.available("family")}
    for name in FAMILIES:
        assert records[name].provider.plugin == "contrib"
        assert any("arXiv:" in ref for ref in records[name].references), name
        assert "learning_rate" == records[name].parameters[0].name
    assert rollfast.registry().lookup("family", "ADAMW_8BIT").name == "adamw8bit"
