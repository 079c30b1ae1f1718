"""PRISM family: invariants, options, partition + fallback, jit, sharding, bf16, scanned layers."""

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
import rollfast
import rollfast_prism
from rollfast.testing import mixed_tree, mlp_problem, quadratic_loss, run
from rollfast_partition import MatrixSpec
from rollfast.toolbox import update_clipper
from rollfast_prism import transform
from rollfast_prism.modes import bidirectional, original
from rollfast_prism.transform import PrismOptions

MODES = ["original", "bidirectional"]


def _random(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _well_conditioned(rows, cols, seed=0, low=0.5):
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((rows, rows)))[0]
    v = np.linalg.qr(rng.standard_normal((cols, cols)))[0]
    k = min(rows, cols)
    s = np.linspace(low, 1.0, k)
    return u[:, :k] @ np.diag(s) @ v[:, :k].T


def _steps(opt, grads, params):
    state, out = opt.init(params), []
    update = jax.jit(opt.update)
    for g in grads:
        u, state = update(g, state, params)
        out.append(u)
    return out, state


# --------------------------------------------------------------- the shaping maths
@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_newton_schulz_approximates_the_polar_factor(shape):
    """Singular values in [1−ε, 1+ε] (ε = 0.32 for Muon's coefficients), same
    singular vectors: Aᵀ X is symmetric positive definite."""
    a = _well_conditioned(*shape, low=0.2)
    x = np.asarray(original.newton_schulz(jnp.asarray(a, jnp.float32), 5), np.float64)
    s = np.linalg.svd(x, compute_uv=False)
    assert s.min() > 0.68 and s.max() < 1.32
    c = a.T @ x if shape[0] >= shape[1] else x @ a.T
    np.testing.assert_allclose(c, c.T, atol=1e-5)
    assert np.linalg.eigvalsh((c + c.T) / 2).min() > 0


def test_newton_schulz_orientation_does_not_matter():
    a = _random((12, 20))
    np.testing.assert_allclose(original.newton_schulz(a.T, 5), original.newton_schulz(a, 5).T, atol=1e-6)
    np.testing.assert_allclose(original.newton_schulz(a, 5, rows=4), original.newton_schulz(a, 5)[:4],
                               atol=1e-6)


def test_original_with_gamma_zero_is_muon():
    t, d = _random((10, 14), 1), _random((10, 14), 2)
    np.testing.assert_allclose(original.shape(t, d, gamma=0.0), original.newton_schulz(t, 5), atol=1e-6)
    gamma = jnp.float32(0.0)  # traced-like γ keeps the zero block: same top block
    np.testing.assert_allclose(original.shape(t, d, gamma=gamma), original.newton_schulz(t, 5), atol=1e-5)


@pytest.mark.parametrize("shape", [(12, 12), (6, 20), (20, 6)])
def test_bidirectional_with_gamma_zero_is_the_polar_factor(shape):
    a = _well_conditioned(*shape, seed=3)
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    got = bidirectional.shape(jnp.asarray(a, jnp.float32), jnp.zeros(shape), gamma=0.0)
    np.testing.assert_allclose(got, u @ vt, atol=2e-2)


def test_innovation_shrinks_the_update():
    """Coefficients per direction lie in [0, 1]: a large innovation shrinks the output."""
    t = jnp.asarray(_well_conditioned(8, 8, low=0.9), jnp.float32)
    for fn in (original.shape, bidirectional.shape):
        quiet = jnp.linalg.norm(fn(t, jnp.zeros((8, 8))))
        noisy = jnp.linalg.norm(fn(t, 3 * _random((8, 8))))
        assert noisy < 0.6 * quiet


def test_inverse_root_coefficient_schedule():
    assert len(bidirectional.coefficients(0)) == 4 == len(bidirectional.coefficients(None))
    two = bidirectional.coefficients(2, 1.0)
    assert two == bidirectional.INV_ROOT4_COEFFS[:2]
    a, b, c = bidirectional.coefficients(1, 2.0)[0]
    np.testing.assert_allclose((a, b, c), (3.85003 / 2, -10.8539 / 32, 8.61893 / 512))
    with pytest.raises(ValueError, match="inv_steps"):
        bidirectional.coefficients(-1)


