"""Train a small MLP with a few registered optimizers, each one line away.

Run: ``python examples/quickstart.py``
"""

import jax
import optax

import rollfast
from rollfast.testing import mlp_problem

CHOICES = [  # (family, options); families that are not installed are skipped
    ("adamw", dict(learning_rate=1e-2)),
    ("kron", dict(learning_rate=3e-3, mode="EXP")),
    ("prism", dict(learning_rate=3e-2, mode="bidirectional")),
    ("adamw", dict(learning_rate=4e-2, mask="magma", average="schedule_free")),  # magma: ~4x lr
]

params0, loss = mlp_problem()
for name, options in CHOICES:
    try:
        opt = rollfast.get(name, **options)
    except (rollfast.UnknownNameError, TypeError) as exc:
        print(f"{name:>6}: skipped ({exc})")
        continue
    params, state = params0, opt.init(params0)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    for _ in range(300):
        params, state, value = step(params, state)
    extra = ", ".join(f"{k}={v}" for k, v in options.items() if k != "learning_rate")
    print(f"{name:>6}({extra}): loss {float(loss(params0)):.4f} -> {float(value):.6f} after 300 steps")
