"""The core: discovery, collisions, lookups, assembly, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rollfast
import rollfast.testing
from rollfast.registry import Registry

import toy_plugin


@pytest.fixture
def fresh():
    """A fresh process registry; the toy plugin registered at run time."""
    rollfast.plugins.reset()
    rollfast.plugins.register(toy_plugin, "toy")
    yield rollfast.registry()
    rollfast.plugins.reset()


def fake_distribution(root, name, version, entry_points, modules):
    """Write an installed-looking distribution (dist-info + modules) under ``root``."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[rollfast]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def broken_plugins(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "broken-plugins", "9.9", {
        "fails_import": "rb_fails_import",
        "raises": "rb_raises",
        "collides": "rb_collides",
        "good": "rb_good",
    }, {
        "rb_fails_import": "import a_module_that_does_not_exist\n",
        "rb_raises": """
            import rollfast
            @rollfast.hookimpl
            def precondition(register):
                raise RuntimeError("boom in hook")
        """,
        "rb_collides": """
            import optax, rollfast
            @rollfast.hookimpl
            def precondition(register):
                register.family("adamw", lambda learning_rate=1.0: optax.sgd(learning_rate))
        """,
        "rb_good": """
            import optax, rollfast
            @rollfast.hookimpl
            def precondition(register):
                register.family("plain_sgd", lambda learning_rate=1.0: optax.sgd(learning_rate))
        """,
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    rollfast.plugins.reset()


def test_import_is_light():
    code = ("import sys, rollfast; bad = [m for m in sys.modules if m == 'jax' or m.startswith("
            "('jax.', 'optax', 'rollfast_'))]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_first_party_and_third_party_discovery():
    rollfast.plugins.reset()
    adamw = rollfast.registry().lookup("family", "adamw")
    assert adamw.provider.distribution == "rollfast" and adamw.provider.first_party
    assert adamw.provider.version == rollfast.__version__
    adamod = rollfast.registry().lookup("family", "adamod")
    assert adamod.provider.distribution == "rollfast-example-plugin"
    assert not adamod.provider.first_party
    assert rollfast.registry().lookup("mask", "trust_ratio").provider.plugin == "example"


def test_broken_plugins_warn_and_the_rest_works(broken_plugins):
    rollfast.plugins.reset()
    with pytest.warns(rollfast.RollfastPluginWarning) as record:
        reg = rollfast.registry()
    messages = "\n".join(str(w.message) for w in record)
    assert "'fails_import'" in messages and "a_module_that_does_not_exist" in messages
    assert "'raises'" in messages and "boom in hook" in messages
    assert "'collides'" in messages and "'collides:adamw'" in messages
    assert messages.count("'broken-plugins'") == 3
    # first party wins the collision; the loser is reachable by its qualified name
    assert reg.lookup("family", "adamw").provider.distribution == "rollfast"
    assert reg.lookup("family", "collides:adamw").provider.plugin == "collides"
    assert reg.lookup("family", "plain_sgd").provider.plugin == "good"
    errors = {p.provider.plugin: p.error for p in reg.plugins()}
    assert errors["good"] is None and "failed to import" in errors["fails_import"]
    opt = rollfast.get("adamw", learning_rate=0.1)
    assert np.isfinite(opt.update({"w": jnp.ones(2)}, opt.init({"w": jnp.ones(2)}),
                                  {"w": jnp.ones(2)})[0]["w"]).all()


def test_third_party_collision_between_equals_warns_first_wins():
    rollfast.plugins.reset()
    one = rollfast.plugins.as_plugin(mask=lambda register: register("same", toy_plugin.cap))
    two = rollfast.plugins.as_plugin(mask=lambda register: register("same", toy_plugin.keep_sign))
    rollfast.plugins.register(one, "one")
    with pytest.warns(rollfast.RollfastPluginWarning, match="'two'.*'one'.*'two:same'"):
        rollfast.plugins.register(two, "two")
    assert rollfast.registry().lookup("mask", "same").provider.plugin == "one"
    assert rollfast.registry().lookup("mask", "two:same").factory is toy_plugin.keep_sign
    rollfast.plugins.reset()


def test_autoload_can_be_disabled_first_party_still_loads(monkeypatch):
    monkeypatch.setenv("ROLLFAST_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = Registry().load()
    assert reg.lookup("family", "adamw")
    with pytest.raises(rollfast.UnknownNameError):
        reg.lookup("family", "adamod")


def test_modes_are_case_insensitive_and_take_aliases(fresh):
    for spelling, scale in [("EXP", 2.0), ("exp", 2.0), ("Exp", 2.0),
                            ("Q0.5EQ1.5", 0.5), ("q0p5eq1p5", 0.5), ("Q0P5EQ1P5", 0.5)]:
        assert fresh.lookup("mode", spelling, family="toy").impl["scale"] == scale
        opt = rollfast.get("toy", mode=spelling, learning_rate=1.0, round="to_half_grid")
        u, _ = opt.update({"v": jnp.ones(3)}, opt.init({"v": jnp.zeros(3)}))
        np.testing.assert_array_equal(u["v"], -scale * np.ones(3))


def test_parameters_come_from_the_signature_and_docstring(fresh):
    record = fresh.lookup("family", "toy")
    assert record.parameter_names == ("learning_rate", "b1", "mode", "round", "partition")
    b1 = record.parameters[1]
    assert (b1.default, b1.doc) == (0.5, "momentum.")
    assert record.summary.startswith("Momentum SGD whose mode scales")


def test_unknown_names_suggest_the_closest(fresh):
    with pytest.raises(rollfast.UnknownNameError, match="did you mean 'adamw'") as info:
        rollfast.get("adamww", learning_rate=1.0)
    assert "adamw" in info.value.suggestions and "rollfast list" in str(info.value)
    with pytest.raises(rollfast.UnknownNameError, match="unknown mode 'EXQ'.*'EXP'.*--family toy"):
        rollfast.get("toy", mode="EXQ")
    with pytest.raises(rollfast.UnknownNameError, match="unknown mask 'keep_sing'.*'keep_sign'"):
        rollfast.get("toy", mask="keep_sing")
    with pytest.raises(rollfast.UnknownNameError, match="unknown average"):
        rollfast.get("toy", average="emma_of_updates")
    with pytest.raises(rollfast.UnknownNameError, match="unknown partition 'by_dim'.*'by_ndim'"):
        rollfast.get("toy", partition="by_dim")


def test_unknown_option_names_the_closest_and_who_declares_what(fresh):
    with pytest.raises(TypeError, match="unknown option 'leraning_rate'; did you mean 'learning_rate'") as info:
        rollfast.get("adamw", leraning_rate=1e-3)
    assert "family 'adamw' (adam) takes learning_rate, b1, b2" in str(info.value)
    with pytest.raises(TypeError, match="'decay'.*average 'ema_of_updates'.*takes learning_rate, decay"):
        rollfast.get("toy", average="ema_of_updates", decya=0.5)
    with pytest.raises(TypeError, match="mode= is not supported.*family 'adamw'"):
        rollfast.get("adamw", learning_rate=1e-3, mode="EXP")
    with pytest.raises(TypeError, match="family 'adamw' .* needs learning_rate="):
        rollfast.get("adamw")
    with pytest.raises(TypeError, match="partition 'by_ndim' .* takes min_ndim"):
        rollfast.get("toy", min_dim=1)


def test_services_are_resolved_built_and_injected(fresh):
    params = {"m": jnp.ones((2, 2)), "v": jnp.ones(2)}
    grads = {"m": jnp.full((2, 2), 0.3), "v": jnp.full(2, 0.3)}
    opt = rollfast.get("toy", learning_rate=1.0, mode="q0p5eq1p5", b1=0.0)
    u, _ = opt.update(grads, opt.init(params))
    # partition: matrices ×10; mode scale 0.5; rounding to the 1/2 grid
    np.testing.assert_array_equal(u["m"], -np.full((2, 2), 1.5))
    np.testing.assert_array_equal(u["v"], -np.full(2, 0.0))
    opt = rollfast.get("toy", learning_rate=1.0, mode="q0p5eq1p5", b1=0.0, min_ndim=1)
    np.testing.assert_array_equal(opt.update(grads, opt.init(params))[0]["v"], -np.full(2, 1.5))
    # a built object passes through unchanged
    opt = rollfast.get("toy", learning_rate=1.0, b1=0.0, partition=lambda p: jax.tree.map(lambda _: True, p))
    np.testing.assert_array_equal(opt.update(grads, opt.init(params))[0]["v"], -np.full(2, 6.0))


def test_masks_wrap_in_order_with_the_first_moment_and_auto_masks(fresh):
    params = {"v": jnp.zeros(2)}
    opt = rollfast.get("toy", learning_rate=1.0, b1=0.5, mask="keep_sign", cap_value=0.25)
    state = opt.init(params)
    u, state = opt.update({"v": jnp.array([1.0, -1.0])}, state)
    # auto mask `cap` was added (its option was given) and sits inside keep_sign (order -10)
    np.testing.assert_array_equal(u["v"], [-0.25, 0.25])
    u, state = opt.update({"v": jnp.array([-3.0, -3.0])}, state)
    # the mask saw the family's momentum g + b1·m through the auto mask's state
    np.testing.assert_array_equal(state.seen["v"], [-2.5, -3.5])
    np.testing.assert_array_equal(u["v"], [0.25, 0.25])


def test_average_receives_the_family_learning_rate(fresh):
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    opt = rollfast.get("toy", learning_rate=schedule, average="ema_of_updates")
    assert opt.init({"v": jnp.zeros(1)}).seen is schedule
    opt = rollfast.get("toy", average="ema_of_updates")
    assert opt.init({"v": jnp.zeros(1)}).seen == 0.1  # the family's default


def test_adamw_equals_optax_bit_for_bit():
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (5, 3)), "b": jnp.arange(3.0)}
    kw = dict(learning_rate=optax.cosine_decay_schedule(1e-2, 20), b1=0.8, b2=0.99, eps=1e-7,
              weight_decay=0.05, weight_decay_mask={"w": True, "b": False}, nesterov=True)
    mask = kw["weight_decay_mask"]
    ours = rollfast.get("adamw", **kw)
    theirs = optax.adamw(**{k: v for k, v in kw.items() if k != "weight_decay_mask"}, mask=mask)
    s1, s2, p1, p2 = ours.init(params), theirs.init(params), params, params
    step = lambda opt: jax.jit(lambda g, s, p: opt.update(g, s, p))
    f1, f2 = step(ours), step(theirs)
    for t in range(20):
        g = jax.tree.map(lambda x: jnp.sin(x * (t + 1)), p1)
        u1, s1 = f1(g, s1, p1)
        u2, s2 = f2(g, s2, p2)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_array_equal(a, b)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)


