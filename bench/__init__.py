"""Benchmarks: scripts that print a table; run as ``python -m bench.<name>``.

LAPACK calls inside a compiled step (kron EQ's triangular solve, CAYLEY's Cholesky) run in
SciPy's OpenBLAS, whose worker threads keep spinning after each call and take the
cores from XLA's own thread pool (measured: kron EQ 410 → 310 ms per step on two
cores). So the benchmarks run OpenBLAS single-threaded unless ``OPENBLAS_NUM_THREADS``
is already set; XLA still uses every core. ``docs/kron.md`` (Cost) gives the same
advice for training.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
