"""Public path ``distspatial.windows``: the module lives in :mod:`distspatial.live.windows` (one folder per layer)."""

import sys as _sys

from .live import windows as _module

_sys.modules[__name__] = _module
