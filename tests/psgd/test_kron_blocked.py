"""kron with ``block_size``: the tile rules, exact padding, tile independence for every
registered mode, and convergence on a problem whose curvature is block diagonal."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rollfast
from rollfast_psgd import KronState, scale_by_kron
from rollfast_psgd.blocking import Tiling, matrix_view, piece_rule
from rollfast_psgd.factors import UpdateConfig, mode_spec, update_factors

MODES = [r.name for r in rollfast.available("mode", family="kron")]
# Every mode runs the tile tests (tile independence, padding) in the slow tier (`make test-all`); the default and the
# triangular one (EQ) on every run.
tier = lambda mode: () if mode in ("Q0.5EQ1.5", "EQ") else (pytest.mark.slow,)
EXACT = dict(preconditioner_update_probability=1.0, preconditioner_init_scale=1.0,
             grad_clip_max_amps=(1e9, 1e9))


def _tiles_of(x, bs):
    """The ``bs × bs`` tiles of a matrix with sides multiple of ``bs``, row-major."""
    m, n = x.shape
    return [x[i:i + bs, j:j + bs] for i in range(0, m, bs) for j in range(0, n, bs)]


@pytest.mark.parametrize("shape, scanned", [((300, 700), False), ((2, 300, 700), True), ((64, 3000), False),
                                            ((3000, 40), False), ((2000, 2100), False), ((4, 8, 300), False),
                                            ((100, 90), False), ((17,), False), ((), False)])
def test_block_then_unblock_is_the_identity(shape, scanned):
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    tiling = Tiling([shape], [(scanned, (True,) * 2)], block_size=128, max_size_dense=1000, stack_multiple=4)
    units = tiling.split([x])
    assert bool((tiling.join(units, [x])[0] == x).all())
    if tiling.stacked:  # padding is zero and filler tiles are zero
        assert units[0].shape[0] % 4 == 0
        assert float(jnp.sum(jnp.abs(units[0]))) == pytest.approx(float(jnp.sum(jnp.abs(x))), rel=1e-5)


def test_tile_rules():
    assert [piece_rule(matrix_view(s), 256, 16384) for s in
            [(4096, 11008), (32000, 4096), (40000, 20000), (256, 256), (4096,), (8, 64, 64)]] == \
        ["tiles", "cols", "diag", "whole", "whole", "tiles"]
    state = scale_by_kron(block_size=128, max_size_dense=1000).init({"a": jnp.zeros((64, 3000)),
                                                                     "b": jnp.zeros((3000, 40))})
    (ql, qr), (pl, pr) = state.qs.units
    assert (ql.shape, qr.shape, pl.shape, pr.shape) == ((1, 128, 128), (1, 3000), (1, 3000), (1, 128, 128))


def test_at_most_block_size_is_the_unblocked_result_exactly():
    params = {"w": jnp.zeros((100, 120)), "b": jnp.zeros(7), "c": jnp.zeros((3, 4, 5))}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
    outs = []
    for block in (None, 128):
        tx = scale_by_kron(block_size=block, preconditioner_update_probability=1.0)
        state, step = tx.init(params), jax.jit(tx.update)
        for _ in range(4):
            u, state = step(grads, state)
        outs.append((u, state.mu, jax.tree.leaves(state.qs)))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mode", [pytest.param(m, marks=tier(m)) for m in MODES])
def test_every_mode_blocked_equals_each_tile_as_its_own_leaf(mode):
    """A 96×64 leaf at block 32 and its six tiles as separate leaves draw the same
    probes (the six leaves are fitted as one stacked unit of the same shape), so the
    runs agree; the clip is off because it is per leaf (per tile in the second run)."""
    g = jax.random.normal(jax.random.PRNGKey(0), (96, 64)) * jnp.linspace(0.1, 3.0, 64)
    blocked = scale_by_kron(block_size=32, mode=mode, **EXACT)
    tiles = scale_by_kron(mode=mode, **EXACT)
    sb, st = blocked.init({"w": g}), tiles.init(_tiles_of(g, 32))
    step_b, step_t = jax.jit(blocked.update), jax.jit(tiles.update)
    for k in range(3):
        gk = g * (1 + 0.1 * k)
        ub, sb = step_b({"w": gk}, sb)
        ut, st = step_t(_tiles_of(gk, 32), st)
        np.testing.assert_allclose(np.asarray(_tiles_of(ub["w"], 32)), np.asarray(ut), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sb.qs.stack.left), np.asarray([q[0] for q in st.qs]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", [pytest.param(m, marks=tier(m)) for m in MODES])
def test_padded_tile_moves_as_its_valid_block(mode):
    """Stage level: a 44×60 tile padded to 128×128 (zero padding, ``valid``) and the
    unpadded 44×60 leaf, given the same probes on the valid block, move the same way."""
    spec = mode_spec(rollfast.registry().lookup("mode", mode, family="kron").impl)
    cfg = UpdateConfig(spec, 0.1, 0.9, True, 1e-9, 5)
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    h = jax.random.normal(keys[0], (44, 60))
    v = jax.random.normal(keys[1], (44, 60))
    probes = [jax.random.normal(keys[2], (2, 32, 44)), jax.random.normal(keys[3], (2, 32, 60))]
    eye = [jnp.eye(44) * 1.3, jnp.eye(60) * 0.8]
    small = update_factors(eye, [jnp.float32(0.5)] * 2, h, v, probes, True, cfg)
    pad = lambda x, shape: jnp.zeros(shape).at[tuple(slice(0, d) for d in x.shape)].set(x)
    big = update_factors([pad(q, (128, 128)) for q in eye], [jnp.float32(0.5)] * 2, pad(h, (128, 128)),
                         pad(v, (128, 128)), [pad(p, (2, 32, 128)) for p in probes], True, cfg,
                         valid=(jnp.int32(44), jnp.int32(60)))
    for i, d in enumerate((44, 60)):
        np.testing.assert_allclose(np.asarray(big[0][i][:d, :d]), np.asarray(small[0][i]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(big[2][i][:d, :d]), np.asarray(small[2][i]), rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(big[0][i][d:]).max()) == 0.0 and float(jnp.abs(big[0][i][:, d:]).max()) == 0.0
        np.testing.assert_allclose(float(big[1][i]), float(small[1][i]), rtol=1e-5)


@pytest.mark.parametrize("mode, shape, block", [pytest.param(m, (75, 175), 32, marks=tier(m)) for m in MODES]
                         + [("Q0.5EQ1.5", (300, 700), 128)])
def test_padding_stays_zero_and_output_is_finite(mode, shape, block):
    """Edge tiles (e.g. 300×700 at block 128: valid 44×60) and a row strip (100 valid rows
    of 128 when ``block=128``) keep exact zeros on their padding through five updates."""
    x = jax.random.normal(jax.random.PRNGKey(2), shape)
    params = {"w": jnp.zeros(shape), "strip": jnp.zeros((100, 1500))}
    grads = {"w": x, "strip": jax.random.normal(jax.random.PRNGKey(4), (100, 1500))}
    tx = scale_by_kron(block_size=block, max_size_dense=1000, mode=mode, preconditioner_update_probability=1.0)
    state, step = tx.init(params), jax.jit(tx.update)
    for _ in range(5):
        u, state = step(grads, state)
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(u))
    tiling = Tiling([shape], [(False, (True, True))], block_size=block, max_size_dense=1000)
    rows, cols = tiling.valid[0]
    for side, valid in ((state.qs.stack.left, rows), (state.qs.stack.right, cols)):
        side = np.asarray(side)
        for q, r in zip(side, valid):
            assert not q[r:].any() and not q[:, r:].any()
            assert np.isfinite(q[:r, :r]).all() and np.abs(np.diag(q[:r, :r])).min() > 0
    strip_left, valid = np.asarray(state.qs.units[0][0]), -(-100 // block) * block - 100
    assert strip_left.shape[1:] == (block, block)
    assert not strip_left[-1, block - valid:].any() and not strip_left[-1, :, block - valid:].any()


def test_options_are_checked():
    with pytest.raises(ValueError, match="block_size must be None or an int >= 1, got 0"):
        scale_by_kron(block_size=0)
    with pytest.raises(ValueError, match="tile_stack_multiple must be an int >= 1, got 2.5"):
        scale_by_kron(block_size=8, tile_stack_multiple=2.5)


def _spd(key, d, cond):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, d)))
    return (q * jnp.geomspace(1.0, 1.0 / cond, d)) @ q.T


def block_diagonal_least_squares(bs=128):
    """``½ tr((W−W*)ᵀ A (W−W*) B)``, W 384×256: Hessian ``B ⊗ A`` of condition 1e4 with
    ``A``, ``B`` block diagonal of random SPD ``bs`` blocks (condition 100 each)."""
    k = jax.random.split(jax.random.PRNGKey(0), 7)
    a = jax.scipy.linalg.block_diag(*[_spd(k[i], bs, 100.0) for i in range(3)])
    b = jax.scipy.linalg.block_diag(*[_spd(k[3 + i], bs, 100.0) for i in range(2)])
    w_star = jax.random.normal(k[6], (384, 256))
    return (lambda w: 0.5 * jnp.sum((w - w_star) * (a @ (w - w_star) @ b))), w_star


def relative_error(opt, loss, w_star, steps=300):
    """``‖W − W*‖ / ‖W*‖`` after ``steps`` steps from zero (one jitted scan)."""
    def step(carry, _):
        w, s = carry
        u, s = opt.update(jax.grad(loss)(w), s, w)
        return (w + u, s), None

    w0 = jnp.zeros_like(w_star)
    (w, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))((w0, opt.init(w0)))
    return float(jnp.linalg.norm(w - w_star) / jnp.linalg.norm(w_star))


def test_blocked_kron_converges_like_kron_on_block_diagonal_curvature():
    loss, w_star = block_diagonal_least_squares()
    kron = relative_error(rollfast.get("kron", learning_rate=0.03), loss, w_star)
    blocked = relative_error(rollfast.get("kron", learning_rate=0.03, block_size=128), loss, w_star)
    adam = min(relative_error(optax.adam(lr), loss, w_star) for lr in (0.1, 0.3, 1.0, 3.0))
    assert blocked <= 2 * kron, (blocked, kron)
    assert 10 * blocked <= adam, (blocked, adam)


def test_normalize_grads_and_adam_lr_style():
    """``normalize_grads`` makes the step invariant to the gradient's scale; ``lr_style="adam"``
    is the plain update (same draws) times ``min(1, 1.1/rms)/5``: a fifth of it at RMS 0.09,
    capped to RMS 0.22 from a large initial preconditioner."""
    g = {"w": jax.random.normal(jax.random.PRNGKey(5), (40, 30)) * jnp.linspace(0.1, 5.0, 30)}

    txs = {style: scale_by_kron(normalize_grads=True, lr_style=style, preconditioner_init_scale=1.0,
                                preconditioner_update_probability=1.0) for style in ("adam", None)}
    steps = {style: jax.jit(tx.update) for style, tx in txs.items()}

    def third_update(scale, lr_style, init_scale=1.0):
        state = txs[lr_style].init(g)
        state = state._replace(qs=jax.tree.map(lambda q: q * init_scale**0.5, state.qs))  # two factors
        for _ in range(3):
            u, state = steps[lr_style](jax.tree.map(lambda x: x * scale, g), state)
        return np.asarray(u["w"], np.float64)

    rms = lambda u: np.sqrt(np.mean(u**2))
    adam, plain = third_update(1.0, "adam"), third_update(1.0, None)
    np.testing.assert_allclose(adam, third_update(1e3, "adam"), rtol=1e-4, atol=1e-7)
    assert 0.05 < rms(plain) < 1.1
    np.testing.assert_allclose(adam, plain / 5, rtol=1e-6)
    adam, plain = third_update(1.0, "adam", init_scale=100.0), third_update(1.0, None, init_scale=100.0)
    assert rms(plain) > 1.1
    np.testing.assert_allclose(adam, plain * 1.1 / rms(plain) / 5, rtol=1e-5)
    assert rms(adam) == pytest.approx(0.22, rel=1e-5)
    with pytest.raises(ValueError, match="lr_style must be one of \\(None, 'adam'\\), got 'sgd'"):
        scale_by_kron(lr_style="sgd")


def test_scanned_layers_join_the_stack_like_separate_leaves():
    """A scanned ``(3, 80, 50)`` leaf at block 32 and its three layers as separate leaves
    give the same tile stack (layer by layer), hence the same run."""
    g = jax.random.normal(jax.random.PRNGKey(6), (3, 80, 50))
    kwargs = dict(block_size=32, preconditioner_update_probability=1.0, grad_clip_max_amps=(1e9, 1e9))
    scanned = scale_by_kron(scanned_layers={"w": True}, **kwargs)
    separate = scale_by_kron(**kwargs)
    s1, s2 = scanned.init({"w": g}), separate.init([x for x in g])
    for k in range(2):
        u1, s1 = jax.jit(scanned.update)({"w": g * (1 + k)}, s1)
        u2, s2 = jax.jit(separate.update)([x * (1 + k) for x in g], s2)
    np.testing.assert_allclose(np.asarray(u1["w"]), np.asarray(jnp.stack(u2)), rtol=1e-5, atol=1e-6)
    assert s1.qs.stack.left.shape == (3 * 3 * 2, 32, 32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_tree_trains_under_jit(dtype):
    """Scalar, vector, 6×5 matrix, 3×3×2×4 kernel (viewed as 9×8), None, int and empty
    leaves at block 4, bf16 factors and momentum: the loss falls and nothing is NaN."""
    from rollfast.testing import mixed_tree, quadratic_loss, run
    params = dict(mixed_tree(dtype), empty=jnp.zeros((0, 9), dtype))
    opt = rollfast.get("kron", learning_rate=0.05, block_size=4, preconditioner_update_probability=1.0,
                       mu_dtype=jnp.bfloat16, precond_dtype=jnp.bfloat16)
    target = dict(mixed_tree(dtype, seed=1), empty=params["empty"])
    _, state, losses = run(opt, params, quadratic_loss(target), 40)
    assert losses[-1] < 0.2 * losses[0]
    kron = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, KronState))
            if isinstance(s, KronState)][0]
    assert kron.qs.stack.left.dtype == jnp.bfloat16
    assert all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in jax.tree.leaves(kron.qs))
