"""``rollfast.get``: resolve named parts through the registry and build one Optax chain.

The chain, outermost first::

    average( masks( family(mode, partition, round) ) )

Masks sort by their ``order`` (clipping, registered with a low order, sits next to
the family). Every part is an ordinary Optax transformation. The core checks every
option against its parameter's constraint before building, and wraps the chain in
the guards of :mod:`rollfast.policy`: leaf rules around the family, the non-finite
policy and the layout check around everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rollfast.constraints import Choice, check
from rollfast.errors import closest
from rollfast.registry import Contribution, registry

# Parameters that receive a resolved object instead of the user's string.
SERVICES = ("mode", "round", "partition")
# What a service parameter takes besides a registered name: a test and its description.
SERVICE_OBJECTS = {
    "mode": (lambda v: isinstance(v, Contribution) and v.kind == "mode", "a mode record"),
    "round": (lambda v: callable(getattr(v, "cast", None)), "an object with cast(x, dtype, key)"),
    "partition": (callable, "a partitioner (callable params -> specs)"),
}
NONFINITE_CHOICE = Choice("skip", "propagate")


def get(name: str, /, *, mask: str | Sequence[str] | None = None, average: str | None = None,
        nonfinite: str = "skip", **options):
    """Build the optimizer ``name`` with ``options``, as one Optax transformation.

    Args:
      name: a family (``"adamw"``, ``"kron"``, ...) or ``"<plugin>:<family>"``.
      mask: a mask name, or a sequence of them, wrapped around the family.
      average: an averaging wrapper around everything.
      nonfinite: ``"skip"`` (default): a step whose gradient or update arguments
        are not all finite changes nothing but the skip counter
        (:func:`rollfast.skipped_steps`); ``"propagate"``: no such guard.
      **options: options of the family, its mode, the masks, the average, the
        rounding and the partitioner; each goes to every chosen part that
        declares it. ``learning_rate`` takes a float or an Optax schedule.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      rollfast.UnknownNameError: an unknown family, mode or part (with the
        closest valid names).
      TypeError: an option that no chosen part declares, or a missing required one.
      ValueError, TypeError: a value its parameter's constraint does not allow
        (:mod:`rollfast.constraints`): names the option, part, value, what is allowed.

    >>> import jax.numpy as jnp, optax, rollfast
    >>> opt = rollfast.get("adamw", learning_rate=1e-2)
    >>> params = {"w": jnp.ones(3)}
    >>> updates, state = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
    >>> [round(float(x), 5) for x in optax.apply_updates(params, updates)["w"]]
    [0.99, 0.99, 0.99]
    """
    check(NONFINITE_CHOICE, nonfinite, option="nonfinite", part="rollfast.get")
    reg = registry()
    family = reg.lookup("family", name)
    masks = [reg.lookup("mask", m) for m in _names(mask)]
    averages = [reg.lookup("average", a) for a in _names(average)]
    explicit = [family, *masks, *averages]

    given = _services_given(options, explicit)
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
                elif value is not None:
                    _check_service(part, service, value)
                out[service] = value  # a record, or None / a user-built object, passed as is
        return out

    part_services = {id(p): services_of(p) for p in explicit}
    service_parts = [r for r in resolved.values() if r.factory is not None]

    parts = explicit + service_parts
    unclaimed = [o for o in options if not any(o in p.parameter_names for p in parts)]
    autos = [m for m in reg.records("mask")
             if m not in masks and any(o in _triggers(m) for o in unclaimed)]
    for m in autos:
        part_services[id(m)] = services_of(m)
    routed = _route(options, parts, autos, family)
    for p in parts + autos:
        _check_required(p, routed[id(p)], part_services.get(id(p), {}))

    built = {id(r): r if r.kind == "mode" else r.factory(**routed.get(id(r), {}))
             for r in resolved.values()}

    def inject(p: Contribution) -> dict:
        return {s: built.get(id(v), v) for s, v in part_services[id(p)].items()}

    wrappers = sorted(masks + autos, key=lambda r: r.metadata.get("order", 0)) + averages
    return _assemble(family, wrappers, routed, inject, nonfinite.lower(), options.get("axis_name"))


def _services_given(options: dict, explicit: list[Contribution]) -> dict:
    """The service options (``mode``, ``round``, ``partition``), taken out of ``options``;
    each must be declared by a chosen part."""
    given = {s: options.pop(s) for s in SERVICES if s in options}
    for service in given:
        if not any(service in p.parameter_names for p in explicit):
            raise TypeError(_no_taker(service, explicit))
    return given


def _route(options: dict, parts: list[Contribution], autos: list[Contribution],
           family: Contribution) -> dict[int, dict]:
    """Each option to every part that declares it, checked against that parameter's
    constraint; a wrapper declaring ``learning_rate`` gets the family's."""
    lr = options.get("learning_rate", _default(family, "learning_rate"))
    routed: dict[int, dict] = {id(p): {} for p in parts + autos}
    for option, value in options.items():
        takers = [p for p in parts + autos if option in p.parameter_names]
        if not takers:
            raise TypeError(_unknown_option(option, parts))
        for p in takers:
            routed[id(p)][option] = value
    for p in parts + autos:
        _check_values(p, routed[id(p)])
        if p is not family and "learning_rate" in p.parameter_names:
            routed[id(p)].setdefault("learning_rate", lr)
    return routed


def _assemble(family: Contribution, wrappers: list[Contribution], routed: dict,
              inject: Callable, nonfinite: str, axis_name=None):
    """``guard(averages(masks(leaf_rules(family))))`` from the routed options."""
    import optax

    from rollfast.policy import guard, leaf_rules

    tx = leaf_rules(family.factory(**routed[id(family)], **inject(family)),
                    tuple(family.metadata.get("update_args", ())), family.describe(),
                    complex_leaves=bool(family.metadata.get("complex_leaves", False)))
    first_moment = _through(family.metadata.get("first_moment"))
    for w in wrappers:
        if w.kind == "mask":
            tx = w.factory(tx, first_moment=first_moment, **routed[id(w)], **inject(w))
            first_moment = _through(first_moment)
        else:
            tx = w.factory(tx, **routed[id(w)], **inject(w))
    return guard(optax.with_extra_args_support(tx), nonfinite, axis_name)


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


def _check_values(part: Contribution, given: dict) -> None:
    """Every option given to ``part`` against its parameter's constraint."""
    constraints = {p.name: p.constraint for p in part.parameters}
    for option, value in given.items():
        check(constraints.get(option), value, option=option, part=part.describe())


def _check_service(part: Contribution, service: str, value) -> None:
    """A service option given as an object must be of the kind the service resolves to."""
    accepts, what = SERVICE_OBJECTS[service]
    if not accepts(value):
        text = f"{value!r} ({type(value).__name__})"
        names = (f"`rollfast list --kind mode --family {part.name}`" if service == "mode"
                 else f"`rollfast list --kind {service}`")
        raise TypeError(f"{service}={text} is not allowed by {part.describe()}: allowed is a "
                        f"registered {service} name ({names} lists them) or {what}")


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
