"""Cost of the core's non-finite policy: ``rollfast.get("adamw")`` against ``optax.adamw``.

The optimizer step alone (update + apply, jitted, donated; the gradient is computed
outside the timer) on the standard 4.9 M-parameter tree of ``bench.common``, for
``optax.adamw``, rollfast's adamw with the default ``nonfinite="skip"`` (one
finiteness pass over the gradient and a ``lax.cond`` around the step) and with
``nonfinite="propagate"`` (no guard), and with the default policy stepping through
``rollfast.apply_step`` (the update and its application inside one ``lax.cond``). The rows are timed in interleaved rounds on a
shared machine; the table gives each row's best-round median and, below it, the
min and median over rounds of the ratio to ``optax.adamw``. Target: ≤ 1.10×.

    python -m bench.nonfinite
"""

from __future__ import annotations

import statistics

import jax

import rollfast
from bench.common import compile_step, print_table, time_interleaved

LR = 1e-3
ROUNDS = 15


def main() -> None:
    import optax

    configs = [
        ("optax.adamw", optax.adamw(LR, weight_decay=1e-4)),
        ("rollfast adamw (nonfinite=skip)", rollfast.get("adamw", learning_rate=LR)),
        ("rollfast adamw (nonfinite=propagate)",
         rollfast.get("adamw", learning_rate=LR, nonfinite="propagate")),
    ]
    cases = [compile_step(name, opt) for name, opt in configs]
    cases.append(compile_step("rollfast adamw (nonfinite=skip) via rollfast.apply_step", configs[1][1], fused=True))
    per_round = {case.name: [] for case in cases}
    keys = iter(jax.random.split(jax.random.PRNGKey(2), ROUNDS * len(cases) + len(cases)))
    for case in cases:
        case.run(2, next(keys))
    for _ in range(ROUNDS):
        for case in cases:
            ms = case.run(5, next(keys))
            per_round[case.name].append(ms)
            case.best_ms = min(case.best_ms, ms)
    print_table([case.row() for case in cases])
    base = per_round["optax.adamw"]
    print("\n| optimizer | step ms min | step ms median | × optax.adamw (min) | × optax.adamw (median of rounds) |")
    print("|---|---|---|---|---|")
    for name, times in per_round.items():
        ratios = [t / b for t, b in zip(times, base)]
        print(f"| {name} | {min(times):.2f} | {statistics.median(times):.2f} | "
              f"{min(times) / min(base):.3f} | {statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
