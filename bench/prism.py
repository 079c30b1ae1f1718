"""PRISM's two modes against optax.adamw on the standard tree.

Rows: each mode with float32 momenta, each mode with ``mu_dtype=bfloat16``, and
``optax.adamw``; all measured in one process with the same-run matmul peak (the
better of a measurement before and after, as other load on the machine depresses
it). The
auto partitioner sends the 3×3×64×64 conv kernel (as 576×64), 784×512, 512×512,
512×10 and 1024×4096 to PRISM, biases and the scalar to AdamW.

    python -m bench.prism [MODE ...]
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import optax

import rollfast
from bench.common import matmul_peak_gflops, measure, print_table


def main(modes: list[str]) -> None:
    modes = modes or [r.name for r in rollfast.available("mode", family="prism")]
    before = matmul_peak_gflops()
    rows = [measure("optax.adamw", optax.adamw(1e-3))]
    for mode in modes:
        rows.append(measure(f"prism {mode}", rollfast.get("prism", learning_rate=1e-3, mode=mode)))
        rows.append(measure(f"prism {mode} mu=bf16", rollfast.get(
            "prism", learning_rate=1e-3, mode=mode, mu_dtype=jnp.bfloat16)))
    print_table(rows, peak_gflops=max(before, matmul_peak_gflops()))


if __name__ == "__main__":
    main(sys.argv[1:])
