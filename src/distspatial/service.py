"""Public path ``distspatial.service``: the module lives in :mod:`distspatial.ui.service` (one folder per layer)."""

import sys as _sys

from .ui import service as _module

_sys.modules[__name__] = _module
