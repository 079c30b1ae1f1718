r"""The tree and numerics helpers every plugin needs; no algorithm lives here.

A first-party plugin imports the core, jax, optax and its own modules; what two
plugins would otherwise both write (which tree positions hold float arrays, PRNG key
coercion, finiteness, sums of squares, cheap random bits, skipping a non-finite step,
update clipping, resolving a registered name to its object) is written once here.

Importing this module imports jax and optax; ``import rollfast`` alone does not.

Tree positions:

- *absent*: ``None`` or ``optax.MaskedNode`` (no array);
- *float*: a floating or complex array or scalar (the only leaves an optimizer moves).

Skipping: a step is *skipped* when ``ok`` is false: the updates are zeros and the
state is returned unchanged (:func:`run_unless_skipped`, :func:`skip_nonfinite`).

Spike guard (``raw_global_grad_clip`` = :math:`c`, :math:`N = \lVert g\rVert_2` over all
float leaves): a spike :math:`N > c` is rescaled to norm :math:`c` when
``permissive_spike_protection`` is true and skips the step when it is false; a
non-finite :math:`N` always skips (:func:`spike_guard`).

Update clipping (``grad_clip_mode``, ``grad_clip_max_amps`` = :math:`(a, e)`, scale
:math:`s`, usually :math:`|\eta_t|`):

.. math::
    \text{per\_tensor\_rms:}\ u \leftarrow \operatorname{clip}\Big(u\min\big(1,
        \tfrac{a s}{\operatorname{rms}(u)}\big), -e s, e s\Big)\ \text{per leaf};\qquad
    \text{global\_rms:}\ u \leftarrow u\min\big(1, \tfrac{a s}{\operatorname{rms}_{\text{all}}(u)}\big)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

CLIP_MODES = ("per_tensor_rms", "global_rms")

__all__ = [
    "CLIP_MODES", "absent", "all_finite", "all_finite_fast", "apply_unless_skipped", "as_key", "clip_amps", "float_leaves", "hashed_bits", "is_float",
    "keep_if", "leaf_keys", "random_bits", "resolve", "run_unless_skipped", "skip_nonfinite",
    "spike_guard", "sum_of_squares", "tree_sum", "update_clipper",
]


def absent(x) -> bool:
    """Whether a tree position holds no array (``None`` or ``optax.MaskedNode``).

    >>> absent(None), absent(optax.MaskedNode()), absent(jnp.zeros(0))
    (True, True, False)
    """
    return x is None or isinstance(x, optax.MaskedNode)


def is_float(x) -> bool:
    """Whether a tree position holds a floating (or complex) array or scalar.

    >>> is_float(jnp.ones(2)), is_float(jnp.arange(2)), is_float(None)
    (True, False, False)
    """
    return not absent(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def float_leaves(tree) -> list:
    """The float leaves of ``tree`` in flattening order.

    >>> len(float_leaves({"a": jnp.ones(2), "i": jnp.arange(3), "n": None}))
    1
    """
    return [x for x in jax.tree.leaves(tree) if is_float(x)]


def tree_sum(values: list, axis_name=None):
    """``Σ values`` in float32, summed over the devices of ``axis_name`` too.

    >>> tree_sum([jnp.float32(1.5), jnp.float32(2.0)])
    Array(3.5, dtype=float32)
    """
    total = sum(values, jnp.float32(0.0))
    return total if axis_name is None else jax.lax.psum(total, axis_name)


def sum_of_squares(x):
    """``Σ|x|²`` in float32, one vectorised pass over ``x``.

    >>> sum_of_squares(jnp.array([3.0, 4.0])), sum_of_squares(2.0)
    (Array(25., dtype=float32), Array(4., dtype=float32))
    """
    x = jnp.asarray(x)
    x = x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32).ravel()
    # The barrier stops XLA from rewriting the dot into a multiply and a reduce,
    # which writes x² out and reads it back, and runs much slower on CPU.
    return jnp.real(jnp.vdot(x, jax.lax.optimization_barrier(x)))


def all_finite(tree, axis_name=None):
    """Whether every floating element of ``tree`` is finite (on every device of ``axis_name``).

    >>> bool(all_finite({"a": jnp.ones(2), "b": None})), bool(all_finite([jnp.array(jnp.nan)]))
    (True, False)
    """
    # x·0 is 0 where x is finite and NaN elsewhere: one summing pass, about 3× faster
    # than reducing isfinite(x) on CPU.
    flags = [jnp.isfinite(jnp.sum(x * 0)) for x in float_leaves(tree)]
    ok = jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)
    if axis_name is not None:
        ok = jax.lax.pmin(ok.astype(jnp.int32), axis_name).astype(bool)
    return ok


def all_finite_fast(tree):
    r""":func:`all_finite`, decided in the common case by one BLAS pass per leaf.

    :math:`\sum_i |x_i|^2` in float32 is finite when every element is (a vectorised
    dot product, about twice as fast as the reduction of :func:`all_finite` on CPU);
    only when that sum is not finite (a non-finite element, or a sum that overflows)
    does the exact element-wise test run, inside a ``lax.cond``.

    >>> bool(all_finite_fast({"a": jnp.full(3, 1e30)})), bool(all_finite_fast([jnp.array([1.0, jnp.inf])]))
    (True, False)
    """
    floats = float_leaves(tree)
    if not floats:
        return jnp.asarray(True)
    fast = jnp.isfinite(tree_sum([sum_of_squares(x) for x in floats]))
    return jax.lax.cond(fast, lambda xs: jnp.asarray(True), all_finite, floats)


def keep_if(ok, new, old):
    """``new`` where ``ok`` else ``old``, leaf by leaf (trees of the same structure).

    >>> keep_if(jnp.asarray(False), {"a": jnp.ones(2)}, {"a": jnp.zeros(2)})["a"]
    Array([0., 0.], dtype=float32)
    """
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def run_unless_skipped(ok, update: Callable, grads, state):
    """``update(grads, state)`` if ``ok``, else zero updates and ``state`` unchanged.

    A ``lax.cond`` rather than a select of both outcomes: a select re-reads and
    re-writes every state array on every step, which on a memory-bound step costs
    more than the update itself.

    >>> step = lambda g, s: (g, s + 1)
    >>> run_unless_skipped(jnp.asarray(False), step, jnp.ones(2), jnp.zeros(2))
    (Array([0., 0.], dtype=float32), Array([0., 0.], dtype=float32))
    """
    def skipped(grads, state):
        shapes, kept = _kept_state(update, (grads, state), state)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), kept

    return jax.lax.cond(ok, update, skipped, grads, state)


def apply_unless_skipped(ok, step: Callable, grads, state, params):
    """``step(grads, state, params) -> (new_params, new_state)`` if ``ok``, else
    ``(params, state)``: :func:`run_unless_skipped` with the parameter update inside the
    ``lax.cond``, so XLA can fuse the update and its application into one pass.

    >>> step = lambda g, s, p: (p - g, s + 1)
    >>> apply_unless_skipped(jnp.asarray(False), step, jnp.ones(2), jnp.zeros(()), jnp.ones(2))
    (Array([1., 1.], dtype=float32), Array(0., dtype=float32))
    """
    def skipped(grads, state, params):
        shapes, kept = _kept_state(step, (grads, state, params), state)
        return jax.tree.map(lambda p, s: jnp.asarray(p).astype(s.dtype), params, shapes), kept

    return jax.lax.cond(ok, step, skipped, grads, state, params)


def _kept_state(step: Callable, args: tuple, state):
    """The shapes of ``step(*args)`` and ``state`` in the dtypes of the step's new state:
    a state leaf whose dtype the step changes (some Optax states start in the params'
    dtype and continue in float32) keeps its value in the step's dtype."""
    shapes = jax.eval_shape(step, *args)
    return shapes[0], jax.tree.map(lambda s, n: jnp.asarray(s).astype(n.dtype), state, shapes[1])


