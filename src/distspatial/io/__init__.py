"""Input and output: point files read in chunks (``.npy``, CSV/TSV, Parquet and GeoParquet, LAS/LAZ), result
files, GeoPandas objects in and out, generated data sets (:mod:`distspatial.io.datasets`).

``distspatial.io`` is the public path; the readers and writers live in :mod:`distspatial.io.files`, GeoParquet and
GeoPandas in :mod:`distspatial.io.geoparquet` (needs ``distspatial[geo]`` only for GeoPandas and CRS output).
"""

from .files import *  # noqa: F401,F403
from .files import __all__ as _files_all
from .geoparquet import GeoColumn, points_from_geopandas, to_geodataframe, write_geoparquet

__all__ = list(_files_all) + ["GeoColumn", "points_from_geopandas", "to_geodataframe", "write_geoparquet"]
