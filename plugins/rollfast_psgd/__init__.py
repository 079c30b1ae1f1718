"""PSGD Kron (Xi-Lin Li): a Kronecker-factored preconditioner fitted online, as the
rollfast family ``kron``; its update geometries are modes registered separately.

The kron mode protocol
----------------------
A mode is registered by any plugin with::

    register.mode("kron", "NAME", update_dense=fn, update_diag=None,
                  statistic="Ph", inverse_probe=False, aliases=(), summary="...")

The family owns everything common to all geometries: momentum, probe noise
``h = g + (δ + ε|g|)·v``, the statistic, the Gram terms, the curvature bound ℓ and
the Lipschitz-normalised step η, the update-probability schedule, balancing,
applying ``P = QᵀQ``, clipping, dtypes, scanned layers and the lazy scale init.
Per leaf it forms, once and from the old factors, the statistic ``X = P·h``
(``statistic="Ph"``) or ``X = Q·h`` (``"Qh"``), and for each factor ``i`` a
:class:`~rollfast_psgd.factors.FactorTerms`:

* ``t1 = G_i(X)`` — the ``d×d`` Gram ``X_(i) X_(i)ᵀ`` of a dense factor, the vector
  of squared row norms of a diagonal one — plus ``δ``; and ``t2 = n/d_i`` (scalar);
* with ``inverse_probe=True`` (EQ) instead ``t1 = G_i(X)`` and ``t2 = G_i(B)``,
  ``B = Q^{-T}·v`` by triangular solves, so dense factors must stay upper triangular
  (the family relies on it: large ones skip their zero block in ``Q·h`` and ``QᵀQ``);
* ``bound``: ℓ = ``nlb_spd(t1) + t2`` (``nlb_spd(t1 + t2)`` for a matrix ``t2``), or
  ``max(t1 + t2)`` for a diagonal factor; ``eta`` = η₀ / L with
  ``L = max(β L + (1-β) ℓ, ℓ)`` (or η₀ / ℓ without ``track_lipschitz``);
* ``probe``: a ``(32, d)`` standard normal matrix for the geometry's randomised norm
  bounds; ``newton_schulz_iters``: the family option.

The mode returns the moved factor: ``update_dense(q, terms) -> q`` for a float32
``(d, d)`` factor, or ``(q, p)`` with ``p = qᵀq`` (to float32 accuracy) when its
geometry has formed that product anyway — NS's projection does — and the family then
skips forming ``P`` for that factor; and optionally ``update_diag(q, terms) -> q`` for a ``(d,)``
factor (default: ``|q ⊙ (1 − η (t1 − t2))|``, Li's diagonal rule; with the default
rule the family packs all vectors and scalars into one diagonal factor whose
``terms.eta`` is then a vector, see :class:`~rollfast_psgd.factors.Packing`, and a mode
that registers its own ``update_diag`` gets each leaf alone). The family casts,
balances and stores the result; a mode holds no state and its only randomness is
``terms.probe`` (all of a step's probes come from one normal draw, which keeps
compilation small). Shared building blocks (norm bounds, Procrustes, Newton–Schulz,
``whitening_error``) are in :mod:`rollfast_psgd.linalg`.

Non-finite gradients: the step is skipped — zero updates and the ``scale_by_kron``
state unchanged (count, key, momentum, factors) — so NaN never reaches ``Q``. A gradient
spike (``raw_global_grad_clip``) is rescaled to the threshold, or skipped the same way
with ``permissive_spike_protection=False`` (:func:`rollfast.toolbox.spike_guard`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import rollfast
from rollfast.constraints import (BETA, KEY, LEARNING_RATE, NONNEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY,
                                  Choice, Interval, Nullable, Schedule)
from rollfast.sharding import register_state_sharding
from rollfast_psgd.blocking import TileStack
from rollfast_psgd.schedule import precond_update_prob_schedule
from rollfast_psgd.transform import KronOptions, KronState, scale_by_kron

REFERENCES = (
    "Xi-Lin Li, Preconditioned Stochastic Gradient Descent, IEEE TNNLS 2018, arXiv:1512.04202",
    "Xi-Lin Li, Preconditioner on Matrix Lie Group for SGD, ICLR 2019, arXiv:1809.10232",
    "Xi-Lin Li, Stochastic Hessian Fittings with Lie Groups, arXiv:2402.11858",
    "Omead Pooladzandi & Xi-Lin Li, Curvature-Informed SGD via General Purpose Lie-Group "
    "Preconditioners, arXiv:2402.04553",
)


# What each option allows, checked by rollfast.get before kron is built.
CONSTRAINTS = {
    "learning_rate": LEARNING_RATE, "b1": BETA, "weight_decay": Schedule(NONNEGATIVE),
    "preconditioner_update_probability": Schedule(PROBABILITY), "preconditioner_lr": POSITIVE,
    "max_size_triangular": Interval(0, None, integer=True), "max_skew_triangular": NONNEGATIVE,
    "min_ndim_triangular": Interval(0, None, integer=True), "beta_lipschitz": BETA,
    "damping": NONNEGATIVE, "grad_clip_mode": Choice("per_tensor_rms", "global_rms"),
    "newton_schulz_iters": POSITIVE_INT, "lax_map_batch_size": POSITIVE_INT, "key": KEY,
    "block_size": Nullable(POSITIVE_INT), "max_size_dense": POSITIVE_INT,
    "tile_stack_multiple": POSITIVE_INT, "lr_style": Nullable(Choice("adam")),
}


@rollfast.hookimpl
def precondition(register):
    register.family("kron", kron, first_moment=_first_moment, references=REFERENCES,
                    constraints=CONSTRAINTS)
    register.export("scale_by_kron", scale_by_kron)
    register.export("precond_update_prob_schedule", precond_update_prob_schedule)


def _tile_stack_shardings(stack, ctx):
    """The tile stack (factors ``(N, bs, bs)``, estimates ``(N,)``) is sharded on axis 0."""
    return TileStack(*(ctx.stacked(x, "kron's tile_stack_multiple") for x in stack))


register_state_sharding(TileStack, _tile_stack_shardings)


def _first_moment(state):
    mu = state[0].mu
    return None if mu is None else jax.tree.map(lambda m: m.astype(jnp.float32), mu)


def kron(learning_rate=0.001, b1=0.9, weight_decay=0.0, weight_decay_mask=None,
         preconditioner_update_probability=precond_update_prob_schedule(), max_size_triangular=8192,
         max_skew_triangular=1.0, min_ndim_triangular=2, memory_save_mode=None, whiten_grad=True,
         update_preconditioner_first=True, preconditioner_lr=0.1, preconditioner_init_scale=None, mu_dtype=None,
         precond_dtype=None, precond_update_precision="tensorfloat32", precond_grads_precision=None,
         scanned_layers=None, lax_map_scanned_layers=False, lax_map_batch_size=8, mode="Q0.5EQ1.5", beta_lipschitz=0.9,
         track_lipschitz=True, damping=1e-9, grad_clip_max_amps=(2.0, 10.0), grad_clip_mode="per_tensor_rms",
         raw_global_grad_clip=None, permissive_spike_protection=True, newton_schulz_iters=5, axis_name=None,
         round="nearest", key=42, block_size=None, max_size_dense=16384, tile_stack_multiple=1, normalize_grads=False,
         lr_style=None, cache_preconditioner=False):
    r"""PSGD Kron: momentum preconditioned by :math:`P = Q^TQ`, each :math:`Q_i` fitted online by the ``mode``:

    .. math::
        \theta_{t+1} = \theta_t - \alpha_t\bigl(\operatorname{clip}(P m_t) + \lambda\theta_t\bigr),\quad
        m_t = (1-\beta_t) g_t + \beta_t m_{t-1},\quad Q = Q_1 \otimes\dots\otimes Q_k

    Args:
      learning_rate: step size :math:`\alpha_t`, a float or an Optax schedule.
      b1: momentum (``β_t = min((t-1)/t, b1)``); ``<= 0`` uses the gradient.
      weight_decay: decoupled weight decay λ (float or schedule).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.
      preconditioner_update_probability: float or schedule ``step -> p`` (:func:`precond_update_prob_schedule`).
      max_size_triangular, max_skew_triangular, min_ndim_triangular: an axis gets a diagonal factor
        when longer than the first, when ``d² > max_skew_triangular · n``, or in a leaf of fewer axes than the third.
      memory_save_mode: ``None``, ``"one_diag"`` (largest axis diagonal) or ``"all_diag"``.
      whiten_grad: fit P to the gradient (True) or to the momentum (False, needs ``b1 > 0``).
      update_preconditioner_first: precondition with this step's updated factors.
      preconditioner_lr: base step η₀ of the factor updates.
      preconditioner_init_scale: initial ``s`` of ``P = s²I``; ``None``: from the first gradient.
      mu_dtype, precond_dtype: storage dtypes of the momentum and of the factors (``None``: float32).
      precond_update_precision, precond_grads_precision: matmul precision of the factor updates / of ``P·m``.
      scanned_layers: bool pytree (or ``params -> pytree``) of leaves stacked on axis 0.
      lax_map_scanned_layers, lax_map_batch_size: ``lax.map`` over layers in batches (``<= 1``: one), not ``vmap``.
      mode: the factor geometry, a registered kron mode (``rollfast list``).
      beta_lipschitz, track_lipschitz: decay of the Lipschitz estimate ``L``; step by running ``L`` or this bound.
      damping: probe noise floor δ, added to ``G_i(Ph)``, and in the init-scale estimate.
      grad_clip_max_amps, grad_clip_mode: ``(rms, elementwise)`` caps (``a``: ``(a, 10)``); per tensor or global.
      raw_global_grad_clip: spike threshold ``c`` on the raw gradient's global L2 norm.
      permissive_spike_protection: a spike is rescaled to norm ``c`` (True) or skipped (False).
      newton_schulz_iters: NS's reference iteration count (it runs at most ``+ 40``).
      axis_name: mapped axis over which statistics are averaged and bounds maxed.
      round: rounding rule for bfloat16 ``mu_dtype`` / ``precond_dtype`` storage.
      key: int seed or PRNG key; all randomness flows from it.
      block_size, max_size_dense, tile_stack_multiple: tile side of blocked factors (``None``: unblocked);
        longest side tiled (longer: strips, diagonals); tile stack padded to a multiple of this (mesh axis size).
      normalize_grads, lr_style: grads divided by their Frobenius norm (+1e-6); ``"adam"``: RMS capped at 1.1, /5.
      cache_preconditioner: keep ``P_i = Q_iᵀQ_i`` in the state (2× factor memory; steps without a fit form no P).

    Returns:
      ``optax.chain(scale_by_kron(...), add_decayed_weights, scale_by_learning_rate)``.

    References:
      Li, `Preconditioned stochastic gradient descent <https://arxiv.org/abs/1512.04202>`_, 2015;
      Li, `Preconditioner on matrix Lie group for SGD <https://arxiv.org/abs/1809.10232>`_, 2018;
      Pooladzandi & Li, `Curvature-informed SGD via Lie-group preconditioners <https://arxiv.org/abs/2402.04553>`_.

    >>> import jax.numpy as jnp, rollfast, rollfast.testing
    >>> loss = lambda w: 0.5 * jnp.sum((jnp.diag(jnp.array([10.0, 1.0, 0.1])) @ w - 1.0) ** 2)  # min 0
    >>> opt = rollfast.get("kron", learning_rate=0.1, preconditioner_update_probability=1.0)
    >>> _, _, losses = rollfast.testing.run(opt, jnp.zeros((3, 2)), loss, steps=41)
    >>> [round(x, 3) for x in losses[::10]]   # the loss every 10 steps
    [3.0, 1.822, 1.279, 1.067, 0.934]
    """
    return optax.chain(scale_by_kron(
        b1=b1, preconditioner_update_probability=preconditioner_update_probability,
        max_size_triangular=max_size_triangular, max_skew_triangular=max_skew_triangular,
        min_ndim_triangular=min_ndim_triangular, memory_save_mode=memory_save_mode, whiten_grad=whiten_grad,
        update_preconditioner_first=update_preconditioner_first, preconditioner_lr=preconditioner_lr,
        preconditioner_init_scale=preconditioner_init_scale, mu_dtype=mu_dtype, precond_dtype=precond_dtype,
        precond_update_precision=precond_update_precision, precond_grads_precision=precond_grads_precision,
        scanned_layers=scanned_layers, lax_map_scanned_layers=lax_map_scanned_layers,
        lax_map_batch_size=lax_map_batch_size, mode=mode, beta_lipschitz=beta_lipschitz,
        track_lipschitz=track_lipschitz, damping=damping, grad_clip_max_amps=grad_clip_max_amps,
        grad_clip_mode=grad_clip_mode, raw_global_grad_clip=raw_global_grad_clip,
        permissive_spike_protection=permissive_spike_protection, newton_schulz_iters=newton_schulz_iters,
        axis_name=axis_name, round=round, key=key, block_size=block_size, max_size_dense=max_size_dense,
        tile_stack_multiple=tile_stack_multiple, normalize_grads=normalize_grads, lr_style=lr_style,
        cache_preconditioner=cache_preconditioner),
        optax.add_decayed_weights(weight_decay, weight_decay_mask), optax.scale_by_learning_rate(learning_rate))


__all__ = ["kron", "scale_by_kron", "precond_update_prob_schedule", "KronOptions", "KronState", "REFERENCES"]
