"""Public path ``distspatial.streaming``: the module lives in :mod:`distspatial.live.streaming` (one folder per layer)."""

import sys as _sys

from .live import streaming as _module

_sys.modules[__name__] = _module