@pytest.mark.parametrize("b1", [0.9, 0.0])
def test_adam_equals_optax_bit_for_bit(b1):
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4)}
    ours, theirs = rollfast.get("adam", learning_rate=3e-3, b1=b1), optax.adam(3e-3, b1=b1)
    s1, s2 = ours.init(params), theirs.init(params)
    assert (s1.inner_state[0].mu is None) == (b1 == 0)  # b1 = 0: the first moment is the gradient, not stored
    for t in range(20):
        g = {"w": jnp.cos(params["w"] * t)}
        u1, s1 = ours.update(g, s1)
        u2, s2 = theirs.update(g, s2)
        np.testing.assert_array_equal(u1["w"], u2["w"])


def test_adamw_bf16_moments_use_the_chosen_rounding():
    params = {"w": jnp.ones((64,), jnp.bfloat16)}
    grads = {"w": jnp.full((64,), 1 + 2**-10, jnp.bfloat16).astype(jnp.float32)}
    for rounding, distinct in [("nearest", 1), ("stochastic", 2)]:
        opt = rollfast.get("adamw", learning_rate=1e-3, b1=0.0, mu_dtype=jnp.bfloat16, round=rounding)
        _, state = opt.update({"w": jnp.full((64,), 1 + 2**-9)}, opt.init(params), params)
        nu = state.inner_state[0].nu["w"]
        assert nu.dtype == jnp.bfloat16
        assert len(set(np.asarray(nu, np.float32).tolist())) == distinct
    del grads


