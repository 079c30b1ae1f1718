"""Kronecker factors of one leaf: layout, applying Q and P, Gram terms, and the
common part of a factor update (curvature bound, Lipschitz step size, diagonal rule,
balancing). A mode supplies only the dense geometry (see the package docstring).

Everything here works on one un-stacked leaf in float32; scanned leaves are mapped
over their leading axis by the caller. A scalar leaf is viewed as shape ``(1,)``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# along, along_upper, apply_all, gram, inverse_probe and preconditioner are also part of
# this module's public names (modes written against earlier versions import them here).
from rollfast_psgd.linalg import (along, along_upper, apply_all, gram, inverse_probe,  # noqa: F401
                                  nlb_spd, preconditioner)

STATISTICS = ("Ph", "Qh")
MEMORY_SAVE_MODES = (None, "one_diag", "all_diag")
MAX_NDIM = 13


class FactorTerms(NamedTuple):
    """What the family computed for one factor; the input of a mode's update.

    ``t1``: Gram of the statistic along the factor's axis (``+ damping`` unless the mode
    uses the inverse probe); ``t2``: ``n/d`` (a scalar) or the Gram of ``Q^{-T}v``;
    ``eta``: the normalised step; ``bound``: the curvature bound ℓ of this update;
    ``probe``: a ``(32, d)`` standard normal matrix for the geometry's own randomised
    norm bounds (see :mod:`rollfast_psgd.linalg`); ``newton_schulz_iters``: the family option.
    """

    t1: object
    t2: object
    eta: object
    bound: object
    probe: object
    newton_schulz_iters: int


class ModeSpec(NamedTuple):
    """A mode's geometry, read from the ``impl`` keywords it registered."""

    update_dense: Callable
    update_diag: Callable | None = None
    statistic: str = "Ph"
    inverse_probe: bool = False


def mode_spec(impl) -> ModeSpec:
    """Validate a registered mode's ``impl`` mapping and build its :class:`ModeSpec`.

    Args:
      impl: the keywords the mode passed to ``register.mode``.

    >>> mode_spec({"update_dense": abs}).statistic
    'Ph'
    """
    unknown = sorted(set(impl) - set(ModeSpec._fields))
    if unknown or "update_dense" not in impl:
        raise TypeError(f"a kron mode registers update_dense= and optionally {ModeSpec._fields[1:]}; "
                        f"got {sorted(impl)}")
    spec = ModeSpec(**impl)
    if spec.statistic not in STATISTICS:
        raise ValueError(f"kron mode statistic must be one of {STATISTICS}, got {spec.statistic!r}")
    return spec


def layout(shape, max_size_triangular, max_skew_triangular, min_ndim_triangular,
           memory_save_mode) -> tuple[bool, ...]:
    """Which factors of a leaf of ``shape`` are dense (True) or diagonal (False).

    A factor is diagonal if ``d ≤ 1``, ``d > max_size_triangular``,
    ``d² > max_skew_triangular · n``, the leaf has fewer than ``min_ndim_triangular``
    axes, or ``memory_save_mode`` forces it (``"one_diag"``: the largest axis, the last
    among equals; ``"all_diag"``: every axis).

    Args:
      shape: the (un-stacked) leaf shape; ``()`` is treated as ``(1,)``.
      max_size_triangular: largest dense factor.
      max_skew_triangular: skew limit of dense factors.
      min_ndim_triangular: fewest axes for any dense factor.
      memory_save_mode: ``None``, ``"one_diag"`` or ``"all_diag"``.

    >>> layout((1024, 4096), 8192, 1.0, 2, None)
    (True, False)
    """
    if memory_save_mode not in MEMORY_SAVE_MODES:
        raise ValueError(f"memory_save_mode must be one of {MEMORY_SAVE_MODES}, got {memory_save_mode!r}")
    shape = tuple(shape) or (1,)
    if len(shape) > MAX_NDIM:
        raise ValueError(f"kron supports leaves of at most {MAX_NDIM} dimensions, got shape {shape}")
    n = 1
    for d in shape:
        n *= d
    forced = set()
    if memory_save_mode == "one_diag":
        forced = {max(range(len(shape)), key=lambda i: (shape[i], i))}
    elif memory_save_mode == "all_diag":
        forced = set(range(len(shape)))
    return tuple(not (d <= 1 or d > max_size_triangular or d * d > max_skew_triangular * n
                      or len(shape) < min_ndim_triangular or i in forced)
                 for i, d in enumerate(shape))


