r"""The conformance checks: what every contribution of a kind passes, run on the
optimizer ``rollfast.get`` builds with it.

Every contribution is turned into a :class:`Subject`: a family alone, a mode inside its
family, a mask or an average around a base family (``adamw``), a rounding rule or a
partitioner inside the first family that takes one. The common checks then train it for
three jitted steps on :func:`~rollfast.testing.problems.kit_tree` (``None``, integer,
empty, 0-d … 4-D leaves; float32 and bfloat16) against a quadratic — a mode on
:func:`~rollfast.testing.problems.mode_tree`, the leaves whose factors it moves (its
family's own checks cover the rest):

``options``      an unknown option is a ``TypeError`` naming it;
``jit``          the step compiles and its updates are finite;
``leaves``       ``None`` stays ``None``, integer and empty leaves do not move, every
                 update has its parameter's shape, parameters keep their dtype, params
                 and state stay finite;
``non-finite``   a step whose gradient holds NaN and ∞ leaves params and state finite;
``save/restore`` the state pickled and restored continues bit-exactly (and through Orbax
                 when it is installed);
``sharded``      on 8 devices, with the matrix sharded by rows, three steps agree with the
                 unsharded run (float32 to 1e-5, bfloat16 to 1e-2, relative).

Per kind: a mode adds its family's contract (the family declares it with
``register.mode_protocol``); a mask or an average keeps the wrapped optimizer's state
reachable (``inner_state``); a rounding rule writes one of the two neighbours of every
value; a partitioner returns a spec tree of the parameters' structure.
"""

from __future__ import annotations

import functools
import pickle
import tempfile
from collections.abc import Callable

import attrs
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rollfast.assembly import get
from rollfast.errors import CheckFailed
from rollfast.registry import Contribution, registry
from rollfast.testing.problems import kit_tree, mode_tree, quadratic_loss

TREES = {"kit": kit_tree, "mode": mode_tree}

BASE_FAMILY = "adamw"  # what masks and averages wrap
LEARNING_RATE = 0.01   # for a required learning rate
STEPS = 3
DEVICES = 8
XLA_HINT = ("set XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported "
            "(the rollfast pytest plugin does it for pytest runs)")
UPDATE_ARGS = ("value", "grad", "value_fn", "obj_fn")


@attrs.frozen
class Subject:
    """A contribution ready to check: its record, a label for messages, and how to build
    the optimizer it takes part in (``options`` go to ``rollfast.get``)."""

    record: Contribution
    label: str
    family: Contribution
    get_args: tuple
    options: dict = attrs.field(factory=dict, eq=False)
    tree: str = "kit"

    def params(self, seed: int = 0) -> dict:
        return TREES[self.tree](seed)

    def build(self, **extra):
        return get(*self.get_args, **{**self.options, **extra})


def subject(kind: str, name: str, family: str | None = None, **options) -> Subject:
    """The :class:`Subject` of a registered contribution.

    Args:
      kind: ``family``, ``mode``, ``mask``, ``average``, ``round`` or ``partition``.
      name: its name, alias or ``"plugin:name"``.
      family: the family of a mode.
      **options: options for ``rollfast.get`` (a required learning rate defaults to 0.01).
    """
    reg = registry()
    record = reg.lookup(kind, name, family)
    label = record.describe()
    qualified = record.qualified_name
    if kind == "family":
        fam, args, extra = record, (qualified,), {}
    elif kind == "mode":
        fam, args, extra = reg.lookup("family", record.family), (record.family,), {"mode": qualified}
    elif kind in ("mask", "average"):
        fam, args, extra = reg.lookup("family", BASE_FAMILY), (BASE_FAMILY,), {kind: qualified}
    else:
        takers = [r for r in reg.records("family") if kind in r.parameter_names]
        if not takers:
            raise CheckFailed(label, "build", "registry", f"no registered family takes {kind}=")
        fam = min(takers, key=lambda r: (not r.provider.first_party, len(r.parameters), r.name))
        args, extra = (fam.qualified_name,), {kind: qualified}
    return Subject(record, label, fam, args, {**_learning_rate(fam, options), **extra, **options},
                   tree="mode" if kind == "mode" else "kit")


