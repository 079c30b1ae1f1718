"""A user task for ``rollfast compare``: logistic regression on synthetic data.

Run from this directory (the current directory is importable for ``--task``)::

    rollfast compare adamw kron optax:lion --task my_task:make_task --steps 200

``make_task`` returns a :class:`rollfast.compare.Task`: initial parameters, a loss on a
minibatch, the minibatch of each step, and a validation metric.
"""

import jax
import jax.numpy as jnp

from rollfast.compare import Task

FEATURES, TRAIN, TEST, BATCH = 20, 2048, 512, 128


def make_task() -> Task:
    key_x, key_w, key_t = jax.random.split(jax.random.PRNGKey(42), 3)
    scales = jnp.logspace(0, -2, FEATURES)  # features of very different scales
    x = jax.random.normal(key_x, (TRAIN + TEST, FEATURES)) * scales
    w_true = jax.random.normal(key_w, (FEATURES,)) / scales
    y = (x @ w_true + 0.5 * jax.random.normal(key_t, (TRAIN + TEST,)) > 0).astype(jnp.float32)
    x_train, y_train, x_test, y_test = x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]

    def loss(params, batch):
        xb, yb = batch
        logits = xb @ params["w"] + params["b"]
        return jnp.mean(jnp.logaddexp(0.0, logits) - yb * logits)  # binary cross-entropy

    def batch(key, step):  # the same for every optimizer of a seed
        idx = jax.random.randint(jax.random.fold_in(key, step), (BATCH,), 0, TRAIN)
        return x_train[idx], y_train[idx]

    def evaluate(params):
        return 100.0 * jnp.mean(((x_test @ params["w"] + params["b"]) > 0) == (y_test > 0.5))

    return Task(name="logistic", init=lambda key: {"w": jnp.zeros(FEATURES), "b": jnp.zeros(())},
                loss=loss, batch=batch, evaluate=evaluate, metric="test accuracy %",
                higher_is_better=True, steps=300, learning_rate=1e-2, target=0.35,
                description="logistic regression, 20 features scaled 1 to 0.01, 2048 train / 512 test")
