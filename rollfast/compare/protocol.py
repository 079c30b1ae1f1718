"""The :class:`Task` protocol of ``rollfast compare``: a model, its data and its score."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping


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
      learning_rate: the rate of an optimizer without ``--lr``/``--tune`` whose family
        has no entry in ``family_learning_rates``.
      target: a training loss; "steps to target" counts the steps until the
        smoothed training loss first reaches it (``None``: not reported).
      description: model, data, split, loss and metric in one or two sentences.
      family_learning_rates: ``{family: rate}``, a family's rate on this task without
        ``--lr``/``--tune`` and the centre of its ``--tune`` grid; keys are registry
        family names (``"adamw"``, ``"kron"``), whatever mode or wrapper is added.
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
    family_learning_rates: Mapping[str, float] = dataclasses.field(default_factory=dict, compare=False)

    def learning_rate_for(self, family: str) -> float:
        """The rate of family ``family`` (a registry name) on this task.

        >>> task = Task("t", None, None, None, None, learning_rate=1e-3,
        ...             family_learning_rates={"kron": 3e-4})
        >>> task.learning_rate_for("kron"), task.learning_rate_for("adamw")
        (0.0003, 0.001)
        """
        return float(self.family_learning_rates.get(family, self.learning_rate))

    def with_steps(self, steps: int | None) -> Task:
        """The same task with another default number of steps (``None``: unchanged)."""
        return self if steps is None else dataclasses.replace(self, steps=int(steps))


__all__ = ["Task"]