def _learning_rate(family: Contribution, options: dict) -> dict:
    """``{"learning_rate": 0.01}`` when the family requires one and it is not given."""
    required = [p.name for p in family.parameters if p.required and p.name.endswith("learning_rate")]
    return {n: LEARNING_RATE for n in required if n not in options}


# ------------------------------------------------------------------ the training run
def _loss(subj: Subject) -> Callable:
    target = {k: v for k, v in subj.params(seed=1).items() if _trainable(v)}
    quadratic = quadratic_loss(target)
    return lambda params: quadratic({k: params[k] for k in target})


def _trainable(x) -> bool:
    return x is not None and jnp.issubdtype(x.dtype, jnp.floating) and x.size > 0


def _gradients(loss, params, poison):
    """Gradients of ``loss`` on every leaf (zeros for integer and empty leaves, ``None`` kept);
    ``poison[0]`` is added to ``matrix``, ``poison[1]`` to ``bias`` (NaN/∞ for the non-finite step)."""
    value, grads = jax.value_and_grad(loss)({k: v for k, v in params.items() if _trainable(v)})
    full = {k: grads[k] if k in grads else (None if v is None else jnp.zeros_like(v))
            for k, v in params.items()}
    full["matrix"] = full["matrix"] + poison[0]
    full["bias"] = full["bias"] + poison[1]
    return value, full


def make_step(subj: Subject, opt, update_args: tuple) -> Callable:
    """``step(params, state, poison) -> (params, state, updates)``, jitted."""
    loss = _loss(subj)
    unknown = sorted(set(update_args) - set(UPDATE_ARGS))
    if unknown:
        raise ValueError(f"the kit cannot provide the update arguments {unknown} (it knows {UPDATE_ARGS})")

    @jax.jit
    def step(params, state, poison):
        value, grads = _gradients(loss, params, poison)
        provided = {"value": value, "grad": grads, "value_fn": loss, "obj_fn": loss}
        extra = {a: provided[a] for a in update_args}
        updates, state = opt.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state, updates

    return step


CLEAN = (0.0, 0.0)
POISON = (float("nan"), float("inf"))


@attrs.frozen
class Run:
    """Three steps of a subject on the kit tree, kept for the checks that read them."""

    opt: object
    step: Callable
    params: list   # params before each step and after the last
    states: list
    updates: list


_RUNS: dict = {}


def _run(subj: Subject) -> Run:
    """The subject's :class:`Run`, computed once (the last few are kept)."""
    key = (subj.label, subj.get_args, repr(sorted(subj.options.items())))
    if key not in _RUNS:
        if len(_RUNS) >= 4:
            _RUNS.pop(next(iter(_RUNS)))
        _RUNS[key] = _train(subj)
    return _RUNS[key]


def _train(subj: Subject) -> Run:
    opt = subj.build()
    step = make_step(subj, opt, tuple(subj.family.metadata.get("update_args", ())))
    params = [subj.params()]
    states = [opt.init(params[0])]
    updates = []
    for _ in range(STEPS):
        p, s, u = step(params[-1], states[-1], jnp.asarray(CLEAN, jnp.float32))
        params.append(p)
        states.append(s)
        updates.append(u)
    return Run(opt, step, params, states, updates)


# ------------------------------------------------------------------ common checks
def _fail(subj: Subject, check: str, where: str, detail: str):
    raise CheckFailed(subj.label, check, where, detail)


def _nonfinite_leaf(tree) -> str | None:
    """The path of the first leaf holding NaN or ∞, or ``None``."""
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(x))):
            return jax.tree_util.keystr(path)
    return None


