"""PRISM (Yang, arXiv:2602.03096): Muon-like spectral shaping of matrix momentum,
damped where the gradient disagrees with the momentum.

Family ``prism``: a partitioner (``partition=``, see ``rollfast_partition``)
sends each leaf either to :func:`scale_by_prism` (viewed as matrices) or to an
element-wise fallback family (``fallback="adamw"``).

Mode protocol: a mode of ``prism`` registers ``shape=fn`` with
``fn(T, D, **options) -> O`` for one ``R × O`` float32 target ``T`` and
innovation ``D``; ``options`` are those of ``gamma, ns_iters, inv_steps,
inv_eps, inv_scale, eps_gram, gamma_l, gamma_r, precision`` that ``fn``'s
signature names. First-party modes: ``original`` and ``bidirectional``.
"""

from __future__ import annotations

import jax
import optax

import rollfast
from rollfast.constraints import BETA, KEY, LEARNING_RATE, NONNEGATIVE, POSITIVE_INT, Nullable, Schedule
from rollfast.toolbox import as_key, skip_nonfinite
from rollfast_prism.transform import ScaleByPrismState, scale_by_prism

REFERENCES = ("Y. Yang, PRISM: Structured Optimization via Anisotropic Spectral Shaping, arXiv:2602.03096",
              "F. L. Cesista, Bidirectional-PRISM (Shampoo-style two-sided PRISM)")


# What each option allows, checked by rollfast.get before prism is built.
CONSTRAINTS = {
    "learning_rate": LEARNING_RATE, "b1": BETA, "weight_decay": Schedule(NONNEGATIVE),
    "ns_iters": POSITIVE_INT, "inv_steps": POSITIVE_INT, "adam_learning_rate": Nullable(LEARNING_RATE),
    "adam_b1": BETA, "adam_b2": BETA, "adam_eps": NONNEGATIVE, "key": KEY,
}


@rollfast.hookimpl
def precondition(register):
    register.family("prism", prism, first_moment=first_moment, references=REFERENCES,
                    constraints=CONSTRAINTS)


