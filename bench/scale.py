"""kron at model scale: blocked factors against unblocked kron and optax.adamw.

Tables (``docs/scale.md``):

1. ``memory``: optimizer-state bytes per parameter at the shapes of a 1.3 B and a 7 B
   decoder (scanned layers), from ``jax.eval_shape`` (nothing is allocated), and the
   fraction of parameters with a dense factor on both sides.
2. ``speed``: the standard 4.9 M tree, block 128 / 256 / unblocked, default mode and QUAD,
   with and without ``cache_preconditioner``: XLA's GFLOP for an update step (p=1) and an
   apply-only step (p=0), step time (also p→0: the fit compiled but not taken), compile.
   ``floor``: a lower bound for the amortised step from measured matmul rates.
3. ``stack``: 4, 16, 64 equal 1024×1024 leaves at block 256: compile and step time.
4. ``dense``: what blocking costs when the curvature is not block diagonal (relative error
   along the run, 50 to 1000 steps, on the Kronecker least-squares problem with dense
   random-basis factors).

    python -m bench.scale [memory|speed|floor|stack|dense ...]
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rollfast
from bench.common import call_seconds, compile_step, matmul_peak_gflops, print_table, state_bytes, time_interleaved

DECODERS = {"1.3B": dict(d=2048, ffn=5632, layers=24, vocab=32000),
            "7B": dict(d=4096, ffn=11008, layers=32, vocab=32000)}


def decoder_shapes(d, ffn, layers, vocab) -> dict:
    """Parameter shapes of a decoder whose blocks are scanned (leading layer axis)."""
    per_layer = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (d, ffn), "gate": (d, ffn),
                 "down": (ffn, d), "norm1": (d,), "norm2": (d,)}
    tree = {"embed": (vocab, d), "head": (d, vocab), "final_norm": (d,)}
    tree.update({f"blocks/{k}": (layers, *s) for k, s in per_layer.items()})
    return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in tree.items()}


def dense_fraction(params, opt_kwargs) -> float:
    """Fraction of parameters whose leaf (or tile/strip) has a dense factor on both sides."""
    from rollfast_psgd.blocking import matrix_view, piece_rule
    from rollfast_psgd.transform import KronOptions, leaf_plans
    options = KronOptions(**opt_kwargs)
    total = dense = 0
    for p, (scanned, plan) in zip(jax.tree.leaves(params), leaf_plans(params, options)):
        total += p.size
        view = matrix_view(p.shape[1:] if scanned else p.shape)
        rule = piece_rule(view, options.block_size, options.max_size_dense) if options.block_size else "whole"
        dense += p.size * (rule == "tiles" or (rule == "whole" and len(plan) >= 2 and all(plan)))
    return dense / total


def memory_table() -> None:
    scanned = lambda params: {k: k.startswith("blocks/") for k in params}
    variants = [("optax.adamw", None),
                ("kron unblocked", dict()),
                ("kron block 256", dict(block_size=256)),
                ("kron block 256, max_size_dense 32768", dict(block_size=256, max_size_dense=32768)),
                ("kron block 256, bf16 mu + factors", dict(block_size=256, mu_dtype=jnp.bfloat16,
                                                            precond_dtype=jnp.bfloat16)),
                ("kron block 256, cached P", dict(block_size=256, cache_preconditioner=True)),
                ("kron block 256, bf16 mu + factors, cached P", dict(block_size=256, mu_dtype=jnp.bfloat16,
                                                                     precond_dtype=jnp.bfloat16,
                                                                     cache_preconditioner=True))]
    print("| model | optimizer | state GB | bytes / param | × adamw | dense both sides |")
    print("|---|---|---|---|---|---|")
    for model, dims in DECODERS.items():
        params = decoder_shapes(**dims)
        n = sum(p.size for p in jax.tree.leaves(params))
        base = None
        for name, kwargs in variants:
            if kwargs is None:
                opt, frac = optax.adamw(1e-3), "-"
            else:
                kwargs = dict(kwargs, scanned_layers=scanned)
                opt = rollfast.get("kron", learning_rate=1e-3, **kwargs)
                frac = f"{100 * dense_fraction(params, kwargs):.0f} %"
            size = state_bytes(jax.eval_shape(opt.init, params))
            base = base or size
            print(f"| {model} ({n / 1e9:.2f} B) | {name} | {size / 1e9:.1f} | {size / n:.2f} | {size / base:.2f} "
                  f"| {frac} |")


def speed_table() -> None:
    """Per configuration three rows: p=1 (every step fits the factors), p=0 (no fit compiled:
    the apply-only GFLOP) and p→0 (the fit compiled behind its ``lax.cond`` but not taken:
    what the 97 % of steps without a fit cost at p=0.03). The amortised step is
    ``0.03·t(p=1) + 0.97·t(p→0)``."""
    cases = [compile_step("optax.adamw", optax.adamw(1e-3))]
    for mode in ("Q0.5EQ1.5", "QUAD"):
        for block in (None, 128, 256):
            for cached in (False, True):
                for p, label in ((1.0, "p=1"), (0.0, "p=0"), (1e-9, "p→0")):
                    name = (f"kron {mode} {'unblocked' if block is None else f'block {block}'}"
                            f"{' cached P' if cached else ''} {label}")
                    cases.append(compile_step(name, rollfast.get(
                        "kron", learning_rate=1e-3, mode=mode, block_size=block, cache_preconditioner=cached,
                        preconditioner_update_probability=p)))
    rows = time_interleaved(cases, rounds=2, steps=5)
    print_table(rows)
    print("\namortised step at p=0.03 (× adamw): " + ", ".join(
        f"{rows[i].name[:-4]} {(0.03 * rows[i].step_ms + 0.97 * rows[i + 2].step_ms) / rows[0].step_ms:.1f}×"
        for i in range(1, len(rows), 3)))


def stack_table() -> None:
    print("| leaves 1024² | tiles | compile s | step ms (p=1) |")
    print("|---|---|---|---|")
    points = []
    for k in (4, 16, 64):
        params = {f"w{i}": jnp.full((1024, 1024), 0.01) for i in range(k)}
        opt = rollfast.get("kron", learning_rate=1e-3, block_size=256, preconditioner_update_probability=1.0)
        loss = lambda p: sum(jnp.sum(x**2) for x in p.values())
        row = time_interleaved([compile_step(f"{k}", opt, params, loss=loss, compiles=1)], rounds=1, steps=3)[0]
        points.append((16 * k, row.compile_s, row.step_ms))
        print(f"| {k} | {16 * k} | {row.compile_s:.2f} | {row.step_ms:.0f} |")
    tiles, comp, step = map(np.asarray, zip(*points))
    print(f"\nslope per tile: compile {1e3 * np.polyfit(tiles, comp, 1)[0]:.2f} ms, "
          f"step {np.polyfit(tiles, step, 1)[0]:.2f} ms")


def dense_table() -> None:
    sys.path.insert(0, "tests/psgd")
    from test_kron_blocked import _spd, relative_error
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    a, b, w_star = _spd(k[0], 384, 100.0), _spd(k[1], 256, 100.0), jax.random.normal(k[2], (384, 256))
    loss = lambda w: 0.5 * jnp.sum((w - w_star) * (a @ (w - w_star) @ b))
    steps = (50, 100, 150, 200, 300, 1000)
    print("| optimizer (dense random-basis factors), relative error after | " + " | ".join(map(str, steps)) + " |")
    print("|---|" + "---|" * len(steps))
    p1 = dict(learning_rate=0.03, preconditioner_update_probability=1.0)
    for name, opt in [("kron unblocked", rollfast.get("kron", **p1)),
                      ("kron block 128", rollfast.get("kron", block_size=128, **p1))] + [
            (f"adam lr={lr:g}", optax.adam(lr)) for lr in (0.1, 0.3, 1.0)]:
        print(f"| {name} | " + " | ".join(f"{relative_error(opt, loss, w_star, n):.3g}" for n in steps) + " |")


def tile_product_gflops(tiles: int = 80, block: int = 256, repeats: int = 10) -> float:
    """Achieved GFLOP/s of one batched ``(tiles, block, block)`` float32 matmul, now."""
    a = jax.random.normal(jax.random.PRNGKey(0), (tiles, block, block))
    times = call_seconds(lambda x: jnp.einsum("nab,nbc->nac", x, x), a, repeats)
    return 2 * tiles * block**3 / min(times) / 1e9


def floor_table() -> None:
    """A lower bound for the amortised step of blocked kron (block 256, cached P, p=0.03) in
    units of adamw's step, from measured rates: the apply's XLA FLOP count at the best
    measured matmul rates, plus the amortised fit; everything else in the step counted as 0."""
    opt = lambda p: rollfast.get("kron", learning_rate=1e-3, block_size=256, cache_preconditioner=True,
                                 preconditioner_update_probability=p)
    cases = [compile_step("optax.adamw", optax.adamw(1e-3)), compile_step("p=0", opt(0.0)),
             compile_step("p=1", opt(1.0)), compile_step("p→0", opt(1e-9))]
    adamw, apply_only, fit, keep = time_interleaved(cases, rounds=3, steps=5)
    big, tiles = matmul_peak_gflops(), tile_product_gflops()
    fit_ms = 0.03 * (fit.step_ms - apply_only.step_ms)
    rows = [("adamw step", adamw.step_ms), ("apply-only step, measured", apply_only.step_ms),
            ("amortised step, measured (0.03·p=1 + 0.97·p→0)", 0.03 * fit.step_ms + 0.97 * keep.step_ms),
            (f"apply GFLOP ({apply_only.gflop:.2f}) at the 2048² matmul rate ({big:.0f} GFLOP/s)",
             apply_only.gflop / big * 1e3),
            (f"apply GFLOP at the batched 256³ tile rate ({tiles:.0f} GFLOP/s)", apply_only.gflop / tiles * 1e3),
            ("fit, amortised: 0.03·(t(p=1) − t(p=0))", fit_ms),
            ("floor at the 2048² rate: apply + fit, nothing else", apply_only.gflop / big * 1e3 + fit_ms),
            ("floor at the tile rate: apply + fit, nothing else", apply_only.gflop / tiles * 1e3 + fit_ms)]
    print("| block 256, cached P | ms | × adamw |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / adamw.step_ms:.1f} |")


TABLES = {"memory": memory_table, "speed": speed_table, "floor": floor_table, "stack": stack_table,
          "dense": dense_table}

if __name__ == "__main__":
    for name in sys.argv[1:] or TABLES:
        print(f"\n## {name}\n")
        TABLES[name]()
