"""Dtypes and keys: complex leaves (handled by adam/adamw exactly as Optax does, rejected
at init by families that do not handle them), float64 under ``jax_enable_x64`` (in a
subprocess, so the flag never leaks into other tests), float64 NumPy params without
it, and typed / raw PRNG keys wherever a key is taken."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rollfast

COMPLEX = {"z": (jnp.linspace(-1, 1, 6) + 1j * jnp.linspace(0.5, 1, 6)).astype(jnp.complex64),
           "r": jnp.linspace(0, 1, 4)}
FIRST_PARTY_AND_CONTRIB = ("adam", "adamw", "kron", "prism", "soap", "mars", "qhadamw", "normuon",
                           "apollo", "adamw8bit")


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_on_complex_leaves_equals_optax_bit_for_bit(name):
    ours = rollfast.get(name, learning_rate=1e-2)
    theirs = optax.adamw(1e-2, weight_decay=1e-4) if name == "adamw" else optax.adam(1e-2)
    s1, s2 = ours.init(COMPLEX), theirs.init(COMPLEX)
    f1, f2 = jax.jit(ours.update), jax.jit(theirs.update)
    for t in range(8):
        g = jax.tree.map(lambda x: jnp.cos(x * (t + 1)), COMPLEX)
        (u1, s1), (u2, s2) = f1(g, s1, COMPLEX), f2(g, s2, COMPLEX)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)
    mu, theirs_mu = s1.inner_state[0].mu, s2[0].mu
    assert mu["z"].dtype == theirs_mu["z"].dtype == jnp.complex64  # the moment stays as Optax keeps it
    assert abs(float(jnp.abs(u1["z"]).max())) < 0.011  # the issue saw -999999.75j here


def test_adam_state_on_complex_leaves_is_stable_under_scan():
    opt = rollfast.get("adamw", learning_rate=1e-2)

    def body(state, g):
        _, state = opt.update(g, state, COMPLEX)
        return state, None

    grads = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), COMPLEX)
    state, _ = jax.lax.scan(body, opt.init(COMPLEX), grads)
    assert int(state.inner_state[0].count) == 3


@pytest.mark.parametrize("name", [n for n in FIRST_PARTY_AND_CONTRIB if n not in ("adam", "adamw")])
def test_families_without_complex_support_reject_complex_leaves_at_init(name):
    opt = rollfast.get(name, learning_rate=1e-2)
    with pytest.raises(TypeError, match=rf"family '{name}' .* does not take complex parameters: "
                                        r"leaf \['z'\] is complex64"):
        opt.init(COMPLEX)


def test_adam_rejects_complex_leaves_with_a_narrow_moment_dtype():
    opt = rollfast.get("adamw", learning_rate=1e-2, mu_dtype=jnp.bfloat16)
    with pytest.raises(TypeError, match=r"mu_dtype=bfloat16 cannot store .* leaf \['z'\]"):
        opt.init(COMPLEX)


def test_float64_numpy_params_without_x64_warn():
    opt = rollfast.get("adamw", learning_rate=1e-2)
    with pytest.warns(RuntimeWarning, match=r"leaf \['w'\] is float64 but jax_enable_x64 is off"):
        opt.init({"w": np.ones(3)})


X64_SCRIPT = textwrap.dedent("""
    import jax, json
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, optax, rollfast
    params = {"m": jnp.linspace(-1, 1, 12, dtype=jnp.float64).reshape(4, 3),
              "v": jnp.linspace(0.5, 1, 5, dtype=jnp.float64), "h": jnp.ones(3, jnp.float32)}
    out = {}
    for name in %r:
        try:
            opt = rollfast.get(name, learning_rate=1e-2)
            state = opt.init(params)
            step = jax.jit(opt.update)
            for t in range(3):
                g = jax.tree.map(lambda x: jnp.cos(x * (t + 1)), params)
                u, state = step(g, state, params)
            out[name] = {k: str(v.dtype) for k, v in u.items()}
            out[name]["finite"] = all(bool(jnp.isfinite(v).all()) for v in u.values())
        except Exception as e:
            out[name] = {"error": repr(e)[:200]}
    ours, theirs = rollfast.get("adamw", learning_rate=1e-2), optax.adamw(1e-2, weight_decay=1e-4)
    s1, s2 = ours.init(params), theirs.init(params)
    for t in range(5):
        g = jax.tree.map(lambda x: jnp.sin(x * (t + 1)), params)
        (u1, s1), (u2, s2) = ours.update(g, s1, params), theirs.update(g, s2, params)
    out["adamw_equals_optax"] = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)))
    out["adamw_mu_dtype"] = str(s1.inner_state[0].mu["m"].dtype)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def x64_results():
    code = X64_SCRIPT % (FIRST_PARTY_AND_CONTRIB,)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    import json
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", FIRST_PARTY_AND_CONTRIB)
def test_float64_params_get_float64_updates_under_x64(x64_results, name):
    result = x64_results[name]
    assert "error" not in result, result
    assert result == {"m": "float64", "v": "float64", "h": "float32", "finite": True}


def test_adamw_under_x64_equals_optax_and_keeps_float64_moments(x64_results):
    assert x64_results["adamw_equals_optax"] is True
    assert x64_results["adamw_mu_dtype"] == "float64"


KEYED = [("adamw", {}), ("adam", {"mu_dtype": jnp.bfloat16}), ("prism", {}), ("apollo", {}),
         ("kron", {}), ("adamw", {"mask": "magma"}), ("adamw", {"average": "schedule_free"})]


@pytest.mark.parametrize("name, options", KEYED, ids=[f"{n}-{'-'.join(o)}" for n, o in KEYED])
def test_typed_raw_and_int_keys_give_the_same_optimizer(name, options):
    params = {"m": jnp.linspace(-1, 1, 12).reshape(4, 3), "v": jnp.ones(5, jnp.bfloat16)}
    grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
    results = []
    for key in (7, jax.random.PRNGKey(7), jax.random.key(7)):
        opt = rollfast.get(name, learning_rate=1e-2, key=key, **options)
        u, _ = jax.jit(opt.update)(grads, opt.init(params), params)
        results.append(u)
    for other in results[1:]:
        jax.tree.map(np.testing.assert_array_equal, results[0], other)
