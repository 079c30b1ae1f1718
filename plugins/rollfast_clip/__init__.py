r"""Generic spike protection and update clipping, available to every family.

Registered as an automatic mask (``auto=True``, ``order=-100``): ``rollfast.get``
adds it, right next to the family, whenever one of its options is given and the
family does not take that option itself (``kron`` and ``prism`` clip inside, with
the same two helpers and the same meaning of every option).

Two stages around the wrapped optimizer, both from :mod:`rollfast.toolbox`:

1. *Spike guard* on the incoming gradient, before the family
   (:func:`rollfast.toolbox.spike_guard`): with :math:`N = \lVert g\rVert_2` over all
   float leaves and :math:`c` = ``raw_global_grad_clip``, a spike :math:`N > c` is
   rescaled to norm :math:`c` when ``permissive_spike_protection`` is true (the
   default) and skips the step when it is false. A skipped step returns a zero update
   and leaves the whole state unchanged (the wrapped state and this wrapper's count).
2. *Update clipping* of the family's output (:func:`rollfast.toolbox.update_clipper`).
   The family's update is already :math:`u = -\eta_t d`; the caps apply to the
   direction :math:`d = u/\eta_t`, i.e. thresholds are multiplied by :math:`|\eta_t|`
   (the family's learning rate, a schedule evaluated at this wrapper's own step
   count). A family without a learning rate is clipped on :math:`u` itself.

A non-finite gradient (a non-finite :math:`N`) skips the step the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import rollfast
from rollfast.toolbox import is_float, run_unless_skipped, spike_guard, update_clipper


@rollfast.hookimpl
def mask(register):
    register("clip", clip, order=-100, auto=("raw_global_grad_clip", "permissive_spike_protection",
                                             "grad_clip_mode", "grad_clip_max_amps"))


class ClipState(NamedTuple):
    """The wrapped optimizer's state and this wrapper's step count (for schedules)."""

    inner_state: object
    count: object


def clip(inner, *, first_moment=None, learning_rate=None, raw_global_grad_clip=None,
         permissive_spike_protection=True, grad_clip_mode="per_tensor_rms",
         grad_clip_max_amps=(2.0, 10.0), axis_name=None):
    r"""Spike protection on the gradient and RMS/element clipping of the update.

    With :math:`\eta_t` the learning rate and :math:`(a, e)` = ``grad_clip_max_amps``:

    .. math::
        \text{per\_tensor\_rms:}\quad u \leftarrow \operatorname{clip}\Big(
            u\,\min\big(1, \tfrac{a|\eta_t|}{\operatorname{rms}(u)}\big),\;
            -e|\eta_t|, e|\eta_t|\Big)\ \text{per leaf};\qquad
        \text{global\_rms:}\quad u \leftarrow u\,\min\big(1,
            \tfrac{a|\eta_t|}{\operatorname{rms}_{\text{all leaves}}(u)}\big)

    Args:
      learning_rate: the family's learning rate (float or schedule), filled in by
        ``rollfast.get``; the caps are relative to it.
      raw_global_grad_clip: spike threshold on the global L2 norm of the raw
        gradient (``None``: no spike protection).
      permissive_spike_protection: rescale a spike to the threshold (``True``) or
        skip the step (``False``: zero update, state unchanged), as
        :func:`rollfast.toolbox.spike_guard`.
      grad_clip_mode: ``"per_tensor_rms"`` (RMS cap then elementwise cap, per leaf)
        or ``"global_rms"`` (one RMS cap over all leaves).
      grad_clip_max_amps: ``(rms cap, element cap)`` of the update direction; a
        number ``a`` means ``(a, 10.0)``; ``None`` disables update clipping.
      axis_name: pmap/shard_map axis over which norms are summed.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`ClipState`.

    >>> import jax.numpy as jnp, rollfast
    >>> opt = rollfast.get("adamw", learning_rate=0.1, weight_decay=0.0, raw_global_grad_clip=1.0)
    >>> p = {"w": jnp.zeros(2)}
    >>> opt.update({"w": jnp.array([30.0, -40.0])}, opt.init(p), p)[0]["w"]
    Array([-0.1,  0.1], dtype=float32)
    """
    del first_moment
    clip_update = update_clipper(grad_clip_mode, grad_clip_max_amps, axis_name)

    def init(params):
        return ClipState(inner.init(params), jnp.zeros([], jnp.int32))

    def update(grads, state, params=None, **extra):
        ok, factor = spike_guard(grads, raw_global_grad_clip, permissive_spike_protection, axis_name)

        def step(grads, inner_state):  # the spike's rescaling fuses into the family's first pass
            if factor is not None:
                grads = jax.tree.map(lambda g: g * factor.astype(g.dtype) if is_float(g) else g, grads)
            return inner.update(grads, inner_state, params, **extra)

        updates, inner_state = run_unless_skipped(ok, step, grads, state.inner_state)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = clip_update(updates, 1.0 if lr is None else jnp.abs(jnp.asarray(lr, jnp.float32)))
        return updates, ClipState(inner_state, jnp.where(ok, state.count + 1, state.count))

    return optax.GradientTransformationExtraArgs(init, update)


