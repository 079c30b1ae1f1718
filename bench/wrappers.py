"""Overhead of the wrappers (Magma, Schedule-Free, clipping, stochastic rounding) over bare AdamW.

Every row runs in the same process on the standard 4.9 M-parameter tree of
``bench.common`` (update + apply, jitted, donated). The machine is shared, so the
rows are timed in interleaved rounds and each row keeps its best round's median;
the gradient is computed outside the timed call; ratios are to ``rollfast adamw``
(the family the wrappers wrap). Stochastic rounding is timed on bfloat16 params (``rollfast.apply_updates`` with a fresh key per step)
against the same step with round-to-nearest.
Targets: ≤ 1.15× for Magma and Schedule-Free, ≤ 1.3× for stochastic rounding. The
table's ratios are of the optimizer step alone; a last line gives them per training
step, with the gradient of the standard loss included.

    python -m bench.wrappers
"""

from __future__ import annotations

import jax.numpy as jnp

import rollfast
from bench.common import compile_step, matmul_peak_gflops, print_table, standard_tree, time_interleaved

LR = 1e-3


def main() -> None:
    import optax

    get = lambda **options: rollfast.get("adamw", learning_rate=LR, **options)
    f32, bf16 = jnp.float32, jnp.bfloat16
    configs = [
        ("optax.adamw", optax.adamw(LR), f32, False),
        ("rollfast adamw", get(), f32, False),
        ("+ magma", get(mask="magma"), f32, False),
        ("optax schedule_free_adamw", optax.contrib.schedule_free_adamw(LR), f32, False),
        ("+ schedule_free (b1=0: SF-AdamW)", get(average="schedule_free", b1=0.0), f32, False),
        ("+ schedule_free (b1=0.9)", get(average="schedule_free"), f32, False),
        ("+ clip (spike + rms)", get(raw_global_grad_clip=1.0), f32, False),
        ("+ magma + schedule_free + clip", get(mask="magma", average="schedule_free",
                                               raw_global_grad_clip=1.0), f32, False),
        ("bf16 params, nearest", get(), bf16, False),
        ("bf16 params, stochastic apply", get(), bf16, True),
        ("bf16 + schedule_free (sr z), stochastic", get(average="schedule_free", round="stochastic"),
         bf16, True),
    ]
    stochastic = lambda p, u, key: rollfast.apply_updates(p, u, key)
    cases = [compile_step(name, opt, standard_tree(dtype=dtype), apply=stochastic if sr else None)
             for name, opt, dtype, sr in configs]
    rows = time_interleaved(cases, rounds=25, steps=5)
    print_table(rows, baseline="rollfast adamw", peak_gflops=matmul_peak_gflops())
    grad_ms = min(case.grad_ms for case in cases[:-3])
    base = rows[1].step_ms
    print(f"\nper training step, with the standard loss's gradient ({grad_ms:.1f} ms) included (× rollfast adamw): "
          + ", ".join(f"{r.name} {(r.step_ms + grad_ms) / (base + grad_ms):.2f}×" for r in rows[2:-3]))
    nearest, sr = rows[-3], rows[-2]
    print(f"\nstochastic rounding over nearest on bf16 params: {sr.step_ms / nearest.step_ms:.2f}×")


if __name__ == "__main__":
    main()
