"""A dependency-free progress bar on stderr (redrawn in place on a terminal, one line per
update otherwise so logs stay readable)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, enabled) as bar: bar.step(label)`` after each unit of work."""

    def __init__(self, total: int, enabled: bool = True, stream=None, width: int = 28):
        self.total, self.enabled, self.width = max(total, 1), enabled, width
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def step(self, label: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        text = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed:5.1f}s {label}")
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