def init_factors(shape, dense, scale) -> tuple:
    """Factors of a leaf at ``scale^{1/k}·I`` (dense) or ``scale^{1/k}·1`` (diagonal).

    Args:
      shape: the (un-stacked) leaf shape.
      dense: its :func:`layout`.
      scale: the initial scale ``s`` of ``P = s²I``.

    >>> [f.shape for f in init_factors((3, 2), (True, False), 1.0)]
    [(3, 3), (2,)]
    """
    shape = tuple(shape) or (1,)
    root = scale ** (1 / len(shape))
    return tuple(root * (jnp.eye(d) if is_dense else jnp.ones(d)) for d, is_dense in zip(shape, dense))


def diag_step(q, terms):
    r"""The diagonal rule of every mode: :math:`q \leftarrow |q \odot (1 - \eta (T_1 - T_2))|`.

    Args:
      q: the diagonal factor.
      terms: its :class:`FactorTerms`.

    >>> import jax.numpy as jnp
    >>> diag_step(jnp.ones(2), FactorTerms(jnp.array([3.0, 1.0]), 1.0, 0.5, 4.0, None, 5))
    Array([0., 1.], dtype=float32)
    """
    return jnp.abs(q * (1 - terms.eta * (terms.t1 - terms.t2)))


class UpdateConfig(NamedTuple):
    """Family options a factor update reads."""

    spec: ModeSpec
    preconditioner_lr: float
    beta_lipschitz: float
    track_lipschitz: bool
    damping: float
    newton_schulz_iters: int
    axis_name: object = None


def update_factors(qs, ls, h, v, probes, balance, cfg: UpdateConfig, segments=None, valid=None):
    r"""One preconditioner update of a leaf's factors (float32, un-stacked leaf).

    The statistic :math:`X = Qh` or :math:`Ph` (and :math:`B = Q^{-T}v` for inverse-probe
    modes) is formed once from the old factors. Per factor: :math:`T_1 = G_i(X)` (mean
    over ``axis_name``), :math:`T_2 = G_i(B)` or, with :math:`T_1 \mathrel{+}= \delta`,
    :math:`n/d_i`; the bound :math:`\ell` is ``nlb_spd`` of :math:`T_1+T_2`
    (:math:`\mathrm{nlb}(T_1)+T_2` for scalar :math:`T_2`) or :math:`\max(T_1+T_2)` for a
    diagonal factor (max over ``axis_name``); :math:`L \leftarrow \max(\beta L +
    (1-\beta)\ell, \ell)`, :math:`\eta = \eta_0/L` (or :math:`\eta_0/\ell`). Then the mode
    moves the factor; with ``balance`` every factor is rescaled to the geometric mean of
    the max-abs entries (the Kronecker product is unchanged). Last, each factor's
    :math:`Q^TQ` for applying :math:`P`, unless the mode returned it.

    Args:
      qs: the factors (float32).
      ls: their Lipschitz estimates, or ``None``.
      h: the probe gradient.
      v: the probe noise.
      probes: per factor, ``None`` (diagonal) or a ``(2, 32, d)`` standard normal array:
        the probe of the bound ℓ and that of the geometry.
      balance: a boolean scalar.
      cfg: the :class:`UpdateConfig`.
      segments: for a :class:`Packing` of small leaves (one diagonal factor holding
        several leaves), their :class:`Segments`: bounds, Lipschitz estimates and steps
        are then per segment, exactly as for the leaves one by one.
      valid: for a zero-padded piece of a blocked leaf, per factor the valid length
        (an int scalar): ``h`` and ``v`` must be zero on the padding; :math:`T_2` and the
        damping count only the valid block and the moved factors are zeroed on the
        padding (:func:`confine`), so the valid block moves as an unpadded factor would.

    Returns:
      ``(new_qs, new_ls, new_ps)``: the factors, their Lipschitz estimates, and their
      :func:`preconditioner` (the one a mode returned with its factor, if it did).

    >>> import jax, jax.numpy as jnp
    >>> from rollfast_psgd.factors import UpdateConfig, mode_spec
    >>> cfg = UpdateConfig(mode_spec({"update_dense": lambda q, t: q}), 0.1, 0.9, True, 1e-9, 5)
    >>> qs, ls, ps = update_factors([jnp.ones(2)], [jnp.zeros([])], jnp.zeros(2), jnp.ones(2),
    ...                             [None], False, cfg)
    >>> qs[0], ps[0]
    (Array([1.1, 1.1], dtype=float32), Array([1.21, 1.21], dtype=float32))
    """
    spec = cfg.spec
    upper = spec.inverse_probe  # the protocol: inverse-probe modes keep dense factors upper triangular
    x, b = statistic(qs, h, v, spec, valid)
    n = h.size if valid is None else jnp.prod(jnp.stack(valid)).astype(jnp.float32)
    new_qs, new_ls, new_ps = [], [], []
    for i, (q, probe) in enumerate(zip(qs, probes)):
        p_bound, p_geom = probe if q.ndim == 2 else (None, None)
        t1, t2 = gram_terms(x, b, axis=i, q=q, n=n, cfg=cfg, valid=None if valid is None else valid[i])
        bound = curvature_bound(t1, t2, p_bound, dense=q.ndim == 2, segments=segments,
                                axis_name=cfg.axis_name)
        eta, l_new = lipschitz_step(bound, None if ls is None else ls[i], cfg, segments)
        new_ls.append(l_new)
        new_q, new_p = move_factor(q, FactorTerms(t1, t2, eta, bound, p_geom, cfg.newton_schulz_iters), spec)
        if valid is not None:
            new_q, new_p = confine(new_q, new_p, valid[i])
        new_qs.append(new_q)
        new_ps.append(new_p)
    new_qs, new_ps = balanced(new_qs, new_ps, balance, cfg.axis_name)
    new_ps = [preconditioner([q], upper)[0] if p is None else p.astype(jnp.float32)
              for q, p in zip(new_qs, new_ps)]
    return new_qs, (new_ls if cfg.track_lipschitz else ls), new_ps


