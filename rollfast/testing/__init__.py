"""The plugin test kit: standard problems, and the conformance checks every
contribution of a kind passes, one line per contribution.

>>> import rollfast.testing as rt
>>> [name for name, _ in rt.checks("mask", "trust_ratio")]   # what check_mask("trust_ratio") runs
['options', 'jit', 'leaves', 'non-finite', 'save/restore', 'sharded', 'inner state']

``check_mode("kron", "EXP")``, ``check_mask("trust_ratio")``, ``check_average(...)``,
``check_round(...)``, ``check_partition(...)`` do the same for the other kinds (a mode
also runs its family's contract); each raises :class:`~rollfast.errors.CheckFailed`
naming the check, the leaf or factor, and by how much. In a test file,
``test_mine = rt.conformance_test("mode", "MINE", family="kron")`` makes one pytest
test per check. The ``sharded`` check needs 8 devices: on CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported (the
rollfast pytest plugin sets it). See ``docs/plugins.md``.
"""

from __future__ import annotations

from rollfast.errors import CheckFailed
from rollfast.testing.kit import XLA_HINT, checks, run_checks, subject
from rollfast.testing.problems import (ill_conditioned_quadratic, kit_tree, mixed_tree, mlp_problem, mode_tree,
                                       quadratic_loss, run, tree_bytes)


def check_family(name: str, **options) -> list[str]:
    """Every check of the family ``name`` (options go to ``rollfast.get``); the checks run."""
    return run_checks("family", name, **options)


def check_mode(family: str, name: str, **options) -> list[str]:
    """Every check of the mode ``name`` of ``family``, with the family's own contract."""
    return run_checks("mode", name, family, **options)


def check_mask(name: str, **options) -> list[str]:
    """Every check of the mask ``name`` around the base family."""
    return run_checks("mask", name, **options)


def check_average(name: str, **options) -> list[str]:
    """Every check of the average ``name`` around the base family."""
    return run_checks("average", name, **options)


def check_round(name: str, **options) -> list[str]:
    """Every check of the rounding rule ``name`` (directly, and in a family that takes it)."""
    return run_checks("round", name, **options)


def check_partition(name: str, **options) -> list[str]:
    """Every check of the partitioner ``name`` (directly, and in a family that takes it)."""
    return run_checks("partition", name, **options)


def conformance_test(kind: str, name: str, family: str | None = None, **options):
    """A pytest test function with one case per check of a contribution.

    Assign it at module level: ``test_mine = conformance_test("mode", "MINE", family="kron")``.
    """
    import pytest

    names = [check for check, _ in checks(kind, name, family, **options)]

    @pytest.mark.parametrize("check", names)
    def test(check):
        fn = dict(checks(kind, name, family, **options))[check]
        fn()

    test.__name__ = f"test_{kind}_{name}"
    return test


__all__ = ["check_family", "check_mode", "check_mask", "check_average", "check_round",
           "check_partition", "conformance_test", "checks", "run_checks", "subject", "CheckFailed",
           "XLA_HINT", "mixed_tree", "kit_tree", "mode_tree", "quadratic_loss", "ill_conditioned_quadratic",
           "mlp_problem", "run", "tree_bytes"]