def check_options(subj: Subject) -> None:
    """An option no part declares is a ``TypeError`` that names it."""
    bogus = "kit_unknown_option"
    try:
        subj.build(**{bogus: 1})
    except TypeError as exc:
        if bogus not in str(exc):
            _fail(subj, "options", "rollfast.get", f"the TypeError does not name the option: {exc}")
        return
    _fail(subj, "options", "rollfast.get", f"accepted the unknown option {bogus}=1")


def check_jit(subj: Subject) -> None:
    """The step compiles and its first updates are finite."""
    run = _run(subj)
    bad = _nonfinite_leaf(run.updates[0])
    if bad:
        _fail(subj, "jit", f"updates{bad}", "non-finite after the first jitted step")


def check_leaves(subj: Subject) -> None:
    """``None``/integer/empty leaves are kept; updates have their parameter's shape and dtype."""
    run = _run(subj)
    start, end = run.params[0], run.params[-1]
    if "nothing" in start and (end["nothing"] is not None or run.updates[-1]["nothing"] is not None):
        _fail(subj, "leaves", "['nothing']", "a None leaf came back as an array")
    for key in ("count", "empty"):
        if key in start and not (np.array_equal(end[key], start[key]) and end[key].dtype == start[key].dtype):
            _fail(subj, "leaves", f"['{key}']", f"the leaf moved: {start[key]} -> {end[key]}")
    for key, p in start.items():
        u, q = run.updates[-1][key], end[key]
        if p is not None and (u.shape != p.shape or q.dtype != p.dtype):
            _fail(subj, "leaves", f"['{key}']", f"update of shape {u.shape}, parameter {p.shape} "
                  f"{p.dtype} became {q.dtype}")
    for name, tree in (("params", end), ("state", run.states[-1])):
        bad = _nonfinite_leaf(tree)
        if bad:
            _fail(subj, "leaves", f"{name}{bad}", f"non-finite after {STEPS} steps")


def check_nonfinite(subj: Subject) -> None:
    """A gradient with NaN (``matrix``) and ∞ (``bias``) never reaches params or state.

    A mode, wrapper, rounding rule or partitioner is not blamed for its host family's
    policy: when the host family alone lets the NaN through too, the check passes here
    (the family's own check reports it)."""
    bad = _poisoned(subj)
    if bad and subj.record.kind != "family" and _poisoned(host(subj)):
        return
    if bad:
        _fail(subj, "non-finite", bad, "NaN/∞ in the gradient reached it")


def _poisoned(subj: Subject) -> str | None:
    """Where one step with a NaN/∞ gradient leaves a non-finite value, or ``None``."""
    run = _run(subj)
    params, state, _ = run.step(run.params[-1], run.states[-1], jnp.asarray(POISON, jnp.float32))
    for name, tree in (("params", params), ("state", state)):
        bad = _nonfinite_leaf(tree)
        if bad:
            return f"{name}{bad}"
    return None


def host(subj: Subject) -> Subject:
    """The subject's host family alone, with the options that family takes."""
    fam = subj.family
    options = {k: v for k, v in subj.options.items() if k in fam.parameter_names and k not in KINDS_OPTIONS}
    return Subject(fam, fam.describe(), fam, (fam.qualified_name,), options, tree=subj.tree)


KINDS_OPTIONS = ("mode", "mask", "average", "round", "partition")


