"""The five extension points of rollfast, and the contract of each.

Every hook is a *registration* hook: rollfast calls it once per plugin with a
``register`` object, and the plugin declares what it contributes by calling it.
Nothing is returned. A plugin is any module or object with ``@rollfast.hookimpl``
functions named after these specs, published under the entry-point group
``rollfast``::

    # pyproject.toml of a plugin distribution
    [project.entry-points.rollfast]
    my_plugin = "my_plugin_module"

Every ``register`` call accepts the same descriptive keywords:

``aliases``     other names the contribution answers to (e.g. ``"Q0p5EQ1p5"``);
``summary``     one line for ``rollfast list`` (default: first docstring line);
``references``  papers or URLs shown by ``rollfast info``;
``priority``    between two first-party plugins claiming one name, the higher wins
                (default 0); the loser stays reachable as ``"<plugin>:<name>"``;
``constraints`` ``{option: Constraint}`` for options whose factory signature cannot
                carry ``Annotated[..., Constraint]`` (see :mod:`rollfast.constraints`);
``metadata``    a mapping of anything else, kept verbatim on the record
                (``record.metadata``) — the one spelling for free-form data.

Any other keyword (beyond those a kind documents, e.g. ``first_moment``) is a mistake:
when the registry loads, that registration is dropped with a
:class:`~rollfast.RollfastPluginWarning` naming the plugin and suggesting the keyword
meant. So is a registration that cannot work: a mode of an unknown family, a mode whose
keywords its family's mode protocol rejects, a factory whose signature lacks what its
kind requires. ``rollfast plugins`` lists every warning.

A contribution's *parameters* are read from its factory's signature (name,
default) and from the ``Args:`` section of its docstring (one line of doc each),
so they are written once; so are the values each allows (``Annotated[float, Beta]``,
see :mod:`rollfast.constraints`), which ``rollfast.get`` checks before building.
Lookups of names are case-insensitive.

How ``rollfast.get(name, **options)`` uses the contributions
------------------------------------------------------------

* The family factory is called with the options its signature declares.
* A factory parameter named after a kind that rollfast resolves — ``mode``,
  ``round``, ``partition`` — receives, instead of the user's string, the
  resolved object: the mode's :class:`~rollfast.registry.Contribution` record (its
  ``impl`` mapping holds what the mode registered), or the built rounding /
  partitioner object. The parameter's default in the signature is the default
  name (``mode="Q0.5EQ1.5"``).
* Mask and average factories are *wrappers*: they receive the transformation to
  wrap as their first positional argument and return a new one. A wrapper's state
  must be a NamedTuple with a field ``inner_state`` holding the wrapped state, so
  the core can look through it.
* An option declared by several chosen parts goes to all of them (e.g. ``key``);
  ``learning_rate`` is given to every part that declares it, with the family's
  value (the user's, or the family's default).
* A mask registered with ``auto=True`` (or ``auto=(option, ...)``) is added to
  every chain in which one of its options (or of the listed ones) is given and no
  explicitly chosen part declares that option (this is how generic clipping
  reaches every family).
* A service parameter (``round``, ``partition``) that the user does not give is
  resolved per part from that part's own default, like any other option. ``order`` sorts masks: lower is
  applied first, closer to the family.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("rollfast")


@hookspec
def precondition(register):
    """Register optimizer families and modes of families.

    ``register.family(name, factory, **descr)``: ``factory(learning_rate, *,
    options...)`` returns an ``optax.GradientTransformation`` whose updates are
    already multiplied by ``-learning_rate`` (a complete optimizer, as
    ``optax.adamw`` is). Family-only keywords of ``register.family``:

    ``first_moment``  ``Callable[[state], pytree | None]``: the family's first
        moment (momentum) in its own state, in the parameters' tree structure.
        Masks that score updates by gradient/momentum agreement use it; ``None``
        (the default) means the family keeps none visible.
    ``update_args``   names of extra keyword arguments that ``update`` needs
        (e.g. ``("value",)`` for a Polyak step); shown by ``rollfast info``.
    ``complex_leaves`` ``True`` if the family handles complex parameters; otherwise
        ``init`` rejects a complex leaf, naming it.

    ``register.mode(family, name, **impl)`` attaches a mode to a family that may
    be registered by any other plugin. ``impl`` is what the family's *mode
    protocol* asks for, documented by the family; the family receives the mode's
    record, whose ``impl`` mapping holds these keywords. For example, the kron
    family (``rollfast_psgd``) asks for ``update_dense(q, terms) -> q`` — how one
    dense factor moves given the terms the family computed
    (``rollfast_psgd.factors.FactorTerms``: Gram ``t1``, ``t2 = n/d``, step
    ``eta``, bound, random probe), returning ``(q, qᵀq)`` instead when the geometry
    has formed ``qᵀq`` anyway — and optionally ``update_diag(q, terms) -> q``,
    ``statistic`` (``"Ph"`` or ``"Qh"``) and ``inverse_probe`` (bool), plus in
    ``metadata`` its float64 NumPy reference ``reference_dense(q, terms) -> q`` (``q`` a
    float64 ``(d, d)`` array; ``terms`` with float64 ``t1``, ``t2``, ``eta``, ``bound``,
    ``probe``, ``newton_schulz_iters``; returns the moved factor) and the
    ``invariants`` it keeps (``"symmetric"``, ``"upper_triangular"``, ``"spd"``), which
    the conformance kit checks; the prism family asks for ``shape(T, D, **options)``.

    ``register.mode_protocol(family, required=(), optional=(), prepare=None,
    conformance=None, scaffold=None)`` declares a family's mode protocol: the
    implementation keywords of its modes (checked when the registry loads, with
    did-you-mean), ``prepare(record) -> impl`` (checks values, may wrap functions),
    ``conformance(record) -> [(check, fn), ...]`` (run by ``rollfast.testing.check_mode``)
    and ``scaffold(NAME) -> module text`` (``rollfast new-plugin --kind mode``). A family
    without a protocol accepts any keywords.

    ``register.export(name, obj)`` (on every registrar) publishes a top-level
    ``rollfast.<name>`` attribute, resolved lazily on first access.

    Example::

        @rollfast.hookimpl
        def precondition(register):
            register.family("sign_sgd", sign_sgd)

        def sign_sgd(learning_rate=1e-3):
            '''SGD on the sign of the gradient.'''
            return optax.chain(optax.scale_by_sign(),
                               optax.scale_by_learning_rate(learning_rate))
    """


@hookspec
def mask(register):
    """Register update masks: wrappers applied to the whole optimizer's output.

    ``register(name, factory, **descr)`` with
    ``factory(inner, *, first_moment, options...) -> GradientTransformation``.
    ``inner`` is the optimizer built so far; ``first_moment`` is ``None`` or a
    function from ``inner``'s state to the family's first moment (see
    ``precondition``). The wrapper calls ``inner.update`` and transforms the
    updates (masking, scaling, clipping). Extra keywords: ``auto`` (apply when
    one of the mask's options is given, see the module docstring) and ``order``.

    Example::

        @rollfast.hookimpl
        def mask(register):
            register("half", half)

        def half(inner, *, first_moment=None):
            '''Halve every update.'''
            def update(u, state, params=None, **extra):
                u, s = inner.update(u, state.inner_state, params, **extra)
                return jax.tree.map(lambda x: x / 2, u), HalfState(s)
            return optax.GradientTransformationExtraArgs(
                lambda p: HalfState(inner.init(p)), update)
    """


@hookspec
def average(register):
    """Register iterate-averaging wrappers around a whole optimizer.

    ``register(name, factory, **descr)`` with
    ``factory(inner, *, learning_rate, options...) -> GradientTransformation``:
    ``learning_rate`` is the family's (float or schedule), for weightings that
    depend on it. The wrapper's update is applied to the parameters the user
    holds; any extra sequence it keeps lives in its state (``inner_state`` field
    as for masks).

    Example::

        @rollfast.hookimpl
        def average(register):
            register("none", lambda inner, *, learning_rate=None: inner)
    """


@hookspec
def round(register):
    """Register rounding rules for low-precision storage.

    ``register(name, factory, **descr)`` with ``factory(options...)`` returning an
    object with ``cast(x, dtype, key) -> array`` (write ``x`` in ``dtype``;
    ``key`` is a PRNG key or ``None``) and a boolean ``needs_key``. Parts whose
    factory declares a ``round`` parameter receive the built object and use it
    whenever they store a moment in low precision.

    Example::

        @rollfast.hookimpl
        def round(register):
            register("truncate", Truncate)

        class Truncate:
            '''Round toward zero.'''
            needs_key = False
            def cast(self, x, dtype, key=None): ...
    """


@hookspec
def partition(register):
    """Register partitioners: which leaves take a family's matrix path.

    ``register(name, factory, **descr)`` with ``factory(options...)`` returning
    a callable ``partitioner(params) -> specs``: a pytree with the structure of
    ``params`` whose leaves are ``None`` (element-wise fallback, or pass-through
    for ``None``/integer leaves) or a matrix view spec (documented by the
    partition plugin). Matrix families declare a ``partition`` parameter and
    receive the built partitioner.

    Example::

        @rollfast.hookimpl
        def partition(register):
            register("nothing", lambda: lambda params: jax.tree.map(lambda _: None, params))
    """