def skip_nonfinite(inner, axis_name=None) -> optax.GradientTransformationExtraArgs:
    r"""``inner`` with every step whose gradient is not all finite skipped.

    .. math::
        (u_t, s_{t+1}) = \begin{cases} \mathrm{inner}(g_t, s_t) & g_t \text{ finite}\\
                                       (0, s_t) & \text{otherwise}\end{cases}

    Unlike ``optax.apply_if_finite`` the state keeps ``inner``'s structure.

    Args:
      inner: the transformation to guard.
      axis_name: mapped axis over which finiteness is agreed.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state.

    >>> tx = skip_nonfinite(optax.scale_by_adam())
    >>> s = tx.init(jnp.zeros(2))
    >>> u, s2 = tx.update(jnp.array([1.0, jnp.nan]), s)
    >>> u, bool((s2.mu == s.mu).all())
    (Array([0., 0.], dtype=float32), True)
    """
    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, **extra):
        step = lambda g, s: inner.update(g, s, params, **extra)
        return run_unless_skipped(all_finite(updates, axis_name), step, updates, state)

    return optax.GradientTransformationExtraArgs(inner.init, update)


def as_key(key):
    """A raw ``uint32[2]`` PRNG key from an int seed, a raw key or a typed key.

    >>> as_key(42).tolist() == as_key(jax.random.key(42)).tolist() == [0, 42]
    True
    """
    if isinstance(key, (int, np.integer)):
        return jax.random.PRNGKey(int(key))
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def leaf_keys(key, n: int) -> list:
    """``n`` sub-keys of ``key``, one per flattened leaf position (``None`` included).

    >>> len(leaf_keys(jax.random.PRNGKey(0), 3)), leaf_keys(jax.random.PRNGKey(0), 0)
    (3, [])
    """
    return list(jax.random.split(key, n)) if n else []


