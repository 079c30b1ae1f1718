"""The ``rollfast compare`` subcommand: arguments, the run, the output.

Exit codes: 0 done (failed optimizers are results, not errors), 2 bad arguments
(unknown name, malformed option).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rollfast.compare import report, tasks
from rollfast.compare.names import parse, parse_all
from rollfast.compare.session import Options, compare
from rollfast.errors import UnknownNameError

# The default comparison: names resolved through the registry like any other.
DEFAULT_NAMES = ("adamw", "kron", "kron:EXP", "prism", "soap")

EPILOG = """\
names: FAMILY[:MODE][+WRAPPER...] or AVERAGE(NAME), e.g. adamw kron:EXP kron:EQ+magma
  prism:bidirectional optax:lion schedule_free(adamw) kron:kron_cayley:CAYLEY
tasks: digits-mlp digits-cnn lstsq charlm charlm-small (digits = both digits tasks, all =
  every built-in task), or module:function returning a rollfast.compare.Task.
See docs/compare.md."""


HELP = "run optimizers side by side on built-in or your own tasks"


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``rollfast compare``."""
    p = argparse.ArgumentParser(prog="rollfast compare", description=HELP, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"optimizers to compare (default: {' '.join(DEFAULT_NAMES)})")
    p.add_argument("--task", action="append", metavar="TASK",
                   help=f"task to run, repeatable (default: {' '.join(tasks.DEFAULT_TASKS)})")
    p.add_argument("--steps", type=_positive(int), help="training steps (default: each task's own)")
    p.add_argument("--seeds", type=_positive(int), default=1, help="seeds per run; mean ± std (default 1)")
    p.add_argument("--tune", action="store_true",
                   help="sweep the learning rate (family rate x 10^{-1,-1/2,0,1/2,1}) on short runs first")
    p.add_argument("--lr", action="append", default=[], metavar="[NAME=]LR",
                   help="learning rate of one optimizer (NAME=LR) or of all (LR); repeatable")
    p.add_argument("--budget", type=_positive(float), metavar="SECONDS",
                   help="training wall time per run: stop at the first chunk past it")
    p.add_argument("--out", type=Path, default=Path("rollfast-compare"),
                   help="directory for plots and JSON (default ./rollfast-compare); '-': the JSON "
                        "to stdout, the tables to stderr, no plots")
    p.add_argument("--json", action="store_true",
                   help=f"write OUT/compare.json ({report.SCHEMA}); with --out -, to stdout")
    return p


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def learning_rates(items: list[str], labels: list[str]) -> dict[str, float]:
    """``--lr`` values as ``{label: rate}`` (``"*"`` for all).

    >>> learning_rates(["3e-4", "kron=1e-3"], ["adamw", "kron"])
    {'*': 0.0003, 'kron': 0.001}
    """
    out = {}
    for item in items:
        name, _, value = item.rpartition("=")
        if name and name not in labels:
            raise UnknownNameError("optimizer", name, labels,
                                   hint="--lr NAME=LR names one of the optimizers being compared")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"--lr {item!r}: {value!r} is not a number") from None
        if not rate > 0:
            raise ValueError(f"--lr {item!r}: the learning rate must be > 0")
        out[name or "*"] = rate
    return out


def _specs(names: list[str]):
    if names:
        return parse_all(names)
    specs = []
    for n in DEFAULT_NAMES:  # a default whose plugin is absent is skipped, not an error
        try:
            specs.append(parse(n))
        except UnknownNameError as exc:
            print(f"rollfast compare: skipping {n!r} ({exc})", file=sys.stderr)
    return specs


def main(argv: list[str]) -> int:
    """``rollfast compare ARGV``; returns the exit code (2 for a bad name or option)."""
    args = parser().parse_args(argv)
    # LAPACK (the eigh and qr of SOAP and others) on one thread unless the user chose: on
    # small matrices OpenBLAS's thread pool is 10-1000x slower when the cores are busy.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        return run(args, argv)
    except (UnknownNameError, ValueError) as exc:  # TaskError is a ValueError
        print(f"rollfast compare: {exc}", file=sys.stderr)
        return 2


def run(args, argv) -> int:
    """Run ``rollfast compare`` with parsed ``args``; returns the exit code."""
    specs = _specs(args.names)
    options = Options(names=[s.label for s in specs], tasks=tasks.expand(args.task or tasks.DEFAULT_TASKS),
                      steps=args.steps, seeds=args.seeds, tune=args.tune,
                      learning_rates=learning_rates(args.lr, [s.label for s in specs]),
                      budget=args.budget)
    task_list = [tasks.get_task(t) for t in options.tasks]
    human = sys.stderr if _json_to_stdout(args) else sys.stdout
    w0, c0 = time.perf_counter(), time.process_time()
    if report.has("rich"):
        from rich.console import Console

        console = Console(file=human)
        if not console.is_terminal:
            console = Console(file=human, width=report.WIDE)
        with report.RichReporter(console) as reporter:
            results = compare(specs, task_list, options, reporter)
        for r in results:
            report.rich_table(r, console)
    else:
        results = compare(specs, task_list, options, report.PlainReporter())
        for r in results:
            report.plain_table(r, file=human)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(f"total {wall:.1f} s wall, {cpu:.1f} s CPU", file=human)
    _outputs(results, options, args, argv, wall, cpu, human)
    return 0


def _json_to_stdout(args) -> bool:
    return str(args.out) == "-"


def _outputs(results, options, args, argv, wall, cpu, human) -> None:
    if _json_to_stdout(args):
        data = report.to_json(results, options, argv=argv, wall_s=wall, cpu_s=cpu)
        print("plots: none with --out - (give a directory)", file=human)
        print(report.json_text(data))
        return
    if report.has("matplotlib"):
        paths = [report.plot(r, args.out) for r in results]
        print("plots: " + ", ".join(str(p) for p in paths))
    else:
        print(report.HINT)
    if args.json:
        data = report.to_json(results, options, argv=argv, wall_s=wall, cpu_s=cpu)
        print(f"json: {report.write_json(data, args.out / 'compare.json')}")


__all__ = ["main", "parser", "run", "learning_rates", "DEFAULT_NAMES"]
