"""Adam and AdamW (Kingma & Ba, 2015; Loshchilov & Hutter, 2019) as rollfast families.

For float32, float64 and complex parameters the numbers equal ``optax.adam`` /
``optax.adamw`` bit for bit. Additions: moments of bfloat16/float16 parameters
accumulate in float32; ``mu_dtype=jnp.bfloat16`` stores *both* moments in bfloat16,
written with the chosen ``round`` rule.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import rollfast
from rollfast.constraints import Beta, Bool, FloatDtype, LearningRate, NonNegative, Seed, WeightDecay
from rollfast.toolbox import as_key


@rollfast.hookimpl
def precondition(register):
    register.family("adam", adam, first_moment=_first_moment, complex_leaves=True,
                    references=("Kingma & Ba, Adam: A Method for Stochastic Optimization, arXiv:1412.6980",))
    register.family("adamw", adamw, first_moment=_first_moment, complex_leaves=True,
                    references=("Loshchilov & Hutter, Decoupled Weight Decay Regularization, arXiv:1711.05101",))


class ScaleByAdamState(NamedTuple):
    """Step count, first and second moments, and the key for stochastic writes."""

    count: object
    mu: object
    nu: object
    key: object


def _first_moment(state):
    return state[0].mu


def scale_by_adam(b1: Beta = 0.9, b2: Beta = 0.999, eps: NonNegative = 1e-8,
                  eps_root: NonNegative = 0.0, mu_dtype: FloatDtype = None, *,
                  nesterov: Bool = False, round=None, key: Seed = 42):
    r"""Adam's moment scaling, accumulated in at least float32.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2,\quad
        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

    (Nesterov: :math:`\hat m_t = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t)`.)

    Dtypes: with ``mu_dtype=None`` a moment is stored and computed in the wider of
    its parameter's dtype and float32 (float32 for bfloat16/float16/float32 leaves,
    float64 for float64, complex64/complex128 for complex leaves, whose second moment
    holds :math:`|g|^2` in the complex dtype as Optax's does); the update has that
    dtype. A ``mu_dtype`` below float32 stores both moments there (real leaves only).

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the denominator outside the square root.
      eps_root: added to the second moment inside the square root.
      mu_dtype: storage dtype of both moments (``None``: see above).
      nesterov: use Nesterov's momentum.
      round: how moments are written in ``mu_dtype`` (a rounding object).
      key: seed or PRNG key for stochastic writes (the key only advances when
        moments are stored below float32).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByAdamState`.

    With ``b1 = 0`` the first moment is the gradient itself and is not stored
    (``state.mu`` is ``None``), as Schedule-Free AdamW uses Adam.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_adam()
    >>> u, _ = tx.update({"w": jnp.array([2.0, -3.0])}, tx.init({"w": jnp.zeros(2)}))
    >>> [round(float(x), 4) for x in u["w"]]   # ±1 up to eps: the first step is sign(g)
    [1.0, -1.0]
    """
    store = None if mu_dtype is None else jnp.dtype(mu_dtype)
    keeps_mu = not (isinstance(b1, (int, float)) and b1 == 0)  # b1 = 0: m_t = g_t, nothing to store
    low_precision = store is not None and jnp.finfo(store).bits < 32

    def init(params):
        _check_complex(params, store)
        zeros = lambda p: jnp.zeros_like(p, dtype=store or _wide(p))
        mu = jax.tree.map(zeros, params) if keeps_mu else None
        return ScaleByAdamState(jnp.zeros([], jnp.int32), mu, jax.tree.map(zeros, params), as_key(key))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu, nu = _moments(updates, state, b1=b1, b2=b2, keeps_mu=keeps_mu)
        out = _direction(updates, mu, nu, count=count, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                         nesterov=nesterov)
        kept = mu if keeps_mu else None
        if not low_precision:
            return out, ScaleByAdamState(count, kept, nu, state.key)
        key_next, k_mu, k_nu = jax.random.split(state.key, 3)
        return out, ScaleByAdamState(count, _store(kept, k_mu, store, round), _store(nu, k_nu, store, round),
                                     key_next)

    return optax.GradientTransformation(init, update)


def _moments(updates, state, *, b1, b2, keeps_mu):
    r""":math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t` (``g_t`` itself when ``b1 = 0``) and
    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2)|g_t|^2`, in each moment's dtype."""
    mu = (jax.tree.map(lambda g, m: (1 - b1) * _widen(g, m) + b1 * _widen(m, g), updates, state.mu)
          if keeps_mu else jax.tree.map(lambda g, v: _widen(g, v), updates, state.nu))
    nu = jax.tree.map(lambda g, v: (1 - b2) * _abs_sq(_widen(g, v)) + b2 * _widen(v, g), updates, state.nu)
    return mu, nu


def _direction(updates, mu, nu, *, count, b1, b2, eps, eps_root, nesterov):
    r""":math:`u_t = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)` with the
    bias-corrected moments (Nesterov's :math:`\hat m_t` when ``nesterov``)."""
    bc = optax.tree.bias_correction
    if nesterov:
        mu_hat = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g,
                              bc(mu, b1, optax.safe_increment(count)), bc(updates, b1, count))
    else:
        mu_hat = bc(mu, b1, count)
    nu_hat = bc(nu, b2, count)
    return jax.tree.map(lambda m, v: None if m is None else m / (jnp.sqrt(v + eps_root) + eps),
                        mu_hat, nu_hat, is_leaf=lambda x: x is None)


def _store(tree, key, store, round):
    """Each leaf written in the storage dtype ``store`` by the rounding rule ``round``
    (plain casting when ``None``), one key per leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = list(jax.random.split(key, max(len(leaves), 1)))
    cast = round.cast if round is not None else (lambda x, d, _: x.astype(d))
    return jax.tree.unflatten(treedef, [cast(x, store, k) for x, k in zip(leaves, keys)])


def _wide(x):
    """The dtype Adam computes a leaf's moments in: its own, at least float32."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _widen(x, other):
    """``x`` in the wider of both arrays' dtypes and float32."""
    return x.astype(jnp.promote_types(_wide(x), jnp.result_type(other)))


def _abs_sq(g):
    """:math:`|g|^2` (real), as Optax computes it."""
    return (g.conj() * g).real if jnp.iscomplexobj(g) else g * g


def _check_complex(params, store) -> None:
    """A complex leaf needs a complex moment dtype: with ``mu_dtype`` set it is rejected."""
    if store is None:
        return
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jnp.iscomplexobj(p):
            raise TypeError(f"adam: mu_dtype={store.name} cannot store the moments of the complex "
                            f"leaf {jax.tree_util.keystr(path)} ({jnp.result_type(p).name}); "
                            f"leave mu_dtype=None for complex parameters")


def adam(learning_rate: LearningRate, b1: Beta = 0.9, b2: Beta = 0.999, eps: NonNegative = 1e-8,
         eps_root: NonNegative = 0.0, mu_dtype: FloatDtype = None, *, nesterov: Bool = False,
         round="nearest", key: Seed = 42):
    r"""Adam: moment-normalised steps, ``-lr * m̂ / (sqrt(v̂ + eps_root) + eps)``.

    Exponential moving averages of the gradient and of its square, bias-corrected,
    give a per-coordinate step. With :math:`g_t` the gradient and :math:`\eta_t`
    the learning rate at step :math:`t = 1, 2, \dots`:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\,g_t,\qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2,\qquad m_0 = v_0 = 0,\\
        \hat m_t = \frac{m_t}{1-\beta_1^t},\qquad \hat v_t = \frac{v_t}{1-\beta_2^t},\qquad
        u_t = -\eta_t\,\frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    (Nesterov: :math:`\hat m_t = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1)\,g_t/(1-\beta_1^t)`.)
    Moments accumulate in float32; with float32 storage the updates equal
    ``optax.adam``'s bit for bit. ``mu_dtype=jnp.bfloat16`` stores both moments in
    bfloat16, written with the ``round`` rule (``"stochastic"`` keeps them unbiased).

    Args:
      learning_rate: step size, a float or an Optax schedule.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the denominator outside the square root.
      eps_root: added to the second moment inside the square root.
      mu_dtype: storage dtype of both moments (``None``: float32).
      nesterov: use Nesterov's momentum.
      round: rounding rule for moments stored in ``mu_dtype``.
      key: seed or PRNG key for stochastic moment writes.

    Returns:
      An ``optax.GradientTransformation``, :func:`scale_by_adam` followed by
      ``optax.scale_by_learning_rate``. Its state is a tuple whose first entry is
      a :class:`ScaleByAdamState`.

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015,
      https://arxiv.org/abs/1412.6980

    >>> import jax.numpy as jnp, rollfast, rollfast.testing
    >>> target = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -1.0])}
    >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)   # min 0
    >>> opt = rollfast.get("adam", learning_rate=0.1)
    >>> _, _, losses = rollfast.testing.run(opt, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, loss, steps=41)
    >>> [round(x, 4) for x in losses[::10]]   # the loss every 10 steps
    [15.5, 5.2011, 1.4552, 0.2216, 0.0775]
    """
    return optax.chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, round=round, key=key),
        optax.scale_by_learning_rate(learning_rate))


def adamw(learning_rate: LearningRate, b1: Beta = 0.9, b2: Beta = 0.999, eps: NonNegative = 1e-8,
          eps_root: NonNegative = 0.0, mu_dtype: FloatDtype = None, weight_decay: WeightDecay = 1e-4,
          weight_decay_mask=None, *, nesterov: Bool = False, round="nearest", key: Seed = 42):
    r"""AdamW: Adam with decoupled weight decay, ``-lr * (m̂/(sqrt(v̂+eps_root)+eps) + λ θ)``.

    Adam's step (see :func:`adam`) plus a weight decay that is added to the
    direction rather than to the gradient, so it is not normalised by
    :math:`\hat v_t`:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\,g_t,\qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2,\\
        u_t = -\eta_t\Big(\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}}
              + \epsilon} + \lambda\,\theta_{t-1}\Big)

    with :math:`\lambda` = ``weight_decay``, applied where ``weight_decay_mask``
    is true. With float32 moments the updates equal ``optax.adamw``'s bit for bit.

    Args:
      learning_rate: step size, a float or an Optax schedule.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the denominator outside the square root.
      eps_root: added to the second moment inside the square root.
      mu_dtype: storage dtype of both moments (``None``: float32).
      weight_decay: decoupled weight decay λ (float or schedule).
      weight_decay_mask: pytree or callable ``params -> bool pytree``: where to decay.
      nesterov: use Nesterov's momentum.
      round: rounding rule for moments stored in ``mu_dtype``.
      key: seed or PRNG key for stochastic moment writes.

    Returns:
      An ``optax.GradientTransformation`` chaining :func:`scale_by_adam`,
      ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``. Its state
      is a tuple whose first entry is a :class:`ScaleByAdamState`. ``update`` needs
      ``params``.

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015,
      https://arxiv.org/abs/1412.6980

      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019,
      https://arxiv.org/abs/1711.05101

    >>> import jax.numpy as jnp, rollfast, rollfast.testing
    >>> target = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -1.0])}
    >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)   # min 0
    >>> opt = rollfast.get("adamw", learning_rate=0.1, weight_decay=1e-4)
    >>> _, _, losses = rollfast.testing.run(opt, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, loss, steps=41)
    >>> [round(x, 4) for x in losses[::10]]   # the loss every 10 steps
    [15.5, 5.2013, 1.4556, 0.2218, 0.0774]
    """
    return optax.chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, round=round, key=key),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))
