r"""What ``rollfast compare`` trains on: the :class:`Task` protocol, the built-in tasks
and the loader of user tasks (``--task mypkg.mymodule:make_task``).

A task is a model, its data and how to score it. Every optimizer of a comparison gets
the same ``init(key)`` parameters and the same ``batch(key, step)`` sequence for a
given seed, so that only the optimizer differs.

>>> task = get_task("lstsq", steps=10)
>>> task.name, task.metric, task.steps
('lstsq', 'distance to optimum', 10)
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Task:
    """A model, its data and how to score it.

    Every function must be traceable by ``jax.jit`` (``init`` runs once, outside the
    timed loop; ``batch`` and ``loss`` run inside ``lax.scan``).

    Attributes:
      name: short name shown in tables and file names.
      init: ``key -> params``, the initial parameters (any pytree of arrays).
      loss: ``(params, batch) -> scalar``, the training loss to minimise.
      batch: ``(key, step) -> batch``, the minibatch of step ``step`` (an int32 array);
        ``key`` is the run's data key, the same for every optimizer of a seed.
      evaluate: ``params -> scalar``, the validation metric reported and used by
        ``--tune``.
      metric: the metric's name, e.g. ``"test accuracy %"``.
      higher_is_better: whether a larger metric wins.
      steps: the default number of training steps.
      learning_rate: the rate every optimizer uses without ``--lr``/``--tune``, and
        the centre of the ``--tune`` grid.
      target: a training loss; "steps to target" counts the steps until the
        smoothed training loss first reaches it (``None``: not reported).
      description: model, data, split, loss and metric in one or two sentences.
    """

    name: str
    init: Callable
    loss: Callable
    batch: Callable
    evaluate: Callable
    metric: str = "validation loss"
    higher_is_better: bool = False
    steps: int = 300
    learning_rate: float = 1e-3
    target: float | None = None
    description: str = ""

    def with_steps(self, steps: int | None) -> Task:
        """The same task with another default number of steps (``None``: unchanged)."""
        return self if steps is None else dataclasses.replace(self, steps=int(steps))


def least_squares(dim: int = 32, outputs: int = 16, rows: int = 512, condition: float = 1e2,
                  steps: int = 300, seed: int = 0) -> Task:
    r"""An ill-conditioned least-squares problem with a known optimum.

    The data :math:`X = U\operatorname{diag}(s)V^\top\in\mathbb{R}^{n\times d}` has
    orthonormal random :math:`U, V` and singular values :math:`s` log-spaced from 1 to
    ``1/condition``; the targets are :math:`Y = XW^\star` for a fixed random
    :math:`W^\star\in\mathbb{R}^{d\times k}` with :math:`\lVert W^\star\rVert_F = 1`.
    The full-batch loss

    .. math:: L(W) = \tfrac12\lVert XW - Y\rVert_F^2

    is minimised exactly at :math:`W^\star` (:math:`L = 0`); its Hessian
    :math:`X^\top X\otimes I` has eigenvalues in :math:`[\text{condition}^{-2}, 1]`.
    Parameters start at :math:`W = 0`; the metric is the distance to the optimum
    :math:`\lVert W - W^\star\rVert_F` (1 at the start).

    >>> t = least_squares(dim=4, outputs=2, rows=8)
    >>> round(float(t.evaluate(t.init(jax.random.PRNGKey(0)))), 4)
    1.0
    """
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((rows, dim)))[0]
    v = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    x = (u * np.logspace(0, -np.log10(condition), dim)) @ v.T
    w_star = rng.standard_normal((dim, outputs))
    w_star /= np.linalg.norm(w_star)
    x, w_star = jnp.asarray(x, jnp.float32), jnp.asarray(w_star, jnp.float32)
    y = x @ w_star
    initial = 0.5 * float(jnp.sum(y**2))

    def loss(params, batch):
        return 0.5 * jnp.sum(jnp.square(x @ params["w"] - y))

    def evaluate(params):
        return jnp.linalg.norm(params["w"] - w_star)

    return Task(
        name="lstsq", init=lambda key: {"w": jnp.zeros((dim, outputs), jnp.float32)}, loss=loss,
        batch=lambda key, step: None, evaluate=evaluate, metric="distance to optimum",
        steps=steps, learning_rate=1e-2, target=initial * 1e-3,
        description=(f"least squares 0.5||XW - Y||^2 with X {rows}x{dim} of condition number "
                     f"{condition:g} (Hessian {condition**2:g}), W {dim}x{outputs}, Y = XW*, "
                     f"full batch; metric ||W - W*||_F (1 at the start); target 1e-3 x initial loss"))


_BUILTIN: dict[str, Callable[..., Task]] = {}
GROUPS = {"digits": ("digits-mlp", "digits-cnn")}
DEFAULT_TASKS = ("digits-mlp", "digits-cnn", "lstsq", "charlm")


def _builtins() -> dict[str, Callable[..., Task]]:
    if not _BUILTIN:
        from rollfast.compare import charlm, digits

        _BUILTIN.update({"digits-mlp": digits.mlp_task, "digits-cnn": digits.cnn_task,
                         "lstsq": least_squares, "charlm": charlm.charlm_task})
    return _BUILTIN


def builtin_names() -> list[str]:
    """The built-in task names (and the group names that expand to several)."""
    return [*DEFAULT_TASKS, *GROUPS]


def get_task(name: str, steps: int | None = None) -> Task:
    """A built-in task by name, or a user task ``module:function``.

    A user task is the result of calling ``function()`` from ``module``, importable
    from ``sys.path`` or the current directory; it must return a :class:`Task`.

    Raises:
      rollfast.UnknownNameError: neither a built-in name nor ``module:function``.
      TaskError: the module or function cannot be found, or the function did not
        return a :class:`Task`.
    """
    builtins = _builtins()
    if name in builtins:
        return builtins[name]().with_steps(steps)
    if ":" not in name:
        from rollfast.errors import UnknownNameError

        raise UnknownNameError("task", name, builtin_names(),
                               hint="built-in tasks: " + ", ".join(builtin_names())
                               + "; or your own as module:function")
    return _load_user_task(name).with_steps(steps)


def expand(names) -> list[str]:
    """Task names with groups (``digits``) expanded, in order, without repeats."""
    out: list[str] = []
    for n in names:
        for m in GROUPS.get(n, (n,)):
            if m not in out:
                out.append(m)
    return out


class TaskError(ValueError):
    """A user task that cannot be loaded: the module, the function or what it returned."""


def _load_user_task(ref: str) -> Task:
    module_name, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # like `python -m`: the current directory
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"--task {ref!r}: cannot import module {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TaskError(f"--task {ref!r}: module {module_name!r} has no function {attr!r}")
    task = factory()
    if not isinstance(task, Task):
        raise TaskError(f"--task {ref!r}: {attr}() returned {type(task).__name__}, "
                        f"expected a rollfast.compare.Task")
    return task


__all__ = ["Task", "TaskError", "least_squares", "get_task", "expand", "builtin_names", "GROUPS", "DEFAULT_TASKS"]