@pytest.mark.parametrize("mode", MODES)
def test_scale_invariance(mode):
    g = [{"w": _random((12, 20), i)} for i in range(3)]
    opt = rollfast.get("prism", learning_rate=1.0, mode=mode)
    params = {"w": jnp.zeros((12, 20))}
    base, _ = _steps(opt, g, params)
    scaled, _ = _steps(opt, [jax.tree.map(lambda x: 7.5 * x, x) for x in g], params)
    for a, b in zip(base, scaled):
        np.testing.assert_allclose(a["w"], b["w"], atol=2e-5)


def test_transposition_symmetry():
    """Where the maths implies it, Shape(Tᵀ, Dᵀ) = Shape(T, D)ᵀ: bidirectional
    with γ_L and γ_R swapped, original with γ = 0. Original with γ ≠ 0 is
    one-sided (not symmetric), but a leaf seen through MatrixSpec(1, 0) is
    updated exactly as its transpose through MatrixSpec(0, 1)."""
    t, d = _random((10, 16), 1), _random((10, 16), 2)
    pairs = [(lambda t, d: bidirectional.shape(t, d, gamma_l=0.5, gamma_r=2.0),
              lambda t, d: bidirectional.shape(t, d, gamma_l=2.0, gamma_r=0.5)),
             (lambda t, d: original.shape(t, d, gamma=0.0),) * 2]
    for fn, fn_t in pairs:
        np.testing.assert_allclose(fn_t(t.T, d.T), fn(t, d).T, atol=1e-5)
    assert not np.allclose(original.shape(t.T, d.T), original.shape(t, d).T, atol=1e-3)
    g = [{"w": _random((10, 16), i)} for i in range(2)]
    u, _ = _steps(rollfast.get("prism", learning_rate=1.0), g, {"w": jnp.zeros((10, 16))})
    ut, _ = _steps(rollfast.get("prism", learning_rate=1.0, partition="dimension_numbers",
                                dimension_numbers={"w": MatrixSpec(1, 0)}),
                   [{"w": x["w"].T} for x in g], {"w": jnp.zeros((16, 10))})
    for a, b in zip(u, ut):
        np.testing.assert_allclose(a["w"], b["w"].T, atol=1e-6)


# --------------------------------------------------------------- step pipeline
def test_first_step_momentum_and_first_moment():
    opt = rollfast.get("prism", learning_rate=0.1)
    params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros(5)}
    grads = {"w": _random((6, 5)), "b": jnp.ones(5)}
    _, state = opt.update(grads, opt.init(params), params)
    fm = rollfast_prism.first_moment(state.inner_state)
    np.testing.assert_allclose(fm["w"], 0.05 * grads["w"], rtol=1e-6)
    np.testing.assert_allclose(fm["b"], 0.1 * grads["b"], rtol=1e-6)


def test_spike_skip_and_permissive_clip():
    params = {"w": jnp.zeros((6, 5))}
    g = {"w": 100.0 * _random((6, 5))}
    strict = rollfast.get("prism", learning_rate=1.0, raw_global_grad_clip=1.0,
                          permissive_spike_protection=False)
    state = strict.init(params)
    u, new = strict.update(g, state, params)
    assert float(jnp.abs(u["w"]).max()) == 0.0
    # a skipped step leaves the PRISM state as it was (count, momentum and key), as
    # rollfast.toolbox.spike_guard / run_unless_skipped and the clip mask do
    prism_state = lambda s: s.inner_state.inner_states["prism"].inner_state[0]
    jax.tree.map(np.testing.assert_array_equal, prism_state(new), prism_state(state))
    loose = rollfast.get("prism", learning_rate=1.0, raw_global_grad_clip=1.0)
    u_loose, new = loose.update(g, loose.init(params), params)
    mu = new.inner_state.inner_states["prism"].inner_state[0].mu["w"]
    np.testing.assert_allclose(jnp.linalg.norm(mu), 0.05, rtol=1e-5)
    assert float(jnp.abs(u_loose["w"]).max()) > 0