def statistic(qs, h, v, spec: ModeSpec, valid=None):
    r"""The statistic of one update, from the old factors: :math:`X = Qh` (``"Qh"``) or
    :math:`X = Ph` (``"Ph"``), and :math:`B = Q^{-T}v` for an inverse-probe mode
    (else ``None``).

    Args:
      qs: the factors (float32; dense ones upper triangular for inverse-probe modes).
      h: the probe gradient.
      v: the probe noise.
      spec: the mode's :class:`ModeSpec`.
      valid: per factor the valid length of a zero-padded piece, or ``None``; the
        inverse probe then solves with the identity on the padding (``v`` is zero there).

    >>> import jax.numpy as jnp
    >>> x, b = statistic([jnp.array([2.0, 3.0])], jnp.ones(2), jnp.ones(2), mode_spec({"update_dense": abs}))
    >>> x, b
    (Array([4., 9.], dtype=float32), None)
    """
    upper = spec.inverse_probe
    x = apply_all(qs, h, upper) if spec.statistic == "Qh" else apply_all(preconditioner(qs, upper), h)
    if not spec.inverse_probe:
        return x, None
    if valid is not None:
        qs = [q + jnp.diag(1 - valid_mask(q.shape[0], r)) if q.ndim == 2 else q + 1 - valid_mask(q.shape[0], r)
              for q, r in zip(qs, valid)]
    return x, inverse_probe(qs, v)


def gram_terms(x, b, *, axis, q, n, cfg: UpdateConfig, valid=None):
    r"""``(T_1, T_2)`` of the factor along ``axis``.

    .. math::
        T_1 = \operatorname{mean}_{\text{axis\_name}} G_i(X) + \delta,\quad T_2 = n/d_i
        \qquad\text{or, with } B:\qquad
        T_1 = \operatorname{mean} G_i(X),\quad T_2 = \operatorname{mean} G_i(B)

    Args:
      x: the statistic.
      b: the inverse probe :math:`B`, or ``None``.
      axis: the factor's axis :math:`i`.
      q: the factor (its rank says dense or diagonal, its length is :math:`d_i`).
      n: the number of elements of the leaf.
      cfg: the :class:`UpdateConfig` (``damping`` δ, ``axis_name``).
      valid: the valid length :math:`d_i` of a zero-padded factor (``n`` is then the
        valid element count), or ``None``; δ is added on the valid block only.

    >>> import jax.numpy as jnp
    >>> cfg = UpdateConfig(mode_spec({"update_dense": abs}), 0.1, 0.9, True, 0.5, 5)
    >>> gram_terms(jnp.array([1.0, 2.0]), None, axis=0, q=jnp.ones(2), n=2, cfg=cfg)
    (Array([1.5, 4.5], dtype=float32), Array(1., dtype=float32))
    """
    dense = q.ndim == 2
    mean = (lambda t: jax.lax.pmean(t, cfg.axis_name)) if cfg.axis_name else (lambda t: t)
    t1 = mean(gram(x, axis, dense))
    if b is not None:
        return t1, mean(gram(b, axis, dense))
    if valid is None:
        return t1 + cfg.damping, jnp.float32(n / q.shape[0])
    mask = valid_mask(q.shape[0], valid)
    return t1 + cfg.damping * (jnp.outer(mask, mask) if dense else mask), n / jnp.maximum(valid, 1)


