r"""Schedule-Free averaging around any optimizer, and the WSD learning-rate schedule.

Defazio et al., "The Road Less Scheduled" (arXiv:2405.15682); Pun, Buchholz,
Gower, "Schedulers for Schedule-free" (arXiv:2511.07767).

Three sequences: :math:`z` follows the wrapped optimizer, :math:`x` is a weighted
average of the :math:`z` iterates (evaluate there), and the parameters the user
holds are :math:`y = (1-\beta) z + \beta x` (gradients are taken there):

.. math::
    z_{t+1} = z_t + \Delta_t,\qquad
    x_{t+1} = (1-c_t)\,x_t + c_t\,z_{t+1},\qquad
    c_t = \frac{w_t}{\sum_{s\le t} w_s},\quad
    w_t \in \{1,\ \gamma_t,\ \gamma_t^2\}

for the ``theoretical``, ``schedulet`` and ``practical`` weightings, with
:math:`\Delta_t` the wrapped optimizer's update at :math:`y_t` (already scaled by
:math:`-\gamma_t`). Warmup comes from the schedule: small :math:`\gamma_t` gives
small steps and small weights. :func:`schedule_free_eval_params` recovers
:math:`x = (y - (1-\beta) z)/\beta`.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp
import optax

import rollfast
from rollfast.constraints import Choice, FloatDtype, Probability, Seed
from rollfast.toolbox import absent, as_key, is_float, leaf_keys, resolve

WEIGHTINGS = ("theoretical", "practical", "schedulet")
Weighting = Annotated[str, Choice(*WEIGHTINGS)]
KEY_TAG = 0x5346  # folded into the user's key, so the wrapper's stream differs from the family's


@rollfast.hookimpl
def average(register):
    register("schedule_free", schedule_free, aliases=("schedulefree", "sf"),
             references=("Defazio et al., The Road Less Scheduled, arXiv:2405.15682",
                         "Pun, Buchholz & Gower, Schedulers for Schedule-free, arXiv:2511.07767"))
    register.export("schedule_free_eval_params", schedule_free_eval_params)
    register.export("wsd_schedule", wsd_schedule)


class ScheduleFreeState(NamedTuple):
    """Wrapped state, interpolation β, weight sum W, step count, the z sequence, PRNG key."""

    inner_state: object
    b1: object
    weight_sum: object
    step_count: object
    z: object
    key: object


def schedule_free(inner, *, learning_rate, weighting_mode: Weighting = "schedulet",
                  sf_b1: Probability = 0.9, state_dtype: FloatDtype = None, round="stochastic",
                  key: Seed = 42):
    r"""Schedule-Free averaging: hold y, step z with the wrapped optimizer, evaluate at the average x.

    Three sequences: :math:`z` follows the wrapped optimizer, :math:`x` is a
    weighted average of the :math:`z` iterates, and the parameters the user holds
    (where gradients are taken) are :math:`y = (1-\beta) z + \beta x`. Per step,
    with :math:`\Delta_t` the wrapped optimizer's update at :math:`y_t` (already
    scaled by :math:`-\gamma_t`) and :math:`\beta = \max(b_1, 10^{-8})`:

    .. math::
        z_{t+1} = z_t + \Delta_t,\qquad
        c_t = \frac{w_t}{\sum_{s\le t} w_s},\quad
        w_t = 1,\ \gamma_t\ \text{or}\ \gamma_t^2,\qquad
        x_{t+1} = (1-c_t)\,x_t + c_t\,z_{t+1},\\
        y_{t+1} - y_t = (1-\beta)(1-c_t)\,(z_{t+1}-z_t) + c_t\,(z_{t+1} - y_t)

    (``theoretical``, ``schedulet`` or ``practical`` weighting); the returned update,
    the last line, is :math:`y_{t+1} = (1-\beta) z_{t+1} + \beta x_{t+1}` in closed
    form. ``z`` is stored in ``state_dtype`` (default: the lowest-precision float dtype
    among the params); bfloat16/float16 ``z`` is always written with stochastic rounding
    (it accumulates the small steps that round-to-nearest would lose). The ``round``
    rule writes the returned update in a low-precision parameter dtype. ``params``
    must be passed to ``update``. A step with a non-finite gradient never reaches
    this wrapper (the core's policy skips it, see ``rollfast.get``); with
    ``nonfinite="propagate"``, non-finite entries of :math:`\Delta_t` are dropped:
    ``z`` keeps those entries and ``y`` only moves there by the averaging term, so
    ``z`` and ``y`` stay finite. Evaluate at :math:`x` with :func:`schedule_free_eval_params`.

    Args:
      inner: the optimizer to wrap (given by ``rollfast.get``).
      learning_rate: the family's learning rate (float or schedule), filled in by
        ``rollfast.get``; it defines the weights.
      weighting_mode: ``"schedulet"`` (:math:`w_t=\gamma_t`), ``"practical"``
        (:math:`\gamma_t^2`) or ``"theoretical"`` (1, a uniform average); any case.
      sf_b1: interpolation β between the average x (β) and z (1 − β).
      state_dtype: dtype of the stored z sequence (``None``: lowest-precision param dtype).
      round: rounding rule (name or object) writing the update in a low-precision param dtype.
      key: int seed or PRNG key for the stochastic rounding of low-precision z.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose :class:`ScheduleFreeState`
      holds the wrapped state in ``inner_state``; ``update`` needs ``params``.

    Raises:
      ValueError: an unknown ``weighting_mode``, or ``update`` called without ``params``.

    References:
      Defazio et al., *The Road Less Scheduled*, NeurIPS 2024,
      https://arxiv.org/abs/2405.15682

      Pun, Buchholz & Gower, *Schedulers for Schedule-free*, 2025,
      https://arxiv.org/abs/2511.07767

    >>> import jax, jax.numpy as jnp, optax, rollfast
    >>> target = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -1.0])}
    >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)   # 15.5 at zero
    >>> opt = rollfast.get("adamw", learning_rate=0.2, b1=0.0, average="schedule_free")
    >>> params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}; state = opt.init(params)
    >>> step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p)); losses = []
    >>> for t in range(40):   # evaluated at the average x, not at the held y
    ...     u, state = step(params, state); params = optax.apply_updates(params, u)
    ...     losses.append(round(float(loss(rollfast.schedule_free_eval_params(state, params))), 4))
    >>> losses[9::10]
    [4.986, 1.58, 0.3464, 0.0493]
    """
    mode = str(getattr(weighting_mode, "value", weighting_mode)).lower()
    z_rounding, out_rounding = resolve("round", "stochastic"), resolve("round", round, default="nearest", option="round")
    return _averaged(inner, learning_rate=learning_rate, mode=mode, sf_b1=sf_b1, state_dtype=state_dtype,
                     z_rounding=z_rounding, out_rounding=out_rounding, key=key)


def _averaged(inner, *, learning_rate, mode, sf_b1, state_dtype, z_rounding, out_rounding, key):
    """The transformation that :func:`schedule_free` documents, its options resolved."""

    def init(params):
        floats = [p.dtype for p in jax.tree.leaves(params) if is_float(p)]
        store = jnp.dtype(state_dtype) if state_dtype is not None else min(
            floats, key=lambda d: jnp.finfo(d).nmant, default=jnp.dtype(jnp.float32))
        z = jax.tree.map(lambda p: jnp.array(p, store, copy=True) if is_float(p) else None, params,
                         is_leaf=absent)  # a copy: z must not alias (donated) params
        return ScheduleFreeState(inner.init(params), jnp.asarray(float(sf_b1)), jnp.asarray(0.0),
                                 jnp.zeros([], jnp.int32), z, jax.random.fold_in(as_key(key), KEY_TAG))

    def update(grads, state, params=None, **extra):
        if params is None:
            raise ValueError("schedule_free needs params: call update(grads, state, params)")
        t = state.step_count
        gamma = learning_rate(t) if callable(learning_rate) else learning_rate
        gamma = jnp.asarray(gamma, state.weight_sum.dtype)
        weight = {"theoretical": jnp.ones_like(gamma), "practical": gamma * gamma,
                  "schedulet": gamma}[mode]
        weight_sum = state.weight_sum + weight
        c = jnp.where(weight_sum > 0, weight / jnp.maximum(weight_sum, 1e-30), 0.0)
        beta = jnp.maximum(state.b1, 1e-8)
        delta, inner_state = inner.update(grads, state.inner_state, params, **extra)
        flat_y, treedef = jax.tree.flatten(params, is_leaf=absent)
        flat_z = treedef.flatten_up_to(state.z)
        narrow = lambda x: is_float(x) and jnp.finfo(x.dtype).bits < 32
        if any(map(narrow, flat_z + flat_y)):
            key_next, k_z, k_out = jax.random.split(state.key, 3)
            z_keys, out_keys = leaf_keys(k_z, len(flat_y)), leaf_keys(k_out, len(flat_y))
        else:  # nothing is rounded: the key need not advance
            key_next, z_keys, out_keys = state.key, [None] * len(flat_y), [None] * len(flat_y)
        out, zs = [], []
        for y, d, z, kz, ko in zip(flat_y, treedef.flatten_up_to(delta), flat_z, z_keys, out_keys):
            if absent(z):
                out.append(d)
                zs.append(z)
                continue
            wide = jnp.promote_types(y.dtype, jnp.float32)
            z_old = z.astype(wide)
            d = d.astype(wide)
            d = jnp.where(jnp.isfinite(d), d, 0)
            if narrow(z):
                z_new = z_rounding.cast(z_old + d, z.dtype, kz)
                step = z_new.astype(wide) - z_old
            else:  # z_{t+1} - z_t is d; written so, the new z need not be read back
                z_new, step = z_old + d, d
            c_w, b_w = c.astype(wide), beta.astype(wide)
            move = (1 - b_w) * (1 - c_w) * step + c_w * (z_old + step - y.astype(wide))
            out.append(out_rounding.cast(move, y.dtype, ko))
            zs.append(z_new)
        return treedef.unflatten(out), ScheduleFreeState(
            inner_state, state.b1, weight_sum, t + 1, treedef.unflatten(zs), key_next)

    return optax.GradientTransformationExtraArgs(init, update)


def schedule_free_eval_params(state, params):
    r"""The evaluation params x = (y − (1 − β) z) / β of a Schedule-Free run, from the held params y.

    ``state`` must be the Schedule-Free state itself, i.e. the optimizer was built
    with ``average="schedule_free"`` and this is its outermost state.

    Args:
      state: the outermost optimizer state (a ``ScheduleFreeState``).
      params: the parameters held during training (``y``).

    >>> import jax.numpy as jnp, rollfast
    >>> opt = rollfast.get("adamw", learning_rate=0.1, average="schedule_free")
    >>> p = {"w": jnp.ones(2)}
    >>> rollfast.schedule_free_eval_params(opt.init(p), p)["w"]
    Array([1., 1.], dtype=float32)
    """

    if not (hasattr(state, "b1") and hasattr(state, "z")):
        raise ValueError("schedule_free_eval_params needs the Schedule-Free state itself (with "
                         f"fields b1 and z), i.e. the outermost state; got {type(state).__name__}")
    beta = jnp.maximum(state.b1, 1e-8)
    flat_y, treedef = jax.tree.flatten(params, is_leaf=absent)

    def x(y, z):
        if absent(z):
            return y
        wide = jnp.promote_types(y.dtype, jnp.float32)
        return ((y.astype(wide) - (1 - beta.astype(wide)) * z.astype(wide)) / beta.astype(wide)).astype(y.dtype)

    return treedef.unflatten([x(y, z) for y, z in zip(flat_y, treedef.flatten_up_to(state.z))])


def wsd_schedule(peak_lr, total_steps, warmup_fraction=0.1, decay_fraction=0.1):
    r"""Warmup–stable–decay: linear warmup, constant, linear decay to 0 (rollfast 0.2.1).

    With :math:`T_w = \lfloor T f_w\rfloor`, :math:`T_c = T - \lfloor T f_d\rfloor`,
    :math:`T_f = T-1` and the 0-based count :math:`n`:

    .. math::
        \eta(n) = \max\Big(0,\ \begin{cases}
          \eta_{\max}\,\frac{T_f - n + 1}{T_f - T_c + 1} & n > T_c\\
          \eta_{\max}\,\frac{n+1}{T_w+1} & n \le T_w\\
          \eta_{\max} & \text{otherwise}\end{cases}\Big)

    Args:
      peak_lr: the stable learning rate.
      total_steps: number of training steps T.
      warmup_fraction: fraction of T spent warming up.
      decay_fraction: fraction of T spent decaying.

    >>> lr = wsd_schedule(1.0, 100)
    >>> [round(float(lr(n)), 4) for n in (0, 10, 90, 91, 99, 100)]
    [0.0909, 1.0, 1.0, 0.9, 0.1, 0.0]
    """
    warmup = int(total_steps * warmup_fraction)
    stable_end = total_steps - int(total_steps * decay_fraction)
    final = total_steps - 1
    decay_len = max(final - stable_end + 1, 1)

    def schedule(count):
        n = jnp.asarray(count, jnp.float32)
        lr = jnp.where(n <= warmup, peak_lr * (n + 1) / (warmup + 1), peak_lr)
        lr = jnp.where(n > stable_end, peak_lr * (final - n + 1) / decay_len, lr)
        return jnp.maximum(lr, 0.0)

    return schedule
