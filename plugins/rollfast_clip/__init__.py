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

    Before the wrapped optimizer, a gradient whose global norm :math:`N` exceeds
    :math:`c` = ``raw_global_grad_clip`` is rescaled by :math:`c/N` or, with
    ``permissive_spike_protection=False``, its step is skipped, as is a step with a
    non-finite gradient (zero update, wrapped state unchanged). After it, with
    :math:`\eta_t` the learning rate and :math:`(a, e)` = ``grad_clip_max_amps``,
    the update is clipped so that the caps apply to the direction :math:`u/\eta_t`:

    .. math::
        \text{per\_tensor\_rms:}\quad u \leftarrow \operatorname{clip}\Big(
            u\,\min\big(1, \tfrac{a|\eta_t|}{\operatorname{rms}(u)}\big),\;
            -e|\eta_t|, e|\eta_t|\Big)\ \text{per leaf};\qquad
        \text{global\_rms:}\quad u \leftarrow u\,\min\big(1,
            \tfrac{a|\eta_t|}{\operatorname{rms}_{\text{all leaves}}(u)}\big)

    Args:
      inner: the optimizer to wrap (given by ``rollfast.get``).
      first_moment: unused (part of the mask contract).
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
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`ClipState` holding the wrapped state in ``inner_state``.

    References:
      Pascanu, Mikolov & Bengio, *On the difficulty of training recurrent neural
      networks*, ICML 2013 (global-norm clipping), https://arxiv.org/abs/1211.5063

      Shazeer & Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory
      Cost*, ICML 2018 (clipping the update by its RMS), https://arxiv.org/abs/1804.04235

    >>> import jax.numpy as jnp, rollfast, rollfast.testing
    >>> target = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -1.0])}
    >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)   # min 0
    >>> opt = rollfast.get("adamw", learning_rate=0.05, raw_global_grad_clip=1.0)
    >>> _, _, losses = rollfast.testing.run(opt, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, loss, steps=41)
    >>> [round(x, 4) for x in losses[::10]]   # the loss every 10 steps
    [15.5, 9.0083, 5.011, 2.4915, 0.915]

    A spike of norm 50 is rescaled to norm 1 before SGD sees it:

    >>> opt = rollfast.get("optax:sgd", learning_rate=0.1, raw_global_grad_clip=1.0)
    >>> p, g = {"w": jnp.zeros(2)}, {"w": jnp.array([30.0, -40.0])}
    >>> [round(float(x), 4) for x in opt.update(g, opt.init(p), p)[0]["w"]]
    [-0.06, 0.08]
    """
    del first_moment
    clip_update = update_clipper(grad_clip_mode, grad_clip_max_amps, axis_name)
    return _clipped(inner, learning_rate=learning_rate, raw_global_grad_clip=raw_global_grad_clip,
                    permissive_spike_protection=permissive_spike_protection, clip_update=clip_update,
                    axis_name=axis_name)


def _clipped(inner, *, learning_rate, raw_global_grad_clip, permissive_spike_protection, clip_update,
             axis_name):
    """The transformation that :func:`clip` documents, its update clipper built."""

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


