"""Step time and state bytes of every contrib family against ``optax.adamw``, in
one process, on the standard tree (``python -m bench.catalogue``)."""

from __future__ import annotations

import optax
import rollfast

from bench.common import matmul_peak_gflops, measure, print_table, standard_tree

LEARNING_RATE = 1e-3
CONTRIB = {
    "soap": {},
    "mars": {},
    "mars (lion)": {"name": "mars", "variant": "lion"},
    "qhadamw": {},
    "normuon": {},
    "apollo": {},
    "apollo (mini)": {"name": "apollo", "variant": "mini"},
    "adamw8bit": {},
    "adamw8bit (block 256)": {"name": "adamw8bit", "block_size": 256},
}


def main() -> None:
    params = standard_tree()
    peak = matmul_peak_gflops()
    rows = [measure("optax.adamw", optax.adamw(LEARNING_RATE), params)]
    for label, options in CONTRIB.items():
        options = dict(options)
        name = options.pop("name", label)
        rows.append(measure(label, rollfast.get(name, learning_rate=LEARNING_RATE, **options), params))
    print_table(rows, peak_gflops=peak)


if __name__ == "__main__":
    main()
