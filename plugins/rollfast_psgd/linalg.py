"""Matrix building blocks of the PSGD factor updates (float32, jit-friendly).

Modes of the ``kron`` family (first- or third-party) import these: a randomised
spectral-norm lower bound for PSD and skew-symmetric matrices, the online
Procrustes rotation towards the symmetric member of ``{U Q}``, and the
Newton–Schulz polar projection onto ``(QᵀQ)^{1/2}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PROBES = 32
PROCRUSTES_MAX_STEP = 0.125
NS_TOL = 1e-3  # XᵀX this close to I: one more Newton–Schulz step reaches float32 accuracy
NS_EXTRA_ITERS = 40
EXPM_THETA = 0.125  # ‖A‖ up to which the degree-4 Taylor polynomial is float32-accurate
BLOCKING = 1024  # dense products of at least this many rows run in blocks (see _edges)
MAX_BLOCKS = 8


def sym(a):
    r"""Symmetric part :math:`(A + A^T)/2`.

    Args:
      a: a square matrix.

    >>> import jax.numpy as jnp
    >>> sym(jnp.array([[1.0, 2.0], [0.0, 1.0]]))
    Array([[1., 1.],
           [1., 1.]], dtype=float32)
    """
    return (a + a.T) / 2


def diagonal(a):
    """The diagonal of a square matrix, as a strided slice (``jnp.diagonal`` lowers to a
    masked gather inside a conditional, which takes ~10 ms to compile each time).

    >>> import jax.numpy as jnp
    >>> diagonal(jnp.arange(9.0).reshape(3, 3))
    Array([0., 4., 8.], dtype=float32)
    """
    return a.reshape(-1)[:: a.shape[0] + 1]

def along(m, x, axis):
    """Apply ``m`` to ``x`` along ``axis``: a matrix contracts ``m[a,b]·x[…,b,…]``, a
    vector multiplies elementwise.

    Args:
      m: a ``(d, d)`` matrix or a ``(d,)`` vector.
      x: the tensor.
      axis: the axis of length ``d``.

    >>> import jax.numpy as jnp
    >>> along(jnp.array([[0.0, 1.0], [1.0, 0.0]]), jnp.array([[1.0, 2.0]]), 1)
    Array([[2., 1.]], dtype=float32)
    """
    if m.ndim == 1:
        return x * m.reshape((-1,) + (1,) * (x.ndim - axis - 1))
    if axis == x.ndim - 1:
        return x @ m.T
    return jnp.moveaxis(jnp.tensordot(m, x, axes=([1], [axis])), 0, axis)


def along_upper(m, x, axis):
    r""":func:`along` for an upper-triangular ``m``, skipping its zero blocks.

    .. math::
        (MX)_i = \sum_{k \ge i} M_{ik} X_k

    over the row blocks of :func:`_edges`: with :math:`b` blocks,
    :math:`(b+1)/2b` of the whole product.

    Args:
      m: an upper-triangular ``(d, d)`` matrix.
      x: the tensor.
      axis: the axis of length ``d``.

    >>> import jax.numpy as jnp
    >>> m = jnp.triu(jnp.ones((2, 2)))
    >>> along_upper(m, jnp.arange(4.0).reshape(2, 2), 0)
    Array([[2., 4.],
           [2., 3.]], dtype=float32)
    """
    edges = _edges(m.shape[0])
    if len(edges) == 2:
        return along(m, x, axis)
    spans, blocks = _cut(x, axis, edges)
    rows = [sum(along(m[a:b, c:e], blocks[k], axis) for k, (c, e) in enumerate(spans) if k >= i)
            for i, (a, b) in enumerate(spans)]
    return jnp.concatenate(rows, axis)


def _edges(d) -> list:
    """Block boundaries of a dimension: whole below ``BLOCKING``, else blocks of about
    ``BLOCKING/4`` rows (at most ``MAX_BLOCKS``). Grams of blocks this large still run
    at the matmul's full speed."""
    blocks = 1 if d < BLOCKING else min(MAX_BLOCKS, d, max(1, 4 * d // BLOCKING))
    return [d * i // blocks for i in range(blocks + 1)]


def _cut(x, axis, edges):
    """The ``(start, stop)`` spans between ``edges`` and the slices of ``x`` along ``axis``."""
    spans = list(zip(edges, edges[1:]))
    return spans, [jax.lax.slice_in_dim(x, a, b, axis=axis) for a, b in spans]


def apply_all(mats, x, upper=False):
    """Apply one matrix or vector per axis: ``Q·X`` from the factors, ``P·X`` from
    :func:`preconditioner`.

    Args:
      mats: one matrix or vector per axis of ``x``.
      x: the tensor.
      upper: the matrices are upper triangular (:func:`along_upper`).

    >>> import jax.numpy as jnp
    >>> apply_all([jnp.array([2.0]), jnp.array([3.0, 1.0])], jnp.ones((1, 2)))
    Array([[6., 2.]], dtype=float32)
    """
    for axis, m in enumerate(mats):
        x = (along_upper if upper and m.ndim == 2 else along)(m, x, axis)
    return x


def preconditioner(qs, upper=False) -> list:
    """Per axis, ``P_i = Q_iᵀQ_i`` (dense, :func:`gram` along the columns) or ``q_i²``
    (diagonal).

    Args:
      qs: the factors of a leaf.
      upper: the dense factors are upper triangular (their zero blocks are skipped).

    >>> import jax.numpy as jnp
    >>> preconditioner([jnp.array([[1.0, 1.0], [0.0, 1.0]])])[0]
    Array([[1., 1.],
           [1., 2.]], dtype=float32)
    """
    return [gram(q, 1, True, upper) if q.ndim == 2 else q * q for q in qs]


def inverse_probe(qs, v):
    """``B = Q^{-T}·v``: per axis solve ``Q_iᵀ Y = V`` (upper-triangular dense factors) or
    divide by ``q_i``.

    The solve runs as ``Y_(i)ᵀ Q_i = V_(i)ᵀ`` with the axis last: LAPACK's right-side
    triangular solve is about 1.5× faster here than the transposed left-side one.

    Args:
      qs: the factors (dense ones upper triangular).
      v: the probe noise.

    >>> import jax.numpy as jnp
    >>> inverse_probe([jnp.array([[2.0, 0.0], [0.0, 4.0]])], jnp.ones(2))
    Array([0.5 , 0.25], dtype=float32)
    """
    for axis, q in enumerate(qs):
        if q.ndim == 1:
            v = v / q.reshape((-1,) + (1,) * (v.ndim - axis - 1))
            continue
        moved = jnp.moveaxis(v, axis, -1)
        solved = jax.lax.linalg.triangular_solve(q, moved.reshape(-1, q.shape[0]),
                                                 left_side=False, lower=False)
        v = jnp.moveaxis(solved.reshape(moved.shape), -1, axis)
    return v


def gram(z, axis, dense, upper=False):
    r"""``G_i(Z)``: ``Z_(i) Z_(i)ᵀ`` (dense) or the squared norms of the rows of ``Z_(i)``.

    A dense Gram is symmetric: along a long axis (:func:`_edges`) only its upper blocks
    :math:`G_{ij} = Z_i Z_j^T,\ i \le j` are formed, :math:`(b+1)/2b` of the product.
    With ``upper``, ``z`` is an upper-triangular matrix and ``axis`` is 1
    (:math:`G = Z^TZ`): block :math:`ij` then contracts only the rows above
    block :math:`i`'s end.

    Args:
      z: the tensor.
      axis: the factor's axis.
      dense: whether the factor is dense.
      upper: ``z`` is upper triangular (``axis`` 1).

    >>> import jax.numpy as jnp
    >>> gram(jnp.array([[1.0, 2.0], [0.0, 3.0]]), 0, False)
    Array([5., 9.], dtype=float32)
    """
    others = tuple(i for i in range(z.ndim) if i != axis)
    if not dense:
        return jnp.sum(z * z, axis=others)
    edges = _edges(z.shape[axis])
    if len(edges) == 2:
        return jnp.tensordot(z, z, axes=(others, others))
    spans, cuts = _cut(z, axis, edges)
    n = len(cuts)
    blocks = {}
    for i, (_, end) in enumerate(spans):
        for j in range(i, n):
            zi, zj = (cuts[i][:end], cuts[j][:end]) if upper else (cuts[i], cuts[j])
            blocks[i, j] = jnp.tensordot(zi, zj, axes=(others, others))
    return jnp.block([[blocks[i, j] if i <= j else blocks[j, i].T for j in range(n)] for i in range(n)])



def _power_bound(a, scale, probe):
    tiny = jnp.finfo(a.dtype).tiny
    a = a / scale
    row = a[jnp.argmax(jnp.sum(a * a, axis=1))]
    v = row + jnp.sign(probe @ row)[:, None] * probe
    for _ in range(2):
        v = v @ a
        v = v / (jnp.linalg.norm(v, axis=1, keepdims=True) + tiny)
        v = v @ a
    return scale * jnp.max(jnp.linalg.norm(v, axis=1))


def nlb_spd(a, probe):
    r"""Randomised lower bound of the spectral norm of a PSD matrix.

    With :math:`c = \max_j A_{jj}`, :math:`\hat A = A/c` and 32 probe rows seeded by the
    heaviest row of :math:`\hat A` plus the Gaussian ``probe``, two rounds of
    :math:`V \leftarrow V\hat A;\ V_r \leftarrow V_r/\|V_r\|;\ V \leftarrow V\hat A` give
    :math:`c \max_r \|V_r\| \le \|A\|_2`.

    Args:
      a: a symmetric positive semi-definite matrix.
      probe: a ``(32, d)`` standard normal matrix.

    >>> import jax, jax.numpy as jnp
    >>> probe = jax.random.normal(jax.random.PRNGKey(0), (32, 2))
    >>> round(float(nlb_spd(jnp.diag(jnp.array([4.0, 1.0])), probe)), 5)
    4.0
    """
    return _power_bound(a, jnp.max(diagonal(a)) + jnp.finfo(a.dtype).tiny, probe)


def nlb_skh(a, probe):
    r"""Randomised lower bound of the spectral norm of a skew-symmetric matrix
    (as :func:`nlb_spd`, normalised by :math:`\max |A_{ij}|`).

    Args:
      a: a skew-symmetric matrix.
      probe: a ``(32, d)`` standard normal matrix.

    >>> import jax, jax.numpy as jnp
    >>> probe = jax.random.normal(jax.random.PRNGKey(0), (32, 2))
    >>> round(float(nlb_skh(jnp.array([[0.0, 3.0], [-3.0, 0.0]]), probe)), 5)
    3.0
    """
    return _power_bound(a, jnp.max(jnp.abs(a)) + jnp.finfo(a.dtype).tiny, probe)


def procrustes(q, probe):
    r"""One online Procrustes step rotating ``q`` towards the symmetric member of its orbit.

    .. math::
        R = \frac{Q^T - Q}{\|Q^T - Q\|},\quad t_1 = \operatorname{tr}(RQ),\
        t_2 = \operatorname{tr}(R^2Q),\quad
        a = \min(-t_1/t_2, 1/8)\ (t_2<0),\ \text{else } 1/8,\quad
        Q \leftarrow (I + aR + \tfrac{a^2}{2}R^2)\,Q

    a second-order step along :math:`e^{aR}` that increases :math:`\operatorname{tr}(UQ)`.
    A symmetric ``q`` is a fixed point.

    Args:
      q: a square matrix.
      probe: a ``(32, d)`` standard normal matrix for the norm bound.

    >>> import jax, jax.numpy as jnp
    >>> q = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> bool(jnp.all(procrustes(q, jnp.ones((32, 2))) == q))
    True
    """
    tiny = jnp.finfo(q.dtype).tiny
    r = q.T - q
    r = r / (nlb_skh(r, probe) + tiny)
    rq = r @ q
    rrq = r @ rq
    t1, t2 = jnp.sum(diagonal(rq)), jnp.sum(diagonal(rrq))
    a = jnp.where(t2 < 0, jnp.minimum(-t1 / jnp.where(t2 < 0, t2, -1.0), PROCRUSTES_MAX_STEP),
                  PROCRUSTES_MAX_STEP)
    return q + a * (rq + (a / 2) * rrq)


def ns_spd(q, probe, iters):
    r"""Project ``q`` onto the SPD matrix :math:`(Q^TQ)^{1/2}` with Newton–Schulz.

    .. math::
        X_0 = Q/\sigma,\quad X \leftarrow \tfrac12 X (3I - X^TX),
        \quad Q \leftarrow \operatorname{sym}(X^T Q)

    where :math:`\sigma^2` is :func:`nlb_spd` of :math:`Q^TQ`; :math:`X` tends to the
    orthogonal polar factor of :math:`Q`. A step squares the error of a singular value
    near 1 (:math:`1+\delta \mapsto 1 - \tfrac32\delta^2`), so the iteration stops after
    the step that began with :math:`\max|X^TX - I| \le 10^{-3}`: :math:`X` is then
    orthogonal to float32 accuracy and further steps change nothing. A well-conditioned
    ``q`` needs about three steps. An ill-conditioned one needs more, since a singular
    value :math:`s \ll \sigma` only grows by 1.5× per step and stopping early would
    shrink it in :math:`X^TQ` (docs/kron.md, NS); the reference's fixed ``iters``
    steps are therefore not a limit, ``iters + 40`` is.

    Args:
      q: a square matrix.
      probe: a ``(32, d)`` standard normal matrix for the norm bound.
      iters: the reference's number of iterations; at most ``iters + 40`` run.

    Returns:
      ``(s, qtq)``: the projection and :math:`Q^TQ`, which is its square (the polar
      factor cancels) to float32 accuracy.

    >>> import jax, jax.numpy as jnp
    >>> ns_spd(jnp.array([[0.0, 2.0], [2.0, 0.0]]), jnp.ones((32, 2)), 5)[0]
    Array([[2., 0.],
           [0., 2.]], dtype=float32)
    """
    qtq = gram(q, 1, True)
    scale = 1 / (jnp.sqrt(nlb_spd(qtq, probe)) + jnp.finfo(jnp.float32).eps)
    eye = jnp.eye(q.shape[0], dtype=q.dtype)

    def running(carry):
        _, i, started_from = carry
        return (started_from > NS_TOL) & (i < iters + NS_EXTRA_ITERS)

    def step(carry):
        x, i, _ = carry
        xtx = gram(x, 1, True)
        return 0.5 * x @ (3 * eye - xtx), i + 1, jnp.max(jnp.abs(xtx - eye))

    x, _, _ = jax.lax.while_loop(running, step, (q * scale, 0, jnp.float32(jnp.inf)))
    return sym(x.T @ q), qtq


def left_step(q, terms, fraction=1.0):
    r"""The Euclidean step of the P-modes: :math:`Q - c\,\eta\,(T_1 - T_2 I)\,Q`.

    Args:
      q: a dense factor.
      terms: its :class:`~rollfast_psgd.factors.FactorTerms`.
      fraction: the fraction :math:`c` of the step.

    >>> import jax.numpy as jnp
    >>> from rollfast_psgd.factors import FactorTerms
    >>> left_step(jnp.eye(1), FactorTerms(jnp.eye(1) * 3, 1.0, 0.25, 4.0, None, 5))
    Array([[0.5]], dtype=float32)
    """
    return q - fraction * terms.eta * (terms.t1 @ q - terms.t2 * q)


def whitening_error(terms):
    r"""The symmetric whitening error :math:`\hat E = \operatorname{sym}(T_1) - T_2 I`
    of a dense factor's terms (zero at the fixed point).

    Args:
      terms: the :class:`~rollfast_psgd.factors.FactorTerms` of one dense factor.

    >>> import jax.numpy as jnp
    >>> from rollfast_psgd.factors import FactorTerms
    >>> whitening_error(FactorTerms(jnp.eye(2) * 3, 2.0, 0.1, 3.0, None, 5))
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
    """
    return sym(terms.t1) - terms.t2 * jnp.eye(terms.t1.shape[0], dtype=terms.t1.dtype)


def expm_taylor(a, norm):
    r"""Matrix exponential of a small matrix: degree-4 Taylor with scaling and squaring.

    With :math:`s = \max(0, \lceil\log_2(\rho/\theta)\rceil)`, :math:`\theta = 1/8`
    and :math:`B = A/2^s`,

    .. math::
        e^A \approx \Bigl(I + B + B^2\bigl(\tfrac12 I + \tfrac16 B + \tfrac1{24} B^2\bigr)\Bigr)^{2^s}

    two matrix products when :math:`s = 0`, and the truncation error is at most
    :math:`\theta^5/5!\,e^\theta \approx 3\cdot10^{-7}` relative (each squaring doubles
    it: :math:`5\cdot10^{-6}` for :math:`\lVert A\rVert = 2`). ``norm`` is an
    estimate :math:`\rho \ge \lVert A\rVert_2`; the PSGD step :math:`-\eta\hat E` has
    :math:`\lVert\eta\hat E\rVert_2 \le \eta\ell \le \eta_0`, so with the default
    ``preconditioner_lr`` no squaring runs. (Padé-13, as in ``jax.scipy.linalg.expm``,
    spends six products and a solve on matrices of any norm.)

    Args:
      a: a square matrix.
      norm: an estimate of (an upper bound of) its spectral norm.

    >>> import jax.numpy as jnp
    >>> e = expm_taylor(jnp.diag(jnp.array([0.1, -2.0])), 2.0)   # four squarings
    >>> jnp.abs(jnp.diagonal(e) / jnp.exp(jnp.array([0.1, -2.0])) - 1) < jnp.array([3e-7, 1e-5])
    Array([ True,  True], dtype=bool)
    """
    squarings = jnp.maximum(jnp.ceil(jnp.log2(jnp.maximum(norm, 1e-30) / EXPM_THETA)), 0).astype(jnp.int32)
    b = a / jnp.exp2(squarings.astype(a.dtype))
    eye = jnp.eye(a.shape[0], dtype=a.dtype)
    b2 = b @ b
    e = eye + b + b2 @ (0.5 * eye + b / 6 + b2 / 24)
    return jax.lax.fori_loop(0, squarings, lambda _, e: e @ e, e)
