"""The rollfast 0.2.1 top-level API, as thin calls into ``rollfast.get``.

``rollfast.kron``, ``prism``, ``adamw``, ``schedule_free_kron``,
``schedule_free_prism`` and ``schedule_free_adam`` take exactly the 0.2.1 keyword
names and defaults and translate them to the registry spelling:

| 0.2.1 | ``rollfast.get`` |
|---|---|
| ``preconditioner_mode=`` | ``mode=`` |
| ``use_magma=True, magma_p=, magma_tau=`` | ``mask="magma", magma_p=, magma_tau=`` |
| ``schedule_free_*(learning_rate, total_steps, warmup_fraction, decay_fraction, ...)`` | ``average="schedule_free", learning_rate=wsd_schedule(...)`` |
| ``key=PRNGKey(42)`` | ``key=42`` (an int seed or a PRNG key) |

``axis_name`` of ``adamw``/``schedule_free_adam`` only served Magma in 0.2.1; it
goes to the Magma mask when it is on and is otherwise unused. Magma keeps working
with ``b1=0`` (it then scores against its own gradient EMA) instead of raising.
"""

from __future__ import annotations

import rollfast
from rollfast.errors import UnknownNameError

NAMES = ("kron", "prism", "adamw", "schedule_free_kron", "schedule_free_prism", "schedule_free_adam")
PROVIDERS = {"kron": "rollfast_psgd", "prism": "rollfast_prism", "adamw": "rollfast_adam"}


@rollfast.hookimpl
def precondition(register):
    for name in NAMES:
        register.export(name, globals()[name])


def kron(learning_rate=0.001, b1=0.9, weight_decay=0.0, weight_decay_mask=None,
         preconditioner_update_probability=None, max_size_triangular=8192,
         max_skew_triangular=1.0, min_ndim_triangular=2, memory_save_mode=None, whiten_grad=True,
         update_preconditioner_first=True, preconditioner_lr=0.1, preconditioner_init_scale=None,
         mu_dtype=None, precond_dtype=None, precond_update_precision="tensorfloat32",
         precond_grads_precision=None, scanned_layers=None, lax_map_scanned_layers=False,
         lax_map_batch_size=8, preconditioner_mode="Q0.5EQ1.5", beta_lipschitz=0.9,
         track_lipschitz=True, damping=1e-9, grad_clip_max_amps=(2.0, 10.0),
         grad_clip_mode="per_tensor_rms", raw_global_grad_clip=None,
         permissive_spike_protection=True, newton_schulz_iters=5, use_magma=False, magma_p=0.5,
         magma_tau=2.0, axis_name=None, key=42):
    """PSGD Kron (rollfast 0.2.1 spelling) = ``rollfast.get("kron", mode=preconditioner_mode, ...)``.

    Every argument not listed below goes unchanged to the ``kron`` family
    (``rollfast info kron`` lists them).

    Args:
      preconditioner_update_probability: float or schedule; ``None``: the family's
        default ``precond_update_prob_schedule()``.
      preconditioner_mode: the geometry, passed as ``mode``.
      use_magma: wrap with ``mask="magma"``.
      magma_p: Magma keep probability.
      magma_tau: Magma score temperature.
      key: int seed or PRNG key (``None``: 42).

    >>> import jax.numpy as jnp, rollfast
    >>> opt = rollfast.kron(learning_rate=3e-4, preconditioner_mode="EXP", use_magma=True)
    >>> type(opt.init({"w": jnp.ones((2, 2))})).__name__   # rollfast.get("kron", mode="EXP", mask="magma")
    'MagmaState'
    """
    return _kron(_magma(dict(locals())))


def prism(learning_rate, b1=0.95, gamma=1.0, weight_decay=0.0, weight_decay_mask=None, ns_iters=5,
          mode="original", inv_steps=6, inv_eps=1e-5, inv_scale=1.001, eps_gram=1e-6, gamma_l=None,
          gamma_r=None, precision="highest", nesterov=True, shape_nesterov=True,
          bias_correction=False, grad_clip_max_amps=(2.0, 10.0), raw_global_grad_clip=None,
          permissive_spike_protection=True, mu_dtype=None, axis_name=None, use_magma=False,
          magma_p=0.5, magma_tau=2.0, key=42, adam_learning_rate=None, adam_b1=0.9, adam_b2=0.999,
          adam_eps=1e-8, prism_weight_dimension_numbers=None):
    """PRISM (rollfast 0.2.1 spelling) = ``rollfast.get("prism", ...)``.

    Every argument not listed below goes unchanged to the ``prism`` family
    (``rollfast info prism`` lists them).

    Args:
      precision: matmul precision (``"highest"`` is ``jax.lax.Precision.HIGHEST``).
      use_magma: wrap with ``mask="magma"``.
      magma_p: Magma keep probability.
      magma_tau: Magma score temperature.
      key: int seed or PRNG key (``None``: 42).

    >>> import jax.numpy as jnp, rollfast
    >>> opt = rollfast.prism(learning_rate=1e-3, use_magma=True)
    >>> type(opt.init({"w": jnp.ones((2, 2))})).__name__   # rollfast.get("prism", mask="magma")
    'MagmaState'
    """
    return _get("prism", _magma(dict(locals())))


