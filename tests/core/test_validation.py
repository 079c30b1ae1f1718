"""Every option is checked when the optimizer is built, against the constraint its
parameter declares once; wrong values and wrong trees raise errors that name the
option (or path), the part, the value and what is allowed."""

import json
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rollfast
from rollfast import cli
from rollfast.constraints import (BETA, LEARNING_RATE, Choice, Interval, LearningRate, OptionError,
                                  OptionTypeError, Schedule, check, from_annotation)
from rollfast.registry import as_plugin, registry, reset

# The examples: (family, options, exception, what the message must say).
WRONG = [
    ("kron", {"learning_rate": None}, TypeError, r"learning_rate=None .* family 'kron'.* number > 0, or a schedule"),
    ("adamw", {"learning_rate": None}, TypeError, r"learning_rate=None .* family 'adamw'"),
    ("prism", {"learning_rate": None}, TypeError, r"learning_rate=None .* family 'prism'"),
    ("soap", {"learning_rate": None}, TypeError, r"learning_rate=None .* family 'soap'"),
    ("mars", {"learning_rate": None}, TypeError, r"learning_rate=None .* family 'mars'"),
    ("apollo", {"learning_rate": None}, TypeError, r"learning_rate=None .* family 'apollo'"),
    ("optax:adamw", {"learning_rate": None}, TypeError, r"learning_rate=None .* family 'adamw' \(optax\)"),
    ("adamw", {"learning_rate": "0.1"}, TypeError, r"learning_rate='0.1' is not allowed"),
    ("adamw", {"learning_rate": -1.0}, ValueError, r"learning_rate=-1.0 .* number > 0"),
    ("kron", {"learning_rate": -1e-3}, ValueError, r"learning_rate=-0.001 .* family 'kron'"),
    ("optax:sgd", {"learning_rate": -1.0}, ValueError, r"learning_rate=-1.0 .* family 'sgd' \(optax\)"),
    ("adamw", {"learning_rate": 0.1, "b1": 1.5}, ValueError, r"b1=1.5 .* family 'adamw'.* in \[0, 1\)"),
    ("kron", {"b1": 1.5}, ValueError, r"b1=1.5 .* family 'kron'.* in \[0, 1\)"),
    ("optax:lion", {"learning_rate": 0.1, "b2": 1.0}, ValueError, r"b2=1.0 .* family 'lion' \(optax\)"),
    ("adamw", {"learning_rate": 0.1, "b2": -1}, ValueError, r"b2=-1 .* family 'adamw'.* in \[0, 1\)"),
    ("kron", {"preconditioner_update_probability": 2}, ValueError,
     r"preconditioner_update_probability=2 .* in \[0, 1\], or a schedule"),
    ("kron", {"preconditioner_update_probability": -1}, ValueError, r"preconditioner_update_probability=-1"),
    ("kron", {"mode": 3}, TypeError, r"mode=3 \(int\) .* family 'kron'.* registered mode name"),
    ("adamw", {"learning_rate": 0.1, "round": 3}, TypeError, r"round=3 \(int\) .* registered round name"),
    ("prism", {"learning_rate": 0.1, "partition": 3}, TypeError, r"partition=3 \(int\) .* family 'prism'"),
    ("adamw", {"learning_rate": 0.1, "key": "7"}, TypeError, r"key='7' .* PRNG key"),
    ("adamw", {"learning_rate": 0.1, "mu_dtype": jnp.int8}, ValueError, r"mu_dtype=.* floating-point dtype"),
    ("adamw", {"learning_rate": 0.1, "mask": "magma", "magma_p": 2.0}, ValueError, r"magma_p=2.0 .* mask 'magma'"),
    ("adamw", {"learning_rate": 0.1, "average": "schedule_free", "sf_b1": -0.5}, ValueError,
     r"sf_b1=-0.5 .* average 'schedule_free'"),
    ("mars", {"learning_rate": 0.1, "variant": "sgd"}, ValueError, r"variant='sgd' .* one of 'adamw', 'lion'"),
    ("adamw", {"learning_rate": float("nan")}, ValueError, r"learning_rate=nan"),
    ("adamw", {"learning_rate": 0.1, "nonfinite": "ignore"}, ValueError, r"nonfinite='ignore' .* 'skip', 'propagate'"),
]


@pytest.mark.parametrize("family, options, error, message", WRONG,
                         ids=[f"{f}-{'-'.join(map(str, o))}" for f, o, _, _ in WRONG])
def test_wrong_option_values_are_rejected_when_built(family, options, error, message):
    with pytest.raises(error, match=message) as caught:
        rollfast.get(family, **options)
    assert "allowed is" in str(caught.value)


@pytest.mark.parametrize("family, options", [
    ("adamw", {"learning_rate": optax.linear_schedule(0.0, 1e-3, 10)}),
    ("adamw", {"learning_rate": jnp.float32(1e-3), "b1": 0.0, "key": jax.random.key(7)}),
    ("adamw", {"learning_rate": 1, "key": jax.random.PRNGKey(7), "mu_dtype": "bfloat16"}),
    ("kron", {"preconditioner_update_probability": 1.0, "mode": "EXP"}),
    ("kron", {"preconditioner_update_probability": lambda n: 0.5}),
    ("optax:lbfgs", {}),  # learning_rate=None is Optax's line search
    ("optax:sgd", {"learning_rate": 0.1, "momentum": 0.9}),
    ("adamw", {"learning_rate": 0.1, "average": "schedule_free", "weighting_mode": "PRACTICAL"}),
])
def test_allowed_values_build(family, options):
    opt = rollfast.get(family, **options)
    params = {"w": jnp.ones((2, 2))}
    kwargs = {"value": jnp.float32(1.0), "grad": params, "value_fn": lambda p: jnp.sum(p["w"] ** 2)} \
        if family == "optax:lbfgs" else {}
    updates, _ = opt.update(params, opt.init(params), params, **kwargs)
    assert bool(jnp.all(jnp.isfinite(updates["w"])))


