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
from rollfast_partition import MatrixSpec, as_partitioner, leaf_specs
from rollfast_prism.transform import PrismOptions, ScaleByPrismState, scale_by_prism

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


def prism(learning_rate, b1=0.95, gamma=1.0, weight_decay=0.0, weight_decay_mask=None, ns_iters=5, mode="original",
          inv_steps=6, inv_eps=1e-5, inv_scale=1.001, eps_gram=1e-6, gamma_l=None, gamma_r=None, precision="highest",
          nesterov=True, shape_nesterov=True, bias_correction=False, grad_clip_max_amps=(2.0, 10.0),
          raw_global_grad_clip=None, permissive_spike_protection=True, mu_dtype=None, axis_name=None, key=42,
          adam_learning_rate=None, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, prism_weight_dimension_numbers=None,
          partition="auto", fallback="adamw", round="nearest") -> optax.GradientTransformationExtraArgs:
    r"""PRISM on matrix leaves, an element-wise fallback family (AdamW) on the rest.

    .. math::
        \theta_{t+1} = \theta_t - \eta_t\bigl(\operatorname{clip}(\operatorname{Shape}(T_t, D_t)) + \lambda\theta_t\bigr),
        \quad M_t = b_1 M_{t-1} + (1-b_1) g_t,\quad T_t = b_1 M_t + (1-b_1) g_t,\quad D_t = g_t - M_t,\\
        \operatorname{Shape}_{\text{original}}(T, D) \approx T\,(T^\top T + \gamma^2 D^\top D)^{-1/2}

    per matrix of each matrix leaf (:func:`scale_by_prism`, ``docs/prism.md``); other leaves get ``fallback``
    (``adam_*`` are its ``learning_rate, b1, b2, eps``). A non-finite gradient changes nothing.

    Args:
      learning_rate: step size :math:`\eta_t` of the matrix leaves, a float or an Optax schedule.
      b1: momentum decay, in ``[0, 1)``.
      gamma: weight γ of the innovation ``D = g − M`` in the shaping, ``>= 0``.
      weight_decay: decoupled weight decay λ (both paths).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.
      ns_iters: Newton–Schulz iterations (mode ``original``).
      mode: the shaping rule, ``"original"`` or ``"bidirectional"`` (or a third-party mode).
      inv_steps: inverse-fourth-root iterations (mode ``bidirectional``).
      inv_eps: ridge of the normalised Grams (mode ``bidirectional``).
      inv_scale: safety factor κ of the iteration's coefficients (mode ``bidirectional``).
      eps_gram: ridge added to the Grams (mode ``bidirectional``).
      gamma_l: innovation weight of the left Gram (default ``gamma``).
      gamma_r: innovation weight of the right Gram (default ``gamma``).
      precision: matmul precision of the ``bidirectional`` iteration.
      nesterov: shape (or blend in) the Nesterov look-ahead momentum.
      shape_nesterov: shape the Nesterov target rather than the plain momentum.
      bias_correction: divide the momentum terms by ``1 - b1^t``.
      grad_clip_max_amps: ``(rms, elementwise)`` caps of each shaped matrix; a number ``a`` is ``(a, 10.0)``.
      raw_global_grad_clip: spike threshold ``c`` on the matrix gradients' global L2 norm.
      permissive_spike_protection: a spike is rescaled to norm ``c`` (True) or skipped (False).
      mu_dtype: storage dtype of the momenta (``None``: float32).
      axis_name: data-parallel axis over which the spike norm is summed.
      key: int seed or PRNG key, split between the PRISM and fallback paths.
      adam_learning_rate: step size of the fallback (default ``learning_rate``).
      adam_b1: first-moment decay of the fallback.
      adam_b2: second-moment decay of the fallback.
      adam_eps: epsilon of the fallback.
      prism_weight_dimension_numbers: explicit specs (pytree or callable), overriding ``partition``.
      partition: which leaves are matrices: a partitioner name, a partitioner or ``(path, leaf) -> spec``.
      fallback: the family name used for the other leaves.
      round: rounding rule for momenta stored in ``mu_dtype``.

    Returns:
      ``optax.partition`` of ``chain(scale_by_prism, scale_by_learning_rate)`` and the fallback.

    References:
      Yang, `PRISM: Structured Optimization via Anisotropic Spectral Shaping
      <https://arxiv.org/abs/2602.03096>`_, 2026; Cesista, *Bidirectional-PRISM* (mode ``bidirectional``).

    >>> import jax, jax.numpy as jnp, rollfast, rollfast.testing
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (64, 8)); y = x[:, :4] - 2 * x[:, 4:]
    >>> loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)   # minimum 0
    >>> opt = rollfast.get("prism", learning_rate=0.05)
    >>> _, _, losses = rollfast.testing.run(opt, {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}, loss, steps=60)
    >>> [round(x, 3) for x in losses[::20]]   # the loss every 20 steps
    [5.209, 2.908, 0.735, 0.14]
    """
    partitioner = as_partitioner(partition if prism_weight_dimension_numbers is None
                                 else prism_weight_dimension_numbers)
    key_prism, key_fallback = jax.random.split(as_key(key))
    matrix = scale_by_prism(
        b1=b1, gamma=gamma, ns_iters=ns_iters, mode=mode, inv_steps=inv_steps, inv_eps=inv_eps,
        inv_scale=inv_scale, eps_gram=eps_gram, gamma_l=gamma_l, gamma_r=gamma_r, precision=precision,
        nesterov=nesterov, shape_nesterov=shape_nesterov, bias_correction=bias_correction, mu_dtype=mu_dtype,
        raw_global_grad_clip=raw_global_grad_clip, permissive_spike_protection=permissive_spike_protection,
        grad_clip_max_amps=grad_clip_max_amps, weight_dimension_numbers=partitioner, weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask, axis_name=axis_name, key=key_prism, round=round)
    rest = fallback_family(
        fallback, learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
        b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        mu_dtype=mu_dtype, round=round, axis_name=axis_name, key=key_fallback)
    paths = {"prism": optax.chain(matrix, optax.scale_by_learning_rate(learning_rate)), "fallback": rest}
    return skip_nonfinite(optax.partition(paths, path_labels(partitioner)))


def fallback_family(name: str, **options) -> optax.GradientTransformation:
    """The family ``name`` built with those of ``options`` that it declares."""
    if not isinstance(name, str):
        raise TypeError(f"fallback must be a family name, got {name!r}")
    declared = rollfast.registry().lookup("family", name).parameter_names
    return rollfast.get(name, **{k: v for k, v in options.items() if k in declared})


def path_labels(partitioner):
    """``params -> labels``: ``"prism"`` where ``partitioner`` gives a matrix spec,
    ``"fallback"`` elsewhere."""
    is_spec = lambda s: s is None or isinstance(s, MatrixSpec)

    def labels(tree):
        return jax.tree.map(lambda s: "prism" if isinstance(s, MatrixSpec) else "fallback",
                            leaf_specs(partitioner, tree), is_leaf=is_spec)

    return labels


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


__all__ = ["prism", "scale_by_prism", "ScaleByPrismState", "PrismOptions", "first_moment"]