def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None,
          weight_decay=1e-4, weight_decay_mask=None, *, nesterov=False, use_magma=False,
          magma_p=0.5, magma_tau=2.0, axis_name=None, key=42):
    r"""AdamW (rollfast 0.2.1 spelling) = ``rollfast.get("adamw", ...)``.

    :math:`u = -\eta\,(\hat m/(\sqrt{\hat v + \epsilon_{root}} + \epsilon) + \lambda\theta)`,
    optionally masked by Magma (decay included, as in 0.2.1).

    Args:
      learning_rate: step size, a float or an Optax schedule.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the denominator outside the square root.
      eps_root: added to the second moment inside the square root.
      mu_dtype: storage dtype of both moments (``None``: float32).
      weight_decay: decoupled weight decay.
      weight_decay_mask: where to decay.
      nesterov: use Nesterov's momentum.
      use_magma: wrap with ``mask="magma"``.
      magma_p: Magma keep probability.
      magma_tau: Magma score temperature.
      axis_name: device axis for Magma's reductions (unused without Magma).
      key: int seed or PRNG key (``None``: 42).

    >>> import jax.numpy as jnp, rollfast
    >>> opt = rollfast.adamw(0.1, weight_decay=0.0)
    >>> p = {"w": jnp.ones(2)}
    >>> [round(float(x), 4) for x in opt.update({"w": jnp.array([1.0, -1.0])}, opt.init(p), p)[0]["w"]]
    [-0.1, 0.1]
    """
    return _get("adamw", _magma(dict(locals())))


def schedule_free_kron(learning_rate, total_steps, warmup_fraction=0.1, decay_fraction=0.1,
                       weighting_mode="practical", sf_b1=0.9, state_dtype=None, weight_decay=0.0,
                       weight_decay_mask=None, preconditioner_update_probability=None,
                       max_size_triangular=8192, max_skew_triangular=1.0, min_ndim_triangular=2,
                       memory_save_mode=None, update_preconditioner_first=True,
                       preconditioner_lr=0.1, preconditioner_init_scale=None, precond_dtype=None,
                       precond_update_precision="tensorfloat32", precond_grads_precision=None,
                       scanned_layers=None, lax_map_scanned_layers=False, lax_map_batch_size=8,
                       preconditioner_mode="Q0.5EQ1.5", beta_lipschitz=0.9, track_lipschitz=True,
                       damping=1e-9, grad_clip_max_amps=(2.0, 10.0),
                       grad_clip_mode="per_tensor_rms", raw_global_grad_clip=None,
                       permissive_spike_protection=True, newton_schulz_iters=5, axis_name=None,
                       key=42):
    """Schedule-Free Kron (0.2.1): ``kron`` with ``b1=0``, averaged, on a WSD schedule.

    The momentum-free preconditioner is applied to the raw gradient; the
    Schedule-Free interpolation plays the role of momentum.

    Every argument not listed below goes unchanged to the ``kron`` family
    (``rollfast info kron`` lists them).

    Args:
      learning_rate: peak of the WSD schedule.
      total_steps: length of the WSD schedule.
      warmup_fraction: WSD warmup fraction.
      decay_fraction: WSD decay fraction.
      weighting_mode: Schedule-Free weights (default ``"practical"``).
      sf_b1: Schedule-Free interpolation β.
      state_dtype: dtype of the stored z sequence.
      preconditioner_update_probability: float or schedule; ``None``: the family default.
      preconditioner_mode: the geometry, passed as ``mode``.
      key: int seed or PRNG key (``None``: 42).

    >>> import jax.numpy as jnp, rollfast
    >>> opt = rollfast.schedule_free_kron(1e-3, total_steps=1000, sf_b1=0.95)
    >>> state = opt.init({"w": jnp.ones((2, 2))})
    >>> type(state).__name__, round(float(state.b1), 4)
    ('ScheduleFreeState', 0.95)
    """
    return _kron(_schedule_free(dict(locals())) | {"b1": 0.0, "whiten_grad": True})


