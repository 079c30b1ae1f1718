"""The contrib families and Schedule-Free against independent implementations.

The trajectories in ``tests/fixtures/references/*.npz`` were recorded by
``tools/references/harness.py`` from the packages listed in ``docs/references.md``
(torch, float32, CPU). Here our optimizers run the same problems from the same
starting point. Two checks per run:

* the first ``keep`` steps agree to float32 accuracy: the losses and the parameters
  after ``keep`` steps, to a relative tolerance stated per run (a few float32 ulps
  grown over a few steps; looser where the reference rounds through bfloat16 or
  8-bit state);
* the loss after the full run agrees within a stated factor (the trajectories drift
  apart by rounding once the problem is ill-conditioned, but must not diverge).

Where our choice deliberately differs from the reference the test pins the
difference (see ``docs/references.md``).
"""

from __future__ import annotations

import json
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import rollfast

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "references"


# --- the problems, in JAX (the same as tools/references/harness.py's torch losses) ---

def lsq_loss(p, d):
    return 0.5 * jnp.sum((d["x"] @ p["w"] + p["b"] + p["c"] - d["y"]) ** 2)


def mixed_loss(p, d):
    quad = lambda a, m, b: jnp.sum((a @ m @ b) ** 2)
    return 0.5 * (jnp.sum(d["h_v"] * (p["vec"] - d["t_v"]) ** 2) + d["h_s"] * (p["scal"] - d["t_s"]) ** 2
                  + quad(d["a"], p["mat"] - d["t_m"], d["bm"])
                  + jnp.sum((d["ck"] @ (p["kern"] - d["t_k"]).reshape(18, 4)) ** 2))