def random_bits(key, shape):
    r"""Uniform ``uint32`` bits: a counter hash keyed by one threefry draw.

    Element ``i`` gets :math:`h(h(\varphi i + s_1) \oplus s_2)` with ``h`` the
    ``lowbias32`` integer hash (C. Wellons) and :math:`(s_1, s_2)` drawn from ``key``
    with ``jax.random.bits``. Per element this is a handful of integer operations
    instead of threefry's ~100.

    >>> b = random_bits(jax.random.PRNGKey(0), (100_000,))
    >>> 0.49 < float((b >> 31).mean()) < 0.51 and 0.49 < float((b & 1).mean()) < 0.51
    True
    """
    return hashed_bits(jax.random.bits(key, (2,), jnp.uint32), shape)


def hashed_bits(seeds, shape):
    """The bits of :func:`random_bits` from its two ``uint32`` seeds (draw the seeds of
    many arrays with one ``jax.random.bits`` call).

    >>> hashed_bits(jnp.array([1, 2], jnp.uint32), (3,)).tolist()
    [3405767568, 1833388140, 1203707313]
    """
    def lowbias32(v):
        v = (v ^ (v >> 16)) * jnp.uint32(0x7FEB352D)
        v = (v ^ (v >> 15)) * jnp.uint32(0x846CA68B)
        return v ^ (v >> 16)

    count = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return lowbias32(lowbias32(count * jnp.uint32(0x9E3779B9) + seeds[0]) ^ seeds[1])


def resolve(kind: str, value, family: str | None = None, *, default: str | None = None,
            option: str | None = None):
    """The object a ``kind`` option names: a registered name is looked up in the registry
    (modes return their record, other kinds an instance of their factory), ``None`` takes
    ``default``, anything else is returned as it is.

    Args:
      kind: ``"mode"``, ``"round"`` or ``"partition"``.
      value: a registered name, ``None`` or an object.
      family: the family a mode belongs to.
      default: the name used for ``None`` (``None``: return ``None``).
      option: the option's name, for the error when ``value`` has the wrong type.

    >>> resolve("round", None, default="nearest"), resolve("round", "stochastic")
    (Nearest(), Stochastic())
    >>> resolve("round", 3, option="round")
    Traceback (most recent call last):
    TypeError: round must be a registered round name or a round object, got 3 (int)
    """
    from rollfast.registry import registry

    if value is None:
        if default is None:
            return None
        value = default
    if isinstance(value, str):
        record = registry().lookup(kind, value, family)
        return record if kind == "mode" else record.factory()
    if isinstance(value, (bool, int, float, complex)):
        raise TypeError(f"{option or kind} must be a registered {kind} name or a {kind} object, "
                        f"got {value!r} ({type(value).__name__})")
    return value


