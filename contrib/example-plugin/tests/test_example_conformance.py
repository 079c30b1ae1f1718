"""The rollfast conformance kit on the example plugin's family and mask."""

import rollfast.testing

test_adamod = rollfast.testing.conformance_test("family", "adamod")
test_trust_ratio = rollfast.testing.conformance_test("mask", "trust_ratio")
