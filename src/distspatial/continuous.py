"""Public path ``distspatial.continuous``: the module lives in :mod:`distspatial.live.continuous` (one folder per layer)."""

import sys as _sys

from .live import continuous as _module

_sys.modules[__name__] = _module