def prism(learning_rate, b1=0.95, gamma=1.0, weight_decay=0.0, weight_decay_mask=None, ns_iters=5,
          mode="original", inv_steps=6, inv_eps=1e-5, inv_scale=1.001, eps_gram=1e-6, gamma_l=None,
          gamma_r=None, precision="highest", nesterov=True, shape_nesterov=True,
          bias_correction=False, grad_clip_max_amps=(2.0, 10.0), raw_global_grad_clip=None,
          permissive_spike_protection=True, mu_dtype=None, axis_name=None, key=42,
          adam_learning_rate=None, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
          prism_weight_dimension_numbers=None, partition="auto", fallback="adamw", round="nearest"):
    r"""PRISM on matrix leaves, an element-wise fallback (AdamW) on the rest.

    Matrix leaves: :math:`-\eta\,(\mathrm{clip}(\mathrm{Shape}(T, D)) + λθ)`
    (see :func:`scale_by_prism`); other leaves: the ``fallback`` family with
    ``learning_rate=adam_learning_rate or learning_rate``, ``b1=adam_b1``,
    ``b2=adam_b2``, ``eps=adam_eps`` and the same ``weight_decay``,
    ``weight_decay_mask``, ``mu_dtype``, ``round`` (each passed if the fallback
    takes it). A step whose gradient has a non-finite entry changes nothing.

    Args:
      learning_rate: step size of the matrix leaves, a float or an Optax schedule.
      b1: momentum decay.
      gamma: weight of the innovation ``G − M`` in the shaping.
      weight_decay: decoupled weight decay λ (both paths).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.
      ns_iters: Newton–Schulz iterations (mode ``original``).
      mode: the shaping rule, ``"original"`` or ``"bidirectional"``.
      inv_steps: inverse-fourth-root iterations (mode ``bidirectional``).
      inv_eps: ridge of the normalised Grams (mode ``bidirectional``).
      inv_scale: safety factor of the iteration's coefficients (``bidirectional``).
      eps_gram: ridge added to the Grams (mode ``bidirectional``).
      gamma_l: innovation weight of the left Gram (default ``gamma``).
      gamma_r: innovation weight of the right Gram (default ``gamma``).
      precision: matmul precision of the ``bidirectional`` iteration.
      nesterov: shape (or blend in) the Nesterov look-ahead momentum.
      shape_nesterov: shape the Nesterov target rather than the plain momentum.
      bias_correction: divide the momentum terms by ``1 - b1^t``.
      grad_clip_max_amps: ``(rms, elementwise)`` bounds of each shaped matrix,
        a number (rms bound) or ``None``.
      raw_global_grad_clip: clip the matrix gradients' global L2 norm to this.
      permissive_spike_protection: on a clipped spike, still take the step.
      mu_dtype: storage dtype of the momenta (``None``: float32).
      axis_name: data-parallel axis over which the spike norm is summed.
      key: seed or PRNG key, split between the PRISM and fallback paths.
      adam_learning_rate: step size of the fallback (default ``learning_rate``).
      adam_b1: first-moment decay of the fallback.
      adam_b2: second-moment decay of the fallback.
      adam_eps: epsilon of the fallback.
      prism_weight_dimension_numbers: explicit specs (pytree or callable),
        overriding ``partition`` (rollfast 0.2 name).
      partition: which leaves are matrices: a partitioner name (``"auto"``,
        ``"equinox"``, ``"dimension_numbers"``), a partitioner, or a callable
        ``(path, leaf) -> MatrixSpec | None``.
      fallback: the family used for the other leaves.
      round: rounding rule for momenta stored in ``mu_dtype``.

    >>> import jax.numpy as jnp, rollfast
    >>> opt = rollfast.get("prism", learning_rate=0.1, mode="bidirectional", gamma=0.0)
    >>> p = {"w": jnp.eye(2), "b": jnp.zeros(2)}
    >>> u, _ = opt.update({"w": 3 * jnp.eye(2), "b": jnp.ones(2)}, opt.init(p), p)
    >>> u["w"].round(3), u["b"].round(3)
    (Array([[-0.1, -0. ],
           [-0. , -0.1]], dtype=float32), Array([-0.1, -0.1], dtype=float32))
    """
    from rollfast_partition import MatrixSpec, as_partitioner, leaf_specs

    if not isinstance(fallback, str):
        raise TypeError(f"fallback must be a family name, got {fallback!r}")
    partitioner = as_partitioner(partition if prism_weight_dimension_numbers is None
                                 else prism_weight_dimension_numbers)
    key_prism, key_fallback = jax.random.split(as_key(key))
    matrix = optax.chain(
        scale_by_prism(b1, gamma, ns_iters, mode, inv_steps, inv_eps, inv_scale, eps_gram, gamma_l,
                       gamma_r, precision, nesterov, shape_nesterov, bias_correction, mu_dtype,
                       raw_global_grad_clip, permissive_spike_protection, grad_clip_max_amps,
                       partitioner, weight_decay, weight_decay_mask, axis_name, key_prism, round),
        optax.scale_by_learning_rate(learning_rate))
    wanted = dict(learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
                  b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=weight_decay,
                  weight_decay_mask=weight_decay_mask, mu_dtype=mu_dtype, round=round,
                  axis_name=axis_name, key=key_fallback)
    declared = rollfast.registry().lookup("family", fallback).parameter_names
    rest = rollfast.get(fallback, **{k: v for k, v in wanted.items() if k in declared})

    def labels(tree):
        return jax.tree.map(lambda s: "prism" if isinstance(s, MatrixSpec) else "fallback",
                            leaf_specs(partitioner, tree), is_leaf=lambda s: s is None or isinstance(s, MatrixSpec))

    return skip_nonfinite(optax.partition({"prism": matrix, "fallback": rest}, labels))



def first_moment(state):
    """The momentum in the parameters' structure: PRISM's ``M`` on matrix
    leaves, the fallback's ``mu`` (its first state field named ``mu``) on the
    others, ``None`` where there is none."""
    inner = state.inner_states
    prism_mu = inner["prism"].inner_state[0].mu
    fallback_mu = _find_mu(inner["fallback"].inner_state)
    is_node = lambda x: x is None or isinstance(x, optax.MaskedNode)
    flat, treedef = jax.tree.flatten(prism_mu, is_leaf=is_node)
    other = treedef.flatten_up_to(fallback_mu) if fallback_mu is not None else [None] * len(flat)
    has = lambda x: hasattr(x, "shape")
    return treedef.unflatten([m if has(m) or not has(f) else f for m, f in zip(flat, other)])


def _find_mu(state):
    if hasattr(state, "_fields"):
        if "mu" in state._fields:
            return state.mu
        children = [getattr(state, f) for f in state._fields]
    elif isinstance(state, (tuple, list)):
        children = list(state)
    elif isinstance(state, dict):
        children = list(state.values())
    else:
        return None
    return next((mu for mu in map(_find_mu, children) if mu is not None), None)


__all__ = ["prism", "scale_by_prism", "ScaleByPrismState", "first_moment"]