def update_clipper(mode: str, max_amps, axis_name=None) -> Callable:
    """``clip(updates, scale)``: the update clipping of ``mode`` with caps ``max_amps × scale``.

    ``max_amps`` is ``(rms cap, element cap)``, a number ``a`` meaning ``(a, 10.0)``, or
    ``None`` (no clipping); ``global_rms`` uses only the rms cap.

    >>> clip = update_clipper("per_tensor_rms", (1.0, 1.5))
    >>> clip({"w": jnp.array([3.0, 4.0])}, 1.0)["w"]     # rms 3.54 → 1, then |·| ≤ 1.5
    Array([0.84852815, 1.1313709 ], dtype=float32)
    >>> update_clipper("global", 1.0)
    Traceback (most recent call last):
    ValueError: grad_clip_mode must be one of 'per_tensor_rms', 'global_rms'; got 'global'
    """
    mode = str(getattr(mode, "value", mode)).lower()
    if mode not in CLIP_MODES:
        raise ValueError(f"grad_clip_mode must be one of {', '.join(map(repr, CLIP_MODES))}; got {mode!r}")
    if max_amps is None:
        return lambda updates, scale: updates
    a_rms, a_elem = clip_amps(max_amps)
    tiny = jnp.finfo(jnp.float32).tiny

    def per_tensor(u, scale):
        if not is_float(u):
            return u
        rms = jnp.sqrt(sum_of_squares(u) / max(u.size, 1))
        u = u * jnp.minimum(1.0, a_rms * scale / (rms + tiny)).astype(u.dtype)
        cap = (a_elem * scale).astype(jnp.float32)
        if jnp.iscomplexobj(u):
            return u * jnp.minimum(1.0, cap / jnp.maximum(jnp.abs(u), tiny)).astype(u.real.dtype)
        return jnp.clip(u, -cap.astype(u.dtype), cap.astype(u.dtype))

    def clip_per_tensor(updates, scale):
        return jax.tree.map(lambda u: per_tensor(u, jnp.asarray(scale, jnp.float32)), updates)

    def clip_global(updates, scale):
        floats = float_leaves(updates)
        total = tree_sum([sum_of_squares(u) for u in floats], axis_name)
        count = tree_sum([jnp.asarray(u.size, jnp.float32) for u in floats], axis_name)
        factor = jnp.minimum(1.0, a_rms * scale / jnp.maximum(jnp.sqrt(total / jnp.maximum(count, 1.0)), tiny))
        return jax.tree.map(lambda u: u * factor.astype(u.dtype) if is_float(u) else u, updates)

    return clip_per_tensor if mode == "per_tensor_rms" else clip_global


def clip_amps(max_amps) -> tuple[float, float]:
    """``(rms cap, element cap)`` from ``grad_clip_max_amps``: a number ``a`` is ``(a, 10.0)``.

    >>> clip_amps(2), clip_amps((1.0, 3.0))
    ((2.0, 10.0), (1.0, 3.0))
    >>> clip_amps("big")
    Traceback (most recent call last):
    ValueError: grad_clip_max_amps must be None, a number or a pair (rms, elementwise), got 'big'
    """
    if isinstance(max_amps, (int, float)) and not isinstance(max_amps, bool):
        return float(max_amps), 10.0
    try:
        rms, elem = max_amps
        return float(rms), float(elem)
    except (TypeError, ValueError):
        raise ValueError(f"grad_clip_max_amps must be None, a number or a pair "
                         f"(rms, elementwise), got {max_amps!r}") from None


def spike_guard(grads, threshold, permissive: bool = True, axis_name=None):
    r"""``(ok, factor)`` of the spike guard: take the step if ``ok``, with the gradient
    multiplied by ``factor`` (``None`` when there is no threshold: nothing to rescale).

    .. math::
        N = \lVert g\rVert_2,\quad
        \text{factor} = \begin{cases} c/N & N > c\\ 1 & \text{otherwise}\end{cases},\quad
        \text{ok} = N \text{ finite} \wedge (\text{permissive} \vee N \le c)

    Without a threshold, ``ok`` is :func:`all_finite` of ``grads``.

    >>> g = {"w": jnp.array([30.0, -40.0])}
    >>> ok, factor = spike_guard(g, 1.0)
    >>> bool(ok), round(float(factor), 6)
    (True, 0.02)
    >>> bool(spike_guard(g, 1.0, permissive=False)[0]), spike_guard(g, None)[1]
    (False, None)
    """
    if threshold is None:
        return all_finite(grads, axis_name), None
    norm = jnp.sqrt(tree_sum([sum_of_squares(g) for g in float_leaves(grads)], axis_name))
    ok = jnp.isfinite(norm)  # also skips a gradient whose norm overflows float32
    spike = norm > threshold
    factor = jnp.where(spike, threshold / (norm + jnp.finfo(jnp.float32).tiny), 1.0)
    return (ok if permissive else ok & ~spike), factor
