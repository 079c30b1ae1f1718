r"""What ``rollfast compare`` trains on: the built-in tasks by name and the loader of
user tasks (``--task mypkg.mymodule:make_task``); the protocol is :class:`Task`.

A task is a model, its data and how to score it. Every optimizer of a comparison gets
the same ``init(key)`` parameters and the same ``batch(key, step)`` sequence for a
given seed, so that only the optimizer differs.

>>> task = get_task("lstsq", steps=10)
>>> task.name, task.metric, task.steps
('lstsq', 'distance to optimum', 10)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from collections.abc import Callable

from rollfast.compare import charlm, digits, lstsq
from rollfast.compare.protocol import Task
from rollfast.errors import UnknownNameError

BUILTIN: dict[str, Callable[..., Task]] = {
    "digits-mlp": digits.mlp_task, "digits-cnn": digits.cnn_task, "lstsq": lstsq.lstsq_task,
    "charlm": charlm.charlm_task,
    "charlm-small": functools.partial(charlm.charlm_task, layers=1, name="charlm-small")}
GROUPS = {"digits": ("digits-mlp", "digits-cnn"), "all": tuple(BUILTIN)}
# The run with no --task: one task of each kind, sized so that five optimizers finish in
# well under 3 minutes on 2 cores (compilation is most of it). `--task all` runs every one.
DEFAULT_TASKS = ("digits-mlp", "lstsq", "charlm-small")

# A family's rate on each built-in task without --lr/--tune: the best validation metric of
# full-length seed-0 runs at 1e-4, 3e-4, ..., 1e-1 (docs/compare.md, "Learning rates").
FAMILY_LEARNING_RATES: dict[str, dict[str, float]] = {
    "digits-mlp": {"adamw": 1e-2, "kron": 3e-3, "prism": 3e-2, "soap": 1e-2},
    "digits-cnn": {"adamw": 1e-2, "kron": 1e-2, "prism": 1e-1, "soap": 3e-3},
    "lstsq": {"adamw": 3e-2, "kron": 3e-2, "prism": 1e-2, "soap": 3e-3},
    "charlm": {"adamw": 3e-3, "kron": 3e-3, "prism": 3e-2, "soap": 3e-3},
    "charlm-small": {"adamw": 3e-3, "kron": 3e-3, "prism": 3e-2, "soap": 1e-2},
}


def builtin_names() -> list[str]:
    """The built-in task names (and the group names that expand to several)."""
    return [*BUILTIN, *GROUPS]


def get_task(name: str, steps: int | None = None) -> Task:
    """A built-in task by name, or a user task ``module:function``.

    A user task is the result of calling ``function()`` from ``module``, importable
    from ``sys.path`` or the current directory; it must return a :class:`Task`.

    Raises:
      rollfast.UnknownNameError: neither a built-in name nor ``module:function``.
      TaskError: the module or function cannot be found, or the function did not
        return a :class:`Task`.
    """
    if name in BUILTIN:
        task = dataclasses.replace(BUILTIN[name](), family_learning_rates=FAMILY_LEARNING_RATES[name])
        return task.with_steps(steps)
    if ":" not in name:
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


__all__ = ["Task", "TaskError", "BUILTIN", "get_task", "expand", "builtin_names", "GROUPS", "DEFAULT_TASKS",
           "FAMILY_LEARNING_RATES"]
