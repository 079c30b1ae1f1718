"""The Optax catalogue plugin: discovery rule, registry records, bit-for-bit equality
with the direct Optax call, the core's leaf rules, and the skipped list."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import rollfast
import rollfast.testing as rt
from rollfast.registry import Registry
from rollfast_optax import first_moment
from rollfast_optax.discovery import UPDATE_ARGS, catalogue, classify

ENTRIES = {e.name: e for e in catalogue()[0]}


def _tree(scalar=False, seed=0):
    keys = ("bias", "matrix") + (("scalar",) if scalar else ())
    return {k: v for k, v in rt.mixed_tree(seed=seed).items() if k in keys}


def _loss():
    return rt.quadratic_loss(_tree(seed=1))


def _lr(entry) -> dict:
    first = next(iter(inspect.signature(entry.function).parameters))
    return {first: 0.05}


def _extras(names, loss, value, grads) -> dict:
    provided = {"value": value, "grad": grads, "value_fn": loss, "obj_fn": loss}
    return {n: provided[n] for n in names}


def _trajectory(opt, params, loss, update_args, steps=2):
    """``steps`` steps of ``opt``, as a list of ``(params, updates, state)``; traceable."""
    state = opt.init(params)
    out = []
    for _ in range(steps):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params, **_extras(update_args, loss, value, grads))
        params = optax.apply_updates(params, updates)
        out.append((params, updates, state))
    return out


def _bits(x):
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


# -- bit for bit --------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_equals_the_direct_optax_call_bit_for_bit(name):
    entry = ENTRIES[name]
    # "propagate": the skip policy's lax.cond lets XLA fuse this whole-step jit differently
    ours = rollfast.get(f"optax:{name}", **_lr(entry), nonfinite="propagate")
    theirs = entry.function(**_lr(entry))
    both = jax.jit(lambda p: [_trajectory(opt, p, _loss(), entry.update_args)
                              for opt in (ours, theirs)])
    for (p1, u1, s1), (p2, u2, s2) in zip(*both(_tree())):
        jax.tree.map(np.testing.assert_array_equal, (p1, u1), (p2, u2))
        leaves1, leaves2 = jax.tree.leaves(s1.inner_state), jax.tree.leaves(s2)  # CoreState: + skip counter
        assert len(leaves1) == len(leaves2)
        for a, b in zip(leaves1, leaves2):
            np.testing.assert_array_equal(_bits(a), _bits(b))


def test_optax_options_are_passed_through():
    p = _tree()
    g = jax.tree.map(jnp.ones_like, p)
    ours = rollfast.get("optax:lion", learning_rate=0.1, b1=0.5, weight_decay=0.25)
    theirs = optax.lion(0.1, b1=0.5, weight_decay=0.25)
    u1, _ = ours.update(g, ours.init(p), p)
    u2, _ = theirs.update(g, theirs.init(p), p)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)


# -- registry records ---------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::rollfast.RollfastPluginWarning")
def test_at_least_forty_families_each_with_its_provider():
    records = rollfast.available("family")
    assert len(records) >= 40
    assert all(r.provider.plugin and r.provider.distribution for r in records)
    from_optax = {r.name for r in records if r.provider.plugin == "optax"}
    assert {"sgd", "lion", "lamb", "adafactor", "radam", "nadamw", "muon", "sophia",
            "prodigy", "schedule_free_adamw", "polyak_sgd"} <= from_optax


def test_every_discovered_optimizer_is_reachable_as_optax_name():
    reg = rollfast.registry()
    for name, entry in ENTRIES.items():
        record = reg.lookup("family", f"optax:{name}")
        assert record.provider.plugin == "optax"
        assert record.metadata["source"] == entry.source


def test_info_record_of_optax_lion_shows_its_parameters():
    record = rollfast.registry().lookup("family", "optax:lion")
    expected = [(p.name, p.default) for p in inspect.signature(optax.lion).parameters.values()]
    assert [(p.name, p.default) for p in record.parameters] == expected
    assert record.parameters[0].required and record.parameters[0].name == "learning_rate"
    docs = {p.name: p.doc for p in record.parameters}
    assert "momentum" in docs["b1"]
    assert record.summary == inspect.getdoc(optax.lion).splitlines()[0]
    assert any("Symbolic Discovery" in ref for ref in record.references)
    assert record.metadata["source"] == "optax.lion"


def test_first_party_names_win_silently_and_optax_ones_stay_reachable():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = Registry().load()
    assert not [w for w in caught if "'adamw'" in str(w.message) or "'adam'" in str(w.message)]
    assert reg.lookup("family", "adamw").provider.plugin == "adam"
    assert reg.lookup("family", "optax:adamw").provider.plugin == "optax"
    assert reg.lookup("family", "optax:adamw").priority == -1


def test_update_args_are_declared():
    reg = rollfast.registry()
    for name, needs in UPDATE_ARGS.items():
        assert reg.lookup("family", f"optax:{name}").metadata["update_args"] == needs
    assert reg.lookup("family", "optax:lion").metadata["update_args"] == ()


def test_missing_update_arg_is_an_error_that_names_it():
    p = _tree()
    opt = rollfast.get("optax:polyak_sgd")
    with pytest.raises(TypeError, match=r"family 'polyak_sgd' \(optax\) needs update\(\.\.\., value=\)"):
        opt.update(p, opt.init(p), p)
    opt = rollfast.get("optax:lbfgs")
    with pytest.raises(TypeError, match="grad=, value_fn="):
        opt.update(p, opt.init(p), p, value=1.0)


def test_unknown_option_suggests_the_closest():
    with pytest.raises(TypeError, match="did you mean 'learning_rate'"):
        rollfast.get("optax:lion", learnig_rate=0.1)


def test_first_moment_is_mu_in_the_params_structure_or_none():
    params = _tree(scalar=True)
    shapes = jax.tree.map(jnp.shape, params)
    found = []
    for name, entry in ENTRIES.items():
        if name == "sm3":
            continue
        record = rollfast.registry().lookup("family", f"optax:{name}")
        mu = record.metadata["first_moment"](entry.function(**_lr(entry)).init(params))
        if mu is not None:
            assert jax.tree.map(jnp.shape, mu) == shapes, name
            found.append(name)
    assert {"adam", "adamw", "lion", "nadamw"} <= set(found)
    assert first_moment(optax.sgd(0.1).init(params)) is None


# -- discovery rule -----------------------------------------------------------------

def _fake_optax():
    """Two namespaces standing for a newer Optax: a new optimizer, a wrapper, a
    building block, a transformation without a learning rate, and a collision."""

    def new_opt(learning_rate, b=0.5) -> optax.GradientTransformation:
        """A new optimizer.

        Args:
          learning_rate: step.
          b: beta.
        """
        return optax.sgd(learning_rate, b)

    def wrapper(inner: optax.GradientTransformation, k=2) -> optax.GradientTransformation:
        return inner

    def scale_by_new(learning_rate=1.0) -> optax.GradientTransformation:
        return optax.scale(learning_rate)

    def no_lr(decay=0.9) -> optax.GradientTransformation:
        return optax.trace(decay)

    def a_loss(x, y) -> jax.Array:
        return x - y

    top = types.SimpleNamespace(new_opt=new_opt, wrapper=wrapper, scale_by_new=scale_by_new,
                                no_lr=no_lr, a_loss=a_loss, sub=types)
    contrib = types.SimpleNamespace(new_opt=lambda learning_rate: optax.sgd(learning_rate))
    return top, contrib


def test_discovery_rule_on_a_newer_optax():
    top, contrib = _fake_optax()
    entries, skipped = catalogue((("optax", top), ("optax.contrib", contrib)))
    assert [(e.name, e.source) for e in entries] == [
        ("new_opt", "optax.new_opt"), ("contrib_new_opt", "optax.contrib.new_opt")]
    assert skipped == {
        "optax.wrapper": "wraps or combines other transformations (takes `inner`), "
                         "not an optimizer by itself",
        "optax.scale_by_new": "building block (a scaling transformation), not a complete optimizer",
        "optax.no_lr": "transformation without a learning rate, not a complete optimizer",
    }


def test_the_same_object_in_both_namespaces_is_registered_once():
    top, _ = _fake_optax()
    contrib = types.SimpleNamespace(new_opt=top.new_opt)
    entries, _ = catalogue((("optax", top), ("optax.contrib", contrib)))
    assert [e.name for e in entries] == ["new_opt"]


def test_classify_known_optax_callables():
    assert classify("adamw", optax.adamw) is True
    assert classify("nadamw", optax.nadamw) is True  # a functools.partial
    assert classify("polyak_sgd", optax.polyak_sgd) is True  # max_learning_rate
    assert classify("dog", optax.contrib.dog) is True  # unannotated return
    assert "per-example" in classify("dpsgd", optax.contrib.dpsgd)
    assert "takes `inner`" in classify("split_real_and_imaginary",
                                       optax.contrib.split_real_and_imaginary)
    assert "takes `opt`" in classify("MultiSteps", optax.MultiSteps)
    assert classify("cosine_decay_schedule", optax.cosine_decay_schedule) is False
    assert classify("GradientTransformation", optax.GradientTransformation) is False


def test_skipped_names_are_exported_with_reasons():
    skipped = rollfast.optax_catalogue_skipped
    for name in ("optax.contrib.dpsgd", "optax.contrib.sam", "optax.contrib.mechanize",
                 "optax.contrib.split_real_and_imaginary", "optax.MultiSteps", "optax.chain",
                 "optax.masked", "optax.inject_hyperparams", "optax.scale_by_adam"):
        assert skipped[name]
    sources = {e.source for e in ENTRIES.values()}
    assert not sources & set(skipped)
    record = rollfast.registry().lookup("export", "optax_catalogue_skipped")
    assert record.provider.plugin == "optax" and "not registered" in record.summary


# -- leaf rules ---------------------------------------------------------------------

def test_none_leaves_reach_optimizers_that_reject_them():
    params = {"w": jnp.ones((4, 3)), "none": None}
    opt = rollfast.get("optax:galore", learning_rate=0.1)
    updates, _ = opt.update({"w": jnp.ones((4, 3)), "none": None}, opt.init(params), params)
    direct = optax.contrib.galore(0.1)
    want, _ = direct.update({"w": jnp.ones((4, 3))}, direct.init({"w": params["w"]}), {"w": params["w"]})
    assert updates["none"] is None
    np.testing.assert_array_equal(updates["w"], want["w"])
    with pytest.raises(AttributeError):
        optax.contrib.galore(0.1).init(params)


def test_non_finite_gradient_with_clip_mask_keeps_params_and_state():
    params = _tree()
    g = jax.tree.map(jnp.ones_like, params)
    bad = {**g, "matrix": g["matrix"].at[0, 0].set(jnp.inf)}
    for name in ("adamw", "muon"):
        opt = rollfast.get(f"optax:{name}", learning_rate=0.1, mask="clip", grad_clip_max_amps=None,
                           nonfinite="propagate")  # the clip mask's own skip
        _, state = opt.update(g, opt.init(params), params)
        updates, new_state = jax.jit(opt.update)(bad, state, params)
        assert all(not jnp.any(u) for u in jax.tree.leaves(updates)), name
        jax.tree.map(np.testing.assert_array_equal, new_state, state)


@pytest.mark.parametrize("name", ["adamw", "muon", "sophia"])
def test_bfloat16_params(name):
    params = {k: v for k, v in rt.mixed_tree(jnp.bfloat16).items()}
    entry = ENTRIES[name]
    opt = rollfast.get(f"optax:{name}", **_lr(entry))
    float_keys = ("scalar", "bias", "matrix", "conv")
    loss = lambda p: rt.quadratic_loss({k: jnp.zeros_like(params[k]) for k in float_keys})(
        {k: p[k] for k in float_keys})

    @jax.jit
    def step(p, s):
        grads = {**jax.grad(loss)({k: p[k] for k in float_keys}), "nothing": None,
                 "count": jnp.zeros_like(p["count"])}
        u, s = opt.update(grads, s, p, **_extras(entry.update_args, loss, None, grads))
        return optax.apply_updates(p, u), s

    p, s = params, opt.init(params)
    for _ in range(3):
        p, s = step(p, s)
    assert all(p[k].dtype == jnp.bfloat16 for k in float_keys)
    assert all(bool(jnp.all(jnp.isfinite(p[k].astype(jnp.float32)))) for k in float_keys)
    assert float(loss(p)) < float(loss(params))


def test_sharded_params_keep_their_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    params = {"w": jax.device_put(jnp.ones((8, 4)), sharding), "none": None}
    opt = rollfast.get("optax:lion", learning_rate=0.1)
    state = jax.jit(opt.init)(params)
    updates, state = jax.jit(opt.update)({"w": params["w"], "none": None}, state, params)
    assert updates["w"].sharding.is_equivalent_to(sharding, 2)
    assert first_moment(state.inner_state)["w"].sharding.is_equivalent_to(sharding, 2)


# -- CLI ----------------------------------------------------------------------------

def _cli(*args) -> str:
    pytest.importorskip("rollfast.cli")
    result = subprocess.run([sys.executable, "-m", "rollfast.cli", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_shows_families_parameters_and_skipped_names():
    listed = [line.split() for line in _cli("list", "--kind", "family").splitlines()[1:]]
    assert len(listed) >= 40 and sum(row[1] == "optax" for row in listed) >= 40
    lion = _cli("info", "optax:lion")
    for word in ("learning_rate", "b1", "b2", "weight_decay", "optax.lion"):
        assert word in lion
    assert "update args: value" in _cli("info", "optax:polyak_sgd")
    plugin = _cli("info", "optax")
    assert "optax.contrib.dpsgd" in plugin and "per-example" in plugin
