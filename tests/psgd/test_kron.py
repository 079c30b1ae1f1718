"""The kron family pipeline (docs/kron.md): identities, lazy init, clipping, skipping,
convergence for every mode, jit, sharding, bf16, scanned layers, leaf shapes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rollfast
import rollfast.testing as rt
from rollfast_psgd import kron, scale_by_kron

MODES = [r.name for r in rollfast.available("mode", family="kron")]
NO_CLIP = (1e9, 1e9)


def tree_equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def grads_like(params, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(params)))
    it = iter(keys)
    return jax.tree.map(lambda p: jax.random.normal(next(it), p.shape, p.dtype), params)


PARAMS = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3), "s": jnp.zeros(())}


def test_fixed_preconditioner_scales_the_momentum():
    s, b1 = 1.5, 0.9
    tx = scale_by_kron(b1=b1, preconditioner_update_probability=0.0, preconditioner_init_scale=s,
                       grad_clip_max_amps=NO_CLIP)
    state, step = tx.init(PARAMS), jax.jit(tx.update)
    m = jax.tree.map(jnp.zeros_like, PARAMS)
    for t in range(1, 4):
        g = grads_like(PARAMS, t)
        beta = min((t - 1) / t, b1)
        m = jax.tree.map(lambda m, g: (1 - beta) * g + beta * m, m, g)
        u, state = step(g, state)
        for got, want in zip(jax.tree.leaves(u), jax.tree.leaves(m)):
            np.testing.assert_allclose(got, s**2 * want, rtol=1e-5, atol=1e-7)
    assert int(state.count) == 3


def test_kron_adds_weight_decay_and_learning_rate():
    opt = kron(learning_rate=0.5, b1=0.0, weight_decay=0.1, preconditioner_update_probability=0.0,
               preconditioner_init_scale=1.0, grad_clip_max_amps=NO_CLIP)
    params = {"w": jnp.full((2, 2), 2.0)}
    u, _ = opt.update({"w": jnp.ones((2, 2))}, opt.init(params), params)
    np.testing.assert_allclose(u["w"], -0.5 * (1.0 + 0.1 * 2.0))


def test_lazy_init_scale_from_first_gradient():
    tx = scale_by_kron(b1=0.0, preconditioner_update_probability=0.0)
    g, step = grads_like(PARAMS, 0), jax.jit(tx.update)
    _, state = step(g, tx.init(PARAMS))
    s = (max(float(jnp.mean(x**4)) for x in jax.tree.leaves(g)) + 1e-36) ** (-1 / 8)
    qw, qb, qs = state.qs["w"], state.qs["b"], state.qs["s"]
    np.testing.assert_allclose(qw[0], s**0.5 * np.ones(4), rtol=1e-5)
    np.testing.assert_allclose(qw[1], s**0.5 * np.eye(3), rtol=1e-5)
    np.testing.assert_allclose(qb[0], s * np.ones(3), rtol=1e-5)
    np.testing.assert_allclose(qs[0], [s], rtol=1e-5)
    assert not bool(state.needs_scale_init)
    _, again = step(g, state)
    assert tree_equal(again.qs, state.qs) and tree_equal(again.ls, state.ls)


def test_layout_of_factors():
    params = {"skew": jnp.zeros((8, 3)), "square": jnp.zeros((5, 5)), "big": jnp.zeros((3, 20000)),
              "vec": jnp.zeros(6), "conv": jnp.zeros((3, 3, 2, 4)), "row": jnp.zeros((1, 7))}
    shapes = jax.tree.map(lambda q: q.shape, scale_by_kron().init(params).qs)
    assert shapes["skew"] == ((8,), (3, 3))
    assert shapes["square"] == ((5, 5), (5, 5))
    assert shapes["big"] == ((3, 3), (20000,))
    assert shapes["vec"] == ((6,),)
    assert shapes["conv"] == ((3, 3), (3, 3), (2, 2), (4, 4))
    assert shapes["row"] == ((1,), (7,))
    one = jax.tree.map(lambda q: q.shape, scale_by_kron(memory_save_mode="one_diag").init(params).qs)
    assert one["square"] == ((5, 5), (5,)) and one["conv"] == ((3, 3), (3, 3), (2, 2), (4,))
    alld = jax.tree.map(lambda q: q.ndim, scale_by_kron(memory_save_mode="all_diag").init(params).qs)
    assert set(jax.tree.leaves(alld)) == {1}


def test_probability_zero_never_moves_factors_and_clip_bounds_updates():
    """P = 9I stays; the first update is -9g scaled to RMS exactly 2 (the default cap),
    and a small gradient's update -9g is left as it is."""
    opt = rollfast.get("kron", learning_rate=1.0, preconditioner_update_probability=0.0,
                       preconditioner_init_scale=3.0)
    params = {"w": jnp.zeros((6, 5))}
    state = opt.init(params)
    g = np.arange(30.0).reshape(6, 5) ** 2
    u, new = jax.jit(opt.update)({"w": jnp.asarray(g, jnp.float32)}, state, params)
    assert tree_equal(new.inner_state[0].qs, state.inner_state[0].qs)
    np.testing.assert_allclose(u["w"], -2.0 * g / np.sqrt(np.mean(g**2)), rtol=1e-5)
    assert np.sqrt(np.mean(np.square(u["w"]))) == pytest.approx(2.0, rel=1e-5)
    small, _ = jax.jit(opt.update)({"w": jnp.asarray(g * 1e-4, jnp.float32)}, state, params)
    np.testing.assert_allclose(small["w"], -9.0 * g * 1e-4, rtol=1e-5)


