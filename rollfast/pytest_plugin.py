"""The rollfast pytest plugin (entry point ``pytest11``): installed with rollfast, so
``pytest`` in any plugin's repository gets it.

It gives jax 8 CPU devices for the kit's ``sharded`` check (``XLA_FLAGS``, set here
before any test module imports jax), declares the ``slow`` marker, and prints the
device count in the report header. The checks themselves are plain functions in
:mod:`rollfast.testing`.
"""

from __future__ import annotations

import os
import sys

FLAG = "--xla_force_host_platform_device_count=8"


def _force_devices() -> None:
    if "jax" not in sys.modules and FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()


_force_devices()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: long-running tests (a slow tier, deselect with -m 'not slow')")


def pytest_report_header(config) -> str:
    flags = os.environ.get("XLA_FLAGS", "")
    return f"rollfast kit: XLA_FLAGS={flags!r} (the sharded check needs 8 devices)"
