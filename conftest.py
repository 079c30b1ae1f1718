"""Test configuration: 8 simulated CPU devices for the sharding tests, float64 off."""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# The example plugins' own tests (the kit, as their authors run it in their repositories)
# duplicate tests/testing/test_kit.py, which runs the kit over every registered contribution.
collect_ignore_glob = ["contrib/*/tests/*"]
