"""Test configuration: 8 simulated CPU devices for the sharding tests, float64 off, LAPACK on
one thread (the suite runs one process per core; OpenBLAS's own thread pool on a busy machine
turned a 128×128 QR from 0.4 ms into 600 ms)."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# The example plugins' own tests (the kit, as their authors run it in their repositories)
# duplicate tests/testing/test_kit.py, which runs the kit over every registered contribution.
collect_ignore_glob = ["contrib/*/tests/*"]
