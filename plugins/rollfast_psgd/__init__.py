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
state unchanged (count, key, momentum, factors) — so NaN never reaches ``Q``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import rollfast
from rollfast.constraints import (BETA, KEY, LEARNING_RATE, NONNEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY,
                                  Choice, Interval, Schedule)
from rollfast_psgd.schedule import precond_update_prob_schedule
from rollfast_psgd.transform import KronState, scale_by_kron

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
}


@rollfast.hookimpl
def precondition(register):
    register.family("kron", kron, first_moment=_first_moment, references=REFERENCES,
                    constraints=CONSTRAINTS)
    register.export("scale_by_kron", scale_by_kron)
    register.export("precond_update_prob_schedule", precond_update_prob_schedule)


def _first_moment(state):
    mu = state[0].mu
    return None if mu is None else jax.tree.map(lambda m: m.astype(jnp.float32), mu)


def kron(learning_rate=0.001, b1=0.9, weight_decay=0.0, weight_decay_mask=None,
         preconditioner_update_probability=precond_update_prob_schedule(),
         max_size_triangular=8192, max_skew_triangular=1.0, min_ndim_triangular=2,
         memory_save_mode=None, whiten_grad=True, update_preconditioner_first=True,
         preconditioner_lr=0.1, preconditioner_init_scale=None, mu_dtype=None, precond_dtype=None,
         precond_update_precision="tensorfloat32", precond_grads_precision=None,
         scanned_layers=None, lax_map_scanned_layers=False, lax_map_batch_size=8,
         mode="Q0.5EQ1.5", beta_lipschitz=0.9, track_lipschitz=True, damping=1e-9,
         grad_clip_max_amps=(2.0, 10.0), grad_clip_mode="per_tensor_rms",
         raw_global_grad_clip=None, permissive_spike_protection=True, newton_schulz_iters=5,
         axis_name=None, round="nearest", key=42):
    r"""PSGD Kron: ``-lr · (clip(P m) + λ θ)`` with ``P = QᵀQ`` fitted to whiten the gradient.

    :func:`scale_by_kron`, then Optax's ``add_decayed_weights(weight_decay,
    weight_decay_mask)`` and ``scale_by_learning_rate(learning_rate)``.

    Args:
      learning_rate: step size, a float or an Optax schedule.
      weight_decay: decoupled weight decay λ (float or schedule).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.
      {scale_by_kron_args}

    >>> import jax.numpy as jnp, optax, rollfast
    >>> opt = rollfast.get("kron", learning_rate=0.1, mode="EXP", preconditioner_init_scale=1.0)
    >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    >>> updates, state = opt.update({"w": jnp.eye(2), "b": jnp.ones(2)}, opt.init(params), params)
    >>> bool(jnp.all(optax.apply_updates(params, updates)["b"] < 1))
    True
    """
    options = {k: v for k, v in locals().items()
               if k not in ("learning_rate", "weight_decay", "weight_decay_mask")}

    return optax.chain(scale_by_kron(**options),
                       optax.add_decayed_weights(weight_decay, weight_decay_mask),
                       optax.scale_by_learning_rate(learning_rate))


def _args_lines(doc: str) -> str:
    """The entries of a docstring's ``Args:`` section, as written."""
    args = doc.split("Args:\n", 1)[1].split("\n\n", 1)[0]
    return args.strip()


kron.__doc__ = kron.__doc__.replace("{scale_by_kron_args}", _args_lines(scale_by_kron.__doc__))

__all__ = ["kron", "scale_by_kron", "precond_update_prob_schedule", "KronState", "REFERENCES"]