def curvature_bound(t1, t2, probe, *, dense, segments=None, axis_name=None):
    r"""The curvature bound :math:`\ell` of one factor update.

    .. math::
        \ell = \begin{cases}
        \mathrm{nlb}(T_1) + T_2 & \text{dense, scalar } T_2\\
        \mathrm{nlb}(T_1 + T_2) & \text{dense, matrix } T_2\\
        \max(T_1 + T_2) & \text{diagonal (per segment of a packed factor)}
        \end{cases}

    maxed over ``axis_name``; :math:`\mathrm{nlb}` is
    :func:`~rollfast_psgd.linalg.nlb_spd`, a lower bound of the spectral norm.

    Args:
      t1: :math:`T_1`.
      t2: :math:`T_2`.
      probe: the ``(32, d)`` probe of the norm bound (dense factors).
      dense: whether the factor is dense.
      segments: the :class:`Segments` of a packed diagonal factor, or ``None``.
      axis_name: mapped axis to max the bound over.

    >>> import jax.numpy as jnp
    >>> curvature_bound(jnp.array([1.0, 3.0]), jnp.float32(1.0), None, dense=False)
    Array(4., dtype=float32)
    """
    if not dense:
        bound = jnp.max(t1 + t2) if segments is None else segments.max(t1 + t2)
    elif jnp.ndim(t2) == 0:
        bound = nlb_spd(t1, probe) + t2
    else:
        bound = nlb_spd(t1 + t2, probe)
    return jax.lax.pmax(bound, axis_name) if axis_name else bound


def lipschitz_step(bound, l, cfg: UpdateConfig, segments=None):
    r"""``(η, L')``: the normalised step and the new Lipschitz estimate.

    .. math::
        L' = \max(\beta L + (1-\beta)\ell,\ \ell),\quad \eta = \eta_0 / \max(L', \text{tiny})

    or, without ``track_lipschitz``, :math:`\eta = \eta_0/(\ell + \text{tiny})` and
    :math:`L'` is ``None``. For a packed factor, :math:`\eta` is spread per segment.

    Args:
      bound: the curvature bound :math:`\ell`.
      l: the previous estimate :math:`L` (ignored without ``track_lipschitz``).
      cfg: the :class:`UpdateConfig` (η₀, β, ``track_lipschitz``).
      segments: the :class:`Segments` of a packed factor, or ``None``.

    >>> import jax.numpy as jnp
    >>> cfg = UpdateConfig(mode_spec({"update_dense": abs}), 0.1, 0.5, True, 1e-9, 5)
    >>> lipschitz_step(jnp.float32(2.0), jnp.float32(4.0), cfg)
    (Array(0.03333334, dtype=float32), Array(3., dtype=float32))
    """
    tiny = jnp.finfo(jnp.float32).tiny
    if cfg.track_lipschitz:
        l_new = jnp.maximum(cfg.beta_lipschitz * l + (1 - cfg.beta_lipschitz) * bound, bound)
        eta = cfg.preconditioner_lr / jnp.maximum(l_new, tiny)
    else:
        l_new, eta = None, cfg.preconditioner_lr / (bound + tiny)
    return (eta if segments is None else segments.spread(eta)), l_new


def move_factor(q, terms: FactorTerms, spec: ModeSpec):
    """``(q', p')``: the mode's move of one factor (``update_dense``, or ``update_diag`` /
    :func:`diag_step` for a vector), in float32; ``p'`` is the ``q'ᵀq'`` the mode
    returned with it, or ``None``.

    >>> import jax.numpy as jnp
    >>> terms = FactorTerms(jnp.array([3.0, 1.0]), 1.0, 0.5, 4.0, None, 5)
    >>> move_factor(jnp.ones(2), terms, mode_spec({"update_dense": abs}))
    (Array([0., 1.], dtype=float32), None)
    """
    move = spec.update_dense if q.ndim == 2 else (spec.update_diag or diag_step)
    moved = move(q, terms)
    new_q, new_p = moved if isinstance(moved, tuple) else (moved, None)
    return new_q.astype(jnp.float32), new_p