def test_global_rms_clip():
    tx = scale_by_kron(b1=0.0, preconditioner_update_probability=0.0, preconditioner_init_scale=1.0,
                       grad_clip_mode="global_rms", grad_clip_max_amps=0.5)
    g = {"a": jnp.full((2, 2), 4.0), "b": jnp.full(4, 2.0)}
    u, _ = tx.update(g, tx.init(g))
    total = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(u)) / 8)
    np.testing.assert_allclose(total, 0.5, rtol=1e-5)
    np.testing.assert_allclose(u["a"] / u["b"][:1], 2.0)


def test_determinism_and_count():
    opt = rollfast.get("kron", learning_rate=0.1, preconditioner_update_probability=0.5, key=3)
    params = rt.mixed_tree()
    grads = jax.tree.map(lambda p: p * 0.3 + 0.1 if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
    runs, step = [], jax.jit(opt.update)
    for _ in range(2):
        state = opt.init(params)
        for _ in range(3):
            u, state = step(grads, state, params)
        runs.append((u, state))
    assert tree_equal(runs[0], runs[1])
    assert int(runs[0][1].inner_state[0].count) == 3
    assert runs[0][0]["nothing"] is None and np.all(np.asarray(runs[0][0]["count"]) == 0)


def test_nan_gradient_skips_the_step():
    opt = rollfast.get("kron", learning_rate=0.1, permissive_spike_protection=False,
                       preconditioner_update_probability=1.0, nonfinite="propagate")  # kron's own skip
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    step = jax.jit(opt.update)
    state = opt.init(params)
    _, state = step(grads_like(params, 0), state, params)
    bad = {"w": jnp.ones((4, 4)).at[1, 2].set(jnp.nan), "b": jnp.full(4, jnp.inf)}
    u, after = step(bad, state, params)
    assert tree_equal(after, state)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
    _, later = step(grads_like(params, 1), after, params)
    assert all(bool(jnp.all(jnp.isfinite(q))) for q in jax.tree.leaves(later.inner_state[0].qs))


def test_spike_skip_and_permissive_clip():
    params = {"w": jnp.ones((3, 3))}
    g = {"w": jnp.full((3, 3), 10.0)}
    strict = scale_by_kron(raw_global_grad_clip=1.0, permissive_spike_protection=False,
                           preconditioner_update_probability=0.5, preconditioner_init_scale=1.0)
    state = strict.init(params)
    u, after = jax.jit(strict.update)(g, state)
    assert tree_equal(after, state) and float(jnp.max(jnp.abs(u["w"]))) == 0.0
    lenient = scale_by_kron(b1=0.0, raw_global_grad_clip=1.0, preconditioner_update_probability=1.0,
                            preconditioner_init_scale=1.0, update_preconditioner_first=False,
                            grad_clip_max_amps=NO_CLIP)
    u, after = jax.jit(lenient.update)(g, lenient.init(params))
    np.testing.assert_allclose(u["w"], np.full((3, 3), 1 / 3), rtol=1e-5)
    assert int(after.count) == 1


@pytest.mark.parametrize("bad, message", [
    (dict(grad_clip_mode="rms"), "grad_clip_mode=.rms. is not allowed by family .kron. \\(psgd\\): allowed is one of .per_tensor_rms., .global_rms."),
    (dict(memory_save_mode="some_diag"), "memory_save_mode must be one of"),
    (dict(whiten_grad=False, b1=0.0), "needs b1 > 0"),
])
def test_bad_options_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        rollfast.get("kron", **bad)


def test_unknown_option_suggests():
    with pytest.raises(TypeError, match="preconditioner_lr"):
        rollfast.get("kron", precondtioner_lr=0.1)


def test_first_moment_is_the_momentum():
    family = rollfast.registry().lookup("family", "kron")
    opt = kron(learning_rate=0.1)
    params = {"w": jnp.ones((2, 3))}
    g = {"w": jnp.full((2, 3), 2.0)}
    _, state = opt.update(g, opt.init(params), params)
    np.testing.assert_allclose(family.metadata["first_moment"](state)["w"], g["w"])
    assert family.metadata["first_moment"](kron(b1=0.0).init(params)) is None


def best_adam_loss(params, loss, steps):
    return min(rt.run(optax.adam(lr), params, loss, steps)[2][-1] for lr in (0.03, 0.1, 0.3, 1.0, 3.0))


@pytest.fixture(scope="module")
def quadratic():
    params, loss = rt.ill_conditioned_quadratic(dim=16, condition=1e4)
    return params, loss, best_adam_loss(params, loss, 200)


def slow_unless_default(modes):
    return [m if m == "Q0.5EQ1.5" else pytest.param(m, marks=pytest.mark.slow) for m in modes]


@pytest.mark.parametrize("mode", slow_unless_default(MODES))
def test_beats_adam_on_ill_conditioned_quadratic(mode, quadratic):
    params, loss, adam = quadratic
    opt = rollfast.get("kron", learning_rate=0.03, mode=mode, preconditioner_update_probability=1.0)
    final = rt.run(opt, params, loss, 200)[2][-1]
    assert final < adam / 10, (final, adam)


@pytest.mark.parametrize("mode", slow_unless_default(MODES))
def test_trains_an_mlp_where_tuned_sgd_stalls(mode):
    """100 steps on rollfast.testing's MLP: plain SGD at its best rate (0.1 of 0.01…3) ends at
    0.28 from 1.26 (measured); kron at 0.03 ends below 0.02 in every mode (measured 5e-4 … 4e-3)."""
    params, loss = rt.mlp_problem()
    losses = rt.run(rollfast.get("kron", learning_rate=0.03, mode=mode), params, loss, 100)[2]
    assert losses[-1] < 0.02, (losses[0], losses[-1])


def test_bfloat16_params_and_state():
    params, loss = rt.mlp_problem()
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    opt = rollfast.get("kron", learning_rate=3e-3, mu_dtype=jnp.bfloat16, precond_dtype=jnp.bfloat16,
                       round="stochastic")
    new, state, losses = rt.run(opt, params, loss, 60)
    inner = state.inner_state[0]
    assert {x.dtype for x in jax.tree.leaves(inner.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(inner.qs)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(new)} == {jnp.dtype(jnp.bfloat16)}
    full = rt.run(rollfast.get("kron", learning_rate=3e-3), rt.mlp_problem()[0], loss, 60)[2]
    # bf16 storage trains as float32 does (measured 0.2546 vs 0.2504 from 1.255)
    assert losses[-1] < 0.25 * losses[0] and abs(losses[-1] - full[-1]) < 0.05 * full[-1], (losses[-1], full[-1])


def relative_error(opt, params, loss, target, steps):
    """``‖x − x*‖ / ‖x*‖`` over the whole tree after ``steps`` steps (one ``lax.scan``)."""
    def step(carry, _):
        p, s = carry
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    sq = lambda tree: sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))
    return jnp.sqrt(sq(jax.tree.map(jnp.subtract, p, target)) / sq(target))


