"""``rollfast.get``: resolve named parts through the registry and build one Optax chain.

The chain, outermost first::

    average( masks( family(mode, partition, round) ) )

Masks sort by their ``order`` (clipping, registered with a low order, sits next to
the family). Every part is an ordinary Optax transformation; the core adds no
per-step work of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rollfast.errors import closest
from rollfast.registry import Contribution, registry

# Parameters that receive a resolved object instead of the user's string.
SERVICES = ("mode", "round", "partition")


def get(name: str, /, *, mask: str | Sequence[str] | None = None, average: str | None = None,
        **options):
    """Build the optimizer ``name`` with ``options``, as one Optax transformation.

    Args:
      name: a family (``"adamw"``, ``"kron"``, ...) or ``"<plugin>:<family>"``.
      mask: a mask name, or a sequence of them, wrapped around the family.
      average: an averaging wrapper around everything.
      **options: options of the family, its mode, the masks, the average, the
        rounding and the partitioner; each goes to every chosen part that
        declares it. ``learning_rate`` takes a float or an Optax schedule.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      rollfast.UnknownNameError: an unknown family, mode or part (with the
        closest valid names).
      TypeError: an option that no chosen part declares, or a missing required one.

    >>> import jax.numpy as jnp, optax, rollfast
    >>> opt = rollfast.get("adamw", learning_rate=1e-2)
    >>> params = {"w": jnp.ones(3)}
    >>> updates, state = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([0.98999, 0.98999, 0.98999], dtype=float32)
    """
    import optax

    reg = registry()
    family = reg.lookup("family", name)
    masks = [reg.lookup("mask", m) for m in _names(mask)]
    averages = [reg.lookup("average", a) for a in _names(average)]
    explicit = [family, *masks, *averages]

    given = {s: options.pop(s) for s in SERVICES if s in options}
    for service in given:
        if not any(service in p.parameter_names for p in explicit):
            raise TypeError(_no_taker(service, explicit))
    resolved: dict[tuple[str, str], Contribution] = {}

    def services_of(part: Contribution) -> dict:
        """Each service parameter of ``part``: the user's choice, else the part's own default."""
        out = {}
        for service in SERVICES:
            if service in part.parameter_names:
                value = given.get(service, _default(part, service))
                if isinstance(value, str):
                    fam = family.name if service == "mode" else None
                    key = (service, value.lower())
                    value = resolved[key] if key in resolved else \
                        resolved.setdefault(key, reg.lookup(service, value, fam))
                out[service] = value  # a record, or None / a user-built object, passed as is
        return out

    part_services = {id(p): services_of(p) for p in explicit}
    service_parts = [r for r in resolved.values() if r.factory is not None]

    parts = explicit + service_parts
    lr = options.get("learning_rate", _default(family, "learning_rate"))
    unclaimed = [o for o in options if not any(o in p.parameter_names for p in parts)]
    autos = [m for m in reg.records("mask")
             if m not in masks and any(o in _triggers(m) for o in unclaimed)]
    routed: dict[int, dict] = {id(p): {} for p in parts + autos}
    for m in autos:
        part_services[id(m)] = services_of(m)
    for option, value in options.items():
        takers = [p for p in parts + autos if option in p.parameter_names]
        if not takers:
            raise TypeError(_unknown_option(option, parts))
        for p in takers:
            routed[id(p)][option] = value
    for p in parts + autos:
        if p is not family and "learning_rate" in p.parameter_names:
            routed[id(p)].setdefault("learning_rate", lr)
        _check_required(p, routed[id(p)], part_services.get(id(p), {}))

    built = {id(r): r if r.kind == "mode" else r.factory(**routed.get(id(r), {}))
             for r in resolved.values()}

    def inject(p: Contribution) -> dict:
        return {s: built.get(id(v), v) for s, v in part_services[id(p)].items()}

    tx = _leaf_rules(family.factory(**routed[id(family)], **inject(family)), family)
    first_moment = _through(family.metadata.get("first_moment"))
    for m in sorted(masks + autos, key=lambda r: r.metadata.get("order", 0)):
        tx = m.factory(tx, first_moment=first_moment, **routed[id(m)], **inject(m))
        first_moment = _through(first_moment)
    for a in averages:
        tx = a.factory(tx, **routed[id(a)], **inject(a))
    return optax.with_extra_args_support(tx)


def available(kind: str | None = None, family: str | None = None) -> list[Contribution]:
    """Every registered contribution (optionally of one kind), as records.

    >>> import rollfast
    >>> "adamw" in [r.name for r in rollfast.available("family")]
    True
    """
    return registry().records(kind, family)


def _names(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _default(part: Contribution, option: str):
    for p in part.parameters:
        if p.name == option:
            return None if p.required else p.default
    return None


def _leaf_rules(inner, family: Contribution):
    """Optimise non-empty floating-point leaves only: ``None`` leaves reach the family as
    ``optax.MaskedNode`` and come back as ``None``; integer and empty leaves get zero
    updates (so ``optax.apply_updates`` keeps them, and no family has to reduce over
    an empty array). Update arguments shaped like the updates get the same holes; a
    missing one that the family needs is an error."""
    import jax
    import jax.numpy as jnp
    import optax

    is_float = lambda x: (x is not None and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
                          and jnp.size(x) > 0)
    mask = lambda tree: jax.tree.map(is_float, tree, is_leaf=lambda x: x is None)
    masked = optax.masked(inner, mask, mask_compatible_extra_args=True)
    needs = tuple(family.metadata.get("update_args", ()))

    def update(updates, state, params=None, **extra):
        missing = [a for a in needs if a not in extra]
        if missing:
            raise TypeError(f"{family.describe()} needs update(..., "
                            f"{', '.join(f'{a}=' for a in missing)}) at every step")
        updates, state = masked.update(updates, state, params, **extra)
        zero_ints = lambda u: u if u is None or is_float(u) else jnp.zeros_like(u)
        return jax.tree.map(zero_ints, updates, is_leaf=lambda x: x is None), state

    return optax.GradientTransformationExtraArgs(masked.init, update)


def _triggers(mask: Contribution) -> tuple[str, ...]:
    """The options whose presence adds an ``auto`` mask: ``auto=True`` means all of its own."""
    auto = mask.metadata.get("auto")
    if not auto:
        return ()
    return mask.parameter_names if auto is True else tuple(auto)


def _through(first_moment: Callable | None) -> Callable | None:
    if first_moment is None:
        return None
    return lambda state: first_moment(state.inner_state)


def _check_required(part: Contribution, given: dict, services: dict) -> None:
    missing = [p.name for p in part.parameters
               if p.required and p.name not in given and p.name not in services]
    if missing:
        raise TypeError(f"{part.describe()} needs {', '.join(f'{m}=' for m in missing)}")


def _declared(parts: list[Contribution]) -> str:
    return "; ".join(f"{p.describe()} takes {', '.join(p.parameter_names) or 'no options'}"
                     for p in parts)


def _unknown_option(option: str, parts: list[Contribution]) -> str:
    valid = sorted({n for p in parts for n in p.parameter_names})
    hint = closest(option, valid)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"unknown option {option!r}{did_you_mean} Valid options: {_declared(parts)}"


def _no_taker(service: str, parts: list[Contribution]) -> str:
    return (f"{service}= is not supported by the chosen parts: {_declared(parts)} "
            f"(`rollfast info {parts[0].name}` shows what it takes)")


__all__ = ["get", "available"]
