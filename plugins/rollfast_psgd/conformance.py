r"""The kron mode protocol, declared to the registry, and the contract every kron mode passes.

A mode of ``kron`` registers ``update_dense`` and optionally ``update_diag``,
``statistic`` (``"Ph"`` or ``"Qh"``) and ``inverse_probe`` (see the package
docstring), and in ``metadata``:

``reference_dense``  ``(q, terms) -> q`` in float64 NumPy: the same geometry, written
    plainly (``terms`` carries float64 ``t1``, ``t2``, ``eta``, ``bound``, ``probe``,
    ``newton_schulz_iters``; see :mod:`rollfast_psgd.reference`);
``invariants``       what every factor it returns satisfies, among
    ``"symmetric"``, ``"upper_triangular"`` and ``"spd"``.

At load time the registry checks the keywords and values (:func:`prepare`) and wraps
the geometry so that a factor of the wrong shape or dtype is an error at trace time
naming the mode and the factor. :func:`contract` is what ``rollfast.testing.check_mode``
runs for a kron mode:

``reference``   10 updates of a ``(5, 8)`` leaf (a dense factor and a diagonal one) agree
                with :func:`~rollfast_psgd.reference.reference_update` driven by the
                mode's ``reference_dense`` to 1e-5 (relative, float32 vs float64);
``P = QᵀQ``     the preconditioner returned with each factor is its ``QᵀQ`` (1e-5);
``invariants``  the declared invariants hold for every factor of every update;
``whitening``   fitted to ``h = C^{1/2} Z`` with ``cond(C) = 100`` (``Z`` orthogonal rows:
                no sampling noise), the eigenvalues of ``P C P`` (``Q C Qᵀ`` for a ``Qh``
                statistic without the inverse probe) lie in (0.8, 1.25) after 300 updates.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rollfast
from rollfast.errors import CheckFailed
from rollfast_psgd import reference
from rollfast_psgd.factors import ModeSpec, UpdateConfig, mode_spec, update_factors

INVARIANTS = ("symmetric", "upper_triangular", "spd")
TOLERANCE = 1e-5
SHAPE = (5, 8)  # a leaf with a dense 5×5 factor and a diagonal one of 8
UPDATES = 10


@rollfast.hookimpl
def precondition(register):
    register.mode_protocol("kron", required=("update_dense",),
                           optional=("update_diag", "statistic", "inverse_probe"),
                           prepare=prepare, conformance=contract, scaffold=scaffold)


def prepare(record) -> dict:
    """Check a kron mode's registration and wrap its geometry with trace-time shape checks.

    Args:
      record: the mode's registry record.

    Returns:
      Its ``impl`` with ``update_dense``/``update_diag`` wrapped by :func:`checked`.

    Raises:
      TypeError, ValueError: a bad keyword value or declared invariant.
    """
    mode_spec(record.impl)
    for key in ("update_dense", "update_diag"):
        if key in record.impl and record.impl[key] is not None and not callable(record.impl[key]):
            raise TypeError(f"{key} must be callable, got {record.impl[key]!r}")
    unknown = sorted(set(record.metadata.get("invariants", ())) - set(INVARIANTS))
    if unknown:
        raise ValueError(f"declares unknown invariants {unknown}; kron modes may declare {INVARIANTS}")
    ref = record.metadata.get("reference_dense")
    if ref is not None and not callable(ref):
        raise TypeError(f"metadata['reference_dense'] must be callable, got {ref!r}")
    impl = dict(record.impl)
    for key, kind in (("update_dense", "dense"), ("update_diag", "diagonal")):
        if impl.get(key) is not None:
            impl[key] = checked(impl[key], record.name, kind)
    return impl


def checked(geometry, mode: str, kind: str):
    """``geometry`` with its result checked at trace time: a factor (or ``(q, qᵀq)``) of
    the input factor's shape and dtype, else a ``ValueError`` naming the mode and the factor."""

    @functools.wraps(geometry)
    def move(q, terms):
        out = geometry(q, terms)
        parts = out if isinstance(out, tuple) else (out,)
        names = ("factor", "qᵀq")
        if len(parts) > 2:
            raise ValueError(f"kron mode {mode!r}: update_{'dense' if kind == 'dense' else 'diag'} "
                             f"returned {len(parts)} values; it returns q or (q, qᵀq)")
        for name, part in zip(names, parts):
            shape, dtype = getattr(part, "shape", None), getattr(part, "dtype", None)
            if shape != q.shape or dtype != q.dtype:
                raise ValueError(
                    f"kron mode {mode!r}: for the {kind} factor of shape {tuple(q.shape)} ({q.dtype}) "
                    f"the {name} returned has shape {shape and tuple(shape)} ({dtype}); it must have "
                    f"the factor's shape and dtype")
        return out

    return move


