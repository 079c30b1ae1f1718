"""What ``rollfast compare`` shows: the table per task, the plots, the JSON, the progress.

``rich`` (live progress bars, coloured tables) and ``matplotlib`` (plots) come with the
``rollfast[compare]`` extra; without them the command prints a plain table and says how
to get plots.

JSON (``--json``, schema ``rollfast.compare/1``)::

    {"schema", "created", "argv", "options": {names, tasks, steps, seeds, tune,
                                              learning_rates, budget},
     "versions": {python, rollfast, jax, jaxlib, optax, numpy, plugins: {plugin: dist version}},
     "machine": {platform, processor, cpu_count, load_average, jax_backend, devices},
     "wall_s", "cpu_s",
     "tasks": [{"name", "description", "metric", "higher_is_better", "target", "steps",
                "winner",
                "results": [{"name", "family", "mode", "masks", "averages",
                             "learning_rate", "sweep": {lr: metric|null}|null, "status",
                             "summary": {final_loss, best_loss, metric, steps_to_target:
                                         [mean, std]|null, ms_per_step, compile_s,
                                         state_mb, steps},
                             "runs": [{seed, learning_rate, status, error, metric,
                                       final_loss, best_loss, steps_to_target,
                                       ms_per_step, compile_s, state_mb,
                                       loss: [...], time_s: [...]}]}]}]}
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from rollfast.compare import runner
from rollfast.compare.session import Entry, Options, Reporter, TaskResult

SCHEMA = "rollfast.compare/1"
HINT = "plots and progress bars: pip install 'rollfast[compare]' (rich, matplotlib)"
COLUMNS = ("optimizer", "lr", "final loss", "best loss", "{metric}", "steps to {target}",
           "ms/step", "compile s", "state MB", "")
WIDE = 160  # rich's console width when stdout is not a terminal


def has(module: str) -> bool:
    """Whether an optional module is importable."""
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, tuple):
        mean, std = x
        return _num(mean, digits) + (f" ± {_num(std, 2)}" if std else "")
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def rows(result: TaskResult) -> tuple[list[str], list[list[str]]]:
    """The header and one row per optimizer of a task's table (winner marked ``★``)."""
    task, winner = result.task, result.winner()
    target = "—" if task.target is None else f"{task.target:.3g}"
    header = [c.format(metric=task.metric, target=target) for c in COLUMNS]
    body = []
    for e in result.entries:
        s = e.summary()
        mark = "★ best" if e is winner else ("" if e.status == "ok" else e.status)
        reached = _num(s["steps_to_target"]) if s["steps_to_target"] else f"> {s['steps']}"
        body.append([e.label, f"{e.learning_rate:.3g}", _num(s["final_loss"]), _num(s["best_loss"]),
                     _num(s["metric"]), reached if e.status == "ok" else "—",
                     _num(s["ms_per_step"], 3), _num(s["compile_s"], 3), _num(s["state_mb"], 3), mark])
    return header, body


def title(result: TaskResult) -> str:
    better = "higher" if result.task.higher_is_better else "lower"
    return (f"{result.task.name} — {result.steps} steps; {result.task.metric} ({better} is better)\n"
            f"  {result.task.description}")


