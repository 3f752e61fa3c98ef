"""Test threads whose failures fail the test, and waiting on conditions instead of sleeping."""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any, Callable


class Worker(threading.Thread):
    """A thread that keeps what its target raised; :meth:`finish` joins it with a deadline and re-raises in the
    calling (test) thread, so an exception in a reader or writer thread cannot pass unseen.

    Daemon, so a thread that hangs cannot keep the test process alive after the test has failed.
    """

    def __init__(self, target: Callable[..., Any], *args: Any, name: str | None = None) -> None:
        super().__init__(name=name or getattr(target, "__name__", None), daemon=True)
        self._fn, self._args = target, args
        self.result: Any = None
        self.exc: BaseException | None = None
        self.tb = ""

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args)
        except BaseException as exc:  # noqa: BLE001 - everything is re-raised in the test thread
            self.exc, self.tb = exc, traceback.format_exc()

    def finish(self, timeout: float) -> Any:
        """Join within ``timeout`` seconds; fail if the thread is still running or raised. Returns its result."""
        self.join(timeout)
        assert not self.is_alive(), f"thread {self.name!r} still running {timeout} s after it was asked to stop"
        if self.exc is not None:
            raise AssertionError(f"thread {self.name!r} raised:\n{self.tb}") from self.exc
        return self.result


def start(target: Callable[..., Any], *args: Any, name: str | None = None) -> Worker:
    w = Worker(target, *args, name=name)
    w.start()
    return w


def wait_until(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.02,
               workers: tuple[Worker, ...] = ()) -> Any:
    """Poll ``cond`` until it returns a true value (returned) or fail after ``timeout`` seconds naming ``what``.

    A worker in ``workers`` that died with an exception fails the wait at once, with its traceback.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        for w in workers:
            if w.exc is not None:
                raise AssertionError(f"thread {w.name!r} raised while waiting for {what}:\n{w.tb}") from w.exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