def test_integer_and_none_leaves_pass_through():
    params = {"w": jnp.ones(3), "steps": jnp.arange(3), "absent": None}
    opt = rollfast.get("adamw", learning_rate=0.1)
    u, _ = jax.jit(opt.update)({"w": jnp.ones(3), "steps": jnp.ones(3, jnp.int32), "absent": None},
                               opt.init(params), params)
    new = optax.apply_updates(params, u)
    np.testing.assert_array_equal(new["steps"], [0, 1, 2])
    assert new["absent"] is None and (new["w"] < 1).all()


def test_available_lists_records_by_kind():
    rollfast.plugins.reset()
    families = {r.name for r in rollfast.available("family")}
    assert {"adam", "adamw", "adamod"} <= families
    assert {r.kind for r in rollfast.available()} >= {"family", "mask", "round"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r.name for r in rollfast.available("round")][:2] == ["nearest", "stochastic"]


def test_example_third_party_family_and_mask_are_usable():
    rollfast.plugins.reset()
    params = {"w": jnp.full((4,), 2.0), "b": jnp.zeros(3)}
    opt = rollfast.get("adamod", learning_rate=0.1, mask="trust_ratio", trust_coefficient=0.01)
    updates, _ = opt.update({"w": jnp.arange(4.0), "b": jnp.ones(3)}, opt.init(params), params)
    np.testing.assert_allclose(jnp.linalg.norm(updates["w"]), 0.01 * 4.0, rtol=1e-5)
    assert (updates["b"] < 0).all()  # zero-norm parameters keep their own step
    target = {"w": jnp.arange(4.0)}
    _, _, losses = rollfast.testing.run(rollfast.get("adamod", learning_rate=0.1, b3=0.9), {"w": jnp.zeros(4)},
                                        rollfast.testing.quadratic_loss(target), 300)
    assert losses[-1] < 1e-2 * losses[0]


