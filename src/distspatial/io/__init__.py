"""Input and output: point files read in chunks (``.npy``, CSV/TSV, Parquet, LAS/LAZ), result files, generated
data sets (:mod:`distspatial.io.datasets`).

``distspatial.io`` is the public path; the readers and writers live in :mod:`distspatial.io.files`.
"""

from .files import *  # noqa: F401,F403
from .files import __all__  # noqa: F401