def schedule_free_prism(learning_rate, total_steps, warmup_fraction=0.1, decay_fraction=0.1,
                        weighting_mode="practical", sf_b1=0.9, state_dtype=None, prism_b1=0.0,
                        gamma=1.0, ns_iters=5, mode="original", inv_steps=6, inv_eps=1e-5,
                        inv_scale=1.001, eps_gram=1e-6, gamma_l=None, gamma_r=None,
                        precision="highest", shape_nesterov=True, weight_decay=0.0,
                        weight_decay_mask=None, grad_clip_max_amps=(2.0, 10.0),
                        raw_global_grad_clip=None, permissive_spike_protection=True, mu_dtype=None,
                        axis_name=None, key=42, adam_learning_rate=None, adam_b1=0.0,
                        adam_b2=0.999, adam_eps=1e-8, prism_weight_dimension_numbers=None):
    """Schedule-Free PRISM (0.2.1): ``prism`` with ``b1=prism_b1``, no Nesterov, averaged, on WSD.

    The AdamW fallback runs on its own WSD schedule with peak ``adam_learning_rate``
    (default ``learning_rate``). The Schedule-Free weights use the PRISM schedule
    for every leaf; as both schedules have the same shape, the weights
    :math:`c_t` agree with per-branch weights for every weighting.

    Every argument not listed below goes unchanged to the ``prism`` family
    (``rollfast info prism`` lists them).

    Args:
      learning_rate: peak of the WSD schedule.
      total_steps: length of the WSD schedule.
      warmup_fraction: WSD warmup fraction.
      decay_fraction: WSD decay fraction.
      weighting_mode: Schedule-Free weights (default ``"practical"``).
      sf_b1: Schedule-Free interpolation β.
      state_dtype: dtype of the stored z sequence.
      prism_b1: PRISM momentum, passed as ``b1``.
      adam_learning_rate: peak of the fallback's WSD schedule (``None``: ``learning_rate``).
      key: int seed or PRNG key (``None``: 42).

    >>> import jax.numpy as jnp, rollfast
    >>> opt = rollfast.schedule_free_prism(1e-3, total_steps=1000, sf_b1=0.95)
    >>> state = opt.init({"w": jnp.ones((2, 2))})
    >>> type(state).__name__, round(float(state.b1), 4)
    ('ScheduleFreeState', 0.95)
    """
    options = _schedule_free(dict(locals()))
    if adam_learning_rate is not None:
        options["adam_learning_rate"] = _wsd(adam_learning_rate, total_steps, warmup_fraction,
                                             decay_fraction)
    options.update(b1=options.pop("prism_b1"), nesterov=False, bias_correction=False)
    return _get("prism", options)


def schedule_free_adam(learning_rate, total_steps, warmup_fraction=0.1, decay_fraction=0.1,
                       weighting_mode="practical", sf_b1=0.9, state_dtype=None, b1=0.0, b2=0.999,
                       eps=1e-8, weight_decay=0.0, weight_decay_mask=None, mu_dtype=None,
                       axis_name=None, key=42):
    """Schedule-Free AdamW (0.2.1): ``adamw`` (``b1=0`` default), averaged, on a WSD schedule.

    Args:
      learning_rate: peak of the WSD schedule.
      total_steps: length of the WSD schedule.
      warmup_fraction: WSD warmup fraction.
      decay_fraction: WSD decay fraction.
      weighting_mode: Schedule-Free weights (default ``"practical"``).
      sf_b1: Schedule-Free interpolation β.
      state_dtype: dtype of the stored z sequence.
      b1: AdamW first-moment decay.
      b2: AdamW second-moment decay.
      eps: AdamW epsilon.
      weight_decay: decoupled weight decay (applied at y).
      weight_decay_mask: where to decay.
      mu_dtype: storage dtype of the AdamW moments.
      axis_name: unused (0.2.1 used it only for Magma, which is off here).
      key: int seed or PRNG key (``None``: 42).

    >>> import jax.numpy as jnp, rollfast
    >>> opt = rollfast.schedule_free_adam(1.0, total_steps=10)
    >>> p = {"w": jnp.zeros(2)}
    >>> u = opt.update({"w": jnp.array([1.0, -1.0])}, opt.init(p), p)[0]["w"]   # lr(0) = 1/2
    >>> [round(float(x), 4) for x in u]
    [-0.5, 0.5]
    """
    return _get("adamw", _schedule_free(dict(locals())))


def _kron(options: dict):
    options["mode"] = options.pop("preconditioner_mode")
    if options["preconditioner_update_probability"] is None:
        del options["preconditioner_update_probability"]
    return _get("kron", options)


def _magma(options: dict) -> dict:
    use = options.pop("use_magma")
    p, tau = options.pop("magma_p"), options.pop("magma_tau")
    if use:
        options.update(mask="magma", magma_p=p, magma_tau=tau)
    return options


def _schedule_free(options: dict) -> dict:
    total = options.pop("total_steps")
    warmup, decay = options.pop("warmup_fraction"), options.pop("decay_fraction")
    options.update(average="schedule_free",
                   learning_rate=_wsd(options["learning_rate"], total, warmup, decay))
    return options


def _wsd(peak, total, warmup, decay):
    return rollfast.wsd_schedule(peak, total, warmup, decay)


def _get(family: str, options: dict):
    """``rollfast.get(family, **options)``, with a hint naming the plugin when it is missing."""
    reg = rollfast.registry()
    try:
        record = reg.lookup("family", family)
    except UnknownNameError as exc:
        raise UnknownNameError(
            "family", family, [r.name for r in reg.records("family")],
            hint=f"the rollfast 0.2 API needs the {family!r} family of the {PROVIDERS[family]} "
                 f"plugin, which is not installed or failed to load: see `rollfast plugins`") from exc
    if options.get("key") is None:
        options["key"] = 42
    if options.get("axis_name") is None or (
            "axis_name" not in record.parameter_names and "mask" not in options):
        options.pop("axis_name", None)
    return rollfast.get(family, **options)
