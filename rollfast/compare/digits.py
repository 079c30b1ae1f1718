r"""Built-in tasks ``digits-mlp`` and ``digits-cnn``: 8×8 handwritten digits.

Data: ``data/digits.npz``, the 1,797 8×8 images (pixel counts 0..16) and labels of
the UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin & Kaynak,
1998; CC BY 4.0), as shipped by scikit-learn (see ``data/README.md``). Pixels are
scaled to ``[0, 1]``. Split (fixed): every fifth sample (index ≡ 4 mod 5) is the test
set (359 images), the rest is the training set (1,438).

Loss: mean softmax cross-entropy on minibatches of 64 training images drawn with
replacement (step :math:`t` draws with ``fold_in(data_key, t)``). Metric: accuracy
on the whole test set, in percent.

>>> images, labels = load()
>>> images.shape, labels.shape, int(labels.max())
((1797, 8, 8), (1797,), 9)
"""

from __future__ import annotations

import functools
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

from rollfast.compare.protocol import Task

BATCH = 64


@functools.cache
def load() -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8, 0..16, shape ``(1797, 8, 8)``) and labels (uint8)."""
    with resources.files("rollfast.compare").joinpath("data/digits.npz").open("rb") as f:
        data = np.load(f)
        return data["images"], data["labels"]


def split() -> tuple[tuple[jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]:
    """``((x_train, y_train), (x_test, y_test))``; ``x`` float32 in ``[0, 1]``, shape
    ``(n, 8, 8, 1)``; test = indices ≡ 4 (mod 5)."""
    images, labels = load()
    test = np.arange(len(labels)) % 5 == 4
    x = jnp.asarray(images[..., None], jnp.float32) / 16.0
    y = jnp.asarray(labels, jnp.int32)
    return (x[~test], y[~test]), (x[test], y[test])


def _dense(key, fan_in: int, fan_out: int) -> dict:
    """A dense layer, LeCun-normal weights and zero bias."""
    w = jax.random.normal(key, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)
    return {"w": w, "b": jnp.zeros(fan_out, jnp.float32)}


def mlp_init(key, hidden: int = 64) -> dict:
    """MLP 64 → ``hidden`` (tanh) → ``hidden`` (tanh) → 10."""
    k = jax.random.split(key, 3)
    return {"l1": _dense(k[0], 64, hidden), "l2": _dense(k[1], hidden, hidden),
            "out": _dense(k[2], hidden, 10)}


def mlp_apply(params: dict, x) -> jnp.ndarray:
    """Logits of the MLP for images ``x`` of shape ``(n, 8, 8, 1)``."""
    h = x.reshape(x.shape[0], -1)
    for layer in ("l1", "l2"):
        h = jnp.tanh(h @ params[layer]["w"] + params[layer]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def cnn_init(key, channels: tuple[int, int] = (8, 16)) -> dict:
    """CNN: conv 3×3 → ``c1`` (relu), conv 3×3 stride 2 → ``c2`` (relu), dense → 10."""
    c1, c2 = channels
    k = jax.random.split(key, 3)
    conv = lambda key, cin, cout: {
        "w": jax.random.normal(key, (3, 3, cin, cout), jnp.float32) / np.sqrt(9 * cin),
        "b": jnp.zeros(cout, jnp.float32)}
    return {"conv1": conv(k[0], 1, c1), "conv2": conv(k[1], c1, c2),
            "out": _dense(k[2], 4 * 4 * c2, 10)}


def cnn_apply(params: dict, x) -> jnp.ndarray:
    """Logits of the CNN for images ``x`` of shape ``(n, 8, 8, 1)`` (NHWC, SAME padding)."""
    h = x
    for layer, stride in (("conv1", 1), ("conv2", 2)):
        h = jax.lax.conv_general_dilated(h, params[layer]["w"], (stride, stride), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + params[layer]["b"])
    h = h.reshape(h.shape[0], -1)
    return h @ params["out"]["w"] + params["out"]["b"]


def cross_entropy(logits, labels) -> jnp.ndarray:
    """Mean softmax cross-entropy (nats)."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def _task(name: str, init, apply, steps: int, learning_rate: float, description: str) -> Task:
    (x_train, y_train), (x_test, y_test) = split()

    def batch(key, step):
        idx = jax.random.randint(jax.random.fold_in(key, step), (BATCH,), 0, x_train.shape[0])
        return x_train[idx], y_train[idx]

    def loss(params, batch):
        x, y = batch
        return cross_entropy(apply(params, x), y)

    def evaluate(params):
        return 100.0 * jnp.mean(jnp.argmax(apply(params, x_test), axis=-1) == y_test)

    return Task(name=name, init=init, loss=loss, batch=batch, evaluate=evaluate,
                metric="test accuracy %", higher_is_better=True, steps=steps,
                learning_rate=learning_rate, target=0.05,
                description=description + "; 8x8 digits, 1438 train / 359 test (index = 4 mod 5), "
                "batch 64, cross-entropy; metric test accuracy; target train loss 0.05")


def mlp_task(steps: int = 300) -> Task:
    """``digits-mlp``: the MLP of :func:`mlp_init` (8,970 parameters)."""
    return _task("digits-mlp", mlp_init, mlp_apply, steps, 3e-3, "MLP 64-64-64-10, tanh")


def cnn_task(steps: int = 300) -> Task:
    """``digits-cnn``: the CNN of :func:`cnn_init` (3,818 parameters)."""
    return _task("digits-cnn", cnn_init, cnn_apply, steps, 3e-3,
                 "CNN conv3x3x8, conv3x3x16 stride 2, dense 256-10, relu")


__all__ = ["load", "split", "mlp_task", "cnn_task", "mlp_init", "mlp_apply", "cnn_init", "cnn_apply"]
