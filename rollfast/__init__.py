"""rollfast: optimizers for JAX as a plugin registry on top of Optax.

>>> import rollfast
>>> opt = rollfast.get("adamw", learning_rate=3e-4)   # a plain optax transformation

Importing rollfast is light: plugins (and jax) load on first use of the registry.
Names that plugins export (e.g. the rollfast 0.2 API) resolve lazily as
attributes of this module, as do the core's jax-dependent helpers
(``rollfast.skipped_steps(state)``: steps skipped for non-finite gradients;
``rollfast.apply_step(opt, grads, state, params)``: update and apply in one guarded step).
"""

from __future__ import annotations

from rollfast import plugins
from rollfast.assembly import available, get
from rollfast.errors import RollfastPluginWarning, UnknownNameError
from rollfast.registry import Contribution, hookimpl, registry

__version__ = "0.3.0"

__all__ = ["get", "available", "hookimpl", "plugins", "registry", "Contribution",
           "UnknownNameError", "RollfastPluginWarning", "apply_step", "skipped_steps", "state_shardings", "__version__"]

# Core names that import jax, resolved on first access: name -> module.
_LAZY = {"state_shardings": "rollfast.sharding", "skipped_steps": "rollfast.policy",
         "apply_step": "rollfast.policy"}


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    reg = registry()
    try:
        return reg.lookup("export", name).impl["object"]
    except LookupError:
        raise AttributeError(f"module 'rollfast' has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {r.name for r in registry().records("export")})
