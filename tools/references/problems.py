"""The fixed problems on which the reference trajectories are recorded.

NumPy only (no torch, no jax), so the harness (torch) and the tests (JAX) build the
same data from the same seed; the fixtures store the data as well, so the tests
never depend on NumPy's generator staying the same.

Parameters are in JAX's layout: a matrix is ``(fan_in, fan_out)`` and a 4-D kernel
``(h, w, in, out)``.
"""

from __future__ import annotations

import numpy as np


def lsq():
    r"""Ill-conditioned least squares with a rank-deficient gradient.

    ``½‖X W + 1bᵀ + c − Y‖²_F`` with ``X`` 16×32 of singular values ``10^{2…0}``
    (condition number 100) and ``Y`` of scale 10: every gradient of ``W`` (32×16) lies in the 16-dimensional
    row space of ``X``, so its left Shampoo factor has rank 16 of 32. The minimum is 0.
    """
    rng = np.random.default_rng(0)
    left = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    right = np.linalg.qr(rng.standard_normal((32, 16)))[0]
    x = (left * 10 ** np.linspace(2, 0, 16)) @ right.T
    data = {"x": x, "y": 10 * rng.standard_normal((16, 16))}
    params = {"w": np.zeros((32, 16)), "b": np.zeros(16), "c": np.zeros(())}
    return _f32(data), _f32(params)


def mixed():
    r"""A tree of a vector, a scalar, a matrix and a 4-D kernel, each a quadratic.

    ``½Σ h_v (v − t_v)² + ½ h_s (s − t_s)² + ½‖A (M − T) B‖² + ½‖C (K_{(18,4)} − T_K)‖²``
    with ``h_v`` spread over three decades and ``A, B, C`` random (condition ~10–100).
    The minimum is 0. The matrix is square and the kernel's unfoldings have full rank,
    so SOAP's first eigenbases are unique up to signs (see ``lsq`` for the other case).
    """
    rng = np.random.default_rng(1)
    data = {"h_v": 10 ** np.linspace(-1, 2, 5), "t_v": rng.standard_normal(5),
            "h_s": np.array(3.0), "t_s": np.array(-2.0),
            "a": rng.standard_normal((4, 4)) + 2 * np.eye(4), "bm": rng.standard_normal((4, 4)) + 2 * np.eye(4),
            "t_m": rng.standard_normal((4, 4)),
            "ck": rng.standard_normal((18, 18)) / 3 + np.eye(18), "t_k": rng.standard_normal((3, 3, 2, 4))}
    params = {"vec": 0.1 * rng.standard_normal(5), "scal": np.array(0.5),
              "mat": 0.1 * rng.standard_normal((4, 4)), "kern": 0.1 * rng.standard_normal((3, 3, 2, 4))}
    return _f32(data), _f32(params)


def mlp():
    r"""A 8-16-1 tanh network regressing ``y = sin(x·w*) + 0.1·x₀²`` on 64 points
    (mean squared error)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 8))
    data = {"x": x, "y": (np.sin(x @ rng.standard_normal(8)) + 0.1 * x[:, 0] ** 2)[:, None]}
    params = {"w1": rng.standard_normal((8, 16)) / np.sqrt(8), "b1": np.zeros(16),
              "w2": rng.standard_normal((16, 1)) / 4, "b2": np.zeros(1)}
    return _f32(data), _f32(params)


def _f32(tree):
    return {k: np.asarray(v, np.float32) for k, v in tree.items()}


PROBLEMS = {"lsq": lsq, "mixed": mixed, "mlp": mlp}
