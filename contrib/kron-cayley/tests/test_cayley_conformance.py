"""The rollfast conformance kit on the CAYLEY mode: one pytest case per check."""

import rollfast.testing

test_cayley = rollfast.testing.conformance_test("mode", "CAYLEY", family="kron")
