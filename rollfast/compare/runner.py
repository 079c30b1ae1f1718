r"""Training runs of ``rollfast compare``: fair by construction, timed, failure-tolerant.

One *run* trains one optimizer on one task from one seed:

* ``key = PRNGKey(seed)`` splits into an init key (``task.init``) and a data key
  (``task.batch(data_key, step)``): every optimizer of a seed starts from the same
  parameters and sees the same minibatches in the same order.
* Training runs in chunks of steps inside one jitted ``lax.scan`` (no Python per
  step). The learning rate is a run-time value of the optimizer state
  (``optax.inject_hyperparams``), so one compilation serves every seed and every rate
  of the ``--tune`` sweep. Compilation (tracing, lowering, XLA) is timed on its own;
  ms/step is the median over chunks of chunk wall time / chunk length.
* A chunk whose losses are not all finite ends the run as ``diverged`` (at the first
  non-finite step); an exception while building, compiling or running ends it as
  ``error``. Either is a result; the comparison goes on.

Summary statistics of a loss curve :math:`\ell_1..\ell_T` use the trailing mean
:math:`\bar\ell_t` over a window :math:`w = \min(20, \max(1, \lfloor T/10\rfloor))`:
final loss :math:`\bar\ell_T`, best loss :math:`\min_t \bar\ell_t`, steps to target
:math:`\min\{t : \bar\ell_t \le \text{target}\}`.

>>> import numpy as np
>>> s = curve_stats(np.array([4.0, 3.0, 2.0, 1.0]), target=2.5)
>>> s["final_loss"], s["best_loss"], s["steps_to_target"]
(1.0, 1.0, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rollfast.compare.names import Spec
from rollfast.compare.protocol import Task

MAX_CHUNK = 50
TUNE_GRID = (0.1, 10**-0.5, 1.0, 10**0.5, 10.0)  # multiples of the family's rate on the task
TUNE_FRACTION = 4  # a sweep run trains steps / TUNE_FRACTION steps


@dataclasses.dataclass
class Run:
    """The result of one optimizer on one task from one seed."""

    label: str
    seed: int
    learning_rate: float
    status: str = "ok"  # "ok", "diverged" or "error"
    error: str | None = None
    losses: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    times: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    metric: float | None = None
    compile_s: float | None = None
    ms_per_step: float | None = None
    state_mb: float | None = None
    stats: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Compiled:
    """One optimizer compiled for one task: the chunk executable, its initial state
    builder and the cost of compiling it."""

    tx: optax.GradientTransformation
    init: Callable
    step_chunk: Callable
    chunk: int
    compile_s: float
    state_mb: float


def chunking(steps: int, max_chunk: int = MAX_CHUNK) -> tuple[int, int]:
    """``(chunks, chunk)`` with ``chunks·chunk ≥ steps`` and ``chunk ≤ max_chunk``, as
    even as possible (``steps`` is rounded up to a whole number of chunks).

    >>> chunking(300), chunking(103), chunking(7)
    ((6, 50), (3, 35), (1, 7))
    """
    chunks = max(1, math.ceil(steps / max_chunk))
    return chunks, math.ceil(steps / chunks)


def smooth(losses: np.ndarray) -> np.ndarray:
    r"""The trailing mean :math:`\bar\ell_t` of a loss curve (module docstring).

    >>> smooth(np.arange(1.0, 5.0)).tolist()
    [1.0, 2.0, 3.0, 4.0]
    """
    n = len(losses)
    w = min(20, max(1, n // 10))
    csum = np.concatenate([[0.0], np.cumsum(losses, dtype=np.float64)])
    idx = np.arange(1, n + 1)
    counts = np.minimum(idx, w)
    return (csum[idx] - csum[idx - counts]) / counts


def curve_stats(losses: np.ndarray, target: float | None) -> dict:
    """Final loss, best loss and steps to target of a loss curve (module docstring)."""
    if len(losses) == 0:
        return {"final_loss": None, "best_loss": None, "steps_to_target": None}
    s = smooth(losses)
    hit = np.flatnonzero(s <= target) if target is not None else np.zeros(0, int)
    return {"final_loss": float(s[-1]), "best_loss": float(np.min(s)),
            "steps_to_target": int(hit[0]) + 1 if len(hit) else None}


@functools.lru_cache(maxsize=16)
def initializer(task: Task) -> Callable:
    """``jax.jit(task.init)``, one per task (eager initialisation would compile op by op)."""
    return jax.jit(task.init)


def _state_with_lr(state, learning_rate):
    """The ``inject_hyperparams`` state with its learning rate replaced."""
    hyper = dict(state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(learning_rate, jnp.asarray(hyper["learning_rate"]).dtype)
    return state._replace(hyperparams=hyper)


def _nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def compile_run(task: Task, spec: Spec, steps: int) -> Compiled:
    r"""Build ``spec`` with an injected learning rate and AOT-compile a training chunk
    :math:`(\theta, s) \mapsto` ``chunk`` steps of
    :math:`\ell_t, g_t = \nabla L(\theta; B_t)`, :math:`(u, s) = \mathrm{opt}(g_t, s, \theta)`,
    :math:`\theta \leftarrow \theta + u`, returning the losses :math:`\ell_t`."""
    _, chunk = chunking(steps)
    tx = optax.inject_hyperparams(spec.build)(learning_rate=task.learning_rate)
    params = initializer(task)(jax.random.PRNGKey(0))
    init = jax.jit(tx.init)
    state = init(params)

    def step_chunk(params, state, data_key, start):
        def body(carry, step):
            params, state = carry
            loss, grads = jax.value_and_grad(task.loss)(params, task.batch(data_key, step))
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        return jax.lax.scan(body, (params, state), start + jnp.arange(chunk, dtype=jnp.int32))

    t0 = time.perf_counter()
    compiled = jax.jit(step_chunk).lower(params, state, jax.random.PRNGKey(0), jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    return Compiled(tx, init, compiled, chunk, compile_s, _nbytes(state.inner_state) / 2**20)


def train(task: Task, compiled: Compiled, evaluate: Callable, *, label: str, seed: int,
          learning_rate: float, steps: int, budget: float | None = None,
          progress: Callable[[int, float], None] | None = None) -> Run:
    """Train from seed ``seed`` for ``steps`` (rounded up to whole compiled chunks) or until
    ``budget`` seconds of training time have passed; evaluate the final parameters."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    params = initializer(task)(init_key)
    state = _state_with_lr(compiled.init(params), learning_rate)
    run = Run(label, seed, float(learning_rate), compile_s=compiled.compile_s,
              state_mb=compiled.state_mb)
    chunk = compiled.chunk
    chunks = max(1, math.ceil(steps / chunk))
    losses, durations = [], []
    for c in range(chunks):
        t0 = time.perf_counter()
        (params, state), chunk_losses = compiled.step_chunk(params, state, data_key,
                                                            jnp.int32(c * chunk))
        chunk_losses = np.asarray(chunk_losses, np.float64)
        durations.append(time.perf_counter() - t0)
        bad = np.flatnonzero(~np.isfinite(chunk_losses))
        losses.append(chunk_losses[: bad[0]] if len(bad) else chunk_losses)
        if progress is not None:
            progress(len(losses[-1]), float(chunk_losses[bad[0] - 1]) if len(bad) and bad[0]
                     else float(chunk_losses[-1]))
        if len(bad):
            run.status = "diverged"
            run.error = f"non-finite loss at step {c * chunk + int(bad[0]) + 1}"
            break
        if budget is not None and sum(durations) >= budget:
            break
    _finish(run, task, losses, durations, chunk, params, evaluate)
    return run


