"""rollfast.state_shardings on a 2×4 mesh of the 8 CPU devices: jitted init and steps
with the returned out_shardings equal the single-device run, and the state is laid out
as promised (no silent replication of the big leaves)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import rollfast
from rollfast_psgd import KronState
from rollfast_psgd.blocking import TileStack

OPTIMIZERS = {
    "kron": dict(name="kron", learning_rate=0.01, preconditioner_update_probability=1.0),
    "kron_blocked": dict(name="kron", learning_rate=0.01, preconditioner_update_probability=1.0, block_size=128,
                         tile_stack_multiple=4),
    "prism": dict(name="prism", learning_rate=0.01),
    "adamw": dict(name="adamw", learning_rate=0.01),
    "magma+schedule_free": dict(name="adamw", learning_rate=0.01, mask="magma", average="schedule_free"),
}


def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "fsdp"))


def problem():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w": jax.random.normal(k[0], (512, 256)) * 0.1, "e": jax.random.normal(k[1], (384, 256)) * 0.1,
              "b": jnp.zeros(256)}
    target = {"w": jax.random.normal(k[2], (512, 256)), "e": jax.random.normal(k[3], (384, 256)),
              "b": jnp.ones(256)}
    specs = {"w": P("dp", "fsdp"), "e": P("fsdp", None), "b": P("fsdp")}
    loss = lambda p: sum(jnp.sum((p[n] - target[n]) ** 2 * jnp.linspace(0.5, 2.0, p[n].shape[-1])) for n in p)
    return params, specs, loss


def run(opt, params, loss, steps, init_out=None, step_out=None):
    init = jax.jit(opt.init, out_shardings=init_out)
    state = init(params)

    def step(p, s):
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return jax.tree.map(lambda a, b: a + b, p, u), s

    step = jax.jit(step, out_shardings=step_out)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_sharded_run_equals_single_device_and_state_is_laid_out(which):
    kwargs = dict(OPTIMIZERS[which])
    opt = rollfast.get(kwargs.pop("name"), **kwargs)
    params, specs, loss = problem()
    ref_params, ref_state = run(opt, params, loss, 5)
    m = mesh()
    param_sh = {n: NamedSharding(m, s) for n, s in specs.items()}
    state_sh = rollfast.state_shardings(opt, params, specs, mesh=m, stack_axis="fsdp")
    sharded = jax.device_put(params, param_sh)
    out_params, out_state = run(opt, sharded, loss, 5, init_out=state_sh, step_out=(param_sh, state_sh))
    for a, b in zip(jax.tree.leaves((ref_params, ref_state)), jax.tree.leaves((out_params, out_state))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-5)
    leaves = jax.tree.leaves(out_state)
    wanted = jax.tree.leaves(state_sh, is_leaf=lambda s: isinstance(s, NamedSharding))
    assert len(leaves) == len(wanted)
    big = [(a, s) for a, s in zip(leaves, wanted) if a.size >= 256 * 128]
    assert big
    for a, s in big:
        assert a.sharding.is_equivalent_to(s, a.ndim), (a.shape, a.sharding, s)
        assert not a.sharding.is_fully_replicated or s.is_fully_replicated
    param_like = [s for a, s in big if a.shape in {(512, 256), (384, 256)}]
    assert param_like and all(not s.is_fully_replicated for s in param_like)


def test_kron_tile_stack_is_sharded_over_the_named_axis():
    params, specs, _ = problem()
    opt = rollfast.get("kron", block_size=128, tile_stack_multiple=4)
    sh = rollfast.state_shardings(opt, params, specs, mesh=mesh(), stack_axis="fsdp")
    stacks = [n for n in jax.tree.leaves(sh, is_leaf=lambda x: isinstance(x, TileStack))
              if isinstance(n, TileStack)]
    assert [s.left.spec for s in stacks] == [P("fsdp", None, None), P("fsdp")]  # factors, Lipschitz
    kron_state = [n for n in jax.tree.leaves(sh, is_leaf=lambda x: isinstance(x, KronState))
                  if isinstance(n, KronState)][0]
    assert kron_state.mu["w"].spec == P("dp", "fsdp") and kron_state.count.spec == P()


def test_cached_preconditioner_stack_is_sharded_like_the_factors():
    params, specs, _ = problem()
    opt = rollfast.get("kron", block_size=128, tile_stack_multiple=4, cache_preconditioner=True)
    sh = rollfast.state_shardings(opt, params, specs, mesh=mesh(), stack_axis="fsdp")
    kron_state = [n for n in jax.tree.leaves(sh, is_leaf=lambda x: isinstance(x, KronState))
                  if isinstance(n, KronState)][0]
    assert kron_state.ps.stack.left.spec == kron_state.qs.stack.left.spec == P("fsdp", None, None)
    state = jax.jit(opt.init, out_shardings=sh)(params)
    cached = [n for n in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, KronState))
              if isinstance(n, KronState)][0].ps.stack.left
    assert cached.shape == (16, 128, 128) and cached.sharding.spec == P("fsdp", None, None)


def test_unpadded_stack_is_refused_with_the_option_to_set():
    params, specs, _ = problem()  # 8 + 6 = 14 tiles of 128
    opt = rollfast.get("kron", block_size=128)
    with pytest.raises(ValueError, match="tile_stack_multiple to a multiple of 4"):
        rollfast.state_shardings(opt, params, specs, mesh=mesh(), stack_axis="fsdp")
    with pytest.raises(ValueError, match="stack_axis must be one of the mesh axes"):
        rollfast.state_shardings(opt, params, specs, mesh=mesh(), stack_axis="pipe")
