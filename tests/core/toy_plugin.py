"""A test plugin exercising all five hooks with small real contributions."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import rollfast


@rollfast.hookimpl
def precondition(register):
    register.family("toy", toy, first_moment=lambda state: state[0].trace)
    register.mode("toy", "EXP", scale=2.0, summary="double the step")
    register.mode("toy", "Q0.5EQ1.5", aliases=("Q0p5EQ1p5",), scale=0.5)


@rollfast.hookimpl
def mask(register):
    register("keep_sign", keep_sign, summary="zero updates whose sign disagrees with the momentum")
    register("cap", cap, auto=True, order=-10)


@rollfast.hookimpl
def average(register):
    register("ema_of_updates", ema_of_updates)


@rollfast.hookimpl
def round(register):
    register("to_half_grid", HalfGrid)


@rollfast.hookimpl
def partition(register):
    register("by_ndim", by_ndim)


def toy(learning_rate=0.1, b1=0.5, mode="EXP", round="to_half_grid", partition="by_ndim"):
    """Momentum SGD whose mode scales the step; matrices (per the partitioner) get 10×.

    Args:
      learning_rate: step size.
      b1: momentum.
      mode: a toy mode.
      round: how the step is written.
      partition: which leaves are matrices.
    """
    scale = mode.impl["scale"]

    def init(params):
        return ()

    def update(updates, state, params=None):
        specs = partition(updates)
        out = jax.tree.map(lambda u, s: u * (10.0 if s else 1.0) * scale, updates, specs)
        return jax.tree.map(lambda u: round.cast(u, u.dtype), out), state

    return optax.chain(optax.trace(b1), optax.GradientTransformation(init, update),
                       optax.scale_by_learning_rate(learning_rate))


class WrapState(NamedTuple):
    inner_state: object
    seen: object = None


def keep_sign(inner, *, first_moment=None):
    """Zero updates that disagree in sign with the family's first moment."""

    def update(u, state, params=None, **extra):
        out, s = inner.update(u, state.inner_state, params, **extra)
        m = first_moment(s)
        return jax.tree.map(lambda o, mm: jnp.where(-o * mm >= 0, o, 0.0), out, m), WrapState(s, m)

    return optax.GradientTransformationExtraArgs(
        lambda p: WrapState(inner.init(p), jax.tree.map(jnp.zeros_like, p)), update)


def cap(inner, *, first_moment=None, cap_value=None):
    """Clip every update to ±cap_value.

    Args:
      cap_value: the bound.
    """

    def update(u, state, params=None, **extra):
        out, s = inner.update(u, state.inner_state, params, **extra)
        return jax.tree.map(lambda o: jnp.clip(o, -cap_value, cap_value), out), WrapState(s)

    return optax.GradientTransformationExtraArgs(lambda p: WrapState(inner.init(p)), update)


def ema_of_updates(inner, *, learning_rate, decay=0.0):
    """Average updates; records the learning rate it was given.

    Args:
      learning_rate: the family's learning rate.
      decay: EMA decay of the updates.
    """

    def update(u, state, params=None, **extra):
        out, s = inner.update(u, state.inner_state, params, **extra)
        return out, WrapState(s, learning_rate)

    return optax.GradientTransformationExtraArgs(lambda p: WrapState(inner.init(p), learning_rate), update)


class HalfGrid:
    """Round to multiples of 1/2."""

    needs_key = False

    def cast(self, x, dtype, key=None):
        return (jnp.round(x * 2) / 2).astype(dtype)


def by_ndim(min_ndim=2):
    """Leaves with at least ``min_ndim`` dimensions are matrices.

    Args:
      min_ndim: the smallest rank treated as a matrix.
    """
    return lambda params: jax.tree.map(lambda p: p.ndim >= min_ndim, params)
