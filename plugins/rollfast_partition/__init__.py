"""Partitioners: which leaves take a matrix family's path, and as which matrix.

A *partitioner* is a callable ``params -> specs``: a pytree with the structure
of ``params`` whose leaves are ``None`` (the family's element-wise fallback;
``None``, masked and integer leaves always get ``None``) or a
:class:`MatrixSpec`. A spec names the *reduction* axes (the matrix rows) and the
*output* axes (the columns) of a tensor; every other axis is a *batch* axis, so
a tensor of shape ``(d_1, …, d_k)`` is viewed as a stack of ``B`` matrices of
shape ``R × O``:

.. math::
    X \\mapsto \\operatorname{reshape}(\\operatorname{transpose}(X,
    (\\text{batch}\\ldots, \\text{reduction}\\ldots, \\text{output}\\ldots)), (B, R, O)),

with ``B, R, O`` the products of the sizes of each group. A conv kernel
``[kh, kw, cin, cout]`` with ``MatrixSpec((0, 1, 2), 3)`` is one
``(kh·kw·cin) × cout`` matrix; a scanned stack ``[L, m, n]`` with
``MatrixSpec(1, 2)`` is ``L`` matrices of shape ``m × n``.

Registered partitioners (``partition=`` of a matrix family):

``auto``               by shape (the default);
``equinox``            from an Equinox model (:func:`get_equinox_prism_spec`);
``dimension_numbers``  an explicit pytree of specs, or a callable ``params -> specs``.

A user may also pass, as ``partition=``, a callable ``(path, leaf) -> spec | None``
or any built partitioner; :func:`as_partitioner` turns each of these into a
partitioner and :func:`leaf_specs` checks its result against the leaves.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence

import attrs
import jax
import jax.numpy as jnp
import numpy as np
import optax

import rollfast


@rollfast.hookimpl
def partition(register):
    register("auto", auto)
    register("equinox", equinox)
    register("dimension_numbers", dimension_numbers, aliases=("dims",))
    register.export("get_equinox_prism_spec", get_equinox_prism_spec)


Axes = int | Sequence[int]


@attrs.frozen
class MatrixSpec:
    """How one tensor is viewed as a stack of matrices: ``reduction_axis`` (rows)
    and ``output_axis`` (columns), each an int or a sequence of ints (negative
    counts from the end); every other axis is a batch axis.

    ``PrismDimensionNumbers`` is the same class (its rollfast 0.2 name).

    >>> MatrixSpec((0, 1, 2), 3).view((3, 3, 16, 32)).matrix_shape
    (1, 144, 32)
    """

    reduction_axis: Axes = 0
    output_axis: Axes = 1

    def view(self, shape: Sequence[int]) -> MatrixView:
        """The :class:`MatrixView` of a tensor of ``shape`` (``ValueError`` if the
        axes do not fit it)."""
        ndim = len(shape)
        if ndim < 2:
            raise ValueError(f"{self} needs a tensor of rank >= 2, got shape {tuple(shape)}")
        red, out = _axes(self.reduction_axis, ndim, "reduction"), _axes(self.output_axis, ndim, "output")
        if not red or not out:
            raise ValueError(f"{self}: reduction and output axes must both be non-empty")
        if set(red) & set(out) or len(set(red)) < len(red) or len(set(out)) < len(out):
            raise ValueError(f"{self}: reduction and output axes overlap for shape {tuple(shape)}")
        batch = tuple(a for a in range(ndim) if a not in red and a not in out)
        size = lambda axes: math.prod(shape[a] for a in axes)
        return MatrixView(tuple(shape), batch + red + out, (size(batch), size(red), size(out)))


PrismDimensionNumbers = MatrixSpec


def _axes(axes: Axes, ndim: int, what: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{what} axis {a} is out of range for a tensor of rank {ndim}")
    return tuple(a % ndim for a in axes)


@attrs.frozen
class MatrixView:
    """A tensor of ``shape`` seen as ``matrix_shape = (B, R, O)`` matrices.

    >>> import jax.numpy as jnp
    >>> v = MatrixSpec(1, 2).view((4, 3, 5))
    >>> x = jnp.arange(60.0).reshape(4, 3, 5)
    >>> bool((v.from_matrices(v.to_matrices(x)) == x).all()), v.matrix_shape
    (True, (4, 3, 5))
    """

    shape: tuple[int, ...]
    perm: tuple[int, ...]
    matrix_shape: tuple[int, int, int]

    def to_matrices(self, x):
        """``x`` (of ``shape``) as a ``(B, R, O)`` array."""
        return x.transpose(self.perm).reshape(self.matrix_shape)

    def from_matrices(self, y):
        """The inverse of :meth:`to_matrices`."""
        y = y.reshape(tuple(self.shape[a] for a in self.perm))
        return y.transpose(tuple(np.argsort(self.perm)))


# ---------------------------------------------------------------- partitioners
def auto(partition_exclude=None, partition_max_dim=None):
    """By shape: floating leaves of rank >= 2 with both matrix dimensions > 1.

    Those take the matrix path; scalars and vectors take the fallback.

    A 2-D leaf is viewed as is (rows = axis 0); a leaf of rank k > 2 as
    ``(d_1·…·d_{k-1}) × d_k`` (a conv kernel ``[kh, kw, cin, cout]`` becomes
    ``(kh·kw·cin) × cout``). Embeddings and output heads are not special unless
    the name/size rule below says so.

    Args:
      partition_exclude: leaves sent to the fallback anyway: a regular
        expression searched in the leaf path (e.g. ``"embed|head"``), or a
        callable ``(path, leaf) -> bool``.
      partition_max_dim: leaves whose matrix view has a dimension above this
        size take the fallback (e.g. vocabulary-sized embeddings).

    >>> import jax.numpy as jnp
    >>> auto()({"w": jnp.ones((4, 3)), "b": jnp.ones(3), "v": jnp.ones((1, 5))})
    {'b': None, 'v': None, 'w': MatrixSpec(reduction_axis=0, output_axis=1)}
    """
    excluded = _exclusion(partition_exclude)

    def spec(path, leaf):
        ndim = len(leaf.shape)
        if ndim < 2:
            return None
        s = MatrixSpec(0, 1) if ndim == 2 else MatrixSpec(tuple(range(ndim - 1)), ndim - 1)
        _, rows, cols = s.view(leaf.shape).matrix_shape
        if min(rows, cols) <= 1 or (partition_max_dim is not None and max(rows, cols) > partition_max_dim):
            return None
        return None if excluded(path, leaf) else s

    return per_leaf(spec)


def _exclusion(rule) -> Callable:
    if rule is None:
        return lambda path, leaf: False
    if isinstance(rule, str):
        pattern = re.compile(rule)
        return lambda path, leaf: pattern.search(path) is not None
    if callable(rule):
        return rule
    raise TypeError(f"partition_exclude must be a regular expression or a callable, got {rule!r}")


def equinox(skip_depthwise_conv=True):
    """From an Equinox model: Linear and (transposed) convolution weights are matrices.

    Everything else takes the fallback (see :func:`get_equinox_prism_spec`).

    Args:
      skip_depthwise_conv: send depthwise convolutions to the fallback.

    >>> import jax, equinox as eqx
    >>> mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.PRNGKey(0))
    >>> specs = equinox()(eqx.filter(mlp, eqx.is_array))
    >>> specs.layers[0].weight, specs.layers[0].bias
    (MatrixSpec(reduction_axis=1, output_axis=0), None)
    """
    return lambda params: get_equinox_prism_spec(params, skip_depthwise_conv)


def get_equinox_prism_spec(model, skip_depthwise_conv=True):
    """The spec pytree of an Equinox model (same structure as the model).

    ``eqx.nn.Linear`` weights (stored ``(out, in)``) get
    ``MatrixSpec(reduction_axis=1, output_axis=0)``; the weights of
    ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` get
    ``MatrixSpec(reduction_axis=(1, …, ndim-1), output_axis=0)``, except
    depthwise convolutions (``groups > 1`` and ``groups == in_channels``) when
    ``skip_depthwise_conv``. Every other leaf (biases, norms, embeddings, …)
    gets ``None``.

    Args:
      model: an Equinox module (or any pytree containing some).
      skip_depthwise_conv: give depthwise convolutions ``None``.

    >>> import jax, equinox as eqx
    >>> conv = eqx.nn.Conv2d(2, 4, 3, key=jax.random.PRNGKey(0))
    >>> get_equinox_prism_spec(conv).weight
    MatrixSpec(reduction_axis=(1, 2, 3), output_axis=0)
    """
    import equinox as eqx

    layers = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)
    is_layer = lambda x: isinstance(x, layers)

    def weight_spec(layer):
        ndim = len(getattr(layer.weight, "shape", ()))
        if ndim < 2:
            return None
        if isinstance(layer, eqx.nn.Linear):
            return MatrixSpec(1, 0)
        if skip_depthwise_conv and layer.groups > 1 and layer.groups == layer.in_channels:
            return None
        return MatrixSpec(tuple(range(1, ndim)), 0)

    def layer_spec(layer):
        blank = jax.tree.map(lambda _: None, layer)
        spec = weight_spec(layer)
        if spec is None:
            return blank
        return eqx.tree_at(lambda m: m.weight, blank, spec, is_leaf=lambda x: x is None)

    return jax.tree.map(lambda x: layer_spec(x) if is_layer(x) else None, model, is_leaf=is_layer)


def dimension_numbers(dimension_numbers):
    """An explicit pytree of specs, or a callable ``params -> specs``.

    The pytree has the structure of the parameters, with a ``MatrixSpec`` or
    ``None`` per leaf.

    Args:
      dimension_numbers: the spec pytree, or a callable returning it.

    >>> import jax.numpy as jnp
    >>> part = dimension_numbers({"k": MatrixSpec((0, 1, 2), 3), "b": None})
    >>> leaf_specs(part, {"k": jnp.ones((3, 3, 2, 4)), "b": jnp.ones(4)})["k"]
    MatrixSpec(reduction_axis=(0, 1, 2), output_axis=3)
    """
    if callable(dimension_numbers):
        return dimension_numbers
    return lambda params: dimension_numbers


def per_leaf(fn: Callable) -> Callable:
    """A partitioner from ``fn(path, leaf) -> spec | None``, called on every
    floating array leaf (``path`` as ``jax.tree_util.keystr`` prints it);
    other leaves get ``None``.

    >>> import jax.numpy as jnp
    >>> part = per_leaf(lambda path, leaf: MatrixSpec(1, 2) if "stack" in path else None)
    >>> part({"stack": jnp.ones((2, 3, 4)), "w": jnp.ones((3, 4))})
    {'stack': MatrixSpec(reduction_axis=1, output_axis=2), 'w': None}
    """
    def partitioner(params):
        def one(path, leaf):
            return fn(jax.tree_util.keystr(path), leaf) if _is_float_array(leaf) else None
        return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_empty)

    return partitioner


def as_partitioner(partition) -> Callable:
    """A partitioner from what a user may pass as ``partition=``: ``None``
    (``auto``), a registered partitioner's name (built with no options), a
    partitioner ``params -> specs``, a per-leaf callable ``(path, leaf) -> spec``
    (two positional parameters), or a spec pytree.

    >>> import jax.numpy as jnp
    >>> as_partitioner(lambda path, leaf: None)({"w": jnp.ones((2, 2))})
    {'w': None}
    """
    if partition is None:
        return auto()
    if isinstance(partition, str):
        return rollfast.registry().lookup("partition", partition).factory()
    if not callable(partition):
        return dimension_numbers(partition)
    return per_leaf(partition) if _positional_arity(partition) >= 2 else partition


def _positional_arity(fn) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


# ---------------------------------------------------------------- checking
def leaf_specs(partitioner: Callable, tree):
    """Run ``partitioner`` on ``tree`` and check its answer against the leaves.

    Returns a pytree with the structure of ``tree`` (``None`` and Optax
    ``MaskedNode`` leaves kept as they are) holding, at every floating array
    leaf, its ``MatrixSpec`` or ``None``. Raises ``ValueError`` naming the leaf
    path when the spec tree does not have the leaves' structure or a spec does
    not fit its leaf.

    >>> import jax.numpy as jnp
    >>> leaf_specs(dimension_numbers({"w": MatrixSpec(0, 2)}), {"w": jnp.ones((3, 4))})
    Traceback (most recent call last):
    ...
    ValueError: spec for leaf ['w'] does not fit its shape (3, 4): output axis 2 is out of range for a tensor of rank 2
    """
    specs = partitioner(tree)
    flat_specs = dict(jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: _is_empty(x) or isinstance(x, MatrixSpec))[0])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_empty)
    paths = {p for p, _ in leaves}
    extra = [p for p, s in flat_specs.items() if p not in paths and not _is_empty(s)]
    if extra:
        raise ValueError(f"spec tree has an entry at {jax.tree_util.keystr(extra[0])}, "
                         f"where the parameters have no leaf")

    def check(path, leaf):
        if not _is_float_array(leaf):
            return leaf if _is_empty(leaf) else None
        name = jax.tree_util.keystr(path)
        if path not in flat_specs:
            raise ValueError(f"spec tree has no entry for leaf {name}")
        spec = flat_specs[path]
        if _is_empty(spec):
            return None
        if not isinstance(spec, MatrixSpec):
            raise ValueError(f"spec for leaf {name} must be a MatrixSpec or None, got {spec!r}")
        try:
            spec.view(leaf.shape)
        except ValueError as exc:
            raise ValueError(f"spec for leaf {name} does not fit its shape {tuple(leaf.shape)}: {exc}") from None
        return spec

    return jax.tree_util.tree_unflatten(treedef, [check(p, x) for p, x in leaves])


def _is_empty(x) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _is_float_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


__all__ = ["MatrixSpec", "PrismDimensionNumbers", "MatrixView", "auto", "equinox",
           "dimension_numbers", "per_leaf", "as_partitioner", "leaf_specs", "get_equinox_prism_spec"]
