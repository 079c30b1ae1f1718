"""Partitioners: which leaves take the matrix path, and the matrix views of tensors."""

import equinox as eqx
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp
import rollfast
from rollfast.testing import mixed_tree
from rollfast_partition import (MatrixSpec, PrismDimensionNumbers, as_partitioner, auto,
                                dimension_numbers, equinox, get_equinox_prism_spec, leaf_specs)


def test_auto_on_a_dict_tree():
    """Rank >= 2 with both matrix dimensions > 1 → matrix path (rank k > 2 as
    (d_1…d_{k-1}) × d_k); scalars, vectors, degenerate matrices, None and ints → None."""
    tree = dict(mixed_tree(), row=jnp.ones((1, 5)), stack=jnp.ones((2, 3, 4)))
    specs = leaf_specs(auto(), tree)
    assert specs == {"scalar": None, "bias": None, "matrix": MatrixSpec(0, 1),
                     "conv": MatrixSpec((0, 1, 2), 3), "nothing": None, "count": None,
                     "row": None, "stack": MatrixSpec((0, 1), 2)}


def test_auto_name_and_size_rules():
    tree = {"embed": jnp.ones((50, 4)), "head": {"w": jnp.ones((4, 50))}, "body": jnp.ones((4, 4))}
    by_name = leaf_specs(auto(partition_exclude="embed|head"), tree)
    assert by_name == {"embed": None, "head": {"w": None}, "body": MatrixSpec(0, 1)}
    by_size = leaf_specs(auto(partition_max_dim=10), tree)
    assert by_size == by_name
    by_fn = leaf_specs(auto(partition_exclude=lambda path, leaf: leaf.shape[0] == 4), tree)
    assert by_fn == {"embed": MatrixSpec(0, 1), "head": {"w": None}, "body": None}
    with pytest.raises(TypeError, match="partition_exclude"):
        auto(partition_exclude=3)


def test_equinox_mlp_and_convs():
    key = jax.random.PRNGKey(0)
    model = [eqx.nn.MLP(3, 2, 4, 1, key=key), eqx.nn.Conv2d(2, 4, 3, key=key),
             eqx.nn.Conv2d(4, 4, 3, groups=4, key=key), eqx.nn.ConvTranspose1d(2, 3, 2, key=key),
             eqx.nn.Embedding(10, 4, key=key), eqx.nn.LayerNorm(4)]
    params = eqx.filter(model, eqx.is_array)
    specs = leaf_specs(equinox(), params)
    mlp, conv, depthwise, transposed, embedding, norm = specs
    assert [layer.weight for layer in mlp.layers] == [MatrixSpec(1, 0)] * 2
    assert [layer.bias for layer in mlp.layers] == [None, None]
    assert conv.weight == MatrixSpec((1, 2, 3), 0) and conv.bias is None
    assert depthwise.weight is None
    assert transposed.weight == MatrixSpec((1, 2), 0)
    assert embedding.weight is None and norm.weight is None and norm.bias is None
    keep = get_equinox_prism_spec(params, skip_depthwise_conv=False)
    assert keep[2].weight == MatrixSpec((1, 2, 3), 0)
    assert rollfast.get_equinox_prism_spec is get_equinox_prism_spec


def test_equinox_partition_drives_prism():
    model = eqx.nn.MLP(3, 1, 8, 1, key=jax.random.PRNGKey(0))
    params = eqx.filter(model, eqx.is_array)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))

    def loss(p):
        m = eqx.combine(p, model)
        return jnp.mean(jax.vmap(m)(x) ** 2)

    opt = rollfast.get("prism", learning_rate=0.05, partition="equinox")
    state = opt.init(params)
    grads = jax.grad(loss)(params)
    updates, state = jax.jit(opt.update)(grads, state, params)
    mu = state.inner_state.inner_states["prism"].inner_state[0].mu
    assert mu.layers[0].weight.shape == (8, 3) and isinstance(mu.layers[0].bias, optax.MaskedNode)
    assert loss(eqx.apply_updates(params, updates)) < loss(params)


