"""The claims of the contrib optimizers' papers that a test can check, and
convergence on problems with known minima."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import rollfast
import rollfast.testing as rt

# Families with the options that pick their variants.
VARIANTS = {
    "soap": {}, "mars": {}, "mars-lion": {"variant": "lion"}, "qhadamw": {}, "normuon": {},
    "apollo": {"rank": 4}, "apollo-mini": {"variant": "mini"}, "adamw8bit": {"min_8bit_size": 0, "block_size": 16},
}
LEARNING_RATE = {"mars-lion": 0.01, "apollo-mini": 0.01}


def build(variant, **options):
    name = variant.split("-")[0]
    return rollfast.get(name, **{"learning_rate": LEARNING_RATE.get(variant, 0.05),
                                 **VARIANTS[variant], **options})


def updates_of(opt, params, grads):
    state = opt.init(params)
    update = jax.jit(opt.update)
    out = []
    for g in grads:
        u, state = update(g, state, params)
        out.append(u)
    return out


def small_grads(steps, shapes={"v": (5,), "m": (4, 3)}, scale=0.05):
    keys = jax.random.split(jax.random.PRNGKey(3), steps)
    return [{k: scale * jax.random.normal(jax.random.fold_in(key, i), s) for i, (k, s) in enumerate(shapes.items())}
            for key in keys]


def axis_aligned_quadratic(rows=16, cols=8, condition=1e4, seed=0):
    """``½ Σ_ij h_i (W − W*)_ij²`` with ``h`` log-spaced over ``[1, condition]``: a
    diagonal preconditioner (Adam's) removes the ill-conditioning, plain SGD cannot."""
    rng = np.random.default_rng(seed)
    h = jnp.asarray(np.logspace(0, np.log10(condition), rows), jnp.float32)[:, None]
    target = jnp.asarray(rng.standard_normal((rows, cols)), jnp.float32)
    return {"w": jnp.zeros((rows, cols))}, lambda p: 0.5 * jnp.sum(h * (p["w"] - target) ** 2)


@pytest.fixture(scope="module")
def tuned_sgd():
    """The best final loss of plain SGD over a learning-rate grid up to its stability
    limit 2/h_max (about 150 from 7e4 after 200 steps)."""
    params, loss = axis_aligned_quadratic()
    return min(rt.run(optax.sgd(lr), params, loss, 200)[2][-1] for lr in (1e-5, 3e-5, 1e-4, 1.9e-4))


# The diagonally adaptive variants, at a learning rate of their own (final losses measured:
# mars 0.02, qhadamw 0.25, apollo 0, apollo-mini 0.45, adamw8bit 2e-5).
ADAPTIVE_LR = {"mars": 0.03, "qhadamw": 0.1, "apollo": 0.3, "apollo-mini": 0.003, "adamw8bit": 0.3}


@pytest.mark.parametrize("variant", sorted(ADAPTIVE_LR))
def test_beats_tuned_sgd_on_an_axis_aligned_ill_conditioned_quadratic(variant, tuned_sgd):
    """Condition 1e4 along rows, 200 steps: at least 100× below the best plain SGD."""
    params, loss = axis_aligned_quadratic()
    opt = rollfast.get(variant.split("-")[0], **{**VARIANTS[variant], "learning_rate": ADAPTIVE_LR[variant],
                                                 "weight_decay": 0.0})
    final = rt.run(opt, params, loss, 200)[2][-1]
    assert final < tuned_sgd / 100, (final, tuned_sgd)


def kronecker_quadratic(rotated, dim=8, condition=1e4, seed=0):
    """``½ tr((W−T)ᵀ A (W−T) B)``, a Hessian ``A ⊗ B`` of condition ``condition``
    (eigenvalues log-spaced), with ``A, B`` in random orthogonal bases ``Q_A, Q_B``
    (``rotated``, the problem of ``rollfast.testing.ill_conditioned_quadratic``) or
    diagonal: the same problem seen in the coordinates ``Q_Aᵀ W Q_B``, so the start
    ``W = 0`` and every loss are the same."""
    rng = np.random.default_rng(seed)
    bases = [np.linalg.qr(rng.standard_normal((dim, dim)))[0] for _ in range(2)]
    eig = np.logspace(0, np.log10(condition) / 2, dim)
    a, b = ((q * eig) @ q.T if rotated else np.diag(eig) for q in bases)
    target = rng.standard_normal((dim, dim))
    target = target if rotated else bases[0].T @ target @ bases[1]
    a, b, target = (jnp.asarray(x, jnp.float32) for x in (a, b, target))

    def loss(p):
        d = p["w"] - target
        return 0.5 * jnp.sum(d * (a @ d @ b))

    return {"w": jnp.zeros((dim, dim))}, loss


def test_soap_does_not_depend_on_the_basis_where_adam_does():
    """SOAP is Adam in the eigenbasis of its Kronecker factors, which turn with the
    parameters: rotating both sides of the matrix leaves it the same algorithm (in exact
    arithmetic; in float32 the first real step's rounding noise differs, so the finals
    differ by a small factor, measured 0.53 rotated, 0.80 diagonal at lr 0.1). Adam
    is diagonal: on the diagonal problem it solves each coordinate (final loss ~3e-6),
    on the rotated one it does 1e5× worse (0.25 at its best lr). From 1.03e4, 200 steps.

    SOAP does not beat tuned Adam on the rotated problem: heavyball's SOAP with the same
    options (betas 0.95, refresh every 10 steps, no decay) ends at 0.58 at its best lr
    (0.1) and ours at 0.53; tuned Adam reaches 0.25 (docs/references.md)."""
    soap = rollfast.get("soap", learning_rate=0.1, weight_decay=0.0)
    final = {}
    for rotated in (True, False):
        params, loss = kronecker_quadratic(rotated)
        final["soap", rotated] = rt.run(soap, params, loss, 200)[2][-1]
        final["adam", rotated] = min(rt.run(optax.adam(lr), params, loss, 200)[2][-1] for lr in (0.1, 0.3, 1.0))
    assert final["soap", True] < 2.0 and 1 / 3 < final["soap", True] / final["soap", False] < 3, final
    assert final["adam", False] < 1e-3 * final["adam", True], final


def test_mars_with_gamma_zero_is_adamw():
    """γ = 0 makes the corrected gradient the gradient; with every leaf's norm under
    the clipping threshold (checked) MARS is AdamW. Tolerance: float32 rounding,
    rtol 1e-6 plus atol 1e-9 for elements where the direction and the decay cancel
    (XLA fuses the two computations differently, so they are not bit-identical)."""
    grads = small_grads(20)
    assert all(float(jnp.linalg.norm(x)) < 1 for g in grads for x in jax.tree.leaves(g))
    params = {"v": jnp.ones(5), "m": jnp.ones((4, 3))}
    mars = rollfast.get("mars", learning_rate=0.01, gamma=0.0, weight_decay=0.1)
    adamw = optax.adamw(0.01, b1=0.95, b2=0.99, eps=1e-8, weight_decay=0.1)
    for a, b in zip(updates_of(mars, params, grads), updates_of(adamw, params, grads)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), a, b)


