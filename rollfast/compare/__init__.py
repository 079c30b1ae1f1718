"""``rollfast compare``: run optimizers side by side on built-in or your own tasks.

Every optimizer is named through the registry (see :mod:`rollfast.compare.names`
for the grammar), trains on the same initialisation and data order per seed, in
jitted chunks, with compile time measured apart. See ``docs/compare.md``.

This subpackage imports jax; ``import rollfast`` does not import it.

>>> from rollfast.compare import Task, parse
>>> parse("kron:EXP").mode
'EXP'
"""

from rollfast.compare.names import Spec, parse, parse_all
from rollfast.compare.session import Options, compare
from rollfast.compare.protocol import Task
from rollfast.compare.tasks import get_task

__all__ = ["Task", "Spec", "Options", "parse", "parse_all", "compare", "get_task"]