def test_spike_norm_is_summed_over_axis_name():
    """Two identical replicas under ``axis_name``: the norm is √2·N, so a clip
    between N and √2·N fires only with the axis."""
    g = {"w": _random((6, 5))}
    norm = float(jnp.linalg.norm(g["w"]))
    batched = jax.tree.map(lambda x: jnp.stack([x, x]), g)
    for axis, fired in ((None, False), ("b", True)):
        tx = rollfast_prism.scale_by_prism(raw_global_grad_clip=1.2 * norm,
                                           permissive_spike_protection=False, axis_name=axis)
        state = tx.init(g)
        u, _ = jax.vmap(lambda x: tx.update(x, state), axis_name="b")(batched)
        assert bool(jnp.all(u["w"] == 0)) == fired


def test_non_finite_gradient_changes_nothing():
    params = mixed_tree()
    opt = rollfast.get("prism", learning_rate=0.1, mode="bidirectional", nonfinite="propagate")
    state = opt.init(params)
    update = jax.jit(opt.update)
    good = jax.tree.map(lambda p: jnp.ones_like(p) if p is not None else None, params)
    _, state = update(good, state, params)
    for leaf, index in (("bias", 0), ("matrix", (0, 0))):
        for bad in (jnp.nan, jnp.inf):
            poisoned = dict(good, **{leaf: good[leaf].at[index].set(bad)})
            u, new = update(poisoned, state, params)
            assert not any(bool(jnp.any(x)) for x in jax.tree.leaves(u))
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new, state)


def test_weight_decay_on_both_paths_with_mask():
    params = {"w": jnp.ones((6, 5)), "b": jnp.ones(5), "v": jnp.ones(5)}
    zero = jax.tree.map(jnp.zeros_like, params)
    opt = rollfast.get("prism", learning_rate=0.5, weight_decay=0.1,
                       weight_decay_mask={"w": True, "b": True, "v": False})
    u, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(u["w"], -0.05 * np.ones((6, 5)), rtol=1e-6)
    np.testing.assert_allclose(u["b"], -0.05 * np.ones(5), rtol=1e-6)
    np.testing.assert_allclose(u["v"], np.zeros(5))


def test_jit_equals_eager_on_a_mixed_tree():
    """Scalars, vectors, a matrix, a 4-D kernel, None and an int leaf."""
    params = mixed_tree()
    grads = jax.tree.map(lambda p: jnp.cos(p) if p is not None else None, params)
    grads["count"] = jnp.zeros(3, jnp.int32)
    opt = rollfast.get("prism", learning_rate=0.1)
    eager, _ = opt.update(grads, opt.init(params), params)
    jitted, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    assert eager["nothing"] is None and not jnp.any(eager["count"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), eager, jitted)
    assert float(jnp.abs(eager["conv"]).max()) > 0 and float(jnp.abs(eager["scalar"])) > 0


def test_update_needs_params():
    """As in rollfast 0.2: weight decay (here the fallback's) needs ``params``."""
    grads = {"w": _random((6, 5)), "b": jnp.ones(5)}
    opt = rollfast.get("prism", learning_rate=0.1)
    with pytest.raises(ValueError, match="params"):
        opt.update(grads, opt.init(grads))


@pytest.mark.parametrize("mode", MODES)
def test_scanned_leaves_equal_separate_leaves(mode):
    stack = _random((3, 8, 12))
    grads_sep = [{f"l{i}": stack[i] * (k + 1) + k for i in range(3)} for k in range(3)]
    grads_stack = [{"s": jnp.stack([g[f"l{i}"] for i in range(3)])} for g in grads_sep]
    opt_sep = rollfast.get("prism", learning_rate=1.0, mode=mode)
    opt_stack = rollfast.get("prism", learning_rate=1.0, mode=mode, partition="dimension_numbers",
                             dimension_numbers={"s": MatrixSpec(1, 2)})
    sep, _ = _steps(opt_sep, grads_sep, jax.tree.map(jnp.zeros_like, grads_sep[0]))
    stk, _ = _steps(opt_stack, grads_stack, {"s": jnp.zeros((3, 8, 12))})
    for a, b in zip(sep, stk):
        for i in range(3):
            np.testing.assert_allclose(b["s"][i], a[f"l{i}"], atol=2e-6)


