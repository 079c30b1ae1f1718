"""One comparison: every optimizer on every task, every seed; the numbers behind the
table, the plots and the JSON.

An optimizer's learning rate on a task is, in order of precedence: ``--lr NAME=LR``
(or ``--lr LR`` for all), the best rate of the ``--tune`` sweep (centred on the next),
the task's rate for the optimizer's family (:meth:`Task.learning_rate_for`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence

import jax

from rollfast.compare import runner
from rollfast.compare.names import Spec
from rollfast.compare.protocol import Task
from rollfast.compare.runner import Run


@dataclasses.dataclass
class Entry:
    """One optimizer on one task: its rate, the sweep (if tuned) and one run per seed."""

    spec: Spec
    learning_rate: float
    runs: list[Run]
    sweep: dict[float, float | None] | None = None

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def status(self) -> str:
        """``ok``, or the first failure (``error: ...``, ``diverged: ...``) with how many
        seeds it hit."""
        bad = [r for r in self.runs if r.status != "ok"]
        if not bad:
            return "ok"
        count = f" ({len(bad)}/{len(self.runs)} seeds)" if len(self.runs) > 1 else ""
        return f"{bad[0].status}{count}: {bad[0].error}"

    def summary(self) -> dict:
        """Mean and standard deviation over the successful seeds of each number; the
        median ms/step over all; ``steps_to_target`` only if every good seed reached it."""
        good = [r for r in self.runs if r.status == "ok"]
        out = {}
        for key in ("final_loss", "best_loss"):
            out[key] = _mean_std([r.stats.get(key) for r in good])
        out["metric"] = _mean_std([r.metric for r in good])
        reached = [r.stats.get("steps_to_target") for r in good]
        out["steps_to_target"] = _mean_std(reached) if reached and None not in reached else None
        ms = [r.ms_per_step for r in self.runs if r.ms_per_step is not None]
        out["ms_per_step"] = statistics.median(ms) if ms else None
        compiled = [r.compile_s for r in self.runs if r.compile_s is not None]
        out["compile_s"] = compiled[0] if compiled else None
        sizes = [r.state_mb for r in self.runs if r.state_mb is not None]
        out["state_mb"] = sizes[0] if sizes else None
        out["steps"] = max((len(r.losses) for r in self.runs), default=0)
        return out


def _mean_std(values) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return float(statistics.fmean(values)), float(statistics.pstdev(values)) if len(values) > 1 else 0.0


@dataclasses.dataclass
class TaskResult:
    """Every optimizer's entry on one task."""

    task: Task
    steps: int
    entries: list[Entry]

    def winner(self) -> Entry | None:
        """The entry with the best mean metric among those whose every seed succeeded."""
        ok = [e for e in self.entries if e.status == "ok" and e.summary()["metric"] is not None]
        if not ok:
            return None
        sign = -1.0 if self.task.higher_is_better else 1.0
        return min(ok, key=lambda e: sign * e.summary()["metric"][0])


@dataclasses.dataclass
class Options:
    """What the user asked for (recorded in the JSON)."""

    names: Sequence[str]
    tasks: Sequence[str]
    steps: int | None = None
    seeds: int = 1
    tune: bool = False
    learning_rates: dict[str, float] = dataclasses.field(default_factory=dict)
    budget: float | None = None


class Reporter:
    """Progress callbacks: ``run(task, label, phase, steps)`` returns a per-chunk
    ``advance(n, loss)``; ``done(task, entry)`` after each optimizer. The default
    reports nothing."""

    def run(self, task: str, label: str, phase: str, steps: int) -> Callable[[int, float], None]:
        return lambda n, loss: None

    def end_run(self, run: Run | None) -> None:
        pass

    def compiling(self, task: str, count: int) -> Callable[[], None]:
        """Called before ``count`` optimizers compile; returns a callback per compiled one."""
        return lambda: None


def compile_all(task: Task, specs: Sequence[Spec], steps: int, workers: int = 2,
                done: Callable[[], None] = lambda: None) -> list:
    """Every optimizer compiled for ``task`` (or the exception it raised), ``workers`` at
    a time: XLA compiles outside the GIL, so on two cores two compilations take the
    time of one, and each is still timed on its own. Nothing trains meanwhile."""
    def attempt(spec):
        try:
            return runner.compile_run(task, spec, steps)
        except Exception as exc:  # a family that cannot build or compile here is a result
            return exc
        finally:
            done()

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(attempt, specs))


def run_entry(task: Task, spec: Spec, compiled, evaluate: Callable, options: Options, steps: int,
              reporter: Reporter) -> Entry:
    """Sweep the rate if asked, then run every seed of one compiled optimizer; failures
    become results."""
    lr = options.learning_rates.get(spec.label, options.learning_rates.get("*"))
    chosen = lr if lr is not None else task.learning_rate_for(spec.family_name)
    if isinstance(compiled, Exception):
        return Entry(spec, chosen, [runner.failed(spec.label, s, chosen, compiled)
                                    for s in range(options.seeds)])
    sweep = None
    if options.tune and lr is None:
        chosen, sweep = _sweep(task, spec, compiled, evaluate, steps, chosen, reporter)
    runs = []
    for seed in range(options.seeds):
        advance = reporter.run(task.name, spec.label, f"seed {seed}", steps)
        try:
            run = runner.train(task, compiled, evaluate, label=spec.label, seed=seed,
                               learning_rate=chosen, steps=steps, budget=options.budget,
                               progress=advance)
        except Exception as exc:
            run = runner.failed(spec.label, seed, chosen, exc)
        reporter.end_run(run)
        runs.append(run)
    return Entry(spec, chosen, runs, sweep)


def _sweep(task, spec, compiled, evaluate, steps, centre, reporter):
    short = max(1, steps // runner.TUNE_FRACTION)
    rounded = math.ceil(short / compiled.chunk) * compiled.chunk
    advance = reporter.run(task.name, spec.label, "tune", rounded * len(runner.TUNE_GRID))
    best, scores = runner.tune(task, compiled, evaluate, label=spec.label, steps=steps,
                               centre=centre, progress=advance)
    reporter.end_run(None)
    return best, scores


def compare(specs: Sequence[Spec], tasks: Sequence[Task], options: Options,
            reporter: Reporter | None = None) -> list[TaskResult]:
    """Every optimizer on every task: per task, compile all (:func:`compile_all`), then
    train one after the other."""
    reporter = reporter or Reporter()
    results = []
    for task in tasks:
        steps = options.steps or task.steps
        evaluate = jax.jit(task.evaluate)
        compiled = compile_all(task, specs, steps, done=reporter.compiling(task.name, len(specs)))
        entries = [run_entry(task, spec, c, evaluate, options, steps, reporter)
                   for spec, c in zip(specs, compiled)]
        results.append(TaskResult(task, steps, entries))
    return results


__all__ = ["Entry", "TaskResult", "Options", "Reporter", "compare", "compile_all", "run_entry"]
