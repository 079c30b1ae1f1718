"""Every registered kron mode against optax.adamw on the standard tree.

Rows per mode: preconditioner update probability 1.0 (every step updates the factors)
and 0.0 (a step only applies P); plus the default mode with bfloat16 momentum. The
amortised cost under the default annealed probability (floor 0.03) follows from the
two rows: ``0.03·t(p=1) + 0.97·t(p=0)``. Rows are timed in two interleaved rounds (the
machine is shared; each keeps its best); the matmul peak is the better of a measurement
before and after.

    python -m bench.kron_modes [MODE ...]
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import optax

import rollfast
from bench.common import compile_step, matmul_peak_gflops, print_table, time_interleaved

FLOOR = 0.03


def main(modes: list[str]) -> None:
    modes = modes or [r.name for r in rollfast.available("mode", family="kron")]
    peak = matmul_peak_gflops()
    # One-time costs of the process (imports, the first trace of the family's code, the
    # LAPACK kernels' registration) are not any mode's compile time: pay them here.
    tiny = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    for mode in modes:
        compile_step("warm-up", rollfast.get("kron", learning_rate=1e-3, mode=mode), tiny, compiles=1,
                     loss=lambda p: sum(jnp.sum(x**2) for x in p.values()))
    cases = [compile_step("optax.adamw", optax.adamw(1e-3))]
    for mode in modes:
        cases += [compile_step(f"kron {mode} p={p:g}", rollfast.get(
            "kron", learning_rate=1e-3, mode=mode, preconditioner_update_probability=p))
            for p in (1.0, 0.0)]
    cases.append(compile_step("kron Q0.5EQ1.5 p=1 mu=bf16", rollfast.get(
        "kron", learning_rate=1e-3, preconditioner_update_probability=1.0, mu_dtype=jnp.bfloat16)))
    rows = time_interleaved(cases, rounds=2)
    amortised = [(mode, FLOOR * rows[1 + 2 * i].step_ms + (1 - FLOOR) * rows[2 + 2 * i].step_ms)
                 for i, mode in enumerate(modes)]
    print_table(rows, peak_gflops=max(peak, matmul_peak_gflops()))
    base = rows[0].step_ms
    print(f"\namortised step at the schedule's floor p={FLOOR} (× adamw): "
          + ", ".join(f"{m} {t:.1f} ms ({t / base:.1f}×)" for m, t in amortised))


if __name__ == "__main__":
    main(sys.argv[1:])
