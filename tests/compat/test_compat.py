"""The rollfast 0.2.1 top-level API: exact signatures, thin calls into rollfast.get."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rollfast
from rollfast.errors import UnknownNameError
from rollfast.registry import Registry

REQ = inspect.Parameter.empty

KRON = dict(learning_rate=0.001, b1=0.9, weight_decay=0.0, weight_decay_mask=None,
            preconditioner_update_probability="<schedule>", max_size_triangular=8192,
            max_skew_triangular=1.0, min_ndim_triangular=2, memory_save_mode=None, whiten_grad=True,
            update_preconditioner_first=True, preconditioner_lr=0.1, preconditioner_init_scale=None,
            mu_dtype=None, precond_dtype=None, precond_update_precision="tensorfloat32",
            precond_grads_precision=None, scanned_layers=None, lax_map_scanned_layers=False,
            lax_map_batch_size=8, preconditioner_mode="Q0.5EQ1.5", beta_lipschitz=0.9,
            track_lipschitz=True, damping=1e-9, grad_clip_max_amps=(2.0, 10.0),
            grad_clip_mode="per_tensor_rms", raw_global_grad_clip=None,
            permissive_spike_protection=True, newton_schulz_iters=5, use_magma=False, magma_p=0.5,
            magma_tau=2.0, axis_name=None, key="<PRNGKey(42)>")
PRISM = dict(learning_rate=REQ, b1=0.95, gamma=1.0, weight_decay=0.0, weight_decay_mask=None,
             ns_iters=5, mode="original", inv_steps=6, inv_eps=1e-5, inv_scale=1.001, eps_gram=1e-6,
             gamma_l=None, gamma_r=None, precision="<HIGHEST>", nesterov=True, shape_nesterov=True,
             bias_correction=False, grad_clip_max_amps=(2.0, 10.0), raw_global_grad_clip=None,
             permissive_spike_protection=True, mu_dtype=None, axis_name=None, use_magma=False,
             magma_p=0.5, magma_tau=2.0, key="<PRNGKey(42)>", adam_learning_rate=None, adam_b1=0.9,
             adam_b2=0.999, adam_eps=1e-8, prism_weight_dimension_numbers=None)
ADAMW = dict(learning_rate=REQ, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None,
             weight_decay=1e-4, weight_decay_mask=None, nesterov=False, use_magma=False, magma_p=0.5,
             magma_tau=2.0, axis_name=None, key="<PRNGKey(42)>")
SF = dict(learning_rate=REQ, total_steps=REQ, warmup_fraction=0.1, decay_fraction=0.1,
          weighting_mode="practical", sf_b1=0.9, state_dtype=None)
SF_KRON = SF | {k: v for k, v in KRON.items()
                if k not in ("learning_rate", "b1", "whiten_grad", "mu_dtype", "use_magma", "magma_p",
                             "magma_tau")}
SF_PRISM = SF | dict(prism_b1=0.0, gamma=1.0, ns_iters=5, mode="original", inv_steps=6, inv_eps=1e-5,
                     inv_scale=1.001, eps_gram=1e-6, gamma_l=None, gamma_r=None, precision="<HIGHEST>",
                     shape_nesterov=True, weight_decay=0.0, weight_decay_mask=None,
                     grad_clip_max_amps=(2.0, 10.0), raw_global_grad_clip=None,
                     permissive_spike_protection=True, mu_dtype=None, axis_name=None,
                     key="<PRNGKey(42)>", adam_learning_rate=None, adam_b1=0.0, adam_b2=0.999,
                     adam_eps=1e-8, prism_weight_dimension_numbers=None)
SF_ADAM = SF | dict(b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0, weight_decay_mask=None, mu_dtype=None,
                    axis_name=None, key="<PRNGKey(42)>")
API = {"kron": KRON, "prism": PRISM, "adamw": ADAMW, "schedule_free_kron": SF_KRON,
       "schedule_free_prism": SF_PRISM, "schedule_free_adam": SF_ADAM}
# Defaults written differently to keep `import rollfast` light (documented in rollfast_compat).
LIGHT = {"<PRNGKey(42)>": 42, "<HIGHEST>": "highest", "<schedule>": None}
FAMILY = {"kron": "kron", "prism": "prism", "adamw": "adamw", "schedule_free_kron": "kron",
          "schedule_free_prism": "prism", "schedule_free_adam": "adamw"}


def registered(family):
    return family in {r.name for r in rollfast.available("family")}


@pytest.mark.parametrize("name", list(API))
def test_signature_is_the_0_2_1_one(name):
    params = inspect.signature(getattr(rollfast, name)).parameters
    assert list(params) == list(API[name])
    for arg, default in API[name].items():
        expected = LIGHT.get(default, default) if isinstance(default, str) else default
        assert params[arg].default == expected, arg
    if name == "adamw":
        assert params["nesterov"].kind is inspect.Parameter.KEYWORD_ONLY


def tree():
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    return {"w": jax.random.normal(k[0], (6, 4)), "b": jax.random.normal(k[1], (4,)), "none": None}


def five_steps(opt, params):
    loss = lambda p: sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(p))

    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return rollfast.apply_updates(p, u), s

    state = opt.init(params)
    for _ in range(5):
        params, state = step(params, state)
    return params, state


CASES = {
    "adamw": (lambda: rollfast.adamw(1e-2, use_magma=True, magma_p=0.7, key=3),
              lambda: rollfast.get("adamw", learning_rate=1e-2, mask="magma", magma_p=0.7, magma_tau=2.0,
                                   key=3)),
    "schedule_free_adam": (
        lambda: rollfast.schedule_free_adam(1e-2, total_steps=20, weighting_mode="schedulet"),
        lambda: rollfast.get("adamw", average="schedule_free", learning_rate=rollfast.wsd_schedule(1e-2, 20),
                             weighting_mode="schedulet", sf_b1=0.9, state_dtype=None, b1=0.0, b2=0.999,
                             eps=1e-8, weight_decay=0.0, weight_decay_mask=None, mu_dtype=None, key=42)),
    "kron": (lambda: rollfast.kron(1e-2, preconditioner_mode="EQ", use_magma=True, key=5),
             lambda: rollfast.get("kron", learning_rate=1e-2, mode="EQ", mask="magma", key=5)),
    "schedule_free_kron": (
        lambda: rollfast.schedule_free_kron(1e-2, 20),
        lambda: rollfast.get("kron", average="schedule_free", learning_rate=rollfast.wsd_schedule(1e-2, 20),
                             weighting_mode="practical", b1=0.0, whiten_grad=True)),
    "prism": (lambda: rollfast.prism(1e-2, mode="bidirectional"),
              lambda: rollfast.get("prism", learning_rate=1e-2, mode="bidirectional")),
    "schedule_free_prism": (
        lambda: rollfast.schedule_free_prism(1e-2, 20),
        lambda: rollfast.get("prism", average="schedule_free", learning_rate=rollfast.wsd_schedule(1e-2, 20),
                             weighting_mode="practical", b1=0.0, nesterov=False, bias_correction=False,
                             adam_b1=0.0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_builds_runs_and_equals_the_get_spelling(name):
    assert registered(FAMILY[name]), f"family {FAMILY[name]!r} is not registered: its plugin failed to load"
    compat, spelled = (f() for f in CASES[name])
    a, state_a = five_steps(compat, tree())
    b, state_b = five_steps(spelled, tree())
    assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
    for x, y in zip(jax.tree.leaves((a, state_a)), jax.tree.leaves((b, state_b))):
        np.testing.assert_array_equal(x, y)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(a))
    assert a["none"] is None


def test_adamw_without_magma_is_plain_adamw_and_ignores_axis_name():
    plain, _ = five_steps(rollfast.adamw(1e-2, axis_name="batch"), tree())
    spelled, _ = five_steps(rollfast.get("adamw", learning_rate=1e-2), tree())
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(spelled)):
        np.testing.assert_array_equal(x, y)


def test_missing_family_names_its_plugin(monkeypatch):
    bare = Registry(autoload=False)
    monkeypatch.setattr(rollfast, "registry", lambda: bare.load())
    with pytest.raises(UnknownNameError, match=r"unknown family 'kron'.*rollfast_psgd plugin"):
        from rollfast_compat import kron
        kron()
    from rollfast_compat import prism
    with pytest.raises(UnknownNameError, match="rollfast_prism plugin"):
        prism(1e-3)


def test_other_top_level_names_behave():
    """The remaining 0.2 names do what they did: the WSD schedule's values, updates
    added to float leaves only, and the Schedule-Free evaluation point x."""
    lr = rollfast.wsd_schedule(1.0, 20, warmup_fraction=0.25, decay_fraction=0.25)
    assert [round(float(lr(n)), 4) for n in (0, 4, 10, 15, 19, 20)] == [0.1667, 0.8333, 1.0, 1.0, 0.2, 0.0]
    params = {"w": jnp.array([1.0, 2.0]), "n": None, "i": jnp.arange(2)}
    out = rollfast.apply_updates(params, {"w": jnp.array([0.5, -1.0]), "n": None, "i": jnp.zeros(2, jnp.int32)})
    assert out["w"].tolist() == [1.5, 1.0] and out["n"] is None and out["i"].tolist() == [0, 1]
    prefix = rollfast.apply_updates_prefix(params, {"w": jnp.array([0.5, -1.0]), "n": None, "i": None})
    assert prefix["w"].tolist() == [1.5, 1.0] and prefix["i"].tolist() == [0, 1]
    opt = rollfast.schedule_free_adam(0.1, total_steps=10, warmup_fraction=0.0, decay_fraction=0.0)
    p = {"w": jnp.array([1.0, -1.0])}
    state = opt.init(p)
    u, state = opt.update({"w": jnp.array([1.0, -1.0])}, state, p)
    y = rollfast.apply_updates(p, u)
    x = rollfast.schedule_free_eval_params(state, y)
    # one step from z = y = x = p: z moves by -0.1·sign(g); x = z (weight 1); y = 0.1 z + 0.9 x = z
    np.testing.assert_allclose(x["w"], [0.9, -0.9], rtol=1e-5)
