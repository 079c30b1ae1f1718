"""Rounding rules for low-precision storage, and applying updates to low-precision params.

Stochastic rounding writes ``x`` as one of its two neighbours in the target
format, the far one with probability proportional to the distance, so
``E[round(x)] = x``. To bfloat16 (``sr_bf16``) this is a bit trick: add 16 uniform
random bits to the 16 low bits of the float32 pattern that bfloat16 discards, then
truncate them. To float16 (``sr_narrow``) the two neighbours are found with
``nextafter`` and chosen with one uniform draw, which is also right for subnormals.

The random bits come from a cheap counter hash keyed by one threefry draw per
leaf (``random_bits``), not from threefry per element: the rounding then costs
about as much as a cast.

``apply_updates(params, updates, key)`` adds updates in float32 and writes the sum
back in the parameter dtype with that rule, so that updates smaller than half an
ulp survive in expectation (Gupta et al., 2015).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import rollfast
from rollfast.toolbox import absent, as_key, leaf_keys, random_bits, resolve

LOW_PRECISION = ("bfloat16", "float16")


@rollfast.hookimpl
def round(register):
    register("nearest", Nearest)
    register("stochastic", Stochastic,
             references=("Gupta et al., Deep Learning with Limited Numerical Precision, arXiv:1502.02551",))
    register.export("apply_updates", apply_updates)
    register.export("apply_updates_prefix", apply_updates_prefix)


class Nearest:
    """Round to nearest, ties to even (an ordinary cast)."""

    needs_key = False

    def cast(self, x, dtype, key=None):
        return x.astype(dtype)

    def __repr__(self):
        return "Nearest()"


class Stochastic:
    """Round stochastically (unbiased) when writing bfloat16 or float16; other dtypes cast.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.full((10000,), 1 + 2**-10, jnp.float32)
    >>> y = Stochastic().cast(x, jnp.bfloat16, jax.random.PRNGKey(0))
    >>> sorted(set(y.astype(jnp.float32).tolist()))
    [1.0, 1.0078125]
    """

    needs_key = True

    def cast(self, x, dtype, key=None):
        dtype = jnp.dtype(dtype)
        if dtype.name not in LOW_PRECISION or x.dtype == dtype:
            return x.astype(dtype)
        if key is None:
            raise ValueError("stochastic rounding needs a PRNG key (key=...)")
        return sr_bf16(x, key) if dtype == jnp.bfloat16 else sr_narrow(x, dtype, key)

    def __repr__(self):
        return "Stochastic()"


def sr_bf16(x, key):
    """Stochastically round ``x`` (any float) to bfloat16 with the random bits of ``key``."""

    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = random_bits(key, x.shape) & jnp.uint32(0xFFFF)
    special = (bits & jnp.uint32(0x7FFFFFFF)) >= jnp.uint32(0x7F800000)
    is_nan = (bits & jnp.uint32(0x7FFFFFFF)) > jnp.uint32(0x7F800000)
    bits = jnp.where(is_nan, bits | jnp.uint32(0x00400000), bits)
    noise = jnp.where(special, jnp.uint32(0), noise)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def sr_narrow(x, dtype, key):
    r"""Stochastically round ``x`` to any narrower float ``dtype`` (e.g. float16).

    With :math:`a \le |x| < b` the neighbours of :math:`|x|` in ``dtype``, the result
    has magnitude :math:`b` with probability :math:`(|x|-a)/(b-a)`, else :math:`a`.
    Representable values, ``±inf`` and NaN are returned as the ordinary cast;
    finite values beyond the largest finite number saturate to it.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.full((4000,), 1 + 2**-12, jnp.float32)   # a quarter ulp above 1
    >>> y = sr_narrow(x, jnp.float16, jax.random.PRNGKey(0)).astype(jnp.float32)
    >>> sorted(set(y.tolist())), abs(float(y.mean()) - (1 + 2**-12)) < 2**-14
    ([1.0, 1.0009765625], True)
    """

    x = x.astype(jnp.float32)
    near = x.astype(dtype)
    overshoot = jnp.abs(near.astype(jnp.float32)) > jnp.abs(x)
    low = jnp.where(overshoot, jnp.nextafter(near, jnp.zeros_like(near)), near)
    high = jnp.nextafter(low, jnp.where(x < 0, -jnp.inf, jnp.inf).astype(dtype))
    a, b = jnp.abs(low.astype(jnp.float32)), jnp.abs(high.astype(jnp.float32))
    uniform = (random_bits(key, x.shape) >> 8).astype(jnp.float32) * 2.0**-24
    up = uniform * (b - a) < jnp.abs(x) - a
    return jnp.where(jnp.isfinite(x), jnp.where(up, high, low), near)


def as_rounding(rule):
    """A rounding object from a registered name, an object (returned as is) or ``None`` (nearest).

    >>> as_rounding("Stochastic"), as_rounding(None)
    (Stochastic(), Nearest())
    """
    return resolve("round", rule, default="nearest", option="round")


def apply_updates(params, updates, key=None, stochastic=True):
    r"""``params + updates`` leaf by leaf, written back in each parameter's dtype.

    bfloat16/float16 params with a ``key`` (and ``stochastic``): the sum is formed in
    float32 and stochastically rounded, so :math:`E[p_{new}] = p + u` exactly.
    Otherwise (float32 params, ``key=None`` or ``stochastic=False``) it is
    ``optax.apply_updates``. ``None``/``MaskedNode`` params are returned unchanged.
    ``key`` is split into one sub-key per flattened parameter position; pass a
    fresh key every step.

    Args:
      params: the parameter tree.
      updates: a tree of updates with the structure of ``params``.
      key: PRNG key (or int seed) for stochastic rounding; ``None``: round to nearest.
      stochastic: round stochastically when a key is given.

    >>> import jax, jax.numpy as jnp
    >>> p = {"w": jnp.ones(4, jnp.bfloat16), "b": None}
    >>> u = {"w": jnp.full(4, 2**-10), "b": None}
    >>> apply_updates(p, u)["w"]              # lost to round-to-nearest
    Array([1, 1, 1, 1], dtype=bfloat16)
    >>> new = apply_updates(p, u, jax.random.PRNGKey(3))["w"]
    >>> set(new.astype(float).tolist()) <= {1.0, 1.0078125}
    True
    """

    leaves, treedef = jax.tree.flatten(params, is_leaf=absent)
    return treedef.unflatten(_add(leaves, treedef.flatten_up_to(updates), key, stochastic))


def apply_updates_prefix(model, updates, key=None, stochastic=True):
    """``apply_updates`` where ``updates`` is a tree *prefix* of ``model`` (Equinox style).

    The structure of ``updates`` is the reference: where it holds ``None`` or a
    ``MaskedNode``, the whole corresponding subtree of ``model`` (functions, static
    configuration, frozen arrays) is returned untouched; where it holds an array,
    the rule of :func:`apply_updates` applies. Keys: one per ``updates`` position.

    Args:
      model: the model or parameter tree.
      updates: a tree prefix of ``model`` with arrays where it is trained.
      key: PRNG key (or int seed) for stochastic rounding; ``None``: round to nearest.
      stochastic: round stochastically when a key is given.

    >>> import jax.numpy as jnp
    >>> model = {"w": jnp.ones(2), "act": {"fn": print, "scale": jnp.ones(1)}}
    >>> new = apply_updates_prefix(model, {"w": jnp.ones(2), "act": None})
    >>> new["w"], new["act"]["fn"] is print
    (Array([2., 2.], dtype=float32), True)
    """

    ups, treedef = jax.tree.flatten(updates, is_leaf=absent)
    return treedef.unflatten(_add(treedef.flatten_up_to(model), ups, key, stochastic))


def _add(targets: list, ups: list, key, stochastic: bool) -> list:

    rounding = key is not None and stochastic
    keys = leaf_keys(as_key(key), len(targets)) if rounding else [None] * len(targets)
    out = []
    for p, u, k in zip(targets, ups, keys):
        if absent(p) or absent(u):
            out.append(p)
        elif rounding and jnp.dtype(p.dtype).name in LOW_PRECISION:
            total = p.astype(jnp.float32) + u.astype(jnp.float32)
            out.append(Stochastic().cast(total, p.dtype, k))
        else:
            out.append(jnp.asarray(p + u).astype(jnp.asarray(p).dtype))
    return out