def test_bfloat16_params_and_momentum():
    target = {"w": (_random((8, 6)) / 2).astype(jnp.bfloat16), "b": jnp.full((6,), -0.5, jnp.bfloat16)}
    params = jax.tree.map(jnp.zeros_like, target)
    loss = quadratic_loss(target)
    for mode, rounding in zip(MODES, ("nearest", "stochastic")):
        opt = rollfast.get("prism", learning_rate=0.1, mode=mode, mu_dtype=jnp.bfloat16, round=rounding)
        new, state, losses = run(opt, params, loss, 30)
        assert new["w"].dtype == jnp.bfloat16
        mus = jax.tree.leaves(rollfast_prism.first_moment(state.inner_state))
        assert len(mus) == 2 and {x.dtype for x in mus} == {jnp.dtype(jnp.bfloat16)}
        assert losses[-1] < 0.1 * losses[0], (mode, rounding, losses[-1])


def test_sharded_equals_unsharded():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    shard = lambda spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    params = {"w": _random((32, 16)), "b": jnp.zeros(32)}
    loss = lambda p: jnp.sum(jnp.tanh(p["w"] @ p["w"].T) ** 2) + jnp.sum((p["b"] - 1) ** 2)
    for mode in MODES:
        opt = rollfast.get("prism", learning_rate=0.05, mode=mode)
        plain, _, _ = run(opt, params, loss, 2)
        sharded = {"w": jax.device_put(params["w"], shard(("d", None))),
                   "b": jax.device_put(params["b"], shard(("d",)))}
        got, _, _ = run(opt, sharded, loss, 2)
        assert len(got["w"].sharding.device_set) == 8
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, plain)


def test_beats_tuned_adamw_on_the_mlp_problem():
    """50 steps; adamw tuned over {0.03, 0.1, 0.3} (best: 0.1, loss ≈ 0.020);
    prism lr 0.2 (fallback at the same lr): original ≈ 0.0053, bidirectional ≈ 0.0046."""
    params, loss = mlp_problem()
    best_adamw = min(run(optax.adamw(lr), params, loss, 50)[2][-1] for lr in (0.03, 0.1, 0.3))
    for mode in MODES:
        final = run(rollfast.get("prism", learning_rate=0.2, mode=mode), params, loss, 50)[2][-1]
        assert final < 0.5 * best_adamw, (mode, final, best_adamw)


# --------------------------------------------------------------- the stages one by one
@pytest.mark.parametrize("nesterov, shape_nesterov, bias_correction", [
    (True, True, False), (True, True, True), (False, True, False), (False, True, True),
    (True, False, True), (False, False, False)])
