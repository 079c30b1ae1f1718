"""The fourteen families of the rlx-optim list are all reachable by name."""

from __future__ import annotations

import warnings

import optax
import pytest

import rollfast

# name → plugin expected to provide it (None: whichever plugin wins the name)
FOURTEEN = {
    "sgd": None, "adam": "adam", "adamw": "adam", "nadamw": None, "radam": None,
    "qhadamw": "contrib", "lamb": None, "adafactor": None, "lion": None, "soap": "contrib",
    "kron": "psgd", "muon": None, "sophia": None, "mars": "contrib",
}


def _lookup(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rollfast.RollfastPluginWarning)
        return rollfast.registry().lookup("family", name)


def test_exactly_fourteen_distinct_families():
    assert len(FOURTEEN) == 14
    assert len({id(_lookup(n)) for n in FOURTEEN}) == 14


@pytest.mark.parametrize("name", sorted(FOURTEEN))
def test_resolves_and_builds(name):
    record = _lookup(name)
    assert record.kind == "family" and record.name == name
    if FOURTEEN[name] is not None:
        assert record.provider.plugin == FOURTEEN[name]
    assert record.summary
    lr = [p.name for p in record.parameters if p.name.endswith("learning_rate")]
    opt = rollfast.get(name, **{lr[0]: 1e-3})
    assert isinstance(opt, optax.GradientTransformation)