def best_sgd_error(params, loss, target, steps, stable_lr):
    """The best relative error of plain SGD over a log grid of learning rates up to its
    stability limit ``stable_lr`` (all rates in one vmapped program)."""
    grid = jnp.asarray(stable_lr * np.logspace(-3, np.log10(0.95), 10), jnp.float32)
    errors = jax.jit(jax.vmap(lambda lr: relative_error(optax.sgd(lr), params, loss, target, steps)))(grid)
    return float(jnp.min(errors))


def two_scale_quadratic(shape, leaf_scales=(1.0, 1e3), axis_condition=10.0, seed=0):
    """Two leaves of ``shape``, ``x`` and ``y``, with loss ``½ Σ_k c_k (k − k*)ᵀ H (k − k*)``,
    ``c = leaf_scales`` and ``H = H_1 ⊗ … ⊗ H_n`` over the axes: eigenvalues log-spaced
    over ``[1, axis_condition]``, in a random basis along axes kron gives a dense factor,
    permuted on the diagonal along the others. Returns ``(params, loss, target, 2/h_max)``."""
    from rollfast_psgd.factors import layout

    rng = np.random.default_rng(seed)
    dims = shape or (1,)
    hs = []
    for d, dense in zip(dims, layout(dims, 8192, 1.0, 2, None)):
        eig = np.logspace(0, np.log10(axis_condition), d)
        basis = np.linalg.qr(rng.standard_normal((d, d)))[0] if dense else np.eye(d)[rng.permutation(d)]
        hs.append(jnp.asarray((basis * eig) @ basis.T, jnp.float32))
    target = {k: jnp.asarray(rng.standard_normal(shape), jnp.float32) for k in "xy"}

    def curvature(d):
        d = d.reshape(dims)
        for i, h in enumerate(hs):
            d = jnp.moveaxis(jnp.tensordot(h, d, axes=([1], [i])), 0, i)
        return d.reshape(shape)

    def loss(p):
        return sum(0.5 * c * jnp.sum((p[k] - target[k]) * curvature(p[k] - target[k]))
                   for k, c in zip("xy", leaf_scales))

    h_max = max(leaf_scales) * axis_condition ** sum(d > 1 for d in dims)
    return {k: jnp.zeros(shape) for k in "xy"}, loss, target, 2 / h_max