def test_qualified_names_get_suggestions_too():
    rollfast.plugins.reset()
    with pytest.raises(rollfast.UnknownNameError, match="did you mean .*'adam:adamw'"):
        rollfast.get("adam:adamx", learning_rate=0.1)


def test_missing_update_arguments_are_named():
    rollfast.plugins.reset()
    rollfast.plugins.register(rollfast.plugins.as_plugin(precondition=lambda register: register.family(
        "needs_value", lambda learning_rate=1.0: optax.polyak_sgd(learning_rate),
        update_args=("value",))), "polyak_test")
    opt = rollfast.get("needs_value")
    params = {"w": jnp.ones(2), "nothing": None}
    with pytest.raises(TypeError, match=r"family 'needs_value' .* needs update\(\.\.\., value=\)"):
        opt.update(params, opt.init(params), params)
    updates, _ = opt.update({"w": jnp.ones(2), "nothing": None}, opt.init(params), params, value=1.0)
    direct = optax.polyak_sgd(1.0)
    want, _ = direct.update({"w": jnp.ones(2)}, direct.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)}, value=1.0)
    assert updates["nothing"] is None
    np.testing.assert_array_equal(updates["w"], want["w"])
    assert float(jnp.abs(want["w"]).max()) > 0
    rollfast.plugins.reset()


def test_unspecified_services_use_each_parts_own_default(fresh):
    seen = {}

    def recording_average(inner, *, learning_rate=None, round="nearest"):
        """Record the rounding it receives.

        Args:
          learning_rate: unused.
          round: its own default differs from the family's.
        """
        seen["round"] = round
        return inner

    rollfast.plugins.register(rollfast.plugins.as_plugin(
        average=lambda register: register("recording", recording_average)), "recorder")
    rollfast.get("toy", average="recording")
    assert seen["round"].__class__.__name__ == "Nearest"      # its own default, not the family's
    rollfast.get("toy", average="recording", round="to_half_grid")
    assert isinstance(seen["round"], toy_plugin.HalfGrid)     # a given choice reaches every taker


def test_auto_masks_trigger_only_on_their_declared_options(fresh):
    def gate(inner, *, first_moment=None, gate_on=None, gate_shared_option=None):
        """Pass through.

        Args:
          gate_on: triggers the mask.
          gate_shared_option: does not trigger it.
        """
        return inner

    rollfast.plugins.register(rollfast.plugins.as_plugin(
        mask=lambda register: register("gate", gate, auto=("gate_on",))), "gate")
    with pytest.raises(TypeError, match="unknown option 'gate_shared_option'"):
        rollfast.get("toy", gate_shared_option=1)
    rollfast.get("toy", gate_shared_option=1, gate_on=1)


def test_an_option_declared_by_several_parts_reaches_each():
    """``key`` is declared by the family (adamw) and by the magma mask: the mask's keep
    pattern over 10 steps follows the key given (the same for the same key, different
    for another), so the option reached the mask and not only the family."""
    params = {f"l{i}": jnp.zeros(3) for i in range(8)}
    grads = {k: jnp.ones(3) for k in params}

    def kept(key):
        opt = rollfast.get("adamw", learning_rate=0.1, weight_decay=0.0, mask="magma", magma_p=0.5, key=key)
        state, pattern = opt.init(params), []
        for _ in range(10):
            u, state = opt.update(grads, state, params)
            pattern.append([bool(jnp.any(u[k] != 0)) for k in sorted(params)])
        return pattern

    assert kept(1) == kept(1)
    assert kept(1) != kept(2) and kept(1) != kept(42)
