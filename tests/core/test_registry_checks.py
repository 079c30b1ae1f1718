"""Load-time checks of registrations: what cannot work is dropped with a
RollfastPluginWarning naming the plugin and the problem; the CLI reports it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import rollfast
from rollfast.cli import main
from rollfast.registry import Contribution, Provider, factory_problem


@pytest.fixture
def fresh():
    rollfast.plugins.reset()
    rollfast.registry()
    yield
    rollfast.plugins.reset()


def register(name, **hooks):
    rollfast.plugins.register(rollfast.plugins.as_plugin(**hooks), name)


def identity_dense(q, terms):
    return q


def wrap(inner, *, first_moment=None):
    return inner


def warned(name, match, **hooks):
    with pytest.warns(rollfast.RollfastPluginWarning, match=match) as record:
        register(name, **hooks)
    return str(record[0].message)


def test_mode_of_a_misspelled_family_is_dropped_with_did_you_mean(fresh):
    message = warned("typo", r"did you mean 'kron'",
                     precondition=lambda register: register.mode("krn", "MINE", update_dense=identity_dense))
    assert "'typo'" in message and "mode of krn 'MINE'" in message and "unknown family 'krn'" in message
    assert not [m for m in rollfast.available("mode") if m.name == "MINE"]


def test_misspelled_implementation_keyword_is_dropped_at_load(fresh):
    message = warned("typo", r"update_dens.*did you mean 'update_dense'",
                     precondition=lambda register: register.mode("kron", "MINE", update_dens=identity_dense))
    assert "'typo'" in message and "dropped" in message
    with pytest.raises(rollfast.UnknownNameError, match="registration was dropped"):
        rollfast.registry().lookup("mode", "MINE", "kron")


def test_missing_required_implementation_keyword(fresh):
    warned("lazy", r"misses implementation keyword 'update_dense'",
           precondition=lambda register: register.mode("kron", "MINE", statistic="Ph"))


def test_bad_implementation_value_and_unknown_invariant(fresh):
    warned("bad", r"statistic must be one of",
           precondition=lambda register: register.mode("kron", "MINE", update_dense=identity_dense, statistic="Vh"))
    warned("bad2", r"unknown invariants \['orthogonal'\]",
           precondition=lambda register: register.mode("kron", "MINE2", update_dense=identity_dense,
                                         metadata={"invariants": ("orthogonal",)}))


def test_family_without_a_protocol_takes_any_keywords(fresh):
    register("free", precondition=lambda register: (register.family("free_fam", lambda learning_rate=0.1: optax.sgd(learning_rate)),
                                             register.mode("free_fam", "ANY", whatever=1)))
    assert rollfast.registry().lookup("mode", "ANY", "free_fam").impl == {"whatever": 1}


def test_factory_signatures_per_kind(fresh):
    warned("m", r"mask factory must accept the keyword first_moment=",
           mask=lambda register: register("nomoment", lambda inner: inner))
    warned("a", r"average factory must take the optimizer to wrap as its first positional argument",
           average=lambda register: register("noinner", lambda *, learning_rate=None: None))
    warned("f", r"positional-only 'x' without a default",
           precondition=lambda register: register.family("posonly", lambda x, /: optax.sgd(x)))
    record = Contribution("mask", "ok", wrap, Provider("p", "d", "", False))
    assert factory_problem(record) is None


def test_unknown_descriptive_keyword_is_dropped_with_did_you_mean(fresh):
    warned("typo", r"unknown keyword 'first_momnet' \(did you mean 'first_moment'\?\).*metadata=",
           precondition=lambda register: register.family("fam", lambda learning_rate=0.1: optax.sgd(learning_rate),
                                           first_momnet=None))


def test_metadata_is_one_keyword_for_every_kind(fresh):
    register("meta", precondition=lambda register: (
        register.family("meta_fam", lambda learning_rate=0.1: optax.sgd(learning_rate), metadata={"paper": "x"}),
        register.mode("kron", "META", update_dense=identity_dense, metadata={"paper": "y"})))
    assert rollfast.registry().lookup("family", "meta_fam").metadata == {"paper": "x"}
    assert rollfast.registry().lookup("mode", "META", "kron").metadata == {"paper": "y"}


def test_wrong_factor_shape_is_a_trace_time_error_naming_mode_and_factor(fresh):
    register("shapes", precondition=lambda register: register.mode("kron", "SHRINK", update_dense=lambda q, t: q[1:, 1:]))
    opt = rollfast.get("kron", mode="SHRINK", preconditioner_update_probability=1.0)
    params = {"w": jnp.ones((3, 3))}
    with pytest.raises(ValueError, match=r"kron mode 'SHRINK'.*dense factor of shape \(3, 3\).*\(2, 2\)"):
        jax.jit(opt.update)({"w": jnp.ones((3, 3))}, opt.init(params), params)


def test_wrong_factor_dtype_is_named_too(fresh):
    register("dtypes", precondition=lambda register: register.mode("kron", "HALF", update_dense=lambda q, t: q.astype(jnp.bfloat16)))
    opt = rollfast.get("kron", mode="HALF", preconditioner_update_probability=1.0)
    params = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match=r"kron mode 'HALF'.*float32.*bfloat16"):
        opt.update({"w": jnp.ones((3, 2))}, opt.init(params), params)


def test_unknown_name_points_to_failed_plugins(fresh):
    def broken(register):
        raise RuntimeError("boom")

    with pytest.warns(rollfast.RollfastPluginWarning, match="boom"):
        register("broken", precondition=broken)
    with pytest.raises(rollfast.UnknownNameError, match=r"'broken' failed to load; `rollfast plugins` shows why"):
        rollfast.get("never_registered_family")


def test_info_plugin_colon_name_for_a_mode(capsys):
    assert main(["info", "kron_cayley:CAYLEY"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kron × CAYLEY (mode)") and "kron_cayley" in out
    assert main(["info", "kron/EXP"]) == 0


def test_plugins_report_lists_contributions_collisions_and_warnings(fresh, capsys):
    with pytest.warns(rollfast.RollfastPluginWarning):
        register("clash", precondition=lambda register: (
            register.family("adamod", lambda learning_rate=0.1: optax.sgd(learning_rate)),
            register.mode("krn", "LOST", update_dense=identity_dense)))
    code = main(["plugins"])
    out = capsys.readouterr().out
    block = out[out.index("clash"):]
    assert code == 0
    assert block.splitlines()[0].endswith("[2 warnings]")
    assert "already has; use 'clash:adamod'" in block and "unknown family 'krn'" in block
    assert "collisions: adamod (held by example; reach it as clash:adamod)" in block
    example = out[out.index("\nexample ") + 1:].splitlines()
    assert example[1] == "  families: adamod" and example[2] == "  masks: trust_ratio"
    assert "mode protocols: kron" in out[out.index("psgd_protocol"):]