def test_target_stage(nesterov, shape_nesterov, bias_correction):
    """T = b1·M/(1−b1^{t+1}) + (1−b1)·g/(1−b1^t) with Nesterov and bias correction; the
    corrections drop without bias correction; M (corrected or not) without Nesterov; M
    itself when the Nesterov blend is done after shaping instead."""
    b1, t = 0.9, 3.0
    m, g = _random((4, 3), 1), _random((4, 3), 2)
    opts = PrismOptions(b1=b1, nesterov=nesterov, shape_nesterov=shape_nesterov,
                        bias_correction=bias_correction)
    c_next, c_now = (1 - b1 ** (t + 1), 1 - b1**t) if bias_correction else (1.0, 1.0)
    m64, g64 = np.asarray(m, np.float64), np.asarray(g, np.float64)
    if not shape_nesterov:
        expected = m64
    elif nesterov:
        expected = b1 * m64 / c_next + (1 - b1) * g64 / c_now
    else:
        expected = m64 / c_now
    np.testing.assert_allclose(transform.target(m, g, jnp.float32(t), opts), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(transform.momentum(m, g, b1), b1 * m64 + (1 - b1) * g64, rtol=1e-6)


def test_shape_matrix_blends_then_clips_like_the_toolbox():
    """O = Shape(T, D), blended with g when Nesterov is not shaped, then the rms cap a
    and the element cap e of rollfast.toolbox.update_clipper (float64 check)."""
    t, g = 5.0 * _random((6, 4), 1), _random((6, 4), 2)
    opts = PrismOptions(b1=0.8, nesterov=True, shape_nesterov=False, shape=lambda t, d: 2 * t,
                        clip=update_clipper("per_tensor_rms", (1.0, 1.5)))
    o = 0.8 * 2 * np.asarray(t, np.float64) + 0.2 * np.asarray(g, np.float64)
    o = np.clip(o * min(1.0, 1.0 / np.sqrt(np.mean(o**2))), -1.5, 1.5)
    np.testing.assert_allclose(transform.shape_matrix(t, None, g, opts), o, rtol=1e-5)
    assert float(jnp.abs(o).max()) == 1.5  # both caps were active


def test_shape_leaf_clips_each_matrix_of_a_stack_on_its_own():
    """The rms cap applies per matrix of the view: a quiet layer next to a loud one
    keeps its own scale (a per-leaf cap would shrink it too)."""
    opts = PrismOptions(shape=lambda t, d: t, clip=update_clipper("per_tensor_rms", (1.0, 10.0)))
    quiet, loud = 0.1 * _random((5, 4), 1), 50.0 * _random((5, 4), 2)
    zeros = jnp.zeros((2, 5, 4))
    out = transform.shape_leaf(MatrixSpec(1, 2), jnp.stack([quiet, loud]), zeros, zeros, opts)
    np.testing.assert_allclose(out[0], quiet, rtol=1e-6)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(out[1] ** 2)), 1.0, rtol=1e-5)


def test_decay_terms_follow_mask_and_schedule():
    """λ_t·θ on masked-in matrix leaves, λ_t = weight_decay(count) with the count before
    the step; nothing without decay; an error naming params when they are missing."""
    params = {"a": jnp.full((2, 2), 2.0), "b": jnp.ones((2, 2)), "v": jnp.ones(2)}
    specs = {"a": MatrixSpec(), "b": MatrixSpec(), "v": None}
    treedef = jax.tree.structure(specs, is_leaf=lambda s: s is None or isinstance(s, MatrixSpec))
    opts = PrismOptions(weight_decay=lambda c: 0.1 * c, weight_decay_mask={"a": True, "b": False, "v": True})
    terms = transform.decay_terms(params, [0, 1], treedef, jnp.int32(3), opts)
    np.testing.assert_allclose(terms[0], 0.6 * np.ones((2, 2)), rtol=1e-6)
    assert terms[1] is None and terms[2] is None
    assert transform.decay_terms(None, [0, 1], treedef, 0, PrismOptions()) == [None] * 3
    with pytest.raises(ValueError, match="needs params"):
        transform.decay_terms(None, [0, 1], treedef, 0, PrismOptions(weight_decay=0.1))


def test_a_skipped_spike_leaves_the_count_for_the_next_step():
    """permissive_spike_protection=False: the skipped step changes no state, so with
    bias correction the next step equals the first step of a fresh optimizer."""
    g = {"w": _random((6, 5))}
    tx = rollfast_prism.scale_by_prism(raw_global_grad_clip=10.0, permissive_spike_protection=False,
                                       bias_correction=True)
    state = tx.init(g)
    u, skipped = tx.update(jax.tree.map(lambda x: 100 * x, g), state)
    assert not bool(jnp.any(u["w"])) and int(skipped.count) == 0
    np.testing.assert_array_equal(tx.update(g, skipped)[0]["w"], tx.update(g, state)[0]["w"])


