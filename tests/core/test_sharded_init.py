"""``jax.jit(opt.init)`` of every first-party and contrib family (and the wrappers) lays
out each state leaf shaped like a parameter like that parameter (8 CPU devices, see
conftest.py): sharded parameters never get single-device state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import rollfast

CASES = [("adam", {}), ("adamw", {}), ("kron", {}), ("prism", {}), ("soap", {}), ("mars", {}),
         ("qhadamw", {}), ("normuon", {}), ("apollo", {}), ("adamw8bit", {"min_8bit_size": 10**6}),
         ("optax:lion", {}), ("adamw", {"mask": "magma"}), ("adamw", {"average": "schedule_free"}),
         ("optax:sgd", {"mask": "magma", "raw_global_grad_clip": 1.0})]


def sharded_params():
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rows = NamedSharding(mesh, PartitionSpec("d", None))
    cols = NamedSharding(mesh, PartitionSpec(None, "d"))
    params = {"w": jax.device_put(jnp.ones((16, 8)), rows), "v": jax.device_put(jnp.ones((8, 16)), cols),
              "b": jnp.ones(3), "i": jnp.arange(2), "n": None}
    return params, {"w": rows, "v": cols}


def owner(path):
    keys = [getattr(k, "key", None) for k in path]
    return next((k for k in reversed(keys) if k in ("w", "v")), None)


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{'-'.join(o)}" for n, o in CASES])
def test_jitted_init_state_follows_the_params_sharding(name, options):
    params, shardings = sharded_params()
    opt = rollfast.get(name, learning_rate=1e-2, **options)
    state = jax.jit(opt.init)(params)
    checked = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        param = owner(path)
        if param is None or leaf.shape != params[param].shape:
            continue
        assert leaf.sharding.is_equivalent_to(shardings[param], 2), (jax.tree_util.keystr(path), leaf.sharding)
        checked += 1
    assert checked > 0, "no state leaf shaped like a sharded parameter"
    updates, _ = jax.jit(opt.update)(jax.tree.map(lambda p: p, params), state, params)
    assert updates["w"].shape == (16, 8)


def test_eager_init_follows_the_params_sharding_too():
    params, shardings = sharded_params()
    state = rollfast.get("adamw", learning_rate=1e-2).init(params)
    mu = state.inner_state[0].mu
    assert mu["w"].sharding.is_equivalent_to(shardings["w"], 2)
    assert mu["v"].sharding.is_equivalent_to(shardings["v"], 2)