@pytest.mark.parametrize("shape", [(), (5,), (4, 6), (1, 9), (9, 1), (2, 3, 4), (2, 3, 2, 3)],
                         ids=["scalar", "vector", "matrix", "1xN", "Nx1", "3d", "4d"])
def test_every_leaf_shape_beats_tuned_sgd(shape):
    """On :func:`two_scale_quadratic` of each leaf shape (condition 1e3 between the leaves,
    10 per axis), 100 steps of kron end at least 5× closer to the minimum than plain SGD
    at its best learning rate (measured: kron 0.04–0.07, SGD 0.5–0.8)."""
    params, loss, target, stable_lr = two_scale_quadratic(shape)
    opt = rollfast.get("kron", learning_rate=0.03, preconditioner_update_probability=1.0)
    error = float(jax.jit(lambda: relative_error(opt, params, loss, target, 100))())
    sgd = best_sgd_error(params, loss, target, 100, stable_lr)
    assert error < sgd / 5, (error, sgd)


def patterned_normals(seeds, shapes):
    """A stand-in for the probe draw of ``rollfast_psgd.transform._normals``: every array
    is a fixed pseudo-random pattern of its index along the last two axes, so a leaf
    draws the same probes alone, as a layer of a stack or scanned leaf (equal layers) and,
    for its dense factors' ``(2, 32, d)`` probes, wherever it is in the tree."""
    def pattern(shape):
        grid = np.indices(shape[-2:] if len(shape) >= 2 else shape or (1,)).astype(np.float64)
        phase = sum(c * x for c, x in zip((12.9898, 78.233), grid[::-1])) + 0.5
        values = np.sqrt(2.0) * np.sin(phase * 43758.5453)
        return jnp.asarray(np.broadcast_to(values.reshape(values.shape[-len(shape):] if shape else ()), shape),
                           jnp.float32)

    arrays = [pattern(tuple(s)) for s in shapes]
    return lambda: arrays