def test_constraints_are_declared_on_the_parameters_and_shown_by_info(capsys):
    adamw = registry().lookup("family", "adamw")
    allowed = {p.name: str(p.constraint) for p in adamw.parameters if p.constraint is not None}
    assert allowed["b1"] == allowed["b2"] == "a number in [0, 1)"
    assert allowed["learning_rate"].startswith("a number > 0, or a schedule")
    kron = registry().lookup("family", "kron")
    assert "in [0, 1]" in str(next(p for p in kron.parameters
                                   if p.name == "preconditioner_update_probability").constraint)
    assert cli.main(["info", "adamw"]) == 0
    out = capsys.readouterr().out
    assert "a number in [0, 1)" in out
    assert cli.main(["list", "--kind", "family", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["contributions"]
    lion = next(r for r in records if r["name"] == "lion" and r["plugin"] == "optax")
    b1 = next(p for p in lion["parameters"] if p["name"] == "b1")
    assert b1["allowed"] == "a number in [0, 1)"


def test_a_plugin_declares_constraints_by_annotation_or_at_registration():
    def scaled(learning_rate: LearningRate = 0.1, factor: Annotated[float, Interval(1, 4)] = 2.0,
               kind: Annotated[str, Choice("a", "b")] = "a"):
        """Scaled SGD."""
        return optax.sgd(learning_rate * factor)

    def plain(learning_rate=0.1, momentum=0.0):
        """Plain SGD."""
        return optax.sgd(learning_rate, momentum=momentum)

    def register(register):
        register.family("scaled_sgd", scaled)
        register.family("plain_sgd", plain, constraints={"momentum": BETA})

    registry().register(as_plugin(precondition=register), "constrained")
    try:
        rollfast.get("scaled_sgd", factor=3.0, kind="B")
        with pytest.raises(ValueError, match=r"factor=5.0 is not allowed by family 'scaled_sgd' "
                                             r"\(constrained\): allowed is a number in \[1, 4\]"):
            rollfast.get("scaled_sgd", factor=5.0)
        with pytest.raises(ValueError, match=r"kind='c' .* one of 'a', 'b'"):
            rollfast.get("scaled_sgd", kind="c")
        with pytest.raises(ValueError, match=r"momentum=1.0 .* family 'plain_sgd'"):
            rollfast.get("plain_sgd", momentum=1.0)
        with pytest.warns(rollfast.RollfastPluginWarning, match="constraints for nesterov"):
            registry().register(as_plugin(precondition=lambda register: register.family(
                "bad_sgd", plain, constraints={"nesterov": BETA})), "badly_constrained")
    finally:
        reset()


def test_constraint_checks_and_descriptions():
    assert from_annotation(Annotated[float, BETA]) is BETA and from_annotation(int) is None
    with pytest.raises(OptionError, match=r"b1=1.0 is not allowed by here: allowed is a number in \[0, 1\)"):
        check(BETA, 1.0, option="b1", part="here")
    with pytest.raises(OptionTypeError):
        check(BETA, True, option="b1", part="here")  # a bool is not a number
    with pytest.raises(OptionTypeError):
        check(LEARNING_RATE, np.ones(2), option="learning_rate", part="here")
    assert LEARNING_RATE.problem(np.float64(0.5)) is None and LEARNING_RATE.problem(optax.constant_schedule(1.0)) is None
    assert Schedule(BETA).problem(lambda n: n) is None and BETA.problem(float("inf")) is OptionError
    assert Interval(1, None, integer=True).problem(2.0) is OptionTypeError


def test_update_on_a_different_tree_names_the_first_differing_path():
    opt = rollfast.get("adamw", learning_rate=0.1)
    params = {"w": jnp.ones(3), "b": {"x": jnp.ones(2)}}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"differs from the one given to init; first difference at "
                                         r"\['b'\]\['x'\]: init had shape \(2,\), update has no leaf"):
        opt.update({"w": jnp.ones(3), "b": {"y": jnp.ones(2)}}, state, params)
    with pytest.raises(ValueError, match=r"first difference at \['w'\]: init had shape \(3,\), "
                                         r"update has shape \(4,\)"):
        jax.jit(opt.update)({"w": jnp.ones(4), "b": {"x": jnp.ones(2)}}, state)
    with pytest.raises(ValueError, match=r"first difference at \['c'\]"):
        rollfast.get("kron", mode="EXP").update({**params, "c": jnp.ones(1)}, state, params)


def test_a_rebuilt_optimizer_checks_against_params():
    params = {"w": jnp.ones(3)}
    state = rollfast.get("adamw", learning_rate=0.1).init(params)
    fresh = rollfast.get("adamw", learning_rate=0.1)  # e.g. restored from a checkpoint: init never ran
    with pytest.raises(ValueError, match=r"first difference at \['w'\]"):
        fresh.update({"w": jnp.ones(2)}, state, params)
    fresh.update({"w": jnp.ones(3)}, state, params)
