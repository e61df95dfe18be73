"""A live progress bar on stderr, driven by time estimates of each step.

On a terminal the bar redraws in place twice a second from a daemon thread;
elsewhere (CI logs) each step prints one line when it starts.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

WIDTH = 30


class Progress:
    """Tracks estimated seconds done out of an estimated total."""

    def __init__(self, total_seconds: float, stream=None, live: bool | None = None) -> None:
        self.total = max(total_seconds, 1.0)
        self.done = 0.0
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.label = ""
        self.step_started = 0.0
        self.step_estimate = 0.0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.live:
            self._thread = threading.Thread(target=self._draw_loop, daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
            self._draw(final=True)

    @contextlib.contextmanager
    def step(self, label: str, estimate: float) -> Iterator[None]:
        """One step of the run, expected to take `estimate` seconds."""
        self.label, self.step_estimate = label, estimate
        self.step_started = time.monotonic()
        if not self.live:
            print(f"[{self.percent():3.0f}%] {label}", file=self.stream, flush=True)
        try:
            yield
        finally:
            self.done += estimate
            self.step_estimate = 0.0

    def percent(self) -> float:
        inside = min(time.monotonic() - self.step_started, self.step_estimate)
        return min(100.0, 100.0 * (self.done + max(inside, 0.0)) / self.total)

    def render(self) -> str:
        """The bar as one line (no newline)."""
        percent = self.percent()
        filled = int(WIDTH * percent / 100)
        elapsed = time.monotonic() - self.started
        left = max(0.0, elapsed * (100 - percent) / percent) if percent > 1 else 0.0
        return (f"[{'#' * filled}{'-' * (WIDTH - filled)}] {percent:3.0f}% "
                f"{elapsed:5.0f}s elapsed, ~{left:4.0f}s left  {self.label[:50]:<50}")

    def _draw(self, final: bool = False) -> None:
        self.stream.write("\r" + self.render() + ("\n" if final else ""))
        self.stream.flush()

    def _draw_loop(self) -> None:
        while not self._stop.wait(0.5):
            self._draw()