def _bit_diff(a, b) -> str | None:
    """The path of the first leaf where two trees differ bit for bit (or in structure)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return "(tree structure)"
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = _raw(x), _raw(y)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return jax.tree_util.keystr(path)
    return None


def _raw(x):
    """``x`` as a NumPy array (a typed PRNG key as its key data)."""
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def check_save_restore(subj: Subject) -> None:
    """The state survives pickle (and Orbax, if installed) and continues bit-exactly."""
    run = _run(subj)
    state = run.states[-1]
    restored = {"pickle": pickle.loads(pickle.dumps(state))}
    orbax = _orbax_round_trip(state)
    if orbax is not None:
        restored["orbax"] = orbax
    want = run.step(run.params[-1], state, jnp.asarray(CLEAN, jnp.float32))
    for how, back in restored.items():
        diff = _bit_diff(state, back)
        if diff:
            _fail(subj, "save/restore", f"state{diff}", f"differs after a {how} round trip")
        got = run.step(run.params[-1], back, jnp.asarray(CLEAN, jnp.float32))
        diff = _bit_diff(want, got)
        if diff:
            _fail(subj, "save/restore", f"(params, state, updates){diff}",
                  f"the step from the {how}-restored state differs")


def _orbax_round_trip(state):
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = ocp.PyTreeCheckpointer()
        checkpointer.save(f"{tmp}/state", state)
        return checkpointer.restore(f"{tmp}/state", item=state)


def check_sharded(subj: Subject) -> None:
    """On 8 devices with the ``matrix`` leaf sharded by rows, three steps agree with the unsharded run."""
    if jax.device_count() < DEVICES:
        _fail(subj, "sharded", "devices", f"{jax.device_count()} device(s), the check needs {DEVICES}: {XLA_HINT}")
    run = _run(subj)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]), ("x",))
    spec = lambda key: jax.sharding.PartitionSpec("x") if key == "matrix" else jax.sharding.PartitionSpec()
    params = {k: None if v is None else jax.device_put(v, jax.sharding.NamedSharding(mesh, spec(k)))
              for k, v in run.params[0].items()}
    state = run.opt.init(params)
    for _ in range(STEPS):
        params, state, _ = run.step(params, state, jnp.asarray(CLEAN, jnp.float32))
    for key, want in run.params[-1].items():
        if want is None or want.size == 0:
            continue
        got = np.asarray(params[key], np.float64)
        want = np.asarray(want, np.float64)
        scale = max(np.max(np.abs(want)), 1e-30)
        err = np.max(np.abs(got - want)) / scale
        allowed = 1e-2 if params[key].dtype == jnp.bfloat16 else 1e-5
        if not err <= allowed:
            _fail(subj, "sharded", f"params['{key}']",
                  f"sharded vs unsharded relative difference {err:.2e} (allowed {allowed:.0e})")


COMMON = (("options", check_options), ("jit", check_jit), ("leaves", check_leaves),
          ("non-finite", check_nonfinite), ("save/restore", check_save_restore),
          ("sharded", check_sharded))


# ------------------------------------------------------------------ per-kind checks
def check_inner_state(subj: Subject) -> None:
    """A wrapper's state is a NamedTuple with ``inner_state``, which holds the wrapped
    optimizer's state exactly (same tree structure as the base family alone)."""
    state = _run(subj).states[0]
    if not hasattr(state, "inner_state"):
        _fail(subj, "inner state", f"state ({type(state).__name__})", "has no field inner_state")
    base = get(subj.get_args[0], **{k: v for k, v in subj.options.items()
                                    if k in subj.family.parameter_names}).init(subj.params())
    if jax.tree.structure(state.inner_state) != jax.tree.structure(base):
        _fail(subj, "inner state", "state.inner_state",
              f"is not the wrapped optimizer's state: {jax.tree.structure(state.inner_state)} "
              f"vs {jax.tree.structure(base)}")


