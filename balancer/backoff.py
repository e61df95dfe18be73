"""Restart backoff for children that exit unasked, and crash-loop detection.

One unexpected exit in `window` seconds restarts at once; each further one
doubles the wait (0.5 s, 1 s, 2 s... up to `longest`). `loop_after` exits
within the window is a crash loop: reported, and still slowed down, never
spun on.
"""

from __future__ import annotations


class Backoff:
    """When the next restart may happen, from the times of recent unexpected exits."""

    def __init__(self, window: float = 60.0, loop_after: int = 5, first: float = 0.5,
                 longest: float = 30.0) -> None:
        self.window = window
        self.loop_after = loop_after
        self.first = first
        self.longest = longest
        self.exits: list[float] = []
        self.not_before = 0.0  # monotonic time before which nothing is restarted

    def record(self, now: float) -> float:
        """Count an unexpected exit at `now`; returns the delay before the next start."""
        self.exits = [t for t in self.exits if now - t < self.window] + [now]
        n = len(self.exits)
        delay = 0.0 if n == 1 else min(self.longest, self.first * 2 ** (n - 2))
        self.not_before = now + delay
        return delay

    def recent(self, now: float | None = None) -> int:
        """Unexpected exits within the window (as of the last `record` if `now` is None)."""
        if now is None:
            return len(self.exits)
        return sum(1 for t in self.exits if now - t < self.window)

    def is_looping(self, now: float | None = None) -> bool:
        """Whether `loop_after` exits fell within the window (as of `now`, or the last one)."""
        return self.recent(now) >= self.loop_after

    def __repr__(self) -> str:
        return (f"Backoff(recent={len(self.exits)}, looping={self.is_looping()}, "
                f"not_before={self.not_before:.1f})")