def confine(q, p, valid):
    """A moved factor (and the ``p`` a mode returned) zeroed outside its first ``valid``
    rows and columns (entries, for a diagonal).

    >>> import jax.numpy as jnp
    >>> confine(jnp.ones((2, 2)), None, 1)
    (Array([[1., 0.],
           [0., 0.]], dtype=float32), None)
    """
    mask = valid_mask(q.shape[0], valid)
    if q.ndim == 2:
        mask = jnp.outer(mask, mask)
    return q * mask, (None if p is None else p * mask)


def valid_mask(d, valid):
    """The float32 ``(…, d)`` 0/1 mask of the first ``valid`` of ``d`` entries (``valid``
    an int array of shape ``(…)``)."""
    return (jnp.arange(d) < jnp.asarray(valid)[..., None]).astype(jnp.float32)


def balanced(qs, ps, when, axis_name=None):
    r"""Factors (and the products :math:`P_i` modes returned) rescaled by
    :func:`balancing`: :math:`Q_i \leftarrow s_iQ_i,\ P_i \leftarrow s_i^2P_i`, where
    ``when`` is true and there are two or more factors.

    >>> import jax.numpy as jnp
    >>> balanced([jnp.array([4.0]), jnp.array([1.0])], [None, jnp.array([1.0])], True)
    ([Array([2.], dtype=float32), Array([2.], dtype=float32)], [None, Array([4.], dtype=float32)])
    """
    if len(qs) < 2:
        return qs, ps
    scales = balancing(qs, when, axis_name)
    return ([q * s for q, s in zip(qs, scales)],
            [None if p is None else p * s**2 for p, s in zip(ps, scales)])


def balancing(qs, when, axis_name=None) -> list:
    r"""Per factor, the scale that brings it to the common max-abs entry
    :math:`\bar\nu = (\prod_i \nu_i)^{1/k}`, :math:`\nu_i = \max|Q_i|`, where ``when``
    is true (else 1). The scales multiply to 1: the Kronecker product is unchanged.

    Args:
      qs: the factors of a leaf.
      when: a boolean scalar.
      axis_name: reduce the max over this axis, if given.

    >>> import jax.numpy as jnp
    >>> balancing([jnp.array([4.0]), jnp.array([1.0])], True)
    [Array(0.5, dtype=float32), Array(2., dtype=float32)]
    """
    nus = jnp.stack([jnp.max(jnp.abs(q)) for q in qs])
    if axis_name:
        nus = jax.lax.pmax(nus, axis_name)
    positive = jnp.all(nus > 0)
    nus = jnp.where(positive, nus, 1.0)
    return list(jnp.where(when & positive, jnp.exp(jnp.mean(jnp.log(nus))) / nus, 1.0))


class Segments(NamedTuple):
    """Consecutive segments of a packed vector: reductions per segment and back.

    >>> import jax.numpy as jnp
    >>> seg = Segments((2, 1))
    >>> seg.max(jnp.array([1.0, 3.0, 2.0])), seg.spread(jnp.array([10.0, 20.0]))
    (Array([3., 2.], dtype=float32), Array([10., 10., 20.], dtype=float32))
    """

    sizes: tuple

    def _ids(self):
        return np.repeat(np.arange(len(self.sizes)), self.sizes)

    def max(self, x):
        return jax.ops.segment_max(x, self._ids(), len(self.sizes), indices_are_sorted=True)

    def mean(self, x):
        total = jax.ops.segment_sum(x, self._ids(), len(self.sizes), indices_are_sorted=True)
        return total / jnp.asarray(self.sizes, x.dtype)

    def spread(self, v):
        return v[self._ids()]  # a gather by constant indices compiles in ms; jnp.repeat took 70