def test_mars_gamma_zero_unclipped_lion_is_lion():
    grads = small_grads(10, scale=3.0)
    params = {"v": jnp.ones(5), "m": jnp.ones((4, 3))}
    mars = rollfast.get("mars", learning_rate=0.01, gamma=0.0, variant="lion", max_grad_norm=None,
                        weight_decay=0.0)
    lion = optax.lion(0.01, b1=0.95, b2=0.95, weight_decay=0.0)  # b1 = b2: interpolation and momentum coincide
    for a, b in zip(updates_of(mars, params, grads), updates_of(lion, params, grads)):
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def test_mars_correction_changes_the_step():
    grads = small_grads(3)
    params = {"v": jnp.ones(5), "m": jnp.ones((4, 3))}
    a = updates_of(rollfast.get("mars", learning_rate=0.01), params, grads)
    b = updates_of(rollfast.get("mars", learning_rate=0.01, gamma=0.0), params, grads)
    np.testing.assert_array_equal(a[0]["m"], b[0]["m"])  # no previous gradient at step 1
    assert not np.allclose(a[1]["m"], b[1]["m"])


def test_qhadamw_with_nu_one_is_adamw():
    """ν1 = ν2 = 1 reduces QHAdam to Adam; tolerance: float32 rounding (rtol 1e-6, atol 1e-9)."""
    grads = small_grads(20, scale=1.0)
    params = {"v": jnp.ones(5), "m": jnp.ones((4, 3))}
    qh = rollfast.get("qhadamw", learning_rate=0.01, nu1=1.0, nu2=1.0, weight_decay=0.1)
    adamw = optax.adamw(0.01, b1=0.995, b2=0.999, eps=1e-8, weight_decay=0.1)
    for a, b in zip(updates_of(qh, params, grads), updates_of(adamw, params, grads)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), a, b)