def declared(record) -> tuple:
    """``(reference_dense, invariants)`` of a mode, as its registration declares them."""
    return record.metadata.get("reference_dense"), tuple(record.metadata.get("invariants") or ())


def contract(record) -> list:
    """The kron checks of one mode: ``[(check name, zero-argument function), ...]``."""
    step = functools.cache(lambda: _step(record))
    run = functools.cache(lambda: _reference_run(record, step()))
    return [("reference", lambda: _check_reference(record, run())),
            ("P = QᵀQ", lambda: _check_preconditioner(record, run())),
            ("invariants", lambda: _check_invariants(record, run())),
            ("whitening", lambda: _check_whitening(record, step()))]


def _spec(record) -> ModeSpec:
    return mode_spec(record.impl)


def _subject(record) -> str:
    return f"kron mode {record.name!r} ({record.provider.plugin})"


def _step(record):
    """The family's factor update of a ``SHAPE`` leaf, jitted once per mode (η₀ = 0.1)."""
    probes = [np.random.default_rng(7).standard_normal((2, 32, SHAPE[0])).astype(np.float32), None]
    cfg = UpdateConfig(_spec(record), 0.1, 0.9, True, 1e-9, 5)
    update = jax.jit(lambda qs, ls, h, v: update_factors(qs, ls, h, v, probes, False, cfg))

    def step(qs, ls, h, v):
        with jax.default_matmul_precision("highest"):
            return update(qs, ls, jnp.asarray(h, jnp.float32), jnp.asarray(v, jnp.float32))

    step.probes = [probes[0].astype(np.float64), None]
    return step


def _start(record, rng) -> list:
    """Starting factors inside the mode's declared set: upper triangular for a triangular
    (or inverse-probe) mode, else symmetric positive definite; a positive diagonal."""
    _, invariants = declared(record)
    triangular = "upper_triangular" in invariants or _spec(record).inverse_probe
    d, n = SHAPE
    q = np.triu(0.1 * rng.standard_normal((d, d))) + 0.8 * np.eye(d)
    return [q if triangular else reference.sym(q) + 0.5 * np.eye(d), 0.5 + rng.random(n)]


def _reference_run(record, step):
    """10 updates by the family (float32, jitted) and by the float64 reference, side by side.

    Returns ``(got, want)``: per update, ``(qs, ps)`` from the family and ``qs`` from the reference.
    """
    ref, _ = declared(record)
    spec = _spec(record)
    rng = np.random.default_rng(3)
    qs = _start(record, rng)
    h = rng.standard_normal(SHAPE) * np.linspace(0.2, 3.0, SHAPE[-1])
    v = rng.standard_normal(SHAPE)
    jq, jl, ls = [jnp.asarray(q, jnp.float32) for q in qs], [jnp.zeros([], jnp.float32)] * 2, [0.0] * 2
    got, want = [], []
    for _ in range(UPDATES):
        jq, jl, jp = step(jq, jl, h, v)
        got.append(([np.asarray(q, np.float64) for q in jq], [np.asarray(p, np.float64) for p in jp]))
        if ref is not None:
            qs, ls = reference.reference_update(ref, qs, ls, h, v, step.probes,
                                                statistic=spec.statistic, inverse=spec.inverse_probe)
            want.append(qs)
    return got, want


def _where(i: int) -> str:
    return f"factor {i} (dense {SHAPE[0]}×{SHAPE[0]})" if i == 0 else f"factor {i} (diagonal {SHAPE[1]})"