def check_rounding(subj: Subject) -> None:
    """``cast(x, bfloat16, key)`` returns bfloat16 values each equal to one of the two
    bfloat16 neighbours of ``x``; representable values and ±∞ are kept; under jit."""
    rule = subj.record.factory(**{k: v for k, v in subj.options.items()
                                  if k in subj.record.parameter_names})
    if not isinstance(getattr(rule, "needs_key", None), bool):
        _fail(subj, "rounding", "needs_key", f"must be a bool, got {getattr(rule, 'needs_key', None)!r}")
    x = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(0), (1000,)) * 3,
                         jnp.array([1.0, -2.0, 0.0, jnp.inf, -jnp.inf])])
    key = jax.random.PRNGKey(1) if rule.needs_key else None
    got = jax.jit(lambda x, key: rule.cast(x, jnp.bfloat16, key))(x, key)
    if got.dtype != jnp.bfloat16:
        _fail(subj, "rounding", "cast", f"returned {got.dtype} for bfloat16")
    down = np.asarray(_toward(x, -np.inf), np.float64)
    up = np.asarray(_toward(x, np.inf), np.float64)
    g = np.asarray(got, np.float64)
    bad = np.flatnonzero(~((g == down) | (g == up)))
    if bad.size:
        i = int(bad[0])
        _fail(subj, "rounding", f"element {i}",
              f"cast({float(x[i])!r}) = {g[i]!r}, not a neighbour ({down[i]!r}, {up[i]!r})")


def _toward(x, direction):
    """The bfloat16 neighbour of float32 ``x`` toward ``direction`` (``x`` itself if representable)."""
    near = x.astype(jnp.bfloat16)
    step = jnp.nextafter(near, jnp.asarray(direction, jnp.bfloat16))
    wrong_side = (near.astype(jnp.float32) > x) if direction < 0 else (near.astype(jnp.float32) < x)
    return jnp.where(wrong_side, step, near)


def check_partition_specs(subj: Subject) -> None:
    """``partitioner(params)`` has the parameters' structure; ``None``, integer and empty
    leaves map to ``None``; the same params give the same specs."""
    part = subj.record.factory(**{k: v for k, v in subj.options.items()
                                  if k in subj.record.parameter_names})
    params = subj.params()
    specs = part(params)
    if not isinstance(specs, dict) or set(specs) != set(params):
        _fail(subj, "partition", "specs", f"keys {sorted(specs) if isinstance(specs, dict) else type(specs)}"
              f" instead of the parameters' {sorted(params)}")
    for key in ("nothing", "count", "empty"):
        if specs[key] is not None:
            _fail(subj, "partition", f"specs['{key}']", f"{specs[key]!r} for a leaf with no matrix path")
    if repr(part(subj.params())) != repr(specs):
        _fail(subj, "partition", "specs", "two calls on the same parameters disagree")


KIND_CHECKS = {"mask": (("inner state", check_inner_state),),
               "average": (("inner state", check_inner_state),),
               "round": (("rounding", check_rounding),),
               "partition": (("partition", check_partition_specs),)}


def checks(kind: str, name: str, family: str | None = None, **options) -> list[tuple[str, Callable]]:
    """Every check of one contribution: ``[(check name, zero-argument function), ...]``.

    Args:
      kind: ``family``, ``mode``, ``mask``, ``average``, ``round`` or ``partition``.
      name: the contribution's name, alias or ``"plugin:name"``.
      family: the family, for a mode.
      **options: options for ``rollfast.get``.
    """
    subj = subject(kind, name, family, **options)
    own = [(n, functools.partial(fn, subj)) for n, fn in COMMON + KIND_CHECKS.get(kind, ())]
    if kind == "mode":
        protocol = registry().protocol(subj.record.family)
        if protocol is not None and protocol.conformance is not None:
            own += list(protocol.conformance(subj.record))
    return own


def run_checks(kind: str, name: str, family: str | None = None, *, skip: tuple[str, ...] = (),
               **options) -> list[str]:
    """Run every check of one contribution; returns the names of the checks run.

    Raises:
      rollfast.errors.CheckFailed: the first check that fails (which check, where, by how much).
    """
    done = []
    for check, fn in checks(kind, name, family, **options):
        if check in skip:
            continue
        try:
            fn()
        except CheckFailed:
            raise
        except Exception as exc:  # an error inside a check is that check failing
            label = registry().lookup(kind, name, family).describe()
            raise CheckFailed(label, check, "(raised)", repr(exc)) from exc
        done.append(check)
    return done