class Packing(NamedTuple):
    r"""How leaves run as units: alone, stacked with leaves of the same shape, or packed.

    * **Packed:** every leaf of at most one axis (not scanned) has a single diagonal
      factor, and everything kron does to it is elementwise except a max or mean per
      leaf, so these leaves are concatenated into one vector and those reductions run
      per :class:`Segments`.
    * **Stacked** (for the preconditioner update): un-scanned leaves of equal shape and
      factor layout are stacked into one ``(k, …)`` unit that runs as a scanned leaf
      (``vmap``, or ``lax.map`` with ``lax_map_scanned_layers``): the same math per
      layer, one copy of the code. Applying ``P`` is left per leaf: it is little code,
      runs every step, and stacking would copy the momentum each time.

    The numbers are those of the leaves one by one (up to the probe noise); the compiled
    step has one set of kernels instead of one per leaf. Each small leaf alone adds about
    0.3 s of compile time; 24 separate 256×256 matrices compile in 7 s, stacked in 2 s.

    ``others``: indices of the leaves that stay alone; ``groups``: tuples of the indices
    stacked together; ``small``: those packed, with their ``sizes``. Units are ``others``
    in order, then the groups, then the packed one (if any).

    >>> import jax.numpy as jnp
    >>> pk = Packing.of([(False, (True, False)), (False, (False,)), (False, (False,)),
    ...                  (False, (True, True)), (False, (True, True))],
    ...                 [(2, 3), (4,), (), (5, 5), (5, 5)])
    >>> pk.others, pk.groups, pk.small
    ((0,), ((3, 4),), (1, 2))
    >>> leaves = [jnp.ones((2, 3)), jnp.ones(4), jnp.ones(()), jnp.ones((5, 5)), jnp.ones((5, 5))]
    >>> [u.shape for u in pk.pack(leaves)]
    [(2, 3), (2, 5, 5), (5,)]
    """

    others: tuple
    groups: tuple
    small: tuple
    sizes: tuple

    @classmethod
    def of(cls, plans, shapes, enabled=True, stack=True):
        """Pack the un-scanned, non-empty leaves of at most one axis, if there are two or
        more (unless not ``enabled``); with ``stack``, stack the other un-scanned,
        non-empty leaves that share a shape and layout."""
        import math

        small = tuple(i for i, ((scanned, _), shape) in enumerate(zip(plans, shapes))
                      if enabled and not scanned and len(shape) <= 1 and math.prod(shape) > 0)
        if len(small) < 2:
            small = ()
        alike = {}
        for i, ((scanned, dense), shape) in enumerate(zip(plans, shapes)):
            if i not in small and not scanned and math.prod(shape) > 0:
                alike.setdefault((tuple(shape), dense), []).append(i)
        groups = tuple(tuple(g) for g in alike.values() if stack and len(g) > 1)
        grouped = {i for g in groups for i in g}
        others = tuple(i for i in range(len(plans)) if i not in small and i not in grouped)
        return cls(others, groups, small, tuple(math.prod(shapes[i]) for i in small))

    def plans(self, plans) -> list:
        """Per unit, its ``(scanned, dense)`` plan; a stack is scanned."""
        return ([plans[i] for i in self.others] + [(True, plans[g[0]][1]) for g in self.groups]
                + [(False, (False,))] * bool(self.small))

    @property
    def segments(self) -> list:
        """Per unit: ``None``, or the packed unit's :class:`Segments`."""
        return [None] * (len(self.others) + len(self.groups)) + ([Segments(self.sizes)] if self.small else [])

    def pack(self, per_leaf: list) -> list:
        """Per-leaf arrays (or lists of one array per factor) → per-unit."""
        units = [per_leaf[i] for i in self.others]
        for group in self.groups:
            items = [per_leaf[i] for i in group]
            if isinstance(items[0], (list, tuple)):
                units.append([jnp.stack(parts) for parts in zip(*items)])
            else:
                units.append(jnp.stack(items))
        if self.small:
            items = [per_leaf[i] for i in self.small]
            if isinstance(items[0], (list, tuple)):
                units.append([jnp.concatenate([jnp.reshape(x[0], -1) for x in items])])
            else:
                units.append(jnp.concatenate([jnp.reshape(x, -1) for x in items]))
        return units

    def unpack(self, units: list, like: list) -> list:
        """Per-unit → per-leaf, shaped like the per-leaf ``like``."""
        out = [None] * len(like)
        for i, unit in zip(self.others, units):
            out[i] = unit
        for group, unit in zip(self.groups, units[len(self.others):]):
            for k, i in enumerate(group):
                out[i] = [part[k] for part in unit] if isinstance(unit, (list, tuple)) else unit[k]
        if self.small:
            packed = units[-1]
            is_list = isinstance(packed, (list, tuple))
            flat = packed[0] if is_list else packed
            start = 0
            for i in self.small:
                shape = np.shape(like[i][0] if is_list else like[i])
                piece = flat[start:start + max(int(np.prod(shape)), 1)].reshape(shape)
                start += piece.size
                out[i] = [piece] if is_list else piece
        return out
