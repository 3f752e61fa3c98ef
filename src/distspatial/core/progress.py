"""A small progress bar for long steps (reading files, distributing, k-means iterations, checkpoints).

    >>> with progress_bar(total=1000, desc="reading", enabled=True) as bar:    # doctest: +SKIP
    ...     for chunk in chunks:
    ...         bar.update(len(chunk))
    ...         bar.set_postfix(inertia=12.5)

It draws with ``tqdm`` when that is installed (``pip install 'distspatial[progress]'``), else with a plain
one-line updater. It is silent (a no-op object, free to call) when ``enabled`` is false or the stream is not a
terminal (logs, pipes, CI), unless ``force=True``. ``total=None`` shows a count without a percentage.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator, TextIO

__all__ = ["progress_bar", "make_bar", "ProgressBar", "NullBar", "LineBar", "is_terminal"]


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressBar:
    """What :func:`progress_bar` yields: ``update(n)``, ``set_postfix(**values)``, ``set_description(text)``,
    ``close()``, and the running ``n``."""

    n: int = 0

    def update(self, n: int = 1) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def set_postfix(self, **values: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def set_description(self, desc: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class NullBar(ProgressBar):
    """Counts but prints nothing."""

    def __init__(self, total: int | None = None, desc: str = "") -> None:
        self.total, self.desc, self.n, self.postfix = total, desc, 0, {}

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        pass


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _count(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}G"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}k"
    return f"{n:g}"


class LineBar(ProgressBar):
    """A single status line rewritten in place with ``\\r`` (at most every ``min_interval`` seconds), finished
    with a newline on ``close``: ``reading x.csv:  42% 420k/1.00M pts [1.2 s, 350k pts/s] inertia=3.2``."""

    def __init__(self, total: int | None, desc: str, stream: TextIO, unit: str = "it",
                 min_interval: float = 0.1) -> None:
        self.total, self.desc, self.stream, self.unit = total, desc, stream, unit
        self.min_interval = min_interval
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._t0 = time.monotonic()
        self._last = -float("inf")
        self._width = 0
        self._closed = False
        self._draw(force=True)

    def _line(self) -> str:
        el = time.monotonic() - self._t0
        rate = self.n / el if el > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            pct = f"{min(100.0, 100.0 * self.n / self.total):3.0f}% "
            count = f"{_count(self.n)}/{_count(self.total)} {self.unit}"
        else:
            pct, count = "", f"{_count(self.n)} {self.unit}"
        post = " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        return f"{head}{pct}{count} [{el:.1f} s, {_count(rate)} {self.unit}/s]" + (f" {post}" if post else "")

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        line = self._line()
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        try:
            self.stream.write("\r" + line + pad)
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream must not break the work
            pass

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw(force=self.total is not None and self.n >= self.total)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        self._draw()

    def set_description(self, desc: str) -> None:
        self.desc = desc
        self._draw()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._draw(force=True)
        try:
            self.stream.write("\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass


class _TqdmBar(ProgressBar):
    def __init__(self, total: int | None, desc: str, stream: TextIO, unit: str, min_interval: float) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, file=stream, unit=unit, unit_scale=True, mininterval=min_interval,
                         dynamic_ncols=True, leave=True)

    @property
    def n(self) -> int:  # type: ignore[override]
        return int(self._bar.n)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        self._bar.set_postfix({k: _fmt(v) for k, v in values.items()}, refresh=False)

    def set_description(self, desc: str) -> None:
        self._bar.set_description(desc, refresh=False)

    def close(self) -> None:
        self._bar.close()


def _have_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def make_bar(total: int | None = None, desc: str = "", enabled: bool = True, *, stream: TextIO | None = None,
             force: bool = False, unit: str = "it", backend: str = "auto", min_interval: float = 0.1) -> ProgressBar:
    """A started bar (call ``close()``); :func:`progress_bar` is the context-manager form. Arguments there."""
    stream = sys.stderr if stream is None else stream
    if not enabled or not (force or is_terminal(stream)):
        return NullBar(total, desc)
    if backend not in ("auto", "tqdm", "line"):
        raise ValueError(f"backend must be 'auto', 'tqdm' or 'line', got {backend!r}")
    if backend == "tqdm" or (backend == "auto" and _have_tqdm()):
        return _TqdmBar(total, desc, stream, unit, min_interval)
    return LineBar(total, desc, stream, unit, min_interval)


@contextlib.contextmanager
def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, *, stream: TextIO | None = None,
                 force: bool = False, unit: str = "it", backend: str = "auto",
                 min_interval: float = 0.1) -> Iterator[ProgressBar]:
    """Context manager yielding a :class:`ProgressBar`; the bar is closed (line finished) on exit.

    Args:
        total: expected count (``None``: unknown, shows only the count and rate).
        desc: label in front of the bar.
        enabled: ``False`` gives a silent bar (e.g. ``--no-progress``).
        stream: where to draw, default ``sys.stderr``.
        force: draw even when ``stream`` is not a terminal.
        unit: what is counted (``"pts"``, ``"iter"``).
        backend: ``"auto"`` (tqdm if installed, else a line), ``"tqdm"`` or ``"line"``.
        min_interval: seconds between redraws.
    """
    bar = make_bar(total, desc, enabled, stream=stream, force=force, unit=unit, backend=backend,
                   min_interval=min_interval)
    try:
        yield bar
    finally:
        bar.close()