def test_shape_fn_binds_only_declared_options():
    seen = {}

    def mode(t, d, *, gamma, inv_eps=None):
        seen.update(gamma=gamma, inv_eps=inv_eps)
        return t

    transform.shape_fn(mode, {"gamma": 0.5, "ns_iters": 3, "inv_eps": 1e-3})(jnp.ones(1), jnp.ones(1))
    assert seen == {"gamma": 0.5, "inv_eps": 1e-3}
    assert transform.shape_fn("original", {"gamma": 0.0, "ns_iters": 5})(jnp.eye(2), jnp.eye(2)).shape == (2, 2)


# --------------------------------------------------------------- options and errors
def test_bad_options_are_errors():
    with pytest.raises(ValueError, match=r"b1=1.0 is not allowed by family 'prism' \(prism\): allowed is a number in \[0, 1\)"):
        rollfast.get("prism", learning_rate=0.1, b1=1.0)
    with pytest.raises(ValueError, match="gamma must be"):
        rollfast.get("prism", learning_rate=0.1, gamma=-1.0)
    with pytest.raises(TypeError, match="ns_iters=2.5 is not allowed by family 'prism'.*an integer"):
        rollfast.get("prism", learning_rate=0.1, ns_iters=2.5)
    with pytest.raises(ValueError, match="grad_clip_max_amps"):
        rollfast.get("prism", learning_rate=0.1, grad_clip_max_amps=(1, 2, 3))
    with pytest.raises(TypeError, match="fallback must be a family name"):
        rollfast.get("prism", learning_rate=0.1, fallback=optax.sgd(0.1))
    with pytest.raises(rollfast.UnknownNameError, match="did you mean 'bidirectional'"):
        rollfast.get("prism", learning_rate=0.1, mode="bidirectionl")


def test_clip_amp_forms():
    """``None`` leaves the shaped update as it is (RMS ≈ 0.038 here); an RMS cap below it
    scales the update to exactly that RMS; an element cap clips it elementwise."""
    g = {"w": 50.0 * _random((6, 5))}

    def update(amps):
        opt = rollfast.get("prism", learning_rate=1.0, grad_clip_max_amps=amps)
        return np.asarray(opt.update(g, opt.init(g), g)[0]["w"], np.float64)

    rms = lambda u: np.sqrt(np.mean(u**2))
    free = update(None)
    assert 0.03 < rms(free) < 0.05
    np.testing.assert_array_equal(free, update((1e9, 1e9)))
    np.testing.assert_allclose(update(0.02), free * 0.02 / rms(free), rtol=1e-6)
    assert rms(update(0.02)) == pytest.approx(0.02, rel=1e-6)
    np.testing.assert_allclose(update((1.0, 0.01)), np.clip(free, -0.01, 0.01), rtol=1e-6)
    assert np.max(np.abs(free)) > 0.05


def test_fallback_is_a_registry_family_with_its_own_options():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    g = {"w": _random((4, 3)), "b": jnp.array([1.0, -2.0, 0.5])}
    opt = rollfast.get("prism", learning_rate=1.0, fallback="adam", adam_learning_rate=0.25)
    u, _ = opt.update(g, opt.init(params), params)
    np.testing.assert_allclose(u["b"], -0.25 * np.sign(g["b"]), rtol=1e-5)
    with pytest.raises(rollfast.UnknownNameError, match="did you mean .*'adam'"):
        rollfast.get("prism", learning_rate=1.0, fallback="adamx")


def test_scale_by_prism_standalone_and_compat_names():
    tx = rollfast_prism.scale_by_prism(mode="bidirectional", mu_dtype=jnp.bfloat16, round="stochastic",
                                       weight_dimension_numbers={"w": MatrixSpec(1, 0), "b": None})
    g = {"w": _random((5, 4)), "b": jnp.ones(4)}
    u, state = jax.jit(tx.update)(g, tx.init(g))
    assert state.mu["b"] is None and state.mu["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(u["b"], g["b"])
    assert isinstance(state, rollfast_prism.ScaleByPrismState)
    fn = rollfast.registry().lookup("mode", "bidirectional", "prism").impl["shape"]
    assert fn is bidirectional.shape
    assert "Yang" in rollfast.registry().lookup("family", "prism").references[0]