@pytest.fixture
def same_probes(monkeypatch):
    import rollfast_psgd.transform as transform

    monkeypatch.setattr(transform, "_normals", patterned_normals)


@pytest.fixture(scope="module")
def scanned():
    """Updates of a stacked (3, 4, 3) leaf (vmap and lax.map) and of three (4, 3) leaves."""
    rng = np.random.default_rng(0)
    layers = [jnp.asarray(rng.standard_normal((4, 3)), jnp.float32) for _ in range(3)]
    common = dict(learning_rate=0.1, preconditioner_init_scale=1.0, grad_clip_max_amps=NO_CLIP,
                  preconditioner_update_probability=1.0)
    stacked, separate = {"w": jnp.zeros((3, 4, 3))}, {f"w{i}": jnp.zeros((4, 3)) for i in range(3)}
    runs = {}
    for name, params, options in [
            ("vmap", stacked, dict(scanned_layers={"w": True})),
            ("lax.map", stacked, dict(scanned_layers={"w": True}, lax_map_scanned_layers=True,
                                      lax_map_batch_size=2)),
            ("separate", separate, {})]:
        opt = rollfast.get("kron", **common, **options)
        state, step = opt.init(params), jax.jit(opt.update)
        for t in range(4):
            g = [x * (1 + t) for x in layers]
            g = {"w": jnp.stack(g)} if "w" in params else {f"w{i}": x for i, x in enumerate(g)}
            u, state = step(g, state, params)
        runs[name] = (u, state)
    return runs


def test_scanned_layers_match_separate_leaves(scanned):
    """Same math per layer, and the same draws: the three equal-shape leaves are fitted as
    one stacked unit, with the noise shapes of the scanned leaf."""
    (us, state), (ul, _) = scanned["vmap"], scanned["separate"]
    assert [q.shape for q in state.inner_state[0].qs["w"]] == [(3, 4), (3, 3, 3)]
    for i in range(3):
        np.testing.assert_allclose(us["w"][i], ul[f"w{i}"], rtol=1e-6, atol=1e-9)


def test_lax_map_scanned_layers_equals_vmap(scanned):
    np.testing.assert_allclose(scanned["lax.map"][0]["w"], scanned["vmap"][0]["w"], rtol=1e-6)


def test_sharded_params_match_unsharded():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("d",))
    target = {"w": jax.random.normal(jax.random.PRNGKey(1), (16, 24)), "b": jnp.ones(16)}
    full = rt.quadratic_loss(target)
    params = {"w": jnp.zeros((16, 24)), "b": jnp.zeros(16)}
    sharded = jax.tree.map(lambda v: jax.device_put(v, NamedSharding(mesh, P("d"))), params)
    opt = rollfast.get("kron", learning_rate=1e-2, preconditioner_update_probability=1.0)
    ref, _, _ = rt.run(opt, params, full, 4)
    got, state, _ = rt.run(opt, sharded, full, 4)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    mu = state.inner_state[0].mu
    assert mu["w"].sharding.is_equivalent_to(sharded["w"].sharding, 2)


def test_listed_by_the_cli(capsys):
    from rollfast.cli import main

    main(["list"])
    out = capsys.readouterr().out
    assert "CAYLEY" in out and "rollfast-kron-cayley" in out and "Q0.5EQ1.5" in out


