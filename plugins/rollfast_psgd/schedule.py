"""The default annealing schedule of the preconditioner update probability."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


def precond_update_prob_schedule(max_prob=1.0, min_prob=0.03, decay=0.001, flat_start=500):
    r"""Probability of updating the preconditioner at step ``n`` (1 on the first step).

    .. math::
        p(n) = \min\bigl(\max(p_{max}\, e^{-\mathrm{decay}\,(n - n_0)},\ p_{min}),\ p_{max}\bigr)

    so ``p = max_prob`` for the first ``flat_start`` steps, then an exponential decay to
    the floor ``min_prob``.

    Args:
      max_prob: probability during the flat start.
      min_prob: floor of the probability.
      decay: exponential decay rate per step after the flat start.
      flat_start: number of steps :math:`n_0` at ``max_prob``.

    >>> p = precond_update_prob_schedule()
    >>> [round(float(p(n)), 4) for n in (1, 500, 1500, 10_000)]
    [1.0, 1.0, 0.3679, 0.03]
    """

    return _Schedule(max_prob, min_prob, decay, flat_start)


class _Schedule(NamedTuple):
    max_prob: float
    min_prob: float
    decay: float
    flat_start: int

    def __call__(self, n):
        n = jnp.asarray(n, jnp.float32)
        p = self.max_prob * jnp.exp(-self.decay * (n - self.flat_start))
        return jnp.minimum(jnp.maximum(p, self.min_prob), self.max_prob)

    def __repr__(self):
        return "precond_update_prob_schedule({})".format(
            ", ".join(f"{k}={v!r}" for k, v in self._asdict().items()))
