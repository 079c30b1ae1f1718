"""Shared benchmark harness: the standard tree, one measurement routine, one table.

Every benchmark in ``bench/`` measures its optimizers against ``optax.adamw`` in
the same process, on the same tree, and prints a table with: compile time,
median step time (update + apply, jitted, donated, after warm-up; the gradient is
computed by a separate call outside the timer) and its ratio to adamw,
optimizer-state bytes and ratio, GFLOP per step from XLA's cost analysis, and
achieved GFLOP/s as a fraction of a plain 2048×2048 float32 matmul measured in
the same run.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable

import attrs
import jax
import jax.numpy as jnp
import optax

import rollfast


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


def call_seconds(f: Callable, x, repeats: int = 10) -> list[float]:
    """Wall times of ``repeats`` calls of the jitted ``f(x)`` after one warm-up call."""
    f = jax.jit(f)
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return times


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Achieved GFLOP/s of a plain n×n float32 matmul on this machine, now."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    return 2 * n**3 / statistics.median(call_seconds(lambda x: x @ x, a, repeats)) / 1e9


@attrs.define
class Compiled:
    """One optimizer's jitted step (update + apply) with its measurements so far."""

    name: str
    step: Callable
    grad: Callable
    params: object
    state: object
    compile_s: float
    gflop: float
    state_bytes: int
    best_ms: float = float("inf")
    grad_ms: float = float("inf")
    loss: float = float("nan")

    def run(self, steps: int, key) -> float:
        """Run ``steps`` steps; return the median time of the update + apply call in ms.

        The gradient is computed by a separate jitted call outside the timer, so the
        time is that of the optimizer alone, as an Optax user's training step adds it.
        """
        times, grad_times = [], []
        for k in jax.random.split(key, steps):
            t = time.perf_counter()
            value, grads = self.grad(self.params)
            jax.block_until_ready(grads)
            grad_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            self.params, self.state = self.step(self.params, self.state, grads, k)
            jax.block_until_ready((self.params, self.state))
            times.append(time.perf_counter() - t)
        self.loss = float(value)
        self.grad_ms = min(self.grad_ms, 1e3 * statistics.median(grad_times))
        return 1e3 * statistics.median(times)

    def row(self) -> Row:
        return Row(self.name, self.compile_s, self.best_ms, self.state_bytes, self.gflop, self.loss)


def compile_step(name: str, opt: optax.GradientTransformation, params=None,
                 loss: Callable = standard_loss, apply: Callable | None = None,
                 compiles: int = 2, fused: bool = False, **update_args) -> Compiled:
    """Jit and compile ``opt``'s step ``(params, state, grads, key) -> (params, state)``.

    ``apply(params, updates, key)`` applies the updates (default ``optax.apply_updates``);
    ``fused=True`` steps through ``rollfast.apply_step`` instead (update and apply together);
    compile time and XLA's FLOP count are of this step alone. The compile time is the
    better of ``compiles`` compilations (the machine is shared: one can take 25 % longer).
    """
    params = standard_tree() if params is None else params
    apply = apply or (lambda p, u, key: optax.apply_updates(p, u))

    def step(params, state, grads, key):
        if fused:
            return rollfast.apply_step(opt, grads, state, params, **update_args)
        updates, state = opt.update(grads, state, params, **update_args)
        return apply(params, updates, key), state

    state = opt.init(params)
    grad = jax.jit(jax.value_and_grad(loss))
    grads = grad(params)[1]
    compile_s = float("inf")
    for _ in range(compiles):  # trace and compile afresh each time (a new function object)
        t = time.perf_counter()
        compiled = jax.jit(functools.partial(step), donate_argnums=(0, 1)).lower(
            params, state, grads, jax.random.PRNGKey(0)).compile()
        compile_s = min(compile_s, time.perf_counter() - t)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflop = float((cost or {}).get("flops", 0.0)) / 1e9
    return Compiled(name, compiled, grad, jax.tree.map(jnp.copy, params), state, compile_s, gflop,
                    state_bytes(state))


def time_interleaved(cases: list[Compiled], rounds: int = 3, steps: int = 10,
                     warmup: int = 2) -> list[Row]:
    """Time every case ``steps`` steps per round, the rounds interleaved so that other
    load on the machine hits every case alike; each case keeps its best round's median."""
    keys = iter(jax.random.split(jax.random.PRNGKey(1), len(cases) * (rounds + 1)))
    for case in cases:
        case.run(warmup, next(keys))
    for _ in range(rounds):
        for case in cases:
            case.best_ms = min(case.best_ms, case.run(steps, next(keys)))
    return [case.row() for case in cases]


def measure(name: str, opt: optax.GradientTransformation, params=None,
            loss: Callable = standard_loss, steps: int = 10, warmup: int = 2, **update_args) -> Row:
    """Compile and time one optimizer step (update + apply) on ``params``."""
    return time_interleaved([compile_step(name, opt, params, loss, **update_args)],
                            rounds=1, steps=steps, warmup=warmup)[0]


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
