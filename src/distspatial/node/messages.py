"""Node messages: how a node method counts what it receives and sends (:func:`data_message`), and the
:data:`Segment` addressing rows of a call to partitions."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..core.codec import decode_all, encode_all, message_bytes

__all__ = ["Segment", "data_message"]

#: ``(partition_id, start, stop)``: rows ``start:stop`` of a call's query array are addressed to that partition.
Segment = tuple[int, int, int]

F = TypeVar("F", bound=Callable[..., Any])


def data_message(compress_result: bool = False) -> Callable[[F], F]:
    """Mark a node method as a data message: count it, decode compressed arguments, maybe compress the result.

    Bytes are counted with :func:`~distspatial.core.codec.message_bytes` on the arguments as they arrived
    (compressed size where compressed) and on the result as it leaves, the same function the coordinator
    uses on its side, so the totals of all parties add up. Control calls (``ping``, ``stats``, ``clear``,
    ``drop_partitions``, ``split_partition``, ``kmeans_end``) are not data messages and are not counted.
    With ``compress_result`` (query answers) and compression on, large result arrays are encoded.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            received = message_bytes(args, kwargs)
            result = fn(self, *decode_all(args), **kwargs)
            if compress_result and self.compress:
                result = encode_all(result)
            out, raw = message_bytes(result), message_bytes(result, raw=True)
            with self._lock:  # queries run in their own thread (concurrency group "reads")
                c = self.counters
                c["calls"] += 1
                c["busy_s"] += time.perf_counter() - t0
                c["bytes_in"] += received
                c["bytes_out"] += out
                c["raw_bytes_out"] += raw
            return result

        return method  # type: ignore[return-value]

    return wrap
