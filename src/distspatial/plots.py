"""Public path ``distspatial.plots``: the module lives in :mod:`distspatial.ui.plots` (one folder per layer)."""

import sys as _sys

from .ui import plots as _module

_sys.modules[__name__] = _module
