"""The log lines of refused calls, at most a few per caller in a window, so that one client cannot
fill the server's log (or its disk) by being refused over and over."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

LINES_PER_WINDOW = 5
WINDOW_S = 10.0


@dataclass
class Window:
    start: float
    logged: int = 0
    unlogged: int = 0


class RefusalLog:
    """Logs `lines` refusals per caller per `window_s`; past that they are counted, and the count is
    one line when the caller's next window opens."""

    def __init__(
        self,
        log: Callable[[str], None],
        lines: int = LINES_PER_WINDOW,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log, self.lines, self.window_s, self.clock = log, lines, window_s, clock
        self._windows: dict[str, Window] = {}
        self._lock = threading.Lock()

    def refused(self, caller: str, message: str) -> None:
        said = []
        with self._lock:
            now = self.clock()
            window = self._windows.get(caller)
            if window is None or now - window.start >= self.window_s:
                if window is not None and window.unlogged:
                    said.append(f"edgefed: {window.unlogged:,} more refusals of {caller} were not logged")
                window = self._windows[caller] = Window(now)
            if window.logged < self.lines:
                window.logged += 1
                last = window.logged == self.lines
                said.append(
                    f"edgefed: refused: {message}"
                    + (f" (more refusals of {caller} within {self.window_s:g} s go unlogged)" if last else "")
                )
            else:
                window.unlogged += 1
        for line in said:
            self.log(line)