def _check_reference(record, run) -> None:
    got, want = run
    if not want:
        raise CheckFailed(_subject(record), "reference", "registration",
                          "no float64 reference: register metadata={'reference_dense': fn}")
    for i, (g, w) in enumerate(zip(got[-1][0], want[-1])):
        err = np.max(np.abs(g - w)) / np.max(np.abs(w))
        if not err < TOLERANCE:
            raise CheckFailed(_subject(record), "reference", _where(i),
                              f"relative error {err:.2e} after {UPDATES} updates (allowed {TOLERANCE:.0e})")


def _check_preconditioner(record, run) -> None:
    got, _ = run
    for k, (qs, ps) in enumerate(got):
        for i, (q, p) in enumerate(zip(qs, ps)):
            want = q.T @ q if q.ndim == 2 else q * q
            err = np.max(np.abs(p - want)) / np.max(np.abs(want))
            if not err < TOLERANCE:
                raise CheckFailed(_subject(record), "P = QᵀQ", f"{_where(i)}, update {k + 1}",
                                  f"max |P − QᵀQ| / max |QᵀQ| = {err:.2e} (allowed {TOLERANCE:.0e})")


def _check_invariants(record, run) -> None:
    got, _ = run
    _, invariants = declared(record)
    for k, (qs, _) in enumerate(got):
        q, where = qs[0], f"{_where(0)}, update {k + 1}"
        if not np.all(np.isfinite(q)):
            raise CheckFailed(_subject(record), "invariants", where, "non-finite entries")
        scale = np.max(np.abs(q))
        asym = np.max(np.abs(q - q.T)) / scale
        if "symmetric" in invariants and asym > 1e-6:
            raise CheckFailed(_subject(record), "invariants", where,
                              f"declared symmetric, max |Q − Qᵀ| / max |Q| = {asym:.2e}")
        lower = np.max(np.abs(np.tril(q, -1))) / scale
        if "upper_triangular" in invariants and lower > 0:
            raise CheckFailed(_subject(record), "invariants", where,
                              f"declared upper triangular, max |tril(Q, −1)| / max |Q| = {lower:.2e}")
        low = np.min(np.linalg.eigvalsh(reference.sym(q)))
        if "spd" in invariants and not low > 0:
            raise CheckFailed(_subject(record), "invariants", where,
                              f"declared SPD, smallest eigenvalue {low:.3e}")


def _check_whitening(record, step, updates: int = 300, band=(0.8, 1.25)) -> None:
    r"""The fit whitens a known covariance :math:`C` (condition number 100).

    ``h = C^{1/2} Z`` and ``v = Z`` every update, ``Z`` five rows of the 8×8 Hadamard
    matrix (:math:`ZZ^T = 8I`, equal column norms): the exact fixed point is
    :math:`P C P = I` with a constant diagonal factor (:math:`QCQ^T = I` for a ``Qh``
    statistic without the inverse probe), reached without sampling noise.
    """
    spec = _spec(record)
    d, n = SHAPE
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    eig = np.logspace(-1, 1, d)
    cov, root = (basis * eig) @ basis.T, (basis * np.sqrt(eig)) @ basis.T
    z = _hadamard(n)[:d]
    qs, ls = [jnp.eye(d), jnp.ones(n)], [jnp.zeros([], jnp.float32)] * 2
    for _ in range(updates):
        qs, ls, _ = step(qs, ls, root @ z, z)
    q = np.asarray(qs[0], np.float64) * float(np.mean(np.asarray(qs[1], np.float64)))
    white = q @ cov @ q.T if spec.statistic == "Qh" and not spec.inverse_probe else q.T @ q @ cov @ q.T @ q
    got = np.linalg.eigvalsh(reference.sym(white))
    if not np.all((got > band[0]) & (got < band[1])):
        raise CheckFailed(_subject(record), "whitening", f"{_where(0)} after {updates} updates",
                          f"eigenvalues of the whitened covariance {np.round(got, 3).tolist()}, "
                          f"outside {band}")


def _hadamard(n: int):
    """The ``n×n`` Sylvester–Hadamard matrix (``n`` a power of two)."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h


def scaffold(name: str) -> str:
    """The module of a new kron mode package named ``name`` (``rollfast new-plugin``)."""
    text = (Path(__file__).parent / "templates" / "mode.py.tmpl").read_text()
    return text.replace("{{MODE}}", name.upper())


__all__ = ["prepare", "checked", "contract", "declared", "scaffold", "INVARIANTS"]
