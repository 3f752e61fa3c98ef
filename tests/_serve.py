"""`distspatial serve` as a real process: start it, wait for the URL it prints, stop it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


class ServeProcess:
    """``distspatial serve ARGS`` in a subprocess; :attr:`url` once it printed "serving on URL"."""

    def __init__(self, args: list[str], env: dict | None = None, timeout_s: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "distspatial.ui.cli", "serve", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                        daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        self.url = None
        while self.url is None and time.monotonic() < deadline and self.proc.poll() is None:
            self.url = next((ln.split("serving on ")[1].split()[0] for ln in list(self.lines) if "serving on " in ln),
                            None)
            time.sleep(0.1)
        if self.url is None:
            self.kill()
            raise AssertionError(f"no 'serving on' line; exit {self.proc.poll()}; output:\n{self.output}")

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