def test_dimension_numbers_mismatch_names_the_leaf():
    tree = {"a": {"k": jnp.ones((3, 3, 2, 4))}, "b": jnp.ones(4)}
    with pytest.raises(ValueError, match=r"\['a'\]\['k'\].*rank 4"):
        leaf_specs(dimension_numbers({"a": {"k": MatrixSpec(0, 5)}, "b": None}), tree)
    with pytest.raises(ValueError, match=r"no entry for leaf \['b'\]"):
        leaf_specs(dimension_numbers({"a": {"k": MatrixSpec(0, 1)}}), tree)
    with pytest.raises(ValueError, match=r"entry at \['c'\]"):
        leaf_specs(dimension_numbers({"a": {"k": None}, "b": None, "c": MatrixSpec(0, 1)}), tree)
    with pytest.raises(ValueError, match=r"\['b'\].*rank >= 2"):
        leaf_specs(dimension_numbers({"a": {"k": None}, "b": MatrixSpec(0, 1)}), tree)
    with pytest.raises(ValueError, match=r"\['b'\].*must be a MatrixSpec"):
        leaf_specs(dimension_numbers({"a": {"k": None}, "b": "rows"}), tree)
    opt = rollfast.get("prism", learning_rate=0.1, partition="dimension_numbers",
                       dimension_numbers={"a": {"k": MatrixSpec((0, 1, 2), 4)}, "b": None})
    with pytest.raises(ValueError, match=r"\['a'\]\['k'\]"):
        opt.init(tree)


def test_spec_errors():
    with pytest.raises(ValueError, match="rank >= 2"):
        MatrixSpec().view((5,))
    with pytest.raises(ValueError, match="overlap"):
        MatrixSpec((0, 1), 1).view((2, 3, 4))
    with pytest.raises(ValueError, match="non-empty"):
        MatrixSpec((), 1).view((2, 3))
    with pytest.raises(ValueError, match="out of range"):
        MatrixSpec(0, -4).view((2, 3, 4))
    assert PrismDimensionNumbers is MatrixSpec
    assert MatrixSpec(-2, -1).view((2, 3, 4)).matrix_shape == (2, 3, 4)


def test_unknown_partitioner_did_you_mean():
    with pytest.raises(rollfast.UnknownNameError, match="did you mean 'equinox'"):
        rollfast.get("prism", learning_rate=1e-3, partition="equinx")


def test_user_callables_and_compat_override():
    tree = {"stack": jnp.ones((2, 3, 4)), "w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    per_leaf = lambda path, leaf: MatrixSpec(1, 2) if "stack" in path else None
    assert leaf_specs(as_partitioner(per_leaf), tree) == {"stack": MatrixSpec(1, 2), "w": None, "b": None}
    whole = lambda params: {"stack": None, "w": MatrixSpec(1, 0), "b": None}
    assert leaf_specs(as_partitioner(whole), tree)["w"] == MatrixSpec(1, 0)
    assert leaf_specs(as_partitioner(None), tree)["w"] == MatrixSpec(0, 1)
    assert leaf_specs(as_partitioner("auto"), tree)["b"] is None
    labels = lambda opt: jax.tree.map(
        lambda m: getattr(m, "shape", m), opt.init(tree).inner_state.inner_states["prism"].inner_state[0].mu,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    opt = rollfast.get("prism", learning_rate=0.1, partition=per_leaf)
    assert labels(opt)["stack"] == (2, 3, 4) and isinstance(labels(opt)["w"], optax.MaskedNode)
    compat = rollfast.get("prism", learning_rate=0.1, partition=per_leaf,
                          prism_weight_dimension_numbers=whole)
    assert labels(compat)["w"] == (3, 4) and isinstance(labels(compat)["stack"], optax.MaskedNode)


def _numpy_view(x, red, out):
    batch = [a for a in range(x.ndim) if a not in red and a not in out]
    y = np.transpose(x, batch + list(red) + list(out))
    n = lambda axes: int(np.prod([x.shape[a] for a in axes]))
    return y.reshape(n(batch), n(red), n(out))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=5), st.data())
def test_matrix_view_round_trip(shape, data):
    perm = data.draw(st.permutations(range(len(shape))))
    n_red = data.draw(st.integers(1, len(shape) - 1))
    n_out = data.draw(st.integers(1, len(shape) - n_red))
    red, out = tuple(perm[:n_red]), tuple(perm[n_red:n_red + n_out])
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    view = MatrixSpec(red, out).view(shape)
    mats = view.to_matrices(x)
    np.testing.assert_array_equal(mats, _numpy_view(x, red, out))
    np.testing.assert_array_equal(view.from_matrices(mats), x)
