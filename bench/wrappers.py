"""Overhead of the wrappers (Magma, Schedule-Free, clipping, stochastic rounding) over bare AdamW.

Every row is measured in the same process on the standard 4.9 M-parameter tree with
``bench.common``; ratios are to ``rollfast adamw`` (the family the wrappers wrap).
Stochastic rounding is timed on bfloat16 params (update + ``rollfast.apply_updates``
with a fresh key per step) against the same step with round-to-nearest.
Targets: ≤ 1.15× for Magma and Schedule-Free, ≤ 1.3× for stochastic rounding.

    python -m bench.wrappers
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

import rollfast
from bench.common import Row, matmul_peak_gflops, measure, print_table, standard_loss, standard_tree, state_bytes

LR = 1e-3


def measure_bf16(name: str, opt, stochastic: bool, steps: int = 10, warmup: int = 2) -> Row:
    """Like ``bench.common.measure`` on bfloat16 params, applying with ``rollfast.apply_updates``."""
    params = standard_tree(dtype=jnp.bfloat16)
    grad = jax.value_and_grad(standard_loss)

    def step(params, state, key):
        value, g = grad(params)
        updates, state = opt.update(g, state, params)
        return rollfast.apply_updates(params, updates, key if stochastic else None), state, value

    state = opt.init(params)
    keys = jax.random.split(jax.random.PRNGKey(0), warmup + steps)
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, keys[0]).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    times = []
    for i, key in enumerate(keys):
        t = time.perf_counter()
        params, state, value = compiled(params, state, key)
        jax.block_until_ready((params, state))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return Row(name, compile_s, 1e3 * statistics.median(times), state_bytes(state),
               float((cost or {}).get("flops", 0.0)) / 1e9, float(value))


def main() -> None:
    import optax

    base = dict(learning_rate=LR)
    rows = [
        measure("optax.adamw", optax.adamw(LR)),
        measure("rollfast adamw", rollfast.get("adamw", **base)),
        measure("+ magma", rollfast.get("adamw", mask="magma", **base)),
        measure("+ schedule_free", rollfast.get("adamw", average="schedule_free", **base)),
        measure("+ clip (spike + rms)", rollfast.get("adamw", raw_global_grad_clip=1.0, **base)),
        measure("+ magma + schedule_free + clip",
                rollfast.get("adamw", mask="magma", average="schedule_free", raw_global_grad_clip=1.0, **base)),
        measure_bf16("bf16 params, nearest", rollfast.get("adamw", **base), stochastic=False),
        measure_bf16("bf16 params, stochastic apply", rollfast.get("adamw", **base), stochastic=True),
        measure_bf16("bf16 + schedule_free (sr z), stochastic",
                     rollfast.get("adamw", average="schedule_free", round="stochastic", **base),
                     stochastic=True),
    ]
    print_table(rows, baseline="rollfast adamw", peak_gflops=matmul_peak_gflops())
    nearest = next(r for r in rows if r.name == "bf16 params, nearest")
    sr = next(r for r in rows if r.name == "bf16 params, stochastic apply")
    print(f"\nstochastic rounding over nearest on bf16 params: {sr.step_ms / nearest.step_ms:.2f}×")


if __name__ == "__main__":
    main()
