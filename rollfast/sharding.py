"""Where an optimizer's state lives on a device mesh: :func:`state_shardings`.

The rule is generic: a state leaf whose key path ends with a parameter's key path and
whose shape is that parameter's (a momentum ``….mu['w']``, a second moment, a slow copy of
the weights) is sharded like that parameter; every other leaf is replicated. A family
whose state has other large arrays registers a rule for the NamedTuple type that holds
them (:func:`register_state_sharding`), e.g. a stack of preconditioner tiles sharded
along its leading axis.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_RULES: dict[type, Callable] = {}


class ShardingContext(NamedTuple):
    """What a registered rule may use: the ``mesh`` and the user's ``stack_axis`` (a mesh
    axis name or ``None``)."""

    mesh: Mesh
    stack_axis: str | None

    def replicated(self, leaf=None) -> NamedSharding:
        """The fully replicated sharding."""
        return NamedSharding(self.mesh, PartitionSpec())

    def stacked(self, leaf, option: str = "the stack size") -> NamedSharding:
        """Axis 0 of ``leaf`` sharded over ``stack_axis`` (replicated without one); its
        length must be a multiple of the axis size (``option`` names how to pad it)."""
        if self.stack_axis is None:
            return self.replicated()
        if self.stack_axis not in self.mesh.shape:
            raise ValueError(f"stack_axis must be one of the mesh axes {tuple(self.mesh.shape)}, "
                             f"got {self.stack_axis!r}")
        size = self.mesh.shape[self.stack_axis]
        if leaf.shape[0] % size:
            raise ValueError(f"a stacked state of length {leaf.shape[0]} cannot be sharded over mesh axis "
                             f"{self.stack_axis!r} of size {size}: set {option} to a multiple of {size}")
        return NamedSharding(self.mesh, PartitionSpec(self.stack_axis, *[None] * (leaf.ndim - 1)))


def register_state_sharding(state_type: type, rule: Callable) -> None:
    """Register ``rule(node, ctx) -> shardings`` for state nodes of ``state_type``: it
    returns the sharding tree of that node, given a :class:`ShardingContext`."""
    _RULES[state_type] = rule


def state_shardings(optimizer, params, param_shardings, mesh: Mesh | None = None, stack_axis: str | None = None):
    """The ``NamedSharding`` tree of ``optimizer``'s state for ``params`` on a mesh.

    A state leaf whose key path ends with a parameter's path and has its shape follows
    that parameter's sharding; nodes of a type registered with :func:`register_state_sharding`
    use that rule (kron's tile stack: axis 0 over ``stack_axis``); everything else is
    replicated. The result can be passed as ``out_shardings`` of a jitted ``init`` and
    ``update``, or to a checkpointer to restore a state onto the mesh.

    Args:
      optimizer: an ``optax.GradientTransformation``.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``; nothing is allocated).
      param_shardings: a tree like ``params`` of ``NamedSharding`` or ``PartitionSpec``.
      mesh: the mesh (needed with ``PartitionSpec``; else read from ``param_shardings``).
      stack_axis: mesh axis name over which stacked state (e.g. kron's tiles) is sharded.

    Returns:
      A tree like ``optimizer.init(params)`` of ``NamedSharding``.

    >>> import jax, jax.numpy as jnp, optax
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(jax.devices()[:1], ("data",))
    >>> s = state_shardings(optax.adam(1e-3), {"w": jnp.zeros((4, 2))}, {"w": P("data")}, mesh)
    >>> s[0].mu["w"].spec == P("data"), s[0].count.spec == P()
    (True, True)
    """
    mesh = mesh or _mesh_of(param_shardings)
    named = jax.tree.map(lambda s: s if isinstance(s, NamedSharding) else NamedSharding(mesh, s),
                         param_shardings, is_leaf=lambda s: isinstance(s, (NamedSharding, PartitionSpec)))
    shapes = jax.tree_util.tree_flatten_with_path(params)[0]
    by_path = {tuple(path): (tuple(p.shape), s) for (path, p), s in
               zip(shapes, jax.tree.leaves(named, is_leaf=lambda s: isinstance(s, NamedSharding)))}
    state = jax.eval_shape(optimizer.init, params)
    return _assign(state, (), by_path, ShardingContext(mesh, stack_axis))


def _mesh_of(param_shardings) -> Mesh:
    for s in jax.tree.leaves(param_shardings, is_leaf=lambda s: isinstance(s, NamedSharding)):
        if isinstance(s, NamedSharding):
            return s.mesh
    raise ValueError("state_shardings needs mesh= when param_shardings holds no NamedSharding")


def _assign(node, path, by_path, ctx):
    """The sharding tree of the state node at ``path`` (recursively)."""
    if node is None:
        return None
    rule = _RULES.get(type(node))
    if rule is not None:
        return rule(node, ctx)
    if hasattr(node, "shape"):
        return _follow(node, path, by_path) or ctx.replicated(node)
    children, outer = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return outer.unflatten([_assign(c, path + tuple(p), by_path, ctx) for p, c in children])


def _follow(leaf, path, by_path):
    """The sharding of the parameter whose key path ends ``path`` and whose shape is the
    leaf's (a momentum ``….mu['w']`` follows ``params['w']``), or ``None``."""
    for start in range(len(path) + 1):
        shape, sharding = by_path.get(path[start:], (None, None))
        if shape == tuple(leaf.shape):
            return sharding
    return None