@pytest.mark.parametrize("block_size", [2048, 256])
def test_adamw8bit_state_is_a_quarter_of_adamw(block_size):
    params = {"a": jnp.zeros((512, 256)), "b": jnp.zeros((300, 100)), "c": jnp.zeros(64)}
    ours = rt.tree_bytes(rollfast.get("adamw8bit", learning_rate=1e-3, block_size=block_size).init(params))
    f32 = rt.tree_bytes(optax.adamw(1e-3).init(params))
    assert ours <= 0.3 * f32, ours / f32


@pytest.fixture(scope="module")
def mlp_adamw_losses():
    params, loss = rt.mlp_problem()
    return rt.run(optax.adamw(1e-2, weight_decay=1e-2), params, loss, 200)[2]


@pytest.mark.parametrize("block_size", [2048, 256])
def test_adamw8bit_trains_an_mlp_like_adamw(block_size, mlp_adamw_losses):
    """Every leaf quantised (``min_8bit_size=0``): the loss after 200 steps is at most
    2 % above float32 AdamW's. (It is in fact 15–40 % *lower* on this task at learning
    rates 1e-3…1e-2: rounding the second moment to the 8-bit grid drops most of the
    small increments (1−β2)g², which keeps v lower and the steps larger; float32
    moments alone, ``min_8bit_size`` large, reproduce AdamW exactly.)"""
    params, loss = rt.mlp_problem()
    opt8 = rollfast.get("adamw8bit", learning_rate=1e-2, block_size=block_size, min_8bit_size=0)
    _, state, l8 = rt.run(opt8, params, loss, 200)
    l32 = mlp_adamw_losses
    codes = sum(x.size for x in jax.tree.leaves(state) if x.dtype == jnp.uint8)
    assert codes == 2 * sum(p.size for p in jax.tree.leaves(params))
    assert l8[-1] <= 1.02 * l32[-1], (l8[-1], l32[-1])
    assert l8[-1] < 0.01 * l8[0] and l32[-1] < 0.01 * l32[0]


def test_normuon_matrix_update_has_the_target_rms():
    params = {"w": jnp.zeros((16, 8)), "k": jnp.zeros((3, 3, 2, 4))}
    grads = [jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(i), p.shape), params)
             for i in range(3)]
    for u in updates_of(rollfast.get("normuon", learning_rate=1.0, rms_scale=0.3), params, grads):
        for x in jax.tree.leaves(u):
            assert abs(float(jnp.sqrt(jnp.mean(x**2))) - 0.3) < 1e-4


def test_normuon_equalises_neuron_scales():
    """Per-neuron normalisation: after a few steps on a gradient whose output
    neurons differ in scale, the update's per-neuron RMS is nearly uniform."""
    scales = jnp.array([0.01, 0.1, 1.0, 10.0])
    g = jax.random.normal(jax.random.PRNGKey(0), (32, 4)) * scales
    params = {"w": jnp.zeros((32, 4))}
    u = updates_of(rollfast.get("normuon", learning_rate=1.0, b2=0.5), params, [{"w": g}] * 10)[-1]
    per_neuron = jnp.sqrt(jnp.mean(u["w"] ** 2, axis=0))
    assert float(per_neuron.max() / per_neuron.min()) < 1.05, per_neuron


def test_apollo_state_is_low_rank():
    params = {"w": jnp.zeros((64, 256)), "b": jnp.zeros(256)}
    state = rollfast.get("apollo", learning_rate=1e-3, rank=8).init(params)
    f32 = rt.tree_bytes(optax.adamw(1e-3).init(params))
    assert rt.tree_bytes(state) < 0.15 * f32