def _finish(run: Run, task: Task, losses, durations, chunk: int, params, evaluate) -> None:
    """Fill the curve (loss and cumulative time per step), timing, stats and metric."""
    run.losses = np.concatenate(losses) if losses else np.zeros(0)
    per_step = np.repeat(np.asarray(durations) / chunk, chunk)[: len(run.losses)]
    run.times = np.cumsum(per_step)
    run.ms_per_step = float(np.median(np.asarray(durations) / chunk) * 1e3) if durations else None
    run.stats = curve_stats(run.losses, task.target)
    if run.status == "ok":
        metric = float(evaluate(params))
        run.metric = metric if math.isfinite(metric) else None
        if run.metric is None:
            run.status, run.error = "diverged", "non-finite validation metric"


def failed(label: str, seed: int, learning_rate: float, exc: BaseException) -> Run:
    """A run that raised: status ``error`` with the exception's first line."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Run(label, seed, float(learning_rate), status="error",
               error=f"{type(exc).__name__}: {message}"[:300])


def tune(task: Task, compiled: Compiled, evaluate: Callable, *, label: str, steps: int,
         centre: float | None = None, grid=TUNE_GRID,
         progress=None) -> tuple[float, dict[float, float | None]]:
    r"""The learning rate :math:`\eta_0 m` (:math:`\eta_0` = ``centre``, default the task's
    rate; :math:`m` in ``grid``) whose short run (``steps / TUNE_FRACTION``, seed 0)
    reaches the best validation metric; diverged or failed rates score ``None``. Returns
    the rate and every rate's score; if none succeeds, :math:`\eta_0`."""
    centre = float(task.learning_rate if centre is None else centre)
    short = max(1, steps // TUNE_FRACTION)
    scores: dict[float, float | None] = {}
    for m in grid:
        lr = float(centre * m)
        try:
            run = train(task, compiled, evaluate, label=label, seed=0, learning_rate=lr,
                        steps=short, progress=progress)
            scores[lr] = run.metric if run.status == "ok" else None
        except Exception:  # a failing rate is a result of the sweep, not a crash
            scores[lr] = None
    valid = {lr: s for lr, s in scores.items() if s is not None}
    if not valid:
        return centre, scores
    sign = -1.0 if task.higher_is_better else 1.0
    return min(valid, key=lambda lr: sign * valid[lr]), scores


__all__ = ["Run", "Compiled", "compile_run", "train", "tune", "failed", "chunking", "curve_stats", "smooth",
           "TUNE_GRID", "TUNE_FRACTION", "MAX_CHUNK"]
