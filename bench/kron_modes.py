"""Every registered kron mode against optax.adamw on the standard tree.

Rows per mode: preconditioner update probability 1.0 (every step updates the factors)
and 0.0 (a step only applies P); plus the default mode with bfloat16 momentum. The
amortised cost under the default annealed probability (floor 0.03) follows from the
two rows: ``0.03·t(p=1) + 0.97·t(p=0)``.

    python bench/kron_modes.py [MODE ...]
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import optax

import rollfast
from bench.common import matmul_peak_gflops, measure, print_table

FLOOR = 0.03


def main(modes: list[str]) -> None:
    modes = modes or [r.name for r in rollfast.available("mode", family="kron")]
    peak = matmul_peak_gflops()
    rows = [measure("optax.adamw", optax.adamw(1e-3))]
    amortised = []
    for mode in modes:
        pair = [measure(f"kron {mode} p={p:g}", rollfast.get(
            "kron", learning_rate=1e-3, mode=mode, preconditioner_update_probability=p))
            for p in (1.0, 0.0)]
        rows += pair
        amortised.append((mode, FLOOR * pair[0].step_ms + (1 - FLOOR) * pair[1].step_ms))
    rows.append(measure("kron Q0.5EQ1.5 p=1 mu=bf16", rollfast.get(
        "kron", learning_rate=1e-3, preconditioner_update_probability=1.0, mu_dtype=jnp.bfloat16)))
    print_table(rows, peak_gflops=peak)
    base = rows[0].step_ms
    print(f"\namortised step at the schedule's floor p={FLOOR} (× adamw): "
          + ", ".join(f"{m} {t:.1f} ms ({t / base:.1f}×)" for m, t in amortised))


if __name__ == "__main__":
    main(sys.argv[1:])
