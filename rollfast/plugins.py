"""Run-time plugin management: register a plugin from a notebook or a test.

>>> import optax, rollfast
>>> def sign_sgd(learning_rate=1e-3):
...     '''SGD on the sign of the gradient.'''
...     return optax.chain(optax.scale_by_sign(), optax.scale_by_learning_rate(learning_rate))
>>> rollfast.plugins.register(rollfast.plugins.as_plugin(
...     precondition=lambda register: register.family("sign_sgd_doc", sign_sgd)), name="doc")
>>> rollfast.registry().lookup("family", "sign_sgd_doc").provider.plugin
'doc'
>>> opt = rollfast.get("sign_sgd_doc", learning_rate=0.5)
>>> opt.update({"w": -3.0}, opt.init({"w": 1.0}))[0]
{'w': Array(0.5, dtype=float32, weak_type=True)}
>>> _ = rollfast.plugins.reset()
"""

from __future__ import annotations

from rollfast.registry import PluginInfo, as_plugin, registry, reset


def register(plugin: object, name: str | None = None) -> None:
    """Register a plugin module or object now, as a third-party plugin named ``name``."""
    registry().register(plugin, name)


def installed() -> list[PluginInfo]:
    """Every plugin that was loaded or failed to load, with its error if any."""
    return registry().plugins()


__all__ = ["register", "installed", "as_plugin", "reset"]
