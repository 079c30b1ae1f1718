"""The fourteen families of the rlx-optim list are all reachable by name, and each
one's step on a gradient is a descent direction for it."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
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
    params = {"w": jnp.zeros((4, 3))}
    g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)}
    provided = {"value": jnp.float32(1.0), "obj_fn": lambda p: jnp.sum(p["w"] * g["w"])}  # ∇ = g
    extra = {k: provided[k] for k in record.metadata.get("update_args", ())}
    state = opt.init(params)
    for _ in range(3):  # some families (SOAP) take no step the first time
        u, state = opt.update(g, state, params, **extra)
        if float(jnp.sum(u["w"] * u["w"])) > 0:
            break
    # a descent direction for the gradient it was given
    assert float(jnp.sum(u["w"] * g["w"])) < 0
