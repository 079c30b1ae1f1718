"""Shared benchmark harness: the standard tree, one measurement routine, one table.

Every benchmark in ``bench/`` measures its optimizers against ``optax.adamw`` in
the same process, on the same tree, and prints a table with: compile time,
median step time (update + apply, jitted, donated, after warm-up) and its ratio
to adamw, optimizer-state bytes and ratio, GFLOP per step from XLA's cost
analysis, and achieved GFLOP/s as a fraction of a plain 2048×2048 float32
matmul measured in the same run.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import attrs
import jax
import jax.numpy as jnp
import optax


def standard_tree(seed: int = 0, dtype=jnp.float32) -> dict:
    """The standard benchmark tree: 4.9 M parameters.

    3×3×64×64 conv kernel + bias, 784×512, 512×512, 512×10, 1024×4096 with their
    biases, and a scalar.
    """
    shapes = {"conv": (3, 3, 64, 64), "conv_b": (64,), "fc1": (784, 512), "fc1_b": (512,),
              "fc2": (512, 512), "fc2_b": (512,), "head": (512, 10), "head_b": (10,),
              "big": (1024, 4096), "big_b": (4096,), "scale": ()}
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return {name: (jax.random.normal(k, s, jnp.float32) * 0.02).astype(dtype)
            for k, (name, s) in zip(keys, shapes.items())}


def standard_loss(params) -> jax.Array:
    """A smooth loss on the standard tree (quadratic pull towards 1 plus a quartic term)."""
    return sum(jnp.mean((p.astype(jnp.float32) - 1.0) ** 2) + 0.1 * jnp.mean(p.astype(jnp.float32) ** 4)
               for p in jax.tree.leaves(params))


@attrs.frozen
class Row:
    name: str
    compile_s: float
    step_ms: float
    state_bytes: int
    gflop: float
    loss: float


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype"))


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Achieved GFLOP/s of a plain n×n float32 matmul on this machine, now."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def measure(name: str, opt: optax.GradientTransformation, params=None,
            loss: Callable = standard_loss, steps: int = 10, warmup: int = 2,
            grads_fn: Callable | None = None, **update_args) -> Row:
    """Compile and time one optimizer step (update + apply) on ``params``."""
    params = standard_tree() if params is None else params
    grad = jax.value_and_grad(loss)

    def step(params, state):
        value, g = grad(params)
        updates, state = opt.update(g, state, params, **update_args)
        return optax.apply_updates(params, updates), state, value

    state = opt.init(params)
    nbytes = state_bytes(state)
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflop = float((cost or {}).get("flops", 0.0)) / 1e9
    params = jax.tree.map(jnp.copy, params)
    for _ in range(warmup):
        params, state, value = compiled(params, state)
    jax.block_until_ready(params)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        params, state, value = compiled(params, state)
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - t)
    return Row(name, compile_s, 1e3 * statistics.median(times), nbytes, gflop, float(value))


def print_table(rows: list[Row], baseline: str = "optax.adamw", peak_gflops: float | None = None,
                file=sys.stdout) -> None:
    """Print rows as a Markdown table with ratios to the ``baseline`` row."""
    base = next(r for r in rows if r.name == baseline)
    head = ("| optimizer | compile s | step ms | × adamw | state MB | × adamw | GFLOP/step "
            "| GFLOP/s | % matmul peak | loss |")
    print(head, file=file)
    print("|" + "---|" * (head.count("|") - 1), file=file)
    for r in rows:
        rate = r.gflop / (r.step_ms / 1e3) if r.step_ms else 0.0
        peak = f"{100 * rate / peak_gflops:.0f}" if peak_gflops else "-"
        print(f"| {r.name} | {r.compile_s:.2f} | {r.step_ms:.1f} | {r.step_ms / base.step_ms:.1f} "
              f"| {r.state_bytes / 2**20:.1f} | {r.state_bytes / max(base.state_bytes, 1):.2f} "
              f"| {r.gflop:.2f} | {rate:.1f} | {peak} | {r.loss:.4g} |", file=file)
    if peak_gflops:
        print(f"\nmatmul peak (2048² f32, same run): {peak_gflops:.1f} GFLOP/s", file=file)
