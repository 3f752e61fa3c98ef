"""OpenAPI descriptions of the HTTP service's endpoints."""

from __future__ import annotations

from ._requests import ARROW_STREAM, GEOJSON_TYPE, JSON_TYPE

# -- OpenAPI descriptions ------------------------------------------------------------------------------------------
_POINTS_SCHEMA = {
    "description": "a point [x, y, ...] or a list of points [[x, y, ...], ...]; finite numbers",
    "oneOf": [{"type": "array", "items": {"type": "number"}},
              {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}],
}
_ARROW_BODY = {"schema": {"type": "string", "format": "binary",
                          "description": "an Arrow IPC stream: a table with columns x, y[, z] (x0, x1, ... above 3-D; "
                                         "?columns= names others)"}}
_ERRORS = {
    400: {"description": "malformed JSON or Arrow body", "content": {JSON_TYPE: {"example": {"detail": "malformed "
                                                                                                      "JSON: ..."}}}},
    413: {"description": "body larger than the service's limit"},
    415: {"description": "unsupported Content-Type"},
    408: {"description": "the request body did not arrive within the body timeout (the connection is closed)"},
    422: {"description": "wrong shape, dimension or values; the detail says which"},
    503: {"description": "busy: the admission queue is full (retry after the Retry-After header's seconds); or no "
                         "data distributed yet, or partitions lost"},
    504: {"description": "not answered within the request timeout"},
}


def _doc(json_schema: dict, json_out: dict, arrow_out: str) -> dict:
    return {
        "openapi_extra": {"requestBody": {"required": True, "content": {JSON_TYPE: {"schema": json_schema},
                                                                        ARROW_STREAM: _ARROW_BODY}}},
        "responses": {200: {"description": "the answer", "content": {
            JSON_TYPE: {"schema": json_out},
            ARROW_STREAM: {"schema": {"type": "string", "format": "binary", "description": arrow_out}}}},
            **_ERRORS},
    }


_KNN_DOC = _doc(
    {"type": "object", "required": ["points", "k"], "properties": {
        "points": _POINTS_SCHEMA, "k": {"type": "integer", "minimum": 1, "description": "neighbours per point"}},
     "example": {"points": [[0.5, 0.5], [0.1, 0.2]], "k": 5}},
    {"type": "object", "properties": {"distances": {"type": "array"}, "ids": {"type": "array"}}},
    "columns query, rank (1 = nearest), id, distance",
)
_RANGE_DOC = _doc(
    {"type": "object", "required": ["points", "radius"], "properties": {
        "points": _POINTS_SCHEMA,
        "radius": {"oneOf": [{"type": "number", "minimum": 0}, {"type": "array", "items": {"type": "number"}}]}},
     "example": {"points": [[0.5, 0.5]], "radius": 0.05}},
    {"type": "object", "properties": {"ids": {"type": "array"}, "distances": {"type": "array"}}},
    "columns query, id, distance",
)
_BOX_DOC = _doc(
    {"type": "object", "required": ["lo", "hi"], "properties": {"lo": _POINTS_SCHEMA, "hi": _POINTS_SCHEMA},
     "example": {"lo": [0.1, 0.1], "hi": [0.2, 0.3]}},
    {"type": "object", "properties": {"ids": {"type": "array"}}},
    "columns query, id (request columns lo_x, lo_y, hi_x, hi_y)",
)
_POLYGON_SCHEMA = {
    "type": "object", "required": ["type"],
    "description": "a GeoJSON Polygon or MultiPolygon geometry (holes allowed), or a Feature holding one; longitude/"
                   "latitude degrees for a geographic data set (edges straight in lon/lat, as in GeoPandas). "
                   "Optional member predicate (or ?predicate=): 'within' (interior: points on an edge or vertex "
                   "are not in it; default) or 'intersects' (interior or boundary), as geopandas.sjoin",
    "properties": {"type": {"type": "string", "enum": ["Polygon", "MultiPolygon", "Feature"]},
                   "coordinates": {"type": "array"}, "geometry": {"type": "object"},
                   "properties": {"type": "object"},
                   "predicate": {"type": "string", "enum": ["within", "intersects"]}},
    "example": {"type": "Polygon", "coordinates": [[[0.1, 0.1], [0.4, 0.1], [0.4, 0.3], [0.1, 0.1]]]},
}
_POLYGON_DOC = {
    "openapi_extra": {"requestBody": {"required": True, "content": {JSON_TYPE: {"schema": _POLYGON_SCHEMA},
                                                                    GEOJSON_TYPE: {"schema": _POLYGON_SCHEMA}}}},
    "responses": {200: {"description": "the ids of the points in the polygon, sorted", "content": {
        JSON_TYPE: {"schema": {"type": "object", "properties": {
            "ids": {"type": "array", "items": {"type": "integer"}}, "count": {"type": "integer"}}}},
        ARROW_STREAM: {"schema": {"type": "string", "format": "binary", "description": "column id"}}}},
        **{k: v for k, v in _ERRORS.items() if k != 415},
        415: {"description": "a body that is not JSON (application/json or application/geo+json)"},
        501: {"description": "the service lacks shapely (pip install 'distspatial[geo]')"}},
}
#: GeoJSON members /polygon reads (collections' members too, so that their type gets the message)
_POLYGON_FIELDS = ("type", "coordinates", "geometry", "properties", "id", "bbox", "predicate", "features",
                   "geometries")
_INGEST_DOC = _doc(
    {"type": "object", "required": ["points"], "properties": {
        "points": _POINTS_SCHEMA, "ids": {"type": "array", "items": {"type": "integer"}},
        "timestamps": {"type": "array", "items": {"type": "number"}}},
     "example": {"points": [[0.5, 0.5]], "ids": [1000001]}},
    {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}},
                                      "n_points": {"type": "integer"}}},
    "column id (request: optional id and timestamp columns)",
)
