r"""Built-in task ``charlm``: a character-level transformer language model.

Data: ``data/macbeth.txt``, Shakespeare's *Macbeth* (103,427 characters, 67 distinct;
public domain, see ``data/README.md``). The vocabulary is the sorted set of its
characters. Split (fixed): the first 90% of the text trains, the last 10% validates.

Model: a pre-norm decoder-only transformer in plain JAX — token and learned position
embeddings of width :math:`d`, ``layers`` blocks of causal multi-head self-attention
and a GELU MLP of width :math:`4d`, each as :math:`h \leftarrow h + f(\mathrm{LN}(h))`,
a final layer norm and an untied output projection; no biases (layer norms have a
scale only), so every block has six parameter arrays. With the defaults
(:math:`d = 96`, 2 layers, 4 heads, context 32) it has 237,600 parameters; the
default run's ``charlm-small`` has one layer (126,816 parameters).

Loss: mean next-character cross-entropy (nats) on minibatches of 16 windows of
``context + 1`` characters whose starts step :math:`t` draws with
``fold_in(data_key, t)``. Metric: validation cross-entropy in bits per character,
on 64 fixed, evenly spaced windows of the validation text.

>>> task = charlm_task(width=16, layers=1, heads=2, context=8)
>>> x = task.batch(jax.random.PRNGKey(0), 0)
>>> x.shape
(16, 9)
"""

from __future__ import annotations

import functools
import math
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

from rollfast.compare.protocol import Task

BATCH = 16
VALIDATION_WINDOWS = 64


@functools.cache
def text() -> str:
    """The training text (ASCII)."""
    return resources.files("rollfast.compare").joinpath("data/macbeth.txt").read_text("ascii")


def encode() -> tuple[np.ndarray, list[str]]:
    """The text as int32 character ids, and the vocabulary (sorted characters)."""
    chars = sorted(set(text()))
    index = {c: i for i, c in enumerate(chars)}
    return np.array([index[c] for c in text()], np.int32), chars


def init(key, vocab: int, width: int, layers: int, context: int) -> dict:
    """Parameters: embeddings, ``layers`` blocks, final norm, output projection."""
    keys = jax.random.split(key, 3 + layers)
    normal = lambda k, shape, fan_in: jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan_in)
    norm = lambda: jnp.ones(width, jnp.float32)

    def block(k):
        k = jax.random.split(k, 4)
        return {"ln1": norm(), "qkv": normal(k[0], (width, 3 * width), width),
                "proj": normal(k[1], (width, width), width) / math.sqrt(2 * layers),
                "ln2": norm(), "up": normal(k[2], (width, 4 * width), width),
                "down": normal(k[3], (4 * width, width), 4 * width) / math.sqrt(2 * layers)}

    return {"embed": normal(keys[0], (vocab, width), 1) * 0.1,
            "position": normal(keys[1], (context, width), 1) * 0.1,
            "blocks": [block(k) for k in keys[3:]], "ln_f": norm(),
            "unembed": normal(keys[2], (width, vocab), width) * 0.1}


def _layer_norm(scale, h):
    r"""Layer norm with a learned scale and no bias: :math:`\gamma\odot(h-\mu)/\sqrt{\sigma^2+10^{-5}}`."""
    mu = jnp.mean(h, -1, keepdims=True)
    var = jnp.var(h, -1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(var + 1e-5) * scale


def _attention(p: dict, h, heads: int):
    r"""Causal multi-head self-attention :math:`\mathrm{softmax}(QK^\top/\sqrt{d_h} + M)V`."""
    n, t, d = h.shape
    q, k, v = jnp.split(h @ p["qkv"], 3, axis=-1)
    split = lambda z: z.reshape(n, t, heads, d // heads).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, -1e9)
    out = jax.nn.softmax(scores, axis=-1) @ v
    return out.transpose(0, 2, 1, 3).reshape(n, t, d) @ p["proj"]


def apply(params: dict, tokens, heads: int):
    """Next-character logits for ``tokens`` of shape ``(n, t)``."""
    t = tokens.shape[1]
    h = params["embed"][tokens] + params["position"][:t]
    for p in params["blocks"]:
        h = h + _attention(p, _layer_norm(p["ln1"], h), heads)
        h = h + jax.nn.gelu(_layer_norm(p["ln2"], h) @ p["up"]) @ p["down"]
    return _layer_norm(params["ln_f"], h) @ params["unembed"]


def _next_char_loss(params, windows, heads: int):
    """Mean cross-entropy (nats) of predicting ``windows[:, 1:]`` from ``windows[:, :-1]``."""
    logits = apply(params, windows[:, :-1], heads)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1))


def charlm_task(steps: int = 150, width: int = 96, layers: int = 2, heads: int = 4,
                context: int = 32, name: str = "charlm") -> Task:
    """The ``charlm`` task (see the module docstring)."""
    ids, chars = encode()
    cut = int(0.9 * len(ids))
    train, valid = jnp.asarray(ids[:cut]), ids[cut:]
    starts = np.linspace(0, len(valid) - context - 2, VALIDATION_WINDOWS).astype(np.int64)
    valid_windows = jnp.asarray(np.stack([valid[s: s + context + 1] for s in starts]))
    offsets = jnp.arange(context + 1)

    def batch(key, step):
        s = jax.random.randint(jax.random.fold_in(key, step), (BATCH,), 0, cut - context - 1)
        return train[s[:, None] + offsets]

    return Task(
        name=name, init=lambda key: init(key, len(chars), width, layers, context),
        loss=lambda params, windows: _next_char_loss(params, windows, heads), batch=batch,
        evaluate=lambda params: _next_char_loss(params, valid_windows, heads) / math.log(2),
        metric="validation bits/char", higher_is_better=False, steps=steps, learning_rate=3e-3,
        target=2.0,
        description=(f"transformer d={width}, {layers} layer{'s' * (layers > 1)}, {heads} heads, context {context}, "
                     f"on Macbeth ({len(ids)} chars, vocabulary {len(chars)}), 90/10 split, "
                     f"batch {BATCH}; metric validation bits/char; target train loss 2.0 nats"))


__all__ = ["charlm_task", "text", "encode", "init", "apply"]
