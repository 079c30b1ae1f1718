"""The conformance kit over every registered contribution (first-party, contrib, the
example plugins), and the kit catching wrong modes by name of the check."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from rollfast_partition import MatrixSpec
from rollfast_psgd.modes.exp import exp_dense
from rollfast_psgd.reference import exp_reference

import rollfast
import rollfast.testing as rt
from rollfast.errors import CheckFailed


def _records():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rollfast.RollfastPluginWarning)
        return [r for r in rollfast.available() if r.kind != "export"]


RECORDS = {(r.kind, r.qualified_name): r for r in _records()}

# Excused, with the reason (the test expects the failure: a fix shows up as an unexpected pass).
NOT_APPLICABLE = {
    ("family", "optax:sm3"): "Optax's sm3 raises IndexError on 0-d leaves (test_optax_catalogue "
                             "checks it on a tree without one)",
    ("family", "optax:sophia"): "Optax's sophia (Hutchinson jvp) fails on bfloat16 parameters: "
                                "primal float32 vs tangent bfloat16",
    ("family", "contrib:soap"): "sharded vs unsharded differ by 1e-2 (relative) on an (8, 5) matrix: the "
                                "first step's left factor GGᵀ (8×8, rank 5) has a 3-dimensional null space "
                                "whose eigenvectors eigh picks from rounding noise, different in the two "
                                "programs, and Adam's first step turns those coordinates into ±1 "
                                "(docs/references.md, SOAP)",
}
# Options a contribution requires (the kit cannot invent them).
OPTIONS = {
    ("partition", "partition:dimension_numbers"): lambda: {"dimension_numbers": {
        k: MatrixSpec(0, 1) if k == "matrix" else None for k in rt.kit_tree()}},
}
# The sharded check compiles a second, partitioned step: for the kron family and its modes
# (the slowest compile) and the Optax catalogue (Optax's own code) it is a test of its own.
SHARDED_APART = lambda r: r.provider.plugin == "optax" or "kron" in (r.name, r.family)
# The default tier samples what repeats the same code: the Optax catalogue's families all go
# through one wrapper, so every run takes those whose wrapping differs (extra update
# arguments, a key, state that changes dtype, factored or matrix-only state, params needed,
# the two known Optax limitations); the sharded check runs for kron (with its default mode) and one
# catalogue family. The rest is the slow tier (`make test-all`).
OPTAX_SAMPLE = ("sgd", "adafactor", "lbfgs", "dog", "prodigy", "noisy_sgd", "polyak_sgd", "muon",
                "schedule_free_adamw", "sm3", "sophia")
SHARDED_SAMPLE = (("family", "psgd:kron"), ("family", "optax:adafactor"))


def _id(key):
    return f"{key[0]}-{key[1]}"


def _marks(key):
    record = RECORDS[key]
    marks = [pytest.mark.slow] if record.provider.plugin == "optax" and record.name not in OPTAX_SAMPLE else []
    if key in NOT_APPLICABLE:
        marks.append(pytest.mark.xfail(reason=NOT_APPLICABLE[key], raises=CheckFailed, strict=True))
    return marks


@pytest.mark.parametrize("key", [pytest.param(k, marks=_marks(k), id=_id(k)) for k in RECORDS])
def test_every_contribution_passes_the_kit(key):
    """Every check (the sharded one apart for kron and the catalogue), the non-finite policy included."""
    record = RECORDS[key]
    skip = ("sharded",) if SHARDED_APART(record) else ()
    options = OPTIONS.get(key, dict)()
    done = rt.run_checks(record.kind, record.qualified_name, record.family, skip=skip, **options)
    assert {"options", "jit", "leaves", "save/restore", "non-finite"} <= set(done)


@pytest.mark.parametrize("key", [pytest.param(k, id=_id(k), marks=[] if k in SHARDED_SAMPLE else [pytest.mark.slow])
                                 for k, r in RECORDS.items() if SHARDED_APART(r) and k not in NOT_APPLICABLE])
def test_sharded_check(key):
    record = RECORDS[key]
    options = OPTIONS.get(key, dict)()
    dict(rt.checks(record.kind, record.qualified_name, record.family, **options))["sharded"]()


# ------------------------------------------------------------------ wrong modes
WRONG = {
    # the float64 reference is off by 0.1 %
    "OFF": dict(update_dense=exp_dense,
                metadata={"reference_dense": lambda q, t: 1.001 * exp_reference(q, t),
                          "invariants": ("symmetric",)}),
    # declares symmetry, returns a factor that is not symmetric
    "SKEW": dict(update_dense=lambda q, t: exp_dense(q, t) + 1e-3 * jnp.triu(q, 1),
                 metadata={"reference_dense": lambda q, t: exp_reference(q, t) + 1e-3 * np.triu(q, 1),
                           "invariants": ("symmetric",)}),
    # writes NaN into its state (the factor)
    "NAN": dict(update_dense=lambda q, t: q.at[0, 0].set(jnp.nan),
                metadata={"reference_dense": exp_reference, "invariants": ("symmetric",)}),
}


@pytest.fixture(scope="module")
def wrong_modes():
    rollfast.plugins.reset()
    rollfast.plugins.register(rollfast.plugins.as_plugin(
        precondition=lambda register: [register.mode("kron", n, **kw) for n, kw in WRONG.items()]), "wrong")
    yield
    rollfast.plugins.reset()


def _contract(name):
    return dict(rt.checks("mode", name, "kron"))


def test_reference_off_by_a_tenth_of_a_percent_fails(wrong_modes):
    with pytest.raises(CheckFailed, match=r"kron mode 'OFF'.*check 'reference' failed at factor 0 "
                                          r"\(dense 5×5\): relative error \d\.\d\de-03 after 10 updates"):
        _contract("OFF")["reference"]()
    _contract("OFF")["P = QᵀQ"]()  # the family's own product is right


def test_non_symmetric_factor_declared_symmetric_fails(wrong_modes):
    checks = _contract("SKEW")
    checks["reference"]()  # it is what its reference says ...
    with pytest.raises(CheckFailed, match=r"check 'invariants' failed at factor 0 \(dense 5×5\), update 1: "
                                          r"declared symmetric, max \|Q − Qᵀ\| / max \|Q\| = \d"):
        checks["invariants"]()  # ... but not what it declares


def test_nan_written_into_the_state_fails(wrong_modes):
    checks = _contract("NAN")
    with pytest.raises(CheckFailed, match=r"check 'invariants' failed at factor 0 .*non-finite entries"):
        checks["invariants"]()
    with pytest.raises(CheckFailed, match=r"check 'reference' failed"):
        checks["reference"]()


def test_a_mode_without_reference_fails_naming_what_to_register(wrong_modes):
    rollfast.plugins.register(rollfast.plugins.as_plugin(
        precondition=lambda register: register.mode("kron", "BARE", update_dense=exp_dense)), "bare")
    with pytest.raises(CheckFailed, match=r"metadata=\{'reference_dense': fn\}"):
        _contract("BARE")["reference"]()


def test_sharded_check_explains_how_to_get_devices(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "device_count", lambda: 1)
    with pytest.raises(CheckFailed, match="xla_force_host_platform_device_count=8"):
        dict(rt.checks("family", "adamod"))["sharded"]()