def test_axis_name_reductions_match_single_device():
    """Under shard_map with identical per-device gradients, the mean/max/sum reductions over
    ``axis_name`` reproduce the single-device step."""
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("d",))
    params = {"w": jnp.ones((6, 4)), "b": jnp.ones(4)}
    g = {"w": jnp.arange(24.0).reshape(6, 4) / 10, "b": jnp.ones(4)}
    kw = dict(learning_rate=0.1, preconditioner_update_probability=1.0, raw_global_grad_clip=100.0,
              grad_clip_mode="global_rms")
    single = rollfast.get("kron", **kw)
    want, _ = jax.jit(single.update)(g, single.init(params), params)
    mapped = rollfast.get("kron", axis_name="d", **kw)
    step = jax.shard_map(mapped.update, mesh=mesh, in_specs=(P(), P(), P()), out_specs=(P(), P()),
                         check_vma=False)
    got, _ = jax.jit(step)(g, mapped.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_alternative_options_beat_tuned_adam(quadratic):
    """Without Lipschitz tracking, preconditioning with the old factors and at the highest
    precisions, kron still ends 5× below Adam at its best learning rate on the rotated
    condition-1e4 quadratic (measured: 0.40 against 4.75)."""
    params, loss, adam = quadratic
    opt = rollfast.get("kron", learning_rate=0.03, track_lipschitz=False, update_preconditioner_first=False,
                       precond_update_precision="highest", precond_grads_precision="highest",
                       preconditioner_update_probability=1.0)
    _, state, losses = rt.run(opt, params, loss, 200)
    assert state.inner_state[0].ls is None
    assert losses[-1] < adam / 5, (losses[-1], adam)


def test_whitening_the_momentum_beats_tuned_sgd(quadratic):
    """``whiten_grad=False`` fits P to the momentum: on the rotated condition-1e4 quadratic
    it ends 5× below plain SGD at its best learning rate up to the stability limit
    2/h_max = 2e-4 (measured: 16 against 145)."""
    params, loss, _ = quadratic
    opt = rollfast.get("kron", learning_rate=0.03, whiten_grad=False, preconditioner_update_probability=1.0)
    final = rt.run(opt, params, loss, 200)[2][-1]
    sgd = min(rt.run(optax.sgd(lr), params, loss, 200)[2][-1] for lr in (2e-6, 2e-5, 6e-5, 1.9e-4))
    assert final < sgd / 5, (final, sgd)


def test_probe_noise_is_standard_normal_and_keyed():
    from scipy import stats

    from rollfast_psgd.transform import _draw_words, _normals

    seeds = lambda seed, n: _draw_words(jax.random.PRNGKey(seed), n)[1]
    for size in (200_000, 2_000):  # own seeds, and slices of the pooled draw
        a, b, *_ = _normals(seeds(0, 6), [(size,), (4, size // 4)] + [(5,)] * 3)()
        x = np.concatenate([np.asarray(a), np.asarray(b).ravel()]).astype(np.float64)
        n = x.size
        assert abs(x.mean()) < 4 / np.sqrt(n) and abs(x.var() - 1) < 4 * np.sqrt(2 / n)
        assert stats.kstest(x, "norm").pvalue > 1e-3
        assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 4 / np.sqrt(n)  # neighbours independent
        assert abs(np.corrcoef(x[:size], x[size:])[0, 1]) < 4 / np.sqrt(size)  # arrays too
        other = np.asarray(_normals(seeds(1, 2), [(size,)])()[0])
        assert abs(np.corrcoef(np.asarray(a), other)[0, 1]) < 4 / np.sqrt(size)  # keys differ


def test_one_draw_gives_the_next_key_and_uniform_words():
    """A step's randomness is one threefry call: a fresh next key (raw or typed, same
    kind), and words whose high bits are uniform on [0, 1)."""
    from scipy import stats

    from rollfast_psgd.transform import _draw_words, _unit

    for key in (jax.random.PRNGKey(3), jax.random.key(3)):
        nxt, words = _draw_words(key, 50_000)
        assert nxt.dtype == key.dtype and nxt.shape == key.shape and words.shape == (50_000, 2)
        assert not np.array_equal(jax.random.key_data(nxt), jax.random.key_data(key))
        again = _draw_words(nxt, 2)[1]
        assert not np.array_equal(np.asarray(again), np.asarray(words[:2]))
        u = np.asarray(_unit(words)).ravel()
        assert u.min() >= 0 and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_packed_factor_update_equals_the_leaves_one_by_one(mode):
    """One update of a packed diagonal factor, with per-segment bounds, Lipschitz
    estimates and steps, equals updating each small leaf alone (same h and v)."""
    from rollfast_psgd.factors import Packing, UpdateConfig, mode_spec, update_factors

    spec = mode_spec(rollfast.registry().lookup("mode", mode, "kron").impl)
    cfg = UpdateConfig(spec, 0.1, 0.9, True, 1e-9, 5)
    rng = np.random.default_rng(1)
    shapes = [(5,), (), (3,)]
    pk = Packing.of([(False, (False,))] * 3, shapes)
    qs = [[jnp.asarray(0.5 + rng.random(max(int(np.prod(s)), 1)), jnp.float32)] for s in shapes]
    ls = [[jnp.asarray(rng.random(), jnp.float32)] for _ in shapes]
    hs = [jnp.asarray(rng.standard_normal(s) * 3, jnp.float32) for s in shapes]
    vs = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    (q,), (l,), _ = update_factors(pk.pack(qs)[0], pk.pack(ls)[0], pk.pack(hs)[0], pk.pack(vs)[0],
                                   [None], False, cfg, pk.segments[0])
    packed_qs, packed_ls = pk.unpack([[q]], qs), pk.unpack([[l]], ls)
    for i, s in enumerate(shapes):
        (q1,), (l1,), _ = update_factors(qs[i], ls[i], hs[i].reshape(s or (1,)), vs[i].reshape(s or (1,)),
                                         [None], False, cfg)
        np.testing.assert_allclose(packed_qs[i][0], q1, rtol=1e-6)
        np.testing.assert_allclose(packed_ls[i][0], l1, rtol=1e-6)


@pytest.mark.parametrize("mode", ["Q0.5EQ1.5", "TAYLOR2"])
def test_small_leaves_packed_equal_the_leaves_one_by_one(mode, same_probes):
    """Vectors and scalars run as one packed unit; the numbers are per leaf as before.
    With the same probes in both runs (``same_probes``) every leaf, the matrix ``w`` too,
    agrees to float32 rounding (measured ≤ 1e-7 relative; with the library's own
    draws, which differ between the runs, ``w`` differs by 2e-6)."""
    rng = np.random.default_rng(0)
    params = {"a": jnp.ones(5), "b": jnp.ones(()), "c": jnp.ones(3), "w": jnp.ones((4, 3))}
    opts = dict(learning_rate=0.1, mode=mode, preconditioner_update_probability=1.0,
                preconditioner_init_scale=1.0, grad_clip_max_amps=(0.5, 10.0))
    joint = rollfast.get("kron", **opts)
    alone = {k: rollfast.get("kron", **opts) for k in params}
    state = joint.init(params)
    states = {k: alone[k].init({k: p}) for k, p in params.items()}
    for step in range(6):
        grads = {k: jnp.asarray(rng.standard_normal(p.shape) * (1 + step), jnp.float32)
                 for k, p in params.items()}
        u, state = jax.jit(joint.update)(grads, state, params)
        for k in params:
            uk, states[k] = jax.jit(alone[k].update)({k: grads[k]}, states[k], {k: params[k]})
            np.testing.assert_allclose(u[k], uk[k], rtol=1e-6, atol=1e-9)


def test_empty_leaves_change_nothing():
    """Zero-size leaves get empty updates and leave the other leaves' numbers as they are."""
    opts = dict(learning_rate=0.1, preconditioner_update_probability=1.0)
    params = {"a": jnp.ones(3), "b": jnp.ones(()), "w": jnp.ones((3, 2))}
    with_empty = dict(params, e=jnp.ones((0,)), z=jnp.ones((0, 4)))
    grads = lambda p, t: jax.tree.map(lambda x: jnp.cos(x * (t + 1)) * 0.5, p)
    opt = rollfast.get("kron", **opts)
    s1, s2 = opt.init(params), opt.init(with_empty)
    for t in range(3):
        u1, s1 = jax.jit(opt.update)(grads(params, t), s1, params)
        u2, s2 = jax.jit(opt.update)(grads(with_empty, t), s2, with_empty)
        assert u2["e"].shape == (0,) and u2["z"].shape == (0, 4)
        for k in params:  # empty leaves draw no noise: the other leaves' draws are the same
            np.testing.assert_allclose(u2[k], u1[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", ["EQ", "NS"])
def test_blocked_products_change_no_numbers(monkeypatch, mode):
    """From ``BLOCKING`` rows on, Grams form only their upper blocks and EQ's triangular
    factors skip their zero blocks (in Q·h, QᵀQ and triu(E)·Q); forced on small factors
    (odd sizes, every axis position), the steps equal those of whole products."""
    import rollfast_psgd.linalg as linalg

    rng = np.random.default_rng(0)
    params = {"w": jnp.ones((13, 9)), "t": jnp.ones((3, 12, 8)), "b": jnp.ones(5)}
    grads = [{k: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for k, p in params.items()}
             for _ in range(4)]

    def run(blocking):
        monkeypatch.setattr(linalg, "BLOCKING", blocking)
        opt = rollfast.get("kron", learning_rate=0.1, mode=mode, preconditioner_update_probability=1.0)
        state, out = opt.init(params), []
        with jax.default_matmul_precision("highest"):
            for g in grads:
                u, state = jax.jit(opt.update)(g, state, params)
                out.append(u)
        return out, state

    assert len(linalg._edges(1023)) == 2 and len(linalg._edges(1024)) == 5  # 1 and 4 blocks
    blocked, whole = run(8), run(1 << 30)  # blocks of 2-3 rows; 3 and 5 whole
    factor = next(x for x in jax.tree.leaves(blocked[1]) if x.shape == (12, 12))
    if mode == "EQ":
        assert np.array_equal(np.triu(factor), factor) and np.any(np.triu(factor, 1) != 0)
    for a, b in zip(jax.tree.leaves(blocked), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_leaves_of_equal_shape_run_stacked_with_their_own_numbers(same_probes):
    """Un-scanned leaves of one shape run as one stacked unit (one copy of the code); each
    keeps its own factors and its own RMS clip (gradients 1×, 10×, 100×, clip active), as
    if it were alone. With the same probes (``same_probes``) the two are different
    programs only: measured ≤ 1.2e-7 relative (library draws: 1.5e-6)."""
    from rollfast_psgd.factors import Packing

    plans = [(False, (True, True))] * 3 + [(False, (True, False))]
    assert Packing.of(plans, [(4, 3)] * 3 + [(4, 3)]).groups == ((0, 1, 2),)
    rng = np.random.default_rng(0)
    params = {k: jnp.zeros((4, 3)) for k in "abc"}
    opts = dict(learning_rate=0.1, preconditioner_init_scale=1.0, preconditioner_update_probability=1.0,
                grad_clip_max_amps=(0.05, 0.2))
    joint = rollfast.get("kron", **opts)
    state = joint.init(params)
    alone = {k: rollfast.get("kron", **opts) for k in params}
    states = {k: alone[k].init({k: p}) for k, p in params.items()}
    for t in range(4):
        grads = {k: jnp.asarray(rng.standard_normal((4, 3)) * 10.0**i, jnp.float32)
                 for i, k in enumerate(params)}
        u, state = jax.jit(joint.update)(grads, state, params)
        for k in params:
            uk, states[k] = jax.jit(alone[k].update)({k: grads[k]}, states[k], {k: params[k]})
            np.testing.assert_allclose(u[k], uk[k], rtol=1e-6, atol=1e-9)
    qs = jax.tree.leaves(state)
    assert sum(q.shape == (4,) for q in qs) == 3 and sum(q.shape == (3, 3) for q in qs) == 3
