"""Public path ``distspatial.datasets``: the module lives in :mod:`distspatial.io.datasets` (one folder per layer)."""

import sys as _sys

from .io import datasets as _module

_sys.modules[__name__] = _module
