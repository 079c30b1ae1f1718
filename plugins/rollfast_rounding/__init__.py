"""Rounding rules for low-precision storage: round-to-nearest-even and stochastic.

Stochastic rounding to bfloat16 (``sr_bf16``) adds 16 uniform random bits to the
16 low bits of the float32 pattern that bfloat16 discards, then truncates them:
the result is one of the two bfloat16 neighbours of ``x``, the far one with
probability proportional to the distance, so ``E[sr_bf16(x)] = x``.
"""

from __future__ import annotations

import rollfast


@rollfast.hookimpl
def round(register):
    register("nearest", Nearest)
    register("stochastic", Stochastic,
             references=("Gupta et al., Deep Learning with Limited Numerical Precision, arXiv:1502.02551",))


class Nearest:
    """Round to nearest, ties to even (an ordinary cast)."""

    needs_key = False

    def cast(self, x, dtype, key=None):
        return x.astype(dtype)

    def __repr__(self):
        return "Nearest()"


class Stochastic:
    """Round stochastically (unbiased) when writing bfloat16; other dtypes cast.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.full((10000,), 1 + 2**-10, jnp.float32)
    >>> y = Stochastic().cast(x, jnp.bfloat16, jax.random.PRNGKey(0))
    >>> sorted(set(y.astype(jnp.float32).tolist()))
    [1.0, 1.0078125]
    """

    needs_key = True

    def cast(self, x, dtype, key=None):
        import jax.numpy as jnp

        if jnp.dtype(dtype) != jnp.bfloat16 or x.dtype == jnp.bfloat16:
            return x.astype(dtype)
        if key is None:
            raise ValueError("stochastic rounding needs a PRNG key (key=...)")
        return sr_bf16(x, key)

    def __repr__(self):
        return "Stochastic()"


def sr_bf16(x, key):
    """Stochastically round ``x`` (any float) to bfloat16 with the random bits of ``key``."""
    import jax
    import jax.numpy as jnp

    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    special = (bits & jnp.uint32(0x7FFFFFFF)) >= jnp.uint32(0x7F800000)
    is_nan = (bits & jnp.uint32(0x7FFFFFFF)) > jnp.uint32(0x7F800000)
    bits = jnp.where(is_nan, bits | jnp.uint32(0x00400000), bits)
    noise = jnp.where(special, jnp.uint32(0), noise)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