def plain_table(result: TaskResult, file=None) -> None:
    """The task's table as aligned plain text (on ``file``, default stdout)."""
    file = file or sys.stdout
    header, body = rows(result)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    print(title(result), file=file)
    for r in [header, *body]:
        print("  ".join(c.ljust(w) if i == 0 or i == len(r) - 1 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip(), file=file)
    print(file=file)


def rich_table(result: TaskResult, console) -> None:
    """The task's table with rich (the winner bold green, failures red)."""
    from rich.table import Table

    header, body = rows(result)
    head, description = title(result).split("\n")
    table = Table(title=head, caption=description.strip(), title_justify="left", caption_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i in (0, len(header) - 1) else "right", no_wrap=True)
    for r in body:
        style = "bold green" if r[-1].startswith("★") else ("red" if r[-1] else None)
        table.add_row(*r, style=style)
    console.print(table)


def plot(result: TaskResult, out: Path) -> Path:
    """One PNG per task: smoothed training loss against step and against wall time
    (log scale; seed 0 of each optimizer; compile time excluded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    positive = True
    for e in result.entries:
        run = e.runs[0]
        if len(run.losses) == 0:
            continue
        smooth = runner.smooth(run.losses)
        positive &= bool(np.all(smooth > 0))
        label = f"{e.label} (lr {e.learning_rate:.3g})" + ("" if run.status == "ok" else f" [{run.status}]")
        steps = np.arange(1, len(smooth) + 1)
        (line,) = by_step.plot(steps, smooth, label=label)
        by_time.plot(run.times, smooth, color=line.get_color())
    for ax, xlabel in ((by_step, "step"), (by_time, "training wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (smoothed)")
        ax.grid(alpha=0.3)
        if positive:
            ax.set_yscale("log")
        if result.task.target is not None:
            ax.axhline(result.task.target, color="grey", ls=":", lw=1)
    by_time.set_xscale("log")  # per-step costs differ by orders of magnitude
    by_step.legend(fontsize=8)
    fig.suptitle(f"rollfast compare — {result.task.name}, {result.steps} steps "
                 f"(dotted: target loss)", fontsize=10)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result.task.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _versions() -> dict:
    import rollfast

    out = {"python": platform.python_version(), "rollfast": rollfast.__version__}
    for dist in ("jax", "jaxlib", "optax", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    out["plugins"] = {p.provider.plugin: f"{p.provider.distribution} {p.provider.version}".strip()
                      for p in rollfast.registry().plugins()}
    return out


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "jax_backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


def _entry_json(e: Entry) -> dict:
    runs = [{"seed": r.seed, "learning_rate": r.learning_rate, "status": r.status, "error": r.error,
             "metric": r.metric, **r.stats, "ms_per_step": r.ms_per_step, "compile_s": r.compile_s,
             "state_mb": r.state_mb, "loss": [float(x) for x in r.losses],
             "time_s": [float(x) for x in r.times]} for r in e.runs]
    sweep = None if e.sweep is None else {repr(lr): m for lr, m in e.sweep.items()}
    return {"name": e.label, "family": e.spec.family, "mode": e.spec.mode, "masks": list(e.spec.masks),
            "averages": list(e.spec.averages), "learning_rate": e.learning_rate, "sweep": sweep,
            "status": e.status, "summary": e.summary(), "runs": runs}


def to_json(results: list[TaskResult], options: Options, *, argv, wall_s: float, cpu_s: float) -> dict:
    """Every number of a comparison, with versions, machine and options (schema above)."""
    tasks = []
    for res in results:
        t, winner = res.task, res.winner()
        tasks.append({"name": t.name, "description": t.description, "metric": t.metric,
                      "higher_is_better": t.higher_is_better, "target": t.target, "steps": res.steps,
                      "winner": winner.label if winner else None,
                      "results": [_entry_json(e) for e in res.entries]})
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(argv),
            "options": {"names": list(options.names), "tasks": list(options.tasks),
                        "steps": options.steps, "seeds": options.seeds, "tune": options.tune,
                        "learning_rates": dict(options.learning_rates), "budget": options.budget},
            "versions": _versions(), "machine": _machine(), "wall_s": wall_s, "cpu_s": cpu_s,
            "tasks": tasks}


def json_text(data: dict) -> str:
    """``data`` (from :func:`to_json`) as JSON text; (mean, std) tuples become lists."""
    return json.dumps(data, indent=1, allow_nan=False, default=_plain)


def write_json(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_text(data))
    return path


def _plain(x):
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON: {x!r}")


class PlainReporter(Reporter):
    """One line per finished run on stderr (no rich)."""

    def __init__(self, file=None):
        self.file, self.current = file or sys.stderr, None

    def run(self, task, label, phase, steps):
        self.current = f"{task} · {label} · {phase}"
        return lambda n, loss: None

    def compiling(self, task, count):
        print(f"  {task}: compiling {count} optimizers", file=self.file, flush=True)
        return lambda: None

    def end_run(self, run):
        if run is not None:
            state = run.status if run.status != "ok" else f"loss {_num(run.stats.get('final_loss'))}"
            print(f"  {self.current}: {state}", file=self.file, flush=True)


class RichReporter(Reporter):
    """A live progress bar per run (rich)."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
                                 console=console, transient=False)
        self.bar = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def run(self, task, label, phase, steps):
        self.bar = self.progress.add_task(f"{task} · {label} · {phase}", total=steps, loss="compiled")

        def advance(n, loss):
            self.progress.update(self.bar, advance=n, loss=f"loss {loss:.4g}")

        return advance

    def compiling(self, task, count):
        bar = self.progress.add_task(f"{task} · compiling", total=count, loss="")
        return lambda: self.progress.update(bar, advance=1)

    def end_run(self, run):
        if run is not None and run.status != "ok":
            self.progress.update(self.bar, loss=f"[red]{run.status}")


__all__ = ["SCHEMA", "HINT", "rows", "plain_table", "rich_table", "plot", "to_json", "json_text", "write_json",
           "PlainReporter", "RichReporter", "has"]
