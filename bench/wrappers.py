"""Overhead of the wrappers (Magma, Schedule-Free, clipping, stochastic rounding) over bare AdamW.

Every row runs in the same process on the standard 4.9 M-parameter tree of
``bench.common`` (update + apply, jitted, donated). The machine is shared, so the
rows are timed in interleaved rounds and each row keeps its best round's median;
ratios are to ``rollfast adamw`` (the family the wrappers wrap). Stochastic rounding
is timed on bfloat16 params (``rollfast.apply_updates`` with a fresh key per step)
against the same step with round-to-nearest.
Targets: ≤ 1.15× for Magma and Schedule-Free, ≤ 1.3× for stochastic rounding.

    python -m bench.wrappers
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

import rollfast
from bench.common import Row, matmul_peak_gflops, print_table, standard_loss, standard_tree, state_bytes

LR = 1e-3


def compile_step(opt, dtype, stochastic: bool):
    """The jitted step (update + ``rollfast.apply_updates``), its compile time, FLOPs and inputs."""
    params = standard_tree(dtype=dtype)
    grad = jax.value_and_grad(standard_loss)

    def step(params, state, key):
        value, g = grad(params)
        updates, state = opt.update(g, state, params)
        return rollfast.apply_updates(params, updates, key if stochastic else None), state, value

    state = opt.init(params)
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, compile_s, float((cost or {}).get("flops", 0.0)) / 1e9, [params, state]


def time_rows(configs, rounds: int = 5, steps: int = 10) -> list[Row]:
    """Time every config ``steps`` steps per round, rounds interleaved; keep each best median."""
    built = [compile_step(opt, dtype, sr) for _, opt, dtype, sr in configs]
    best = [float("inf")] * len(configs)
    values = [0.0] * len(configs)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), rounds * steps * len(configs) + 2 * len(configs)))
    for compiled, _, _, carry in built:  # warm-up
        for _ in range(2):
            carry[0], carry[1], _ = compiled(carry[0], carry[1], next(keys))
    for _ in range(rounds):
        for i, (compiled, _, _, carry) in enumerate(built):
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                carry[0], carry[1], value = compiled(carry[0], carry[1], next(keys))
                jax.block_until_ready(carry)
                times.append(time.perf_counter() - t)
            best[i] = min(best[i], statistics.median(times))
            values[i] = float(value)
    return [Row(name, b[1], 1e3 * t, state_bytes(b[3][1]), b[2], v)
            for (name, *_), b, t, v in zip(configs, built, best, values)]


def main() -> None:
    import optax

    get = lambda **options: rollfast.get("adamw", learning_rate=LR, **options)
    f32, bf16 = jnp.float32, jnp.bfloat16
    configs = [
        ("optax.adamw", optax.adamw(LR), f32, False),
        ("rollfast adamw", get(), f32, False),
        ("+ magma", get(mask="magma"), f32, False),
        ("+ schedule_free", get(average="schedule_free"), f32, False),
        ("+ clip (spike + rms)", get(raw_global_grad_clip=1.0), f32, False),
        ("+ magma + schedule_free + clip", get(mask="magma", average="schedule_free",
                                               raw_global_grad_clip=1.0), f32, False),
        ("bf16 params, nearest", get(), bf16, False),
        ("bf16 params, stochastic apply", get(), bf16, True),
        ("bf16 + schedule_free (sr z), stochastic", get(average="schedule_free", round="stochastic"),
         bf16, True),
    ]
    rows = time_rows(configs)
    print_table(rows, baseline="rollfast adamw", peak_gflops=matmul_peak_gflops())
    nearest, sr = rows[-3], rows[-2]
    print(f"\nstochastic rounding over nearest on bf16 params: {sr.step_ms / nearest.step_ms:.2f}×")


if __name__ == "__main__":
    main()