def mlp_loss(p, d):
    return jnp.mean((jnp.tanh(d["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - d["y"]) ** 2)


LOSSES = {"lsq": lsq_loss, "mixed": mixed_loss, "mlp": mlp_loss}


def observed(problem, p, d):
    """What the first-steps check compares: the parameters, except that on ``lsq`` the
    matrix is seen through the data (``X W``): ``W``'s component in the null space of
    ``X`` has zero gradient, and there SOAP's eigenbasis is any orthonormal basis of
    the null space (each library picks its own), along which rounding noise takes
    Adam-sized steps that the loss never sees."""
    p = dict(p)
    if problem == "lsq":
        p["w"] = d["x"] @ p["w"]
    return p


class Run(NamedTuple):
    """Our side of a recorded run: the optimizer, the first-steps tolerance (relative,
    ``None``: not compared), the factor the final losses may differ by, and the leaves
    whose parameters the first-steps check compares (``None``: all)."""

    make: object
    rtol: float | None
    factor: float
    leaves: tuple | None = None


def sf(family, **options):
    return lambda lr: rollfast.get(family, learning_rate=lr, average="schedule_free", sf_b1=0.9, **options)


SOAP = lambda lr: rollfast.get("soap", learning_rate=lr, weight_decay=0.01)
MARS = lambda lr: rollfast.get("mars", learning_rate=lr, weight_decay=0.01)
QHADAMW = lambda lr: rollfast.get("qhadamw", learning_rate=lr, weight_decay=0.01)
ADAMW8BIT = lambda lr: rollfast.get("adamw8bit", learning_rate=lr, weight_decay=0.01, min_8bit_size=0,
                                    block_size=256)
RUNS = {
    # SOAP on a deterministic problem: the first real step sees the gradient that built
    # the bases, so Q_Lᵀ G Q_R is diagonal (an SVD) and its off-diagonal coordinates are
    # rounding noise, to which Adam's first step gives ±1: each library's noise, not
    # comparable. Losses agree closely; parameters only for leaves without the effect
    # (vectors, scalars, the kernel, whose per-axis core is not diagonal).
    # pytorch-optimizer keeps the momentum in the parameters' basis (the authors' code
    # before their momentum change): pinned by test_soap_pre_change_reference_jumps.
    "soap_pytorch_optimizer": Run(SOAP, None, 1.5),
    "soap_heavyball": Run(SOAP, 2e-3, 1.5, leaves=()),
    "soap_mixed": Run(SOAP, 1e-3, 1.5, leaves=("vec", "scal", "kern")),
    # MARS: the reference starts from g_0 = 0 (c_1 = (1 + γβ1/(1−β1)) g_1 before clipping),
    # we from g_0 = g_1 (c_1 = g_1); identical when every leaf's c_1 is clipped (lsq),
    # and for Lion (sign), not on the MLP's biases: there only the final loss.
    "mars_adamw": Run(MARS, None, 1.25),
    "mars_adamw_lsq": Run(MARS, 1e-4, 1.5),
    "mars_lion": Run(lambda lr: rollfast.get("mars", learning_rate=lr, weight_decay=0.01, variant="lion"),
                     1e-4, 1.5),
    "qhadamw": Run(QHADAMW, 1e-4, 1.5),
    "qhadamw_mlp": Run(QHADAMW, 1e-4, 1.5),
    # NorMuon: the reference runs Newton–Schulz in bfloat16.
    "normuon": Run(lambda lr: rollfast.get("normuon", learning_rate=lr), 5e-3, 1.25),
    # APOLLO: random projections drawn by different generators: final loss only.
    "apollo": Run(lambda lr: rollfast.get("apollo", learning_rate=lr, rank=4), None, 2.0),
    "apollo_mini": Run(lambda lr: rollfast.get("apollo", learning_rate=lr, variant="mini"), None, 2.0),
    # 8-bit AdamW: the first step uses unquantised moments (compared to float32
    # accuracy); later the quantisation maps differ (ours: cell tops, bitsandbytes:
    # cell midpoints), so only the final loss.
    "adamw8bit": Run(ADAMW8BIT, 1e-4, 1.5),
    "adamw8bit_lsq": Run(ADAMW8BIT, 1e-4, 1.5),
    "sf_adamw": Run(sf("adamw", b1=0.0), 1e-4, 1.5),
    "sf_sgd": Run(sf("sgd"), 1e-4, 1.5),
}


def fixture(problem):
    with np.load(FIXTURES / f"{problem}.npz") as f:
        return dict(f)


def recorded(tag):
    """The fixture's problem data, initial parameters and the run's record."""
    for problem in LOSSES:
        fx = fixture(problem)
        if f"{tag}/settings" in fx:
            group = lambda prefix: {k[len(prefix):]: jnp.asarray(v) for k, v in fx.items() if k.startswith(prefix)}
            return (problem, group("data/"), group("init/"), fx[f"{tag}/loss"], group(f"{tag}/p/"),
                    json.loads(str(fx[f"{tag}/settings"])))
    raise KeyError(tag)


def train(opt, problem, data, params, steps, keep):
    """Our losses before each step and after the last, and the parameters after ``keep``."""
    loss_fn = LOSSES[problem]

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p, data)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state, losses, kept = opt.init(params), [], params
    for t in range(steps):
        if t == keep:
            kept = params
        params, state, loss = step(params, state)
        losses.append(float(loss))
    losses.append(float(loss_fn(params, data)))
    return np.array(losses), kept


def compare(tag):
    problem, data, init, ref_loss, ref_p, cfg = recorded(tag)
    run = RUNS[tag]
    losses, kept = train(run.make(cfg["learning_rate"]), problem, data, init, cfg["steps"], cfg["keep"])
    return problem, data, run, losses, ref_loss, observed(problem, kept, data), observed(problem, ref_p, data), cfg


@pytest.mark.parametrize("tag", sorted(RUNS))
def test_agrees_with_reference(tag):
    problem, _, run, losses, ref_loss, ours, theirs, cfg = compare(tag)
    keep = cfg["keep"]
    if run.rtol is not None:
        np.testing.assert_allclose(losses[:keep + 1], ref_loss[:keep + 1], rtol=run.rtol,
                                   err_msg=f"{tag}: losses of the first {keep} steps")
        for name in ours if run.leaves is None else run.leaves:
            scale = float(np.abs(np.asarray(theirs[name])).max()) or 1.0
            np.testing.assert_allclose(ours[name], theirs[name], rtol=run.rtol, atol=run.rtol * scale,
                                       err_msg=f"{tag}: {name} after {keep} steps")
    ratio = losses[-1] / ref_loss[-1]
    assert 1 / run.factor <= ratio <= run.factor, (tag, losses[-1], ref_loss[-1])


# --- SOAP: the table, the ratio bound, float64 ----------------------------------

def test_soap_pre_change_reference_jumps():
    """Pinned difference: pytorch-optimizer's SOAP (momentum kept in the parameters'
    basis, rotated separately from the gradient) jumps at its first real step on the
    rank-deficient least squares; ours (momentum in the eigenbasis) descends, as
    heavyball's does."""
    _, data, _, losses, ref, *_ = compare("soap_pytorch_optimizer")
    heavy = recorded("soap_heavyball")[3]
    assert ref[2] > 1.05 * ref[0]
    assert losses[2] < losses[0] and heavy[2] < heavy[0]
    np.testing.assert_allclose(losses[2], heavy[2], rtol=2e-3)

SOAP_LRS = (1e-2, 3e-2, 1e-1)


@pytest.mark.parametrize("lr", SOAP_LRS)
def test_soap_table(lr):
    """300 steps on the rank-deficient least squares: within 2x of heavyball's SOAP and
    of pytorch-optimizer's (the authors' pre-"momentum change" algorithm), and no jump
    at step 2 (the loss after the first real step stays within 10% of the start)."""
    fx = fixture("lsq")
    data = {k[5:]: jnp.asarray(v) for k, v in fx.items() if k.startswith("data/")}
    init = {k[5:]: jnp.asarray(v) for k, v in fx.items() if k.startswith("init/")}
    losses, _ = train(SOAP(lr), "lsq", data, init, 300, 0)
    assert losses[2] <= 1.1 * losses[0], losses[:3]
    for package in ("heavyball", "pytorch-optimizer"):
        ref = fx[f"soap_table/{package}/{lr:g}/loss"]
        assert 0.5 <= losses[-1] / ref[-1] <= 2.0, (package, losses[-1], ref[-1])


def test_soap_direction_keeps_adams_bound():
    r"""Momentum and second moment both come from ``Ḡ``, so with β1 = β2 every
    coordinate of ``m̂/√v̂`` is at most 1 (Cauchy–Schwarz), and the direction's
    Frobenius norm at most ``√N``, on a factor of rank 4 of 12 and gradients spanning
    six decades. (Between refreshes: a refresh rotates ``m̄`` but only permutes ``v``,
    as in the authors' code, and the bound no longer holds exactly.)"""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 12)) * np.logspace(0, 6, 12)
    tx = rollfast.get("soap", learning_rate=1.0, weight_decay=0.0, precondition_frequency=100)
    params = {"w": jnp.zeros((12, 6))}
    state, update = tx.init(params), jax.jit(tx.update)
    for t in range(30):
        g = {"w": jnp.asarray(x.T @ rng.standard_normal((4, 6)), jnp.float32)}
        u, state = update(g, state, params)
        assert float(jnp.linalg.norm(u["w"])) <= np.sqrt(72) * (1 + 1e-3), t


def test_soap_float64_under_x64():
    """float64 parameters get float64 state and updates (float32 ones stay float32),
    and the float64 trajectory follows the float32 one (to 2e-3: the first real step's
    off-diagonal noise on the square matrix differs between the two precisions)."""
    fx = fixture("mixed")
    with jax.enable_x64(True):
        for dtype in (jnp.float32, jnp.float64):
            data = {k[5:]: jnp.asarray(v, dtype) for k, v in fx.items() if k.startswith("data/")}
            init = {k[5:]: jnp.asarray(v, dtype) for k, v in fx.items() if k.startswith("init/")}
            opt = SOAP(3e-2)
            u, state = opt.update(jax.grad(mixed_loss)(init, data), opt.init(init), init)
            assert {v.dtype for v in jax.tree.leaves((u, state)) if v.dtype.kind == "f"} == {jnp.dtype(dtype)}
            losses, _ = train(opt, "mixed", data, init, 12, 0)
            if dtype == jnp.float32:
                single = losses
        np.testing.assert_allclose(losses, single, rtol=2e-3)


# --- PRISM against rollfast 0.2.1, PSGD Kron against heavyball: tools/references/grid.py ---

GRID = json.loads((FIXTURES / "grid.json").read_text())
GRID_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
GRID_STEPS = 200


def problem_data(problem):
    fx = fixture(problem)
    group = lambda prefix: {k[len(prefix):]: jnp.asarray(v) for k, v in fx.items() if k.startswith(prefix)}
    return group("data/"), group("init/")


def grid_final(make, problem, lr):
    data, init = problem_data(problem)
    return train(make(lr), problem, data, init, GRID_STEPS, 0)[0][-1]


def matrices_only(path, leaf):
    """rollfast 0.2.1's partition: every 2-D leaf (a ``16 × 1`` column too) is a matrix."""
    from rollfast_partition import MatrixSpec
    return MatrixSpec(0, 1) if leaf.ndim == 2 else None


@pytest.mark.parametrize("problem", ["lsq", "mixed", "mlp"])
def test_prism_with_the_old_partition_is_rollfast_021(problem):
    """Given rollfast 0.2.1's partition, our PRISM is its PRISM: the final loss at
    lr 1e-2 agrees to 1e-4 (measured ≤ 1e-5 on the three problems; at lr ≥ 3e-2 the
    runs drift apart by float32 rounding, ≤ 12%)."""
    ours = grid_final(lambda lr: rollfast.get("prism", learning_rate=lr, partition=matrices_only), problem, 1e-2)
    np.testing.assert_allclose(ours, GRID["rollfast 0.2.1 prism"][problem][GRID_LRS.index(1e-2)], rtol=1e-4)


def test_prism_auto_partition_sends_the_kernel_to_the_matrix_path():
    """Pinned difference on ``mixed``: our ``auto`` partition views the (3, 3, 2, 4)
    kernel as an 18 × 4 matrix, rollfast 0.2.1 sends every leaf of rank ≠ 2 to AdamW.
    On that quadratic the kernel gets slower under PRISM (after 200 steps at lr 3e-2:
    kernel term 0.31 vs 0.061, total 0.44 vs 0.188); with 0.2.1's partition the two
    agree (previous test)."""
    auto = grid_final(lambda lr: rollfast.get("prism", learning_rate=lr), "mixed", 3e-2)
    old = GRID["rollfast 0.2.1 prism"]["mixed"][GRID_LRS.index(3e-2)]
    assert 2 * old < auto < 3 * old, (auto, old)


HEAVYBALL = ("heavyball PSGDKron 3.2.1", "heavyball PSGDPRO 3.2.1")
KRON_DEFAULT = "rollfast kron (Q0.5EQ1.5, default)"


@pytest.mark.parametrize("problem", ["lsq", "mixed", "mlp"])
def test_kron_best_over_the_grid_is_within_1_5x_of_heavyball(problem):
    """PSGD Kron (default mode, update probability 1) at its best learning rate of the
    grid ends within 1.5× of the better of heavyball's PSGDKron and PSGDPRO, each at its
    own best rate (200 steps; not bit-comparable: different probes, and heavyball's are
    unseeded, its finals vary ~10% between runs). Measured ratios: lsq 1.30 (PSGDPRO 212,
    ours 276), mixed 0.013, mlp 0.026. Only our best rate is run, read from the recorded
    row, which this run must also reproduce (same key; 1e-3)."""
    row = GRID[KRON_DEFAULT][problem]
    lr = GRID_LRS[int(np.argmin(row))]
    ours = grid_final(lambda lr: rollfast.get("kron", learning_rate=lr, preconditioner_update_probability=1.0),
                      problem, lr)
    np.testing.assert_allclose(ours, min(row), rtol=1e-3)
    heavyball = min(min(GRID[name][problem]) for name in HEAVYBALL)
    assert ours <= 1.5 * heavyball, (ours, heavyball)
